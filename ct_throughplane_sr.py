"""Through-plane (z) super-resolution of CT volumes in HU (seed 004): a SimpleUNet3D baseline and a 3-D
latent diffusion model (KL-VAE + ResShift residual shifting + ControlNet conditioning, optional CFG).

Training pairs come from high-resolution (HR) volumes by a slice-profile simulation (blur along z, resample
to the target spacing); with `data.in_plane_hr` the in-plane axes are HR directions too (SMORE), so 1.25-5 mm
clinical volumes train as well. Outputs keep the input's orientation and in-plane grid; only the slice axis
(found from the affine) is resampled.

Usage:
  python ct_throughplane_sr.py prepare --input /data/lidc_dicom --out data/ct   # NIfTI in HU + patient split
  python ct_throughplane_sr.py train --model unet3d --out runs/unet3d [--data data/ct]   # default: phantoms
  python ct_throughplane_sr.py train --model vae --out runs/vae [--data data/ct]
  python ct_throughplane_sr.py train --model ldm --vae runs/vae/best.pt --out runs/ldm
  python ct_throughplane_sr.py upsample --checkpoint runs/unet3d/best.pt --input lr.nii.gz --output sr.nii.gz
  python ct_throughplane_sr.py upsample --checkpoint CKPT --input lr_dicom/ --output sr.nii.gz   # + sr_dicom/
  python ct_throughplane_sr.py evaluate --input hr.nii.gz --unet runs/unet3d/best.pt --ldm runs/ldm/best.pt
  torchrun --nproc_per_node 2 ct_throughplane_sr.py train --model unet3d --preset tiny --out runs/ddp
Every command takes --config (repeatable), --preset full|small|tiny, --set section.key=value, --device.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import resource
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import typer
from scipy import ndimage
from scipy.interpolate import make_interp_spline

from common import UserError, dicom_io, losses, metrics, nifti_io, runtime, synthetic, viz, volume
from common.config import config_from_dict, config_to_dict, default_config_path, load_config
from common.metrics import hu_to_unit, unit_to_hu

SCRIPT = Path(__file__).stem
NO_DATA_HU = -1100.0  # below air: scanner padding outside the field of view (-3024, -2000, ...), never tissue

# --- config ---


@dataclass
class DataConfig:
    path: str | None = None  # folder written by `prepare` (train/val/test.txt); None: synthetic phantoms
    hr_spacing_mm: float = 1.0  # HR volumes are resampled to it along z: the model's output spacing
    target_spacing_mm: float = 3.0  # simulated LR slice spacing
    target_thickness_mm: float = 3.0  # FWHM of the slice sensitivity profile
    profile: str = "gaussian"  # gaussian | rect
    in_plane_hr: bool = True  # in-plane axes fine enough for hr_spacing_mm are HR training directions too
    hu_range: tuple[float, float] = (-1024.0, 3072.0)  # maps linearly to [-1, 1]; outputs map back exactly
    patch_size: tuple[int, int, int] = (32, 128, 128)  # HR training patch (z, y, x) in voxels
    phantom_shape: tuple[int, int, int] = (96, 192, 192)  # synthetic HR volume (z, y, x); z at hr_spacing_mm
    phantom_pixel_mm: float = 1.5
    phantom_noise_hu: float = 15.0  # Gaussian noise on synthetic HR volumes (real CT is never noise-free)
    phantom_train: int = 16
    phantom_val: int = 2


@dataclass
class UNetConfig:
    channels: list[int] = field(default_factory=lambda: [8, 16, 32, 64])  # 4 levels, ~0.33 M parameters


@dataclass
class VAEConfig:
    channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512])  # 3 downsamplings: f = 8
    latent_channels: int = 4
    kl_weight: float = 1e-6


@dataclass
class LDMConfig:
    channels: list[int] = field(default_factory=lambda: [128, 256, 512])
    num_res_blocks: int = 2
    timesteps: int = 15  # ResShift: 15 residual-shifting steps
    kappa: float = 2.0
    eta_power: float = 0.3
    eta_max: float = 0.999
    cond_dropout: float = 0.1  # classifier-free guidance: drop the ControlNet condition in training


@dataclass
class TrainConfig:
    max_steps: int = 20000
    batch_size: int = 2
    lr: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    loss_window_hu: tuple[float, float] = (-1024.0, 2048.0)  # HU-aware L1 + SSIM + gradient in this window
    loss_l1: float = 1.0
    loss_ssim: float = 0.1
    loss_gradient: float = 0.1
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 1000  # also the validation interval: best.pt = EMA weights of the best val loss
    val_batches: int = 8  # fixed validation batches from val.txt (or the validation phantoms)
    amp: str = "auto"
    compile: str = "auto"
    channels_last: str = "auto"


@dataclass
class InferConfig:
    patch_lr: tuple[int, int, int] = (16, 192, 192)  # LR slices, rows, cols per patch (bounds memory)
    overlap: float = 0.25  # fraction of a patch shared with its neighbour, 0 <= overlap < 1
    sample_steps: int = 15  # ResShift sampling steps on the trailing grid (<= ldm.timesteps)
    guidance_scale: float = 1.0  # 1 = plain conditional sampling; > 1 = classifier-free guidance
    window_hu: tuple[float, float] = (-1000.0, 1000.0)  # evaluation window for PSNR/SSIM
    mask_threshold_hu: float = -500.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    ldm: LDMConfig = field(default_factory=LDMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)


# --- geometry: the slice axis from the affine, permutations, the output grid ---


def slice_axis(affine: np.ndarray) -> int:
    """Array axis of `Volume.hu` (0 = k, 1 = j, 2 = i) that holds the slices: the clearly coarsest spacing;
    for a near-isotropic volume the voxel axis closest to the patient's head-foot direction (axial CT)."""
    columns = np.asarray(affine, np.float64)[:3, 2::-1]  # k, j, i: the hu axes' directions
    spacing = np.linalg.norm(columns, axis=0)
    coarsest = int(np.argmax(spacing))
    if spacing[coarsest] > 1.1 * np.delete(spacing, coarsest).max():
        return coarsest
    return int(np.argmax(np.abs(columns[2]) / spacing))


def axis_first(vol: nifti_io.Volume, axis: int, back: bool = False) -> nifti_io.Volume:
    """`vol` with hu axis `axis` moved first, the affine's columns following; `back=True` undoes it."""
    order = [axis] + [a for a in range(3) if a != axis]
    order = [int(i) for i in np.argsort(order)] if back else order
    affine = np.array(vol.affine, np.float64)
    affine[:3, :3] = affine[:3, [2 - order[2 - c] for c in range(3)]]
    return nifti_io.Volume(np.ascontiguousarray(vol.hu.transpose(order)), affine, vol.meta)


def check_geometry(affine: np.ndarray, source) -> None:
    """One warning line for a sheared (e.g. gantry-tilted) or oblique slice stack; the output keeps it."""
    what = volume.obliqueness(affine)
    if what:
        warnings.warn(
            f"{source}: {what}; the output keeps this grid, resampled along its slice axis", stacklevel=2
        )


def output_positions(n_in: int, factor: float) -> np.ndarray:
    """Output slice m sits at input slice index offset + m / factor: the spacing divides by `factor` and the
    grid is centred on the input's extent (offset 0 when (n_in - 1) * factor is a whole number)."""
    n_out = int(math.floor((n_in - 1) * factor + 1e-6)) + 1
    return ((n_in - 1) - (n_out - 1) / factor) / 2 + np.arange(n_out) / factor


def resampled_affine(affine: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Affine of slices at `positions` (evenly spaced input slice indices): only the slice column scales."""
    new = np.array(affine, np.float64)
    new[:3, 3] += new[:3, 2] * positions[0]
    new[:3, 2] *= positions[1] - positions[0] if len(positions) > 1 else 1.0
    return new


def no_data_mask(vol: nifti_io.Volume) -> np.ndarray:
    """Scanner padding, 'no data' everywhere: values below air, a DICOM series' declared PixelPaddingValue."""
    datasets = vol.meta.get("datasets")
    declared = dicom_io.padding_mask(vol.hu, datasets[0]) if datasets else None
    return (vol.hu < NO_DATA_HU) | (False if declared is None else declared)


# --- data: slice-profile simulation, volumes, random patches ---


def ssp_kernel(fwhm_vox: float, profile: str) -> np.ndarray:
    """Slice sensitivity profile on the HR grid; a rect of non-integer width gets partial end weights."""
    if profile == "gaussian":
        sigma = max(fwhm_vox, 1e-6) / (2 * math.sqrt(2 * math.log(2)))
        offsets = np.arange(-math.ceil(4 * sigma), math.ceil(4 * sigma) + 1, dtype=np.float64)
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    elif profile == "rect":
        half = max(fwhm_vox, 1.0) / 2
        offsets = np.arange(-math.ceil(half - 0.5), math.ceil(half - 0.5) + 1, dtype=np.float64)
        kernel = np.clip(np.minimum(offsets + 0.5, half) - np.maximum(offsets - 0.5, -half), 0, None)
    else:
        raise UserError(f"config: data.profile must be gaussian or rect, got '{profile}'")
    return (kernel / kernel.sum()).astype(np.float32)


def sample_z(vol: np.ndarray, positions: np.ndarray, cubic: bool = False) -> np.ndarray:
    """`lerp_z` or (`cubic`) `spline_z` of a (z, y, x) array at fractional slice indices `positions`."""
    vol = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[None, None]
    positions = torch.as_tensor(np.asarray(positions, np.float64))
    return (spline_z if cubic else lerp_z)(vol, positions)[0, 0].numpy()


def simulate_thick_slices(hu: np.ndarray, spacing_z_mm: float, cfg: DataConfig, start: float = 0.0):
    """Blur along z by the slice profile, resample at HR slices `start + j * ratio`: (LR, those positions)."""
    kernel = ssp_kernel(cfg.target_thickness_mm / spacing_z_mm, cfg.profile)
    blurred = ndimage.correlate1d(np.asarray(hu, np.float32), kernel, axis=0, mode="nearest")
    ratio = cfg.target_spacing_mm / spacing_z_mm
    positions = start + ratio * np.arange(int(math.floor((hu.shape[0] - 1 - start) / ratio + 1e-6)) + 1)
    return sample_z(blurred, positions), positions


def compact(hu: np.ndarray) -> np.ndarray:
    """Integer HU volumes are kept as int16 in memory (half the RAM of float32, still exact)."""
    exact = np.array_equal(hu, np.rint(hu)) and hu.min() >= -32768 and hu.max() <= 32767
    return hu.astype(np.int16 if exact else np.float32)


def phantom(cfg: DataConfig, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hu = synthetic.ct_phantom_volume(tuple(cfg.phantom_shape), rng)
    return compact(np.rint(hu + rng.normal(0, cfg.phantom_noise_hu, hu.shape)))


def hr_views(vol: nifti_io.Volume, cfg: DataConfig, source) -> list[np.ndarray]:
    """HR training views of one volume at hr_spacing_mm along axis 0: its slice axis if fine enough and
    (data.in_plane_hr: SMORE, Zhao 2020) each fine in-plane axis. Padding becomes air, as in `upsample_hu`."""
    hu = np.where(no_data_mask(vol), -1000.0, vol.hu).astype(np.float32)
    vol = axis_first(nifti_io.Volume(hu, vol.affine, {}), slice_axis(vol.affine))
    views = []
    for axis in (0, 1, 2) if cfg.in_plane_hr else (0,):
        view = axis_first(vol, axis)
        spacing, n = view.spacing_mm[0], view.hu.shape[0]
        if spacing <= cfg.hr_spacing_mm * 1.05 and n > 1:
            views.append(compact(sample_z(view.hu, np.arange(0, n - 1 + 1e-6, cfg.hr_spacing_mm / spacing))))
        elif axis == 0:
            skipped = "not an HR training direction" + ("" if cfg.in_plane_hr else "; volume skipped")
            msg = f"slice spacing {spacing:.2f} mm > data.hr_spacing_mm {cfg.hr_spacing_mm}: {skipped}"
            warnings.warn(f"{source}: {msg}", stacklevel=2)
    return views


def load_volumes(cfg: DataConfig, split: str, seed: int) -> tuple[list[np.ndarray], str]:
    """HR volumes (z, y, x) at hr_spacing_mm along z: synthetic phantoms or the files of a `prepare` split."""
    if cfg.path is None:
        count, offset = (cfg.phantom_train, seed * 1000) if split == "train" else (cfg.phantom_val, 10**6)
        vols = [phantom(cfg, offset + i) for i in range(count)]
        return vols, f"{count} synthetic phantoms {tuple(cfg.phantom_shape)}, noise {cfg.phantom_noise_hu} HU"
    split_file = Path(cfg.path) / f"{split}.txt"
    if not split_file.is_file():
        raise UserError(f"{split_file}: no split file; run `prepare --input FOLDER --out {cfg.path}`")
    vols = []
    for line in split_file.read_text().split():
        path = Path(line) if Path(line).is_absolute() else Path(cfg.path) / line
        vols += hr_views(nifti_io.read_volume(path, "CT"), cfg, path)
    if not vols and split == "train":
        raise UserError(f"{split_file}: no volume has an axis with spacing <= {cfg.hr_spacing_mm} mm")
    return vols, f"{len(vols)} HR views of the volumes in {split_file}"


def random_batch(vols: list[np.ndarray], cfg: Config, batch: int, rng: np.random.Generator, device):
    """Normalised LR patches simulated on the fly (blur + resample of a z-slab with the kernel's margin: equal
    to the whole-volume simulation), HR targets at the output positions, and those positions."""
    dc, ratio = cfg.data, cfg.data.target_spacing_mm / cfg.data.hr_spacing_mm
    shape = np.min([v.shape for v in vols], axis=0)  # the configured patch, cut to fit every volume
    pz, py, px = (int(min(p, s)) for p, s in zip(dc.patch_size, shape))
    d_lr = int(math.floor((pz - 1) / ratio + 1e-6)) + 1
    if d_lr < 2:
        raise UserError(f"volumes of {shape[0]} HR slices are too thin for two LR slices at x{ratio:g}")
    positions = output_positions(d_lr, ratio)
    radius = len(ssp_kernel(dc.target_thickness_mm / dc.hr_spacing_mm, dc.profile)) // 2 + 1
    lrs, hrs = [], []
    for _ in range(batch):
        vol = vols[rng.integers(len(vols))]
        z_start = rng.integers(int(math.floor((vol.shape[0] - 1) / ratio + 1e-6)) + 2 - d_lr) * ratio
        y0, x0 = rng.integers(vol.shape[1] - py + 1), rng.integers(vol.shape[2] - px + 1)
        lo = max(0, int(z_start) - radius)
        hi = min(vol.shape[0], int(math.ceil(z_start + positions[-1] * ratio)) + radius + 1)
        slab = vol[lo:hi, y0 : y0 + py, x0 : x0 + px].astype(np.float32)
        lrs.append(simulate_thick_slices(slab, dc.hr_spacing_mm, dc, z_start - lo)[0][:d_lr])
        hrs.append(sample_z(slab, z_start - lo + positions * ratio))
    lr, hr = (hu_to_unit(torch.from_numpy(np.stack(a)[:, None]), dc.hu_range).to(device) for a in (lrs, hrs))
    return lr, hr, torch.from_numpy(positions).to(device)


# --- models ---


def lerp_z(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, C, len(positions), H, W): linear interpolation at fractional slice indices."""
    p = positions.to(x.device, torch.float64).clamp(0, x.shape[2] - 1)
    i0 = p.floor().long()
    i1 = (i0 + 1).clamp(max=x.shape[2] - 1)
    w = (p - i0).to(x.dtype).view(1, 1, -1, 1, 1)
    return x.index_select(2, i0) * (1 - w) + x.index_select(2, i1) * w


def spline_z(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Cubic spline along z (not-a-knot, scipy) as a (positions x slices) matrix; linear below 4 slices."""
    n = x.shape[2]
    if n < 4:
        return lerp_z(x, positions)
    weights = make_interp_spline(np.arange(n), np.eye(n), k=3, axis=0)(positions.cpu().numpy())
    return torch.einsum("nd,bcdhw->bcnhw", torch.from_numpy(weights).to(x), x)


def pad_to(x: torch.Tensor, multiples: tuple[int, int, int]) -> tuple[torch.Tensor, tuple[int, int, int]]:
    pads = [(-s) % m for s, m in zip(x.shape[2:], multiples)]
    return F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate"), tuple(x.shape[2:])


def zeroed(conv: nn.Conv3d) -> nn.Conv3d:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def conv_relu(cin: int, cout: int, stride=1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1), nn.ReLU(inplace=True))


class SimpleUNet3D(nn.Module):
    """Encoder-decoder on the LR grid (strided in-plane only: few slices), features interpolated to the output
    slices, a head adds a residual to the z cubic spline; its last conv starts at zero: untrained = spline."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        ch = cfg.channels
        self.multiple = 2 ** (len(ch) - 1)
        self.inc = nn.Sequential(conv_relu(1, ch[0]), conv_relu(ch[0], ch[0]))
        self.downs = nn.ModuleList(
            nn.Sequential(conv_relu(ch[i], ch[i + 1], (1, 2, 2)), conv_relu(ch[i + 1], ch[i + 1]))
            for i in range(len(ch) - 1)
        )
        self.ups = nn.ModuleList(conv_relu(ch[i + 1] + ch[i], ch[i]) for i in range(len(ch) - 1))
        self.head = nn.Sequential(conv_relu(ch[0], ch[0]), zeroed(nn.Conv3d(ch[0], 1, 3, 1, 1)))

    def forward(self, lr: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, (_, h, w) = pad_to(lr, (1, self.multiple, self.multiple))
        feat, skips = self.inc(x), []
        for down in self.downs:
            skips.append(feat)
            feat = down(feat)
        for up in reversed(self.ups):
            skip = skips.pop()
            feat = up(torch.cat([F.interpolate(feat, size=skip.shape[2:], mode="trilinear"), skip], 1))
        out = spline_z(x, positions) + self.head(lerp_z(feat, positions))
        return out[..., :h, :w]


def norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with min(32, ch // 4) groups, lowered to a divisor of ch (one group below 8 channels)."""
    groups = max(1, min(32, ch // 4))
    while ch % groups:
        groups -= 1
    return nn.GroupNorm(groups, ch)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_dim: int = 0):
        super().__init__()
        self.block1 = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv3d(cin, cout, 3, 1, 1))
        self.temb = nn.Linear(temb_dim, cout) if temb_dim else None
        self.block2 = nn.Sequential(norm(cout), nn.SiLU(), nn.Conv3d(cout, cout, 3, 1, 1))
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb=None):
        h = self.block1(x)
        if self.temb is not None:
            h = h + self.temb(temb)[:, :, None, None, None]
        return self.skip(x) + self.block2(h)


def up_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(cin, cout, 3, 1, 1))


class VAE3D(nn.Module):
    """3-D KL autoencoder (SD-style): one residual block per level, stride-2 downsampling in all axes."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, zc = cfg.channels, cfg.latent_channels
        self.factor = 2 ** (len(ch) - 1)
        enc = [nn.Conv3d(1, ch[0], 3, 1, 1)]
        for a, b in zip(ch, ch[1:]):
            enc += [ResBlock(a, a), nn.Conv3d(a, b, 3, 2, 1)]
        enc += [ResBlock(ch[-1], ch[-1]), ResBlock(ch[-1], ch[-1]), norm(ch[-1]), nn.SiLU()]
        self.encoder = nn.Sequential(*enc, nn.Conv3d(ch[-1], 2 * zc, 3, 1, 1))
        dec = [nn.Conv3d(zc, ch[-1], 3, 1, 1), ResBlock(ch[-1], ch[-1])]
        for a, b in zip(ch[::-1], ch[-2::-1]):
            dec += [ResBlock(a, a), up_conv(a, b)]
        dec += [ResBlock(ch[0], ch[0]), norm(ch[0]), nn.SiLU(), nn.Conv3d(ch[0], 1, 3, 1, 1)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x):
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)

    def forward(self, x):
        mean, logvar = self.encode(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
        return self.decoder(z), kl


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[sin, cos] with frequencies 10000^(-i / (dim/2)): diffusers' get_timestep_embedding with
    flip_sin_to_cos=False, downscale_freq_shift=0."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], 1)


class LatentEncoder(nn.Module):
    """Time embedding + down path + middle of the latent UNet: the part ControlNet copies."""

    def __init__(self, cfg: LDMConfig, latent_channels: int):
        super().__init__()
        ch, nb = cfg.channels, cfg.num_res_blocks
        self.base, temb_dim = ch[0], 4 * ch[0]
        self.time_mlp = nn.Sequential(nn.Linear(ch[0], temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv3d(latent_channels, ch[0], 3, 1, 1)
        self.levels = nn.ModuleList(
            nn.ModuleList(ResBlock(ch[i], ch[i], temb_dim) for _ in range(nb)) for i in range(len(ch))
        )
        self.downsamples = nn.ModuleList(nn.Conv3d(ch[i], ch[i + 1], 3, 2, 1) for i in range(len(ch) - 1))
        self.mid = nn.ModuleList(ResBlock(ch[-1], ch[-1], temb_dim) for _ in range(2))

    def forward(self, x, t):
        temb = self.time_mlp(timestep_embedding(t, self.base))
        h = self.conv_in(x)
        skips = []
        for i, blocks in enumerate(self.levels):
            for block in blocks:
                h = block(h, temb)
            skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
        for block in self.mid:
            h = block(h, temb)
        return temb, skips + [h]


class LatentDenoiser(nn.Module):
    """Latent UNet predicting x0; ControlNet: an encoder copy reads x_t + zero_conv(LR latent) and adds to the
    skips and middle through zero convs, so training starts unconditional. Zero condition = CFG's uncond."""

    def __init__(self, cfg: LDMConfig, latent_channels: int):
        super().__init__()
        ch, nb, temb_dim = cfg.channels, cfg.num_res_blocks, 4 * cfg.channels[0]
        self.encoder = LatentEncoder(cfg, latent_channels)
        self.ups = nn.ModuleList(
            nn.ModuleList(ResBlock((1 + (j == 0)) * ch[i], ch[i], temb_dim) for j in range(nb))
            for i in range(len(ch))
        )
        self.upsamples = nn.ModuleList(up_conv(ch[i + 1], ch[i]) for i in range(len(ch) - 1))
        self.out = nn.Sequential(norm(ch[0]), nn.SiLU(), nn.Conv3d(ch[0], latent_channels, 3, 1, 1))
        self.control = copy.deepcopy(self.encoder)
        self.control_in = zeroed(nn.Conv3d(latent_channels, latent_channels, 1))
        self.control_out = nn.ModuleList(zeroed(nn.Conv3d(c, c, 1)) for c in [*ch, ch[-1]])
        self.multiple = 2 ** (len(ch) - 1)

    def forward(self, x_t, t, cond):
        _, control = self.control(x_t + self.control_in(cond), t)
        temb, feats = self.encoder(x_t, t)
        feats = [f + conv(c) for f, conv, c in zip(feats, self.control_out, control)]
        h = feats[-1]
        for i in reversed(range(len(self.ups))):
            h = torch.cat([h, feats[i]], 1)
            for block in self.ups[i]:
                h = block(h, temb)
            if i > 0:
                h = self.upsamples[i - 1](h)
        return self.out(h)


# --- diffusion: ResShift residual shifting ---


def trailing_timesteps(T: int, steps: int) -> np.ndarray:
    """diffusers' 'trailing' spacing: exactly `steps` distinct timesteps from T - 1 down to 0."""
    if not 1 <= steps <= T:
        raise UserError(f"config: infer.sample_steps must be between 1 and ldm.timesteps ({T}), got {steps}")
    # np.round(np.arange(T, 0, -T / steps)) - 1, minus arange's float end point (an extra -1 for some steps)
    return (np.round(T - np.arange(steps) * T / steps) - 1).astype(np.int64)


class ResShift:
    """x_t = x0 + eta_t (y0 - x0) + kappa sqrt(eta_t) noise: the chain moves from the HR latent x0 towards
    the interpolated-LR latent y0 in T steps (Yue et al., ResShift): sampling starts near y0, not at noise."""

    def __init__(self, cfg: LDMConfig, device: torch.device):
        self.T, self.kappa = cfg.timesteps, cfg.kappa
        eta_1 = min((0.04 / cfg.kappa) ** 2, 0.001)  # geometric from eta_1 to eta_max, warped by eta_power
        fraction = (np.arange(self.T) / (self.T - 1)) ** cfg.eta_power
        self.eta = torch.tensor(eta_1 * (cfg.eta_max / eta_1) ** fraction, dtype=torch.float32, device=device)

    def q_sample(self, x0, y0, t, noise):
        eta = self.eta[t].view(-1, 1, 1, 1, 1)
        return x0 + eta * (y0 - x0) + self.kappa * eta.sqrt() * noise

    @torch.no_grad()
    def sample(self, predict_x0, y0: torch.Tensor, steps: int, generator: torch.Generator | None = None):
        """Posterior q(x_s | x_t, x0) between trailing-grid steps t > s: mean r x_t + (1 - r) x0 with
        r = eta_s/eta_t, variance kappa^2 r (eta_t - eta_s). Noise drawn on the CPU: alike on every device."""
        grid = trailing_timesteps(self.T, steps)
        x = y0 + self.kappa * self.eta[grid[0]].sqrt() * torch.randn(y0.shape, generator=generator).to(y0)
        for t, s in zip(grid, [*grid[1:], -1]):
            x0 = predict_x0(x, torch.full((y0.shape[0],), int(t), device=y0.device, dtype=torch.long))
            if s >= 0:  # the last step returns the predicted x0
                ratio = self.eta[s] / self.eta[t]
                std = self.kappa * (ratio * (self.eta[t] - self.eta[s])).sqrt()
                x = ratio * x + (1 - ratio) * x0 + std * torch.randn(y0.shape, generator=generator).to(y0)
        return x0


def guided_x0(net, x, t, y0, scale: float):
    """Classifier-free guidance: x0_uncond + scale * (x0_cond - x0_uncond); zero condition = unconditional."""
    cond = net(x, t, y0)
    if scale == 1.0:
        return cond
    uncond = net(x, t, torch.zeros_like(y0))
    return uncond + scale * (cond - uncond)


# --- inference: overlapping patches blended with a Gaussian window ---


def patch_starts(n: int, patch: int, overlap: float, min_shared: int = 0) -> tuple[list[int], int]:
    """Patch origins covering 0..n-1; neighbours share at least `min_shared` voxels (z needs 1: an output
    slice between two LR slices must lie inside some patch)."""
    if not 0 <= overlap < 1:
        raise UserError(f"config: infer.overlap must be in [0, 1), got {overlap}")
    if n <= patch:
        return [0], n
    step = max(1, min(patch - min_shared, int(round(patch * (1 - overlap)))))
    return sorted({*range(0, n - patch, step), n - patch}), patch


def gauss_window(coords: np.ndarray, patch: int) -> np.ndarray:
    sigma = max(patch / 8, 0.5)  # nnU-Net's 1/8 of the patch: patch centres dominate, seams vanish
    return np.exp(-0.5 * ((coords - (patch - 1) / 2) / sigma) ** 2).astype(np.float64)


def blend_patches(lr: np.ndarray, positions: np.ndarray, predict, patch_lr, overlap: float) -> np.ndarray:
    """`predict(lr_patch (1,1,d,h,w), rel_positions) -> (n, h, w)` on overlapping LR patches, Gauss-blended.
    Patches form a grid, so the weight sum is separable: memory is input, output and one patch."""
    n_lr, ny, nx = lr.shape
    zs, pz = patch_starts(n_lr, patch_lr[0], overlap, min_shared=1)
    ys, py = patch_starts(ny, patch_lr[1], overlap)
    xs, px = patch_starts(nx, patch_lr[2], overlap)
    out = np.zeros((len(positions), ny, nx), np.float32)
    gy, gx = gauss_window(np.arange(py), py), gauss_window(np.arange(px), px)
    wy = sum(np.pad(gy, (y0, ny - py - y0)) for y0 in ys)  # the weight sums are separable
    wx = sum(np.pad(gx, (x0, nx - px - x0)) for x0 in xs)
    wz = np.zeros(len(positions))
    for z0 in zs:
        m_lo = int(np.searchsorted(positions, z0 - 1e-6))
        m_hi = int(np.searchsorted(positions, z0 + pz - 1 + 1e-6))
        rel = positions[m_lo:m_hi] - z0
        w_z = gauss_window(rel, pz)
        wz[m_lo:m_hi] += w_z
        w = (w_z[:, None, None] * gy[None, :, None] * gx[None, None, :]).astype(np.float32)
        for y0 in ys:
            for x0 in xs:
                patch = np.ascontiguousarray(lr[z0 : z0 + pz, y0 : y0 + py, x0 : x0 + px])
                pred = predict(torch.from_numpy(patch)[None, None], torch.from_numpy(rel))
                out[m_lo:m_hi, y0 : y0 + py, x0 : x0 + px] += np.asarray(pred, np.float32) * w
    plane = np.outer(wy, wx)
    for m in range(len(positions)):
        out[m] /= (wz[m] * plane).astype(np.float32)
    return out


def upsample_hu(hu: np.ndarray, positions: np.ndarray, predict, cfg: Config, no_data=None) -> np.ndarray:
    """HU in, HU out at `positions` (input slice indices). 'No data' voxels (padding; default: below
    NO_DATA_HU) are shown to the model as air, as in training, and restored from the nearest input slice."""
    no_data = hu < NO_DATA_HU if no_data is None else no_data
    norm_lr = hu_to_unit(np.where(no_data, -1000.0, hu).astype(np.float32), cfg.data.hu_range)
    with torch.no_grad():  # predict() may be any model: no autograd graph at inference
        blended = blend_patches(norm_lr, positions, predict, cfg.infer.patch_lr, cfg.infer.overlap)
    out = unit_to_hu(blended, cfg.data.hu_range)
    for m, k in enumerate(np.rint(positions).astype(np.int64)):
        out[m][no_data[k]] = hu[k][no_data[k]]
    return (np.rint(out) if np.array_equal(hu, np.rint(hu)) else out).astype(np.float32)


def load_checkpoint_cfg(checkpoint: Path, kinds: tuple[str, ...]) -> tuple[dict, Config]:
    state = runtime.load_checkpoint(checkpoint, SCRIPT)
    if state.get("kind") not in kinds:
        raise UserError(f"{checkpoint}: a '{state.get('kind')}' checkpoint; expected {' or '.join(kinds)}")
    try:
        return state, config_from_dict(Config, state["config"])
    except (KeyError, UserError) as exc:
        raise UserError(f"{checkpoint}: checkpoint config does not match this script ({exc})") from None


def load_weights(model: nn.Module, weights: dict, checkpoint: Path) -> nn.Module:
    weights = {k.removeprefix("module."): v for k, v in weights.items() if k != "n_averaged"}
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise UserError(f"{checkpoint}: weights do not match the model ({str(exc)[:120]})") from None
    return model


def build_model(kind: str, cfg: Config) -> nn.Module:
    if kind == "unet3d":
        return SimpleUNet3D(cfg.unet)
    if kind == "vae":
        return VAE3D(cfg.vae)
    return LatentDenoiser(cfg.ldm, cfg.vae.latent_channels)


class Predictor:
    """A trained model as `predictor(lr_patch, rel_positions) -> (n, h, w)` in normalised units (call it
    under no_grad). For the LDM, `roundtrip=True` gives the VAE's encode-decode of the input: its ceiling."""

    def __init__(self, checkpoint: Path, infer: InferConfig, device: torch.device, roundtrip: bool = False):
        self.state, self.cfg = load_checkpoint_cfg(checkpoint, ("unet3d", "ldm"))
        self.cfg.infer, self.device, self.roundtrip, self.kind = infer, device, roundtrip, self.state["kind"]
        model = load_weights(build_model(self.kind, self.cfg), self.state["ema"], checkpoint)
        self.model = model.to(device).eval()
        if self.kind == "ldm":
            self.vae = load_weights(VAE3D(self.cfg.vae), self.state["vae"], checkpoint).to(device).eval()
            self.schedule, self.scale = ResShift(self.cfg.ldm, device), float(self.state["latent_scale"])
            self.generator = torch.Generator().manual_seed(self.cfg.train.seed)
            trailing_timesteps(self.cfg.ldm.timesteps, infer.sample_steps)  # a bad count fails here, early

    def __call__(self, lr: torch.Tensor, rel: torch.Tensor) -> np.ndarray:
        lr, rel = lr.to(self.device), rel.to(self.device)
        if self.kind == "unet3d":
            return self.model(lr, rel)[0, 0].float().cpu().numpy()
        x, size = pad_to(lerp_z(lr, rel), (self.vae.factor * self.model.multiple,) * 3)
        y0 = self.vae.encode(x)[0] * self.scale
        if not self.roundtrip:
            predict_x0 = functools.partial(guided_x0, self.model, y0=y0, scale=self.cfg.infer.guidance_scale)
            y0 = self.schedule.sample(predict_x0, y0, self.cfg.infer.sample_steps, self.generator)
        out = self.vae.decoder(y0 / self.scale)
        return out[0, 0, : size[0], : size[1], : size[2]].float().cpu().numpy()


# --- train ---


def load_vae(checkpoint: Path | None, cfg: Config, vols, device) -> tuple[VAE3D, float]:
    """The frozen VAE for LDM training (its config replaces cfg.vae: the LDM checkpoint is self-contained) and
    the latent scale: 1 / std of HR latents on a fixed batch (the same on every DDP rank)."""
    if checkpoint is None:
        raise UserError("train --model ldm needs --vae CHECKPOINT (from `train --model vae`)")
    state, vae_cfg = load_checkpoint_cfg(checkpoint, ("vae",))
    if tuple(vae_cfg.data.hu_range) != tuple(cfg.data.hu_range):
        raise UserError(f"{checkpoint}: VAE data.hu_range {vae_cfg.data.hu_range} != {cfg.data.hu_range}")
    cfg.vae = vae_cfg.vae
    vae = load_weights(VAE3D(cfg.vae), state["ema"], checkpoint).to(device).eval().requires_grad_(False)
    rng = np.random.default_rng(cfg.train.seed)
    _, hr, _ = random_batch(vols, cfg, max(2, cfg.train.batch_size), rng, device)
    with torch.no_grad():
        return vae, float(1.0 / vae.encode(pad_to(hr, (vae.factor,) * 3)[0])[0].std().clamp(min=1e-6))


def batch_loss(kind: str, net, lr, hr, pos, cfg: Config, vae: VAE3D | None = None, scale: float = 1.0):
    """One batch's loss on [-1, 1] patches; padding multiples from the config (`net` may be wrapped)."""
    if kind == "unet3d":  # HU-aware: L1 + SSIM + gradient on the HU window mapped to [0, 1]
        lo, hi = cfg.train.loss_window_hu
        pred, target = ((unit_to_hu(x, cfg.data.hu_range) - lo) / (hi - lo) for x in (net(lr, pos), hr))
        loss = cfg.train.loss_l1 * (pred - target).abs().mean()  # L1 and gradient unclipped: bone counts
        if cfg.train.loss_ssim and min(pred.shape[2:]) >= 11:  # an 11-tap 'valid' SSIM window must fit
            loss = loss + cfg.train.loss_ssim * losses.ssim_loss(pred.clamp(0, 1), target.clamp(0, 1), 1.0)
        return loss + cfg.train.loss_gradient * losses.gradient_loss(pred, target)
    if kind == "vae":  # HR patches and interpolated-LR patches: the LDM encodes both
        x, _ = pad_to(torch.cat([hr, lerp_z(lr, pos)]), (2 ** (len(cfg.vae.channels) - 1),) * 3)
        recon, kl = net(x)
        return (recon - x).abs().mean() + cfg.vae.kl_weight * kl
    multiple = (vae.factor * 2 ** (len(cfg.ldm.channels) - 1),) * 3
    with torch.no_grad():  # the VAE is frozen; GroupNorm is per sample, so one batch encodes both
        x0, y0 = (vae.encode(pad_to(torch.cat([hr, lerp_z(lr, pos)]), multiple)[0])[0] * scale).chunk(2)
    schedule = ResShift(cfg.ldm, x0.device)
    t = torch.randint(0, schedule.T, (x0.shape[0],), device=x0.device)
    x_t = schedule.q_sample(x0, y0, t, torch.randn_like(x0))
    keep = (torch.rand(x0.shape[0], device=x0.device) >= cfg.ldm.cond_dropout).float().view(-1, 1, 1, 1, 1)
    return F.mse_loss(net(x_t, t, y0 * keep), x0)  # ResShift predicts x0


@torch.no_grad()
def validation_loss(kind, ema_model, val_vols, cfg: Config, vae, scale, device) -> float:
    """EMA model's mean loss on fixed validation batches (same noise, timesteps each time): picks best.pt."""
    rng = np.random.default_rng([cfg.train.seed, 999])
    torch.manual_seed(cfg.train.seed + 999)
    total = 0.0
    for _ in range(cfg.train.val_batches):
        lr, hr, pos = random_batch(val_vols, cfg, cfg.train.batch_size, rng, device)
        total += float(batch_loss(kind, ema_model, lr, hr, pos, cfg, vae, scale))
    return total / max(1, cfg.train.val_batches)


def train(cfg: Config, kind: str, out_dir: Path, device="auto", vae_ckpt=None, resume=None, argv=None):
    """Train unet3d | vae | ldm on random 3-D patches, single process or under torchrun; returns best.pt."""
    dist = runtime.init_distributed(device)
    device = dist.device
    runtime.seed_everything(cfg.train.seed + dist.rank)
    vols, data_desc = load_volumes(cfg.data, "train", cfg.train.seed)  # bad data: fails before any write
    val_vols, _ = load_volumes(cfg.data, "val", cfg.train.seed) if dist.is_main else ([], "")
    if dist.is_main and not val_vols:
        warnings.warn("no validation volumes (val.txt empty): best.pt is the latest checkpoint", stacklevel=2)
    vae, scale = load_vae(vae_ckpt, cfg, vols, device) if kind == "ldm" else (None, 1.0)
    ratio = cfg.data.target_spacing_mm / cfg.data.hr_spacing_mm
    facts = {"script": SCRIPT, "kind": kind, "config": config_to_dict(cfg), "factor": ratio}
    model = build_model(kind, cfg).to(device)
    ema_fn = torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.train.ema_decay)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_fn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    step = 0
    if resume:
        state, _ = load_checkpoint_cfg(resume, (kind,))
        load_weights(model, state["model"], resume)
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        facts |= {k: state[k] for k in ("latent_scale", "best_val_loss", "best_step") if k in state}
    if vae is not None:  # a resumed run keeps its scale
        scale = facts.setdefault("latent_scale", scale)
        facts["vae"] = vae.state_dict()
    if runtime.switch_on(cfg.train.channels_last, device):
        model = model.to(memory_format=torch.channels_last_3d)
    net = runtime.ddp_wrap(model, dist)
    if runtime.switch_on(cfg.train.compile, device):
        net = torch.compile(net)
    use_amp = runtime.switch_on(cfg.train.amp, device)
    if dist.is_main:
        runtime.prepare_run_dir(out_dir, cfg, __file__, argv)
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{kind}: {n_params:.2f} M parameters; {data_desc}; {len(val_vols)} val views; x{ratio:g}")
    per_rank = max(1, cfg.train.batch_size // dist.world_size)
    with runtime.ProgressLogger(  # enabled on rank 0 only: it writes the records, other ranks stay silent
        out_dir, cfg.train.max_steps, f"train {kind}", dist.is_main, cfg.train.log_every, step
    ) as progress:
        while step < cfg.train.max_steps:
            rng = np.random.default_rng([cfg.train.seed, dist.rank, step])  # batches depend only on the step:
            torch.manual_seed(cfg.train.seed * 1_000_003 + dist.rank * 7919 + step)  # resume replays exactly
            lr, hr, pos = random_batch(vols, cfg, per_rank, rng, device)
            with runtime.amp_autocast(device, use_amp):
                loss = batch_loss(kind, net, lr, hr, pos, cfg, vae, scale)
            runtime.stop_if_not_finite(loss, step, out_dir / "checkpoint.pt")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            ema.update_parameters(model)
            step += 1
            scalars = {"loss": loss.item(), "grad_norm": grad_norm.item()}
            if dist.is_main and (step % cfg.train.ckpt_every == 0 or step == cfg.train.max_steps):
                if val_vols:
                    scalars["val_loss"] = validation_loss(kind, ema.module, val_vols, cfg, vae, scale, device)
                save_checkpoints(out_dir, facts, step, scalars.get("val_loss"), (model, ema, optimizer))
            progress.log(step, **scalars)
    return out_dir / "best.pt"


def save_checkpoints(out_dir: Path, facts: dict, step: int, val_loss: float | None, training) -> None:
    """checkpoint.pt: all --resume needs; best.pt: EMA weights of the lowest val loss (else the latest)."""
    model, ema, optimizer = training
    better = val_loss is None or val_loss <= facts.get("best_val_loss", math.inf)
    if better:
        facts.update({"best_step": step} | ({} if val_loss is None else {"best_val_loss": val_loss}))
    best = {**facts, "ema": ema.state_dict(), "step": step}
    resume = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": runtime.rng_state()}
    runtime.save_checkpoint(out_dir / "checkpoint.pt", {**best, **resume})
    if better:
        runtime.save_checkpoint(out_dir / "best.pt", best)


# --- evaluate ---


@contextlib.contextmanager
def measure():
    """Yields a dict that gets the block's time_s and peak_rss_mb (Linux: VmHWM reset on entry)."""
    with contextlib.suppress(OSError):  # '5' resets the high-water mark
        Path("/proc/self/clear_refs").write_text("5")
    t0, row = time.perf_counter(), {}
    yield row
    row["time_s"] = round(time.perf_counter() - t0, 3)
    try:
        peak_kb = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0])
    except (OSError, IndexError):  # not Linux; macOS counts ru_maxrss in bytes, the BSDs in kB
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_kb //= 1024 if sys.platform == "darwin" else 1
    row["peak_rss_mb"] = round(peak_kb / 1024, 1)


def evaluation_volume(cfg: Config, hr_path: Path | None, thin_axis: str) -> tuple[nifti_io.Volume, str]:
    """The HR volume with the axis to thin first: the slice axis found from the affine (`auto`) or the
    voxel axis k, j or i (an in-plane axis gives a SMORE-style check at in-plane resolution)."""
    if hr_path is None:
        shape, px = tuple(cfg.data.phantom_shape), cfg.data.phantom_pixel_mm
        hu = phantom(cfg.data, 10**6 + 999).astype(np.float32)
        source = f"held-out phantom {shape} (seed {10**6 + 999}, noise {cfg.data.phantom_noise_hu} HU)"
        return nifti_io.Volume(hu, np.diag([px, px, cfg.data.hr_spacing_mm, 1.0]), {}), source
    if thin_axis not in ("auto", "k", "j", "i"):
        raise UserError(f"--thin-axis must be auto, k, j or i, got '{thin_axis}'")
    vol = nifti_io.read_volume(hr_path, "CT")
    axis = slice_axis(vol.affine) if thin_axis == "auto" else "kji".index(thin_axis)
    check_geometry(axis_first(vol, slice_axis(vol.affine)).affine, hr_path)
    return axis_first(vol, axis), f"{hr_path} (thinned along voxel axis {'kji'[axis]})"


def evaluation_methods(cfg: Config, unet: Path | None, ldm: Path | None, factor: float, device) -> list:
    """(name, method): "linear" / "cubic" interpolation along z, or a Predictor."""
    methods = [("linear (z)", "linear"), ("cubic spline (z)", "cubic")]
    for name, path in (("unet3d", unet), ("ldm", ldm)):
        if path is None:
            continue
        model = Predictor(path, cfg.infer, device)
        trained = float(model.state["factor"])
        if abs(trained - factor) > 0.05 * factor or model.cfg.data.profile != cfg.data.profile:
            msg = f"{name} trained at x{trained:g} with a {model.cfg.data.profile} profile; evaluated"
            warnings.warn(f"{path}: {msg} at x{factor:.3g} with {cfg.data.profile}", stacklevel=2)
        methods.append((f"{name} (step {model.state['step']})", model))
        if name == "ldm":
            methods.append(("ldm VAE ceiling (HR encode-decode)", Predictor(path, cfg.infer, device, True)))
    return methods


def evaluate(cfg: Config, out_dir: Path, hr_path=None, unet=None, ldm=None, device="auto", thin_axis="auto"):
    """Simulate LR from a held-out HR volume, restore it with every method; masked metrics, time, RAM."""
    device = runtime.pick_device(device)
    hr, source = evaluation_volume(cfg, hr_path, thin_axis)
    lr, _ = simulate_thick_slices(hr.hu, hr.spacing_mm[0], cfg.data)
    if len(lr) < 2:
        raise UserError(f"{source}: {hr.hu.shape[0]} slices; too few to simulate two thick slices")
    factor = cfg.data.target_spacing_mm / hr.spacing_mm[0]
    positions = output_positions(len(lr), factor)
    ref = sample_z(hr.hu, positions * factor)
    padding = sample_z(no_data_mask(hr), positions * factor) > 0
    mask = metrics.body_mask(ref, cfg.infer.mask_threshold_hu) & ~padding
    if not mask.any():
        raise UserError(f"{source}: no voxel above {cfg.infer.mask_threshold_hu} HU; nothing to evaluate")
    rows, outputs = [], {}
    for name, method in evaluation_methods(cfg, unet, ldm, factor, device):
        with measure() as cost:
            if isinstance(method, str):
                outputs[name] = sample_z(lr, positions, cubic=method == "cubic")
            elif method.roundtrip:  # the VAE ceiling puts the HR reference itself through encode-decode
                outputs[name] = upsample_hu(ref, np.arange(len(ref), dtype=np.float64), method, method.cfg)
            else:
                outputs[name] = upsample_hu(lr, positions, method, method.cfg)
        try:  # SSIM: 2-D per slice or a smaller window on short volumes; `convention` says which
            row = metrics.image_metrics(outputs[name], ref, tuple(cfg.infer.window_hu), mask=mask)
        except ValueError as exc:  # under 3 voxels along an image axis: no SSIM window fits
            raise UserError(f"{source}: {exc}") from None
        convention = row.pop("convention")  # the same for every method: same shape and mask
        rows.append({"method": name, **row, **cost})
    spacing = tuple(round(s, 3) for s in hr.spacing_mm)
    notes = [
        f"HR: {source}, {hr.hu.shape} (thinned axis first), spacing {spacing} mm",
        f"LR: {cfg.data.profile} slice profile FWHM {cfg.data.target_thickness_mm} mm, spacing "
        f"{cfg.data.target_spacing_mm} mm ({len(lr)} slices); restored x{factor:.3g}",
        f"metrics: {convention}; MAE in HU unclipped; mask = reference HU > "
        f"{cfg.infer.mask_threshold_hu} without scanner padding ({mask.mean() * 100:.1f} % of voxels)",
        f"time and peak process RSS per method on {device}; command: {' '.join(sys.argv)}",
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    runtime.print_metrics_table(rows, "ct_throughplane_sr evaluate", out_dir / "metrics.json", notes)
    save_reformats(out_dir, outputs, ref, hr.spacing_mm, tuple(cfg.infer.window_hu))
    return rows


def save_reformats(out_dir: Path, outputs: dict, ref: np.ndarray, spacing_zyx, window) -> None:
    """Sagittal and coronal centre planes of every output, superior up, stretched to the physical aspect."""
    last = [name for name in outputs if "ceiling" not in name][-1]  # error panel: the most elaborate method
    volumes = [*outputs.values(), ref, outputs[last] - ref]
    titles = [*outputs, "HR reference", f"{last.split(' ')[0]} - HR"]
    for axis, view in ((2, "sagittal"), (1, "coronal")):
        aspect = (spacing_zyx[0] / spacing_zyx[3 - axis], 1.0)
        images = [ndimage.zoom(np.take(v, v.shape[axis] // 2, axis)[::-1], aspect, order=1) for v in volumes]
        suptitle = f"{view} reformat, window {list(window)} HU"
        viz.save_panel(out_dir / f"{view}.png", images, titles, window, len(images) - 1, suptitle=suptitle)


# --- prepare and upsample (files in, files out) ---


def collect_volumes(input_dir: Path, out_dir: Path, cfg: DataConfig) -> dict[str, list[str]]:
    """NIfTI files listed as they are (patient = file name up to the first '_'), DICOM series (one per
    folder) written as NIfTI in HU; volumes too thin for a training patch are left out with a warning."""
    niftis = sorted(p for p in input_dir.rglob("*") if p.name.endswith((".nii", ".nii.gz")) and p.is_file())
    folders = sorted({p.parent for p in input_dir.rglob("*") if p.is_file() and p not in niftis})
    patients: dict[str, list[str]] = {}
    for i, path in enumerate([*niftis, *folders]):
        try:
            vol = nifti_io.read_volume(path, "CT")
        except UserError as exc:
            if path.is_file():  # a broken NIfTI is the user's to fix; a folder without one series is skipped
                raise
            print(f"skipped: {exc}", file=sys.stderr)
            continue
        axis = slice_axis(vol.affine)  # too thin for one training patch along its slice axis: left out
        extent = (vol.hu.shape[axis] - 1) * vol.spacing_mm[axis]
        need = (cfg.patch_size[0] - 1) * cfg.hr_spacing_mm
        if extent + 1e-6 < need:
            span = f"{vol.hu.shape[axis]} slice(s) span {extent:.1f} mm < {need:.1f} mm of one training patch"
            warnings.warn(f"{path}: left out of the split lists: {span}", stacklevel=2)
            continue
        if path.is_file():
            patient, name = path.name.split("_")[0].split(".nii")[0], str(path.resolve())
        else:
            patient_id = str(vol.meta["datasets"][0].get("PatientID", "") or path.name)
            patient = "".join(c if c.isalnum() or c in "-." else "-" for c in patient_id)
            name = f"{patient}_{i:04d}.nii.gz"
            nifti_io.write_nifti(out_dir / name, nifti_io.Volume(vol.hu, vol.affine, {}))
            print(f"{path} -> {name} {vol.hu.shape} spacing {tuple(round(s, 3) for s in vol.spacing_mm)} mm")
        patients.setdefault(patient, []).append(name)
    return patients


def prepare(input_dir: Path, out_dir: Path, val_fraction: float, test_fraction: float, cfg: Config) -> dict:
    """DICOM series -> NIfTI in HU, NIfTI listed as they are; train/val/test lists split by patient."""
    if not input_dir.is_dir():
        raise UserError(f"{input_dir}: not a folder")
    if out_dir.resolve() == input_dir.resolve() or input_dir.resolve() in out_dir.resolve().parents:
        raise UserError(f"--out {out_dir} is inside the input folder {input_dir}; choose another folder")
    patients = collect_volumes(input_dir, out_dir, cfg.data)
    if not patients:
        raise UserError(f"{input_dir}: no usable DICOM series or NIfTI volume found (see the lines above)")
    order = np.random.default_rng(cfg.train.seed).permutation(sorted(patients)).tolist()
    n_test, n_val = (max(1, round(len(order) * fraction)) for fraction in (test_fraction, val_fraction))
    if len(order) < 3:
        warnings.warn(f"only {len(order)} patient(s): all in train, none held out", stacklevel=2)
        n_test = n_val = 0
    split = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, members in split.items():
        with runtime.atomic_path(out_dir / f"{name}.txt") as tmp:
            tmp.write_text("".join(f"{f}\n" for p in members for f in patients[p]))
    with runtime.atomic_path(out_dir / "patients.json") as tmp:
        tmp.write_text(json.dumps({"split": split, "files": patients}, indent=2))
    counts = ", ".join(f"{name} {len(members)}" for name, members in split.items())
    print(f"{len(order)} patients: {counts}; lists in {out_dir}")
    return split


def choose_factor(factor: float | None, spacing_mm: float | None, input_spacing: float, cfg: Config) -> float:
    """--factor, or the input's slice spacing over --spacing-mm (default: the model's HR spacing)."""
    if factor is not None and spacing_mm is not None:
        raise UserError("give --factor or --spacing-mm, not both")
    factor = input_spacing / (spacing_mm or cfg.data.hr_spacing_mm) if factor is None else factor
    if not factor >= 1:
        raise UserError(f"factor {factor:.3g} < 1: the input's {input_spacing:.2f} mm slices are finer")
    trained = cfg.data.target_spacing_mm
    if abs(input_spacing - trained) > 0.1 * trained:
        warnings.warn(f"input spacing {input_spacing:.2f} mm, model trained on {trained} mm", stacklevel=2)
    return factor


def upsample_file(checkpoint, input_path, output, factor=None, cfg=None, device="auto", spacing_mm=None):
    """LR NIfTI or DICOM series in, NIfTI in HU out (+ a series for DICOM input); checked before writing."""
    if not output.name.endswith((".nii", ".nii.gz")):
        raise UserError(f"--output {output}: must end in .nii or .nii.gz")
    runtime.refuse_overwrite_input(output, input_path)
    vol = nifti_io.read_volume(input_path, "CT")
    from_dicom = "datasets" in vol.meta
    axis = 0 if from_dicom else slice_axis(vol.affine)  # a DICOM series stacks its slices along k
    work = axis_first(vol, axis)
    check_geometry(work.affine, input_path)
    if work.hu.shape[0] < 2:
        raise UserError(f"{input_path}: {work.hu.shape[0]} slice(s); z super-resolution needs at least 2")
    model = Predictor(checkpoint, (cfg or Config()).infer, runtime.pick_device(device))
    factor = choose_factor(factor, spacing_mm, work.spacing_mm[0], model.cfg)
    dicom_dir = output.parent / (output.name.removesuffix(".gz").removesuffix(".nii") + "_dicom")
    if from_dicom and dicom_dir.exists():
        raise UserError(f"{dicom_dir} exists; remove it or choose another --output")
    positions = output_positions(work.hu.shape[0], factor)
    with measure() as cost:
        sr = upsample_hu(work.hu, positions, model, model.cfg, no_data_mask(work))
    meta = {k: v for k, v in vol.meta.items() if k == "nifti_header"}
    sr_vol = axis_first(nifti_io.Volume(sr, resampled_affine(work.affine, positions), meta), axis, back=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{dicom_dir.name}.") as tmp:
        series = Path(tmp) / "series"  # moved into place once the NIfTI is written: both or neither
        if from_dicom:
            description = f"ct_throughplane_sr {model.kind} x{factor:g}"
            dicom_io.write_dicom_series(sr_vol, vol.meta["datasets"], series, description=description)
        written = [nifti_io.write_nifti(output, sr_vol)]
        if from_dicom:
            written.append(series.replace(dicom_dir))
    print(
        f"{vol.hu.shape} -> {sr_vol.hu.shape} (x{factor:g} along {'kji'[axis]}) in {cost['time_s']:.1f} s, "
        f"peak RSS {cost['peak_rss_mb']} MB; wrote {', '.join(map(str, written))}"
    )
    return written


# --- commands ---

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
ConfigOpt = typer.Option(None, "--config", help="YAML config or partial override file; repeatable")
PresetOpt = typer.Option("full", "--preset", help="full (seed 004), small (CPU, ~1 h) or tiny (tests)")
SetOpt = typer.Option(None, "--set", help="override a value: section.key=value (repeatable)")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda")


def build_config(config, preset, overrides) -> Config:
    return load_config(Config, config, preset, overrides, shipped=default_config_path(__file__))


@app.command("prepare")
def prepare_cmd(
    input: Path = typer.Option(..., "--input", help="folder of DICOM series (one per folder) / NIfTI"),
    out: Path = typer.Option(Path("data/ct"), "--out"),
    val_fraction: float = typer.Option(0.1),
    test_fraction: float = typer.Option(0.1),
    config: list[Path] | None = ConfigOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
):
    """Convert DICOM series to NIfTI in HU and write train/val/test lists split by patient."""
    prepare(input, out, val_fraction, test_fraction, build_config(config, preset, set_))


@app.command("train")
def train_cmd(
    model: str = typer.Option("unet3d", "--model", help="unet3d | vae (the LDM's autoencoder) | ldm"),
    out: Path = typer.Option(None, "--out", help="run folder (default runs/<model>)"),
    data: str = typer.Option(None, "--data", help="folder written by `prepare` (default: phantoms)"),
    vae: Path = typer.Option(None, "--vae", help="VAE checkpoint for --model ldm"),
    max_steps: int = typer.Option(None, "--max-steps"),
    resume: Path = typer.Option(None, "--resume", help="checkpoint.pt of an interrupted run"),
    config: list[Path] | None = ConfigOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
):
    """Train the SimpleUNet3D baseline, the 3-D KL-VAE or the latent diffusion model (ResShift+ControlNet)."""
    if model not in ("unet3d", "vae", "ldm"):
        raise UserError(f"--model must be unet3d, vae or ldm, got '{model}'")
    cfg = build_config(config, preset, set_)
    cfg.data.path = cfg.data.path if data is None else data
    cfg.train.max_steps = cfg.train.max_steps if max_steps is None else max_steps
    train(cfg, model, out or Path(f"runs/{model}"), device, vae, resume, sys.argv)


@app.command("upsample")
def upsample_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint"),
    input: Path = typer.Option(..., "--input"),
    output: Path = typer.Option(..., "--output", help="SR.nii.gz (+ SR_dicom/ for DICOM input)"),
    factor: float = typer.Option(None, "--factor", help="slice spacing divisor (default: from --spacing-mm)"),
    spacing_mm: float = typer.Option(None, "--spacing-mm", help="output slice spacing (default: model's HR)"),
    config: list[Path] | None = ConfigOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
):
    """Upsample an LR volume along its slice axis; model from the checkpoint, infer.* from the config."""
    upsample_file(checkpoint, input, output, factor, build_config(config, preset, set_), device, spacing_mm)


@app.command("evaluate")
def evaluate_cmd(
    input: Path = typer.Option(None, "--input", "--hr", help="held-out HR NIfTI/DICOM (default: a phantom)"),
    unet: Path = typer.Option(None, "--unet", help="unet3d checkpoint"),
    ldm: Path = typer.Option(None, "--ldm", help="ldm checkpoint"),
    thin_axis: str = typer.Option("auto", "--thin-axis", help="auto (slice axis) | k | j | i"),
    out: Path = typer.Option(Path("runs/evaluate"), "--out"),
    config: list[Path] | None = ConfigOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
):
    """Linear, cubic, UNet3D and LDM (+ VAE ceiling) on LR simulated from an HR volume: masked metrics."""
    evaluate(build_config(config, preset, set_), out, input, unet, ldm, device, thin_axis)


app.command("eval", hidden=True)(evaluate_cmd)  # old names, kept hidden: `eval`, `evaluate --hr`, `train-vae`

if __name__ == "__main__":
    if sys.argv[1:2] == ["train-vae"]:  # = `train --model vae` (default --out runs/vae, as before)
        sys.argv[1:2] = ["train", "--model", "vae"]
    runtime.cli_main(app)
