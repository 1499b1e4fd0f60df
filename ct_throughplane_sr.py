"""Through-plane (z) super-resolution of CT volumes in HU (seed 004): a SimpleUNet3D baseline and a 3-D latent
diffusion model (KL-VAE + ResShift residual shifting + ControlNet conditioning, optional classifier-free guidance).

Training pairs come from high-resolution (HR) volumes by a slice-profile simulation: blur along z with the slice
sensitivity profile (Gaussian or rectangular, FWHM = target slice thickness), then resample to the target slice
spacing (linear resampling, so non-integer spacing ratios work too). Outputs keep the input's in-plane grid, origin
and orientation; only the z spacing changes, so the result overlays the input in any viewer.

Usage:
  python ct_throughplane_sr.py prepare --input /data/lidc_dicom --out data/ct       # NIfTI in HU + patient split
  python ct_throughplane_sr.py train --model unet3d --out runs/unet3d [--data data/ct]   # default: phantoms
  python ct_throughplane_sr.py train-vae --out runs/vae [--data data/ct]
  python ct_throughplane_sr.py train --model ldm --vae runs/vae/checkpoint.pt --out runs/ldm
  python ct_throughplane_sr.py upsample --checkpoint runs/unet3d/checkpoint.pt --input lr.nii.gz --output sr.nii.gz
  python ct_throughplane_sr.py upsample --checkpoint CKPT --input lr_dicom/ --output sr.nii.gz   # + sr_dicom/
  python ct_throughplane_sr.py evaluate --hr hr.nii.gz --unet runs/unet3d/checkpoint.pt --ldm runs/ldm/checkpoint.pt
  torchrun --nproc_per_node 2 ct_throughplane_sr.py train --model unet3d --preset tiny --out runs/ddp
Every command takes --config, --preset full|tiny, --set section.key=value (repeatable), --device, --out.
"""

from __future__ import annotations

import copy
import json
import math
import os
import resource
import shutil
import sys
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

from common import UserError, dicom_io, losses, metrics, nifti_io, runtime, synthetic, viz
from common.config import config_from_dict, config_to_dict, default_config_path, load_config
from common.metrics import hu_to_unit, unit_to_hu

SCRIPT = Path(__file__).stem

# --- config ---


@dataclass
class DataConfig:
    path: str | None = None  # folder written by `prepare` (train.txt/val.txt/test.txt); None: synthetic phantoms
    hr_spacing_mm: float = 1.0  # HR volumes are resampled along z to this spacing (the model's output spacing)
    target_spacing_mm: float = 3.0  # simulated LR slice spacing
    target_thickness_mm: float = 3.0  # FWHM of the slice sensitivity profile
    profile: str = "gaussian"  # gaussian | rect
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
    channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512])  # 3 downsamplings: f = 8 per axis
    latent_channels: int = 4
    kl_weight: float = 1e-6


@dataclass
class LDMConfig:
    channels: list[int] = field(default_factory=lambda: [128, 256, 512])
    num_res_blocks: int = 2
    timesteps: int = 15  # ResShift: 15 residual-shifting steps, all used at sampling
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
    loss_window_hu: tuple[float, float] = (-1024.0, 2048.0)  # HU-aware loss: L1 + SSIM + gradient in this window
    loss_l1: float = 1.0
    loss_ssim: float = 0.1
    loss_gradient: float = 0.1
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 1000
    amp: str = "auto"
    compile: str = "auto"
    channels_last: str = "auto"


@dataclass
class InferConfig:
    patch_lr: tuple[int, int, int] = (16, 192, 192)  # LR slices, rows, cols per inference patch (bounds memory)
    overlap: float = 0.25
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


# --- data: slice-profile simulation, volumes, random patches ---


def ssp_kernel(fwhm_vox: float, profile: str) -> np.ndarray:
    """Slice sensitivity profile sampled on the HR grid; a rect of non-integer width gets partial end weights."""
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


def sample_z(vol: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation along axis 0 at fractional slice indices (exact at integer positions): `lerp_z`."""
    vol = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[None, None]
    return lerp_z(vol, torch.as_tensor(np.asarray(positions, np.float64)))[0, 0].numpy()


def simulate_thick_slices(
    hu: np.ndarray, spacing_z_mm: float, target_spacing_mm: float, thickness_mm: float, profile: str, start: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Blur along z with the slice profile (FWHM = thickness), then resample at `start + j * ratio` HR slices.
    Returns the LR slices and their positions in HR slice indices."""
    kernel = ssp_kernel(thickness_mm / spacing_z_mm, profile)
    blurred = ndimage.correlate1d(np.asarray(hu, np.float32), kernel, axis=0, mode="nearest")
    ratio = target_spacing_mm / spacing_z_mm
    n = int(math.floor((hu.shape[0] - 1 - start) / ratio + 1e-6)) + 1
    positions = start + ratio * np.arange(n)
    return sample_z(blurred, positions), positions


def simulate_lr_volume(vol: nifti_io.Volume, cfg: DataConfig) -> nifti_io.Volume:
    """LR volume with the affine of its new grid: first slice at the HR first slice, spacing target_spacing_mm."""
    spacing_z = vol.spacing_mm[0]
    lr, _ = simulate_thick_slices(vol.hu, spacing_z, cfg.target_spacing_mm, cfg.target_thickness_mm, cfg.profile)
    return nifti_io.Volume(lr, nifti_io.scale_z_affine(vol.affine, cfg.target_spacing_mm / spacing_z), {})


def output_positions(n_lr: int, factor: float) -> np.ndarray:
    """Output slice m sits at LR index m / factor: the first slice (and origin) stays, the spacing divides."""
    n_out = int(math.floor((n_lr - 1) * factor + 1e-6)) + 1
    return np.arange(n_out) / factor


def compact(hu: np.ndarray) -> np.ndarray:
    """Integer HU volumes are kept as int16 in memory (half the RAM of float32, still exact)."""
    if np.array_equal(hu, np.rint(hu)) and hu.min() >= -32768 and hu.max() <= 32767:
        return hu.astype(np.int16)
    return hu.astype(np.float32)


def phantom(cfg: DataConfig, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hu = synthetic.ct_phantom_volume(tuple(cfg.phantom_shape), rng)
    return compact(np.rint(hu + rng.normal(0, cfg.phantom_noise_hu, hu.shape)))


def load_volumes(cfg: DataConfig, split: str, seed: int) -> tuple[list[np.ndarray], str]:
    """HR volumes (z, y, x) at hr_spacing_mm along z: synthetic phantoms, or the files of a `prepare` split."""
    if cfg.path is None:
        count, offset = (cfg.phantom_train, seed * 1000) if split == "train" else (cfg.phantom_val, 10**6)
        vols = [phantom(cfg, offset + i) for i in range(count)]
        return vols, f"{count} synthetic phantoms {tuple(cfg.phantom_shape)}, noise {cfg.phantom_noise_hu} HU"
    split_file = Path(cfg.path) / f"{split}.txt"
    if not split_file.is_file():
        raise UserError(f"{split_file}: no split file; run `prepare --input <dicom/nifti folder> --out {cfg.path}`")
    vols = []
    for line in split_file.read_text().split():
        path = Path(line) if Path(line).is_absolute() else Path(cfg.path) / line
        vol = nifti_io.read_volume(path, "CT")
        if vol.spacing_mm[0] > cfg.hr_spacing_mm * 1.05:
            warnings.warn(
                f"{path}: z spacing {vol.spacing_mm[0]:.2f} mm is coarser than data.hr_spacing_mm; skipped",
                stacklevel=2,
            )
            continue
        factor = vol.spacing_mm[0] / cfg.hr_spacing_mm
        vols.append(compact(sample_z(vol.hu, output_positions(len(vol.hu), factor))))
    if not vols:
        raise UserError(f"{split_file}: no usable volumes (need z spacing <= {cfg.hr_spacing_mm} mm)")
    return vols, f"{len(vols)} volumes from {split_file}"


def random_batch(vols: list[np.ndarray], cfg: DataConfig, batch: int, rng: np.random.Generator):
    """LR patches simulated on the fly (blur + resample of a slab), their HR targets and the output positions."""
    ratio = cfg.target_spacing_mm / cfg.hr_spacing_mm
    shape = np.min([v.shape for v in vols], axis=0)
    pz, py, px = (int(min(p, s)) for p, s in zip(cfg.patch_size, shape))
    d_lr = max(2, int(math.floor((pz - 1) / ratio + 1e-6)) + 1)
    positions = output_positions(d_lr, ratio)
    radius = len(ssp_kernel(cfg.target_thickness_mm / cfg.hr_spacing_mm, cfg.profile)) // 2 + 1
    lrs, hrs = [], []
    for _ in range(batch):
        vol = vols[rng.integers(len(vols))]
        n_lr = int(math.floor((vol.shape[0] - 1) / ratio + 1e-6)) + 1
        if n_lr < d_lr:
            raise UserError(f"a volume has {vol.shape[0]} slices, too few for a patch of {d_lr} LR slices")
        z_start = rng.integers(n_lr - d_lr + 1) * ratio
        y0, x0 = rng.integers(vol.shape[1] - py + 1), rng.integers(vol.shape[2] - px + 1)
        lo = max(0, int(z_start) - radius)
        hi = min(vol.shape[0], int(math.ceil(z_start + positions[-1] * ratio)) + radius + 1)
        slab = vol[lo:hi, y0 : y0 + py, x0 : x0 + px].astype(np.float32)
        lr, _ = simulate_thick_slices(
            slab, cfg.hr_spacing_mm, cfg.target_spacing_mm, cfg.target_thickness_mm, cfg.profile, start=z_start - lo
        )
        lrs.append(lr[:d_lr])
        hrs.append(sample_z(slab, z_start - lo + positions * ratio))
    return np.stack(lrs)[:, None], np.stack(hrs)[:, None], positions


# --- models ---


def lerp_z(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, C, len(positions), H, W): linear interpolation at fractional slice indices."""
    p = positions.to(x.device, torch.float64).clamp(0, x.shape[2] - 1)
    i0 = p.floor().long()
    i1 = (i0 + 1).clamp(max=x.shape[2] - 1)
    w = (p - i0).to(x.dtype).view(1, 1, -1, 1, 1)
    return x.index_select(2, i0) * (1 - w) + x.index_select(2, i1) * w


def pad_to(x: torch.Tensor, multiples: tuple[int, int, int]) -> tuple[torch.Tensor, tuple[int, int, int]]:
    size = x.shape[2:]
    pads = [(-s) % m for s, m in zip(size, multiples)]
    if any(pads):
        x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate")
    return x, tuple(size)


def zeroed(conv: nn.Conv3d) -> nn.Conv3d:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def conv_relu(cin: int, cout: int, stride=1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1), nn.ReLU(inplace=True))


class SimpleUNet3D(nn.Module):
    """Encoder-decoder on the LR grid (strided in-plane only: an LR patch has few slices), then the features are
    interpolated to the output slice positions and a head adds a residual to the linearly interpolated input.
    The last conv starts at zero, so an untrained model is exactly linear interpolation along z."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        ch = cfg.channels
        self.levels = len(ch)
        self.inc = nn.Sequential(conv_relu(1, ch[0]), conv_relu(ch[0], ch[0]))
        self.downs = nn.ModuleList(
            nn.Sequential(conv_relu(ch[i], ch[i + 1], (1, 2, 2)), conv_relu(ch[i + 1], ch[i + 1]))
            for i in range(len(ch) - 1)
        )
        self.ups = nn.ModuleList(conv_relu(ch[i + 1] + ch[i], ch[i]) for i in range(len(ch) - 1))
        self.head = nn.Sequential(conv_relu(ch[0], ch[0]), zeroed(nn.Conv3d(ch[0], 1, 3, 1, 1)))

    def forward(self, lr: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, (_, h, w) = pad_to(lr, (1, 2 ** (self.levels - 1), 2 ** (self.levels - 1)))
        feat, skips = self.inc(x), []
        for down in self.downs:
            skips.append(feat)
            feat = down(feat)
        for up in reversed(self.ups):
            skip = skips.pop()
            feat = up(torch.cat([F.interpolate(feat, size=skip.shape[2:], mode="trilinear"), skip], 1))
        out = lerp_z(x, positions) + self.head(lerp_z(feat, positions))
        return out[..., :h, :w]


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4) if ch >= 8 else 1, ch)


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


def upsample(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(cin, cout, 3, 1, 1))


class VAE3D(nn.Module):
    """3-D KL autoencoder (SD-style, 3-D convs): one residual block per level, stride-2 downsampling in all axes."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, zc = cfg.channels, cfg.latent_channels
        self.factor = 2 ** (len(ch) - 1)
        enc = [nn.Conv3d(1, ch[0], 3, 1, 1)]
        for i in range(len(ch)):
            enc.append(ResBlock(ch[i], ch[i]))
            if i < len(ch) - 1:
                enc.append(nn.Conv3d(ch[i], ch[i + 1], 3, 2, 1))
        enc += [ResBlock(ch[-1], ch[-1]), norm(ch[-1]), nn.SiLU(), nn.Conv3d(ch[-1], 2 * zc, 3, 1, 1)]
        self.encoder = nn.Sequential(*enc)
        dec = [nn.Conv3d(zc, ch[-1], 3, 1, 1), ResBlock(ch[-1], ch[-1])]
        for i in reversed(range(len(ch))):
            dec.append(ResBlock(ch[i], ch[i]))
            if i > 0:
                dec.append(upsample(ch[i], ch[i - 1]))
        dec += [norm(ch[0]), nn.SiLU(), nn.Conv3d(ch[0], 1, 3, 1, 1)]
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

    def forward(self, x, t, x_add=None):
        temb = self.time_mlp(timestep_embedding(t, self.base))
        h, skips = self.conv_in(x) if x_add is None else self.conv_in(x + x_add), []
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
    """Latent UNet predicting x0, conditioned ControlNet-style: a trainable copy of its encoder reads
    x_t + zero_conv(LR latent) and adds its features to the UNet's skips and middle through zero convs, so
    training starts from the unconditional UNet. A zero condition is the 'unconditional' input for CFG."""

    def __init__(self, cfg: LDMConfig, latent_channels: int):
        super().__init__()
        ch, nb, temb_dim = cfg.channels, cfg.num_res_blocks, 4 * cfg.channels[0]
        self.encoder = LatentEncoder(cfg, latent_channels)
        self.ups = nn.ModuleList()
        for i in range(len(ch)):
            blocks = [ResBlock(2 * ch[i], ch[i], temb_dim)] + [ResBlock(ch[i], ch[i], temb_dim) for _ in range(nb - 1)]
            self.ups.append(nn.ModuleList(blocks))
        self.upsamples = nn.ModuleList(upsample(ch[i + 1], ch[i]) for i in range(len(ch) - 1))
        self.out = nn.Sequential(norm(ch[0]), nn.SiLU(), nn.Conv3d(ch[0], latent_channels, 3, 1, 1))
        self.control = copy.deepcopy(self.encoder)
        self.control_in = zeroed(nn.Conv3d(latent_channels, latent_channels, 1))
        self.control_out = nn.ModuleList(zeroed(nn.Conv3d(c, c, 1)) for c in [*ch, ch[-1]])
        self.multiple = 2 ** (len(ch) - 1)

    def forward(self, x_t, t, cond):
        _, control = self.control(x_t, t, self.control_in(cond))
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


class ResShift:
    """x_t = x0 + eta_t (y0 - x0) + kappa sqrt(eta_t) noise: the chain moves from the HR latent x0 towards the
    interpolated-LR latent y0 in T steps (Yue et al., ResShift), so sampling starts from y0, not from pure noise."""

    def __init__(self, cfg: LDMConfig, device: torch.device):
        T, self.kappa = cfg.timesteps, cfg.kappa
        eta_1 = min((0.04 / cfg.kappa) ** 2, 0.001)
        b0 = math.exp(math.log(cfg.eta_max / eta_1) / (2 * (T - 1)))
        powers = (np.arange(T) / (T - 1)) ** cfg.eta_power * (T - 1)
        self.eta = torch.tensor((math.sqrt(eta_1) * b0**powers) ** 2, dtype=torch.float32, device=device)
        self.T = T

    def q_sample(self, x0, y0, t, noise):
        eta = self.eta[t].view(-1, 1, 1, 1, 1)
        return x0 + eta * (y0 - x0) + self.kappa * eta.sqrt() * noise

    @torch.no_grad()
    def sample(self, predict_x0, y0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        def noise():
            return torch.randn(y0.shape, generator=generator, device="cpu").to(y0.device)

        x = y0 + self.kappa * self.eta[-1].sqrt() * noise()
        for t in reversed(range(self.T)):
            x0 = predict_x0(x, torch.full((y0.shape[0],), t, device=y0.device, dtype=torch.long))
            if t == 0:
                return x0
            eta_t, eta_prev = self.eta[t], self.eta[t - 1]
            alpha = eta_t - eta_prev
            mean = eta_prev / eta_t * x + alpha / eta_t * x0
            x = mean + self.kappa * (eta_prev / eta_t * alpha).sqrt() * noise()
        return x


# --- inference: overlapping patches blended with a Gaussian window ---


def patch_starts(n: int, patch: int, overlap: float) -> tuple[list[int], int]:
    if n <= patch:
        return [0], n
    step = max(1, int(round(patch * (1 - overlap))))
    starts = list(range(0, n - patch + 1, step))
    if starts[-1] != n - patch:
        starts.append(n - patch)
    return starts, patch


def gauss_window(coords: np.ndarray, patch: int) -> np.ndarray:
    sigma = max(patch / 8, 0.5)  # nnU-Net's 1/8 of the patch: patch centres dominate, seams vanish
    return np.exp(-0.5 * ((coords - (patch - 1) / 2) / sigma) ** 2).astype(np.float64)


def blend_patches(lr: np.ndarray, positions: np.ndarray, predict, patch_lr, overlap: float) -> np.ndarray:
    """Run `predict(lr_patch (1,1,d,h,w) tensor, rel_positions tensor) -> (n, h, w)` over overlapping LR patches
    and blend with a separable Gaussian window. Patches form a Cartesian grid, so the weight sum is separable:
    memory is the output, the input and one patch, never a full-size weight volume."""
    n_lr, ny, nx = lr.shape
    zs, pz = patch_starts(n_lr, patch_lr[0], overlap)
    ys, py = patch_starts(ny, patch_lr[1], overlap)
    xs, px = patch_starts(nx, patch_lr[2], overlap)
    out = np.zeros((len(positions), ny, nx), np.float32)
    gy, gx = gauss_window(np.arange(py), py), gauss_window(np.arange(px), px)
    wz, wy, wx = np.zeros(len(positions)), np.zeros(ny), np.zeros(nx)
    for y0 in ys:
        wy[y0 : y0 + py] += gy
    for x0 in xs:
        wx[x0 : x0 + px] += gx
    for z0 in zs:
        m_lo = int(np.searchsorted(positions, z0 - 1e-6))
        m_hi = int(np.searchsorted(positions, z0 + pz - 1 + 1e-6))
        rel = positions[m_lo:m_hi] - z0
        w_z = gauss_window(rel, pz)
        wz[m_lo:m_hi] += w_z
        w = (w_z[:, None, None] * gy[None, :, None] * gx[None, None, :]).astype(np.float32)
        for y0 in ys:
            for x0 in xs:
                patch = torch.from_numpy(np.ascontiguousarray(lr[z0 : z0 + pz, y0 : y0 + py, x0 : x0 + px]))[None, None]
                pred = np.asarray(predict(patch, torch.from_numpy(rel)), dtype=np.float32)
                out[m_lo:m_hi, y0 : y0 + py, x0 : x0 + px] += pred * w
    plane = np.outer(wy, wx)
    for m in range(len(positions)):
        out[m] /= (wz[m] * plane).astype(np.float32)
    return out


def upsample_hu(hu: np.ndarray, factor: float, predict, cfg: Config) -> np.ndarray:
    """HU in, HU out on the new z grid. Values below air (FOV padding, "no data") are shown to the model as air
    and restored afterwards from the nearest input slice; integer input gives integer output."""
    positions = output_positions(hu.shape[0], factor)
    pad = hu < -1100
    norm_lr = hu_to_unit(np.where(pad, -1000.0, hu).astype(np.float32), cfg.data.hu_range).astype(np.float32)
    with torch.no_grad():  # predict() may be any model: no autograd graph at inference
        blended = blend_patches(norm_lr, positions, predict, cfg.infer.patch_lr, cfg.infer.overlap)
    out = unit_to_hu(blended, cfg.data.hu_range)
    if pad.any():
        nearest = np.rint(positions).astype(np.int64)
        for m, k in enumerate(nearest):
            out[m][pad[k]] = hu[k][pad[k]]
    if np.array_equal(hu, np.rint(hu)):
        out = np.rint(out)
    return out.astype(np.float32)


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


def load_predictor(checkpoint: Path, infer: InferConfig, device: torch.device):
    """The trained model as `predict(lr_patch, rel_positions)` in normalised units (call it under no_grad), plus its
    training facts."""
    state, cfg = load_checkpoint_cfg(checkpoint, ("unet3d", "ldm"))
    cfg.infer = infer
    if state["kind"] == "unet3d":
        model = load_weights(SimpleUNet3D(cfg.unet), state["ema"], checkpoint).to(device).eval()

        def predict(lr, rel):
            return model(lr.to(device), rel.to(device))[0, 0].float().cpu().numpy()
    else:
        vae = load_weights(VAE3D(cfg.vae), state["vae"], checkpoint).to(device).eval()
        net = load_weights(LatentDenoiser(cfg.ldm, cfg.vae.latent_channels), state["ema"], checkpoint)
        net = net.to(device).eval()
        sched, scale = ResShift(cfg.ldm, device), float(state["latent_scale"])
        multiple = vae.factor * net.multiple
        generator = torch.Generator().manual_seed(cfg.train.seed)

        def predict(lr, rel):
            interp, size = pad_to(lerp_z(lr.to(device), rel.to(device)), (multiple,) * 3)
            y0 = vae.encode(interp)[0] * scale
            x0 = sched.sample(lambda x, t: guided_x0(net, x, t, y0, infer.guidance_scale), y0, generator)
            out = vae.decoder(x0 / scale)
            return out[0, 0, : size[0], : size[1], : size[2]].float().cpu().numpy()

    return predict, cfg, state


def guided_x0(net, x, t, y0, scale: float):
    """Classifier-free guidance: x0_uncond + scale * (x0_cond - x0_uncond); the zero condition is 'unconditional'."""
    cond = net(x, t, y0)
    if scale == 1.0:
        return cond
    uncond = net(x, t, torch.zeros_like(y0))
    return uncond + scale * (cond - uncond)


# --- train ---


def hu_aware_loss(pred_hu: torch.Tensor, target_hu: torch.Tensor, tc: TrainConfig) -> torch.Tensor:
    """L1 + SSIM + gradient on the HU window mapped to [0, 1] (L1 and gradient unclipped: bone still counts)."""
    lo, hi = tc.loss_window_hu
    pred, target = (pred_hu - lo) / (hi - lo), (target_hu - lo) / (hi - lo)
    loss = tc.loss_l1 * (pred - target).abs().mean()
    if tc.loss_ssim and min(pred.shape[2:]) >= 11:  # an 11-tap 'valid' SSIM window must fit
        loss = loss + tc.loss_ssim * losses.ssim_loss(pred.clamp(0, 1), target.clamp(0, 1), data_range=1.0)
    if tc.loss_gradient:
        loss = loss + tc.loss_gradient * losses.gradient_loss(pred, target)
    return loss


def load_vae(checkpoint: Path | None, cfg: Config, device: torch.device) -> VAE3D:
    """The frozen VAE for LDM training; its config replaces cfg.vae so the LDM checkpoint is self-contained."""
    if checkpoint is None:
        raise UserError("train --model ldm needs --vae CHECKPOINT (from `train-vae`, or local pre-trained weights)")
    state, vae_cfg = load_checkpoint_cfg(checkpoint, ("vae",))
    if tuple(vae_cfg.data.hu_range) != tuple(cfg.data.hu_range):
        raise UserError(
            f"{checkpoint}: VAE trained with data.hu_range {vae_cfg.data.hu_range}, this run uses {cfg.data.hu_range}"
        )
    cfg.vae = vae_cfg.vae
    vae = load_weights(VAE3D(cfg.vae), state["ema"], checkpoint).to(device).eval()
    return vae.requires_grad_(False)


def batch_loss(kind: str, net, lr, hr, pos, cfg: Config, vae: VAE3D | None, schedule, scale: float):
    """One batch's loss for each model kind; lr, hr normalised to [-1, 1]."""
    if kind == "unet3d":
        pred_hu, hr_hu = unit_to_hu(net(lr, pos), cfg.data.hu_range), unit_to_hu(hr, cfg.data.hu_range)
        return hu_aware_loss(pred_hu, hr_hu, cfg.train)
    if kind == "vae":  # HR patches and interpolated-LR patches: the LDM encodes both
        x, _ = pad_to(torch.cat([hr, lerp_z(lr, pos)]), (runtime.unwrap(net).factor,) * 3)
        recon, kl = net(x)
        return (recon - x).abs().mean() + cfg.vae.kl_weight * kl
    multiple = (vae.factor * runtime.unwrap(net).multiple,) * 3
    with torch.no_grad():
        x0 = vae.encode(pad_to(hr, multiple)[0])[0] * scale
        y0 = vae.encode(pad_to(lerp_z(lr, pos), multiple)[0])[0] * scale
    t = torch.randint(0, schedule.T, (x0.shape[0],), device=x0.device)
    x_t = schedule.q_sample(x0, y0, t, torch.randn_like(x0))
    keep = (torch.rand(x0.shape[0], device=x0.device) >= cfg.ldm.cond_dropout).float().view(-1, 1, 1, 1, 1)
    return F.mse_loss(net(x_t, t, y0 * keep), x0)  # ResShift predicts x0


def latent_scale(vae: VAE3D, vols, cfg: Config, device) -> float:
    """1 / std of HR latents on a fixed batch (same on every DDP rank), as in latent diffusion."""
    lr, hr, _ = random_batch(vols, cfg.data, max(2, cfg.train.batch_size), np.random.default_rng(cfg.train.seed))
    x = hu_to_unit(torch.from_numpy(hr).float(), cfg.data.hu_range).to(device)
    with torch.no_grad():
        z = vae.encode(pad_to(x, (vae.factor,) * 3)[0])[0]
    return float(1.0 / z.std().clamp(min=1e-6))


def train(
    cfg: Config,
    kind: str,
    out_dir: Path,
    device_name: str = "auto",
    vae_checkpoint: Path | None = None,
    resume: Path | None = None,
    argv: list[str] | None = None,
) -> Path:
    """Train unet3d | vae | ldm on random 3-D patches; returns the checkpoint path. Single process or torchrun."""
    dist = runtime.init_distributed(device_name)
    device = dist.device
    runtime.seed_everything(cfg.train.seed + dist.rank)
    vols, data_desc = load_volumes(cfg.data, "train", cfg.train.seed)  # bad data fails before anything is written
    vae = load_vae(vae_checkpoint, cfg, device) if kind == "ldm" else None
    model = {
        "unet3d": lambda: SimpleUNet3D(cfg.unet),
        "vae": lambda: VAE3D(cfg.vae),
        "ldm": lambda: LatentDenoiser(cfg.ldm, cfg.vae.latent_channels),
    }[kind]().to(device)
    ema_fn = torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.train.ema_decay)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_fn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    step, extra = 0, {}
    if resume is not None:
        state, _ = load_checkpoint_cfg(resume, (kind,))
        load_weights(model, state["model"], resume)
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        extra = {k: state[k] for k in ("latent_scale",) if k in state}
    if vae is not None:
        extra.setdefault("latent_scale", latent_scale(vae, vols, cfg, device))
        extra["vae"] = vae.state_dict()
    if dist.is_main:
        runtime.prepare_run_dir(out_dir, cfg, __file__, argv)
    if runtime.switch_on(cfg.train.channels_last, device):
        model = model.to(memory_format=torch.channels_last_3d)
    net = runtime.ddp_wrap(model, dist)
    if runtime.switch_on(cfg.train.compile, device):
        net = torch.compile(net)
    use_amp = runtime.switch_on(cfg.train.amp, device)
    schedule, scale = ResShift(cfg.ldm, device), extra.get("latent_scale", 1.0)
    ratio = cfg.data.target_spacing_mm / cfg.data.hr_spacing_mm
    if dist.is_main:
        print(
            f"{kind}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; data: {data_desc}; "
            f"x{ratio:g} ({cfg.data.target_spacing_mm} mm spacing, {cfg.data.target_thickness_mm} mm "
            f"{cfg.data.profile} profile -> {cfg.data.hr_spacing_mm} mm); device {device}, world {dist.world_size}"
        )
    ckpt_path = out_dir / "checkpoint.pt"
    per_rank = max(1, cfg.train.batch_size // dist.world_size)
    log_dir = out_dir if dist.is_main else None  # rank 0 writes the records, other ranks stay silent
    facts = {"script": SCRIPT, "kind": kind, "config": config_to_dict(cfg), "factor": ratio, **extra}
    with runtime.ProgressLogger(
        log_dir, cfg.train.max_steps, f"train {kind}", dist.is_main, log_every=cfg.train.log_every, start_step=step
    ) as progress:
        while step < cfg.train.max_steps:
            rng = np.random.default_rng([cfg.train.seed, dist.rank, step])  # batches depend only on the step:
            torch.manual_seed(cfg.train.seed * 1_000_003 + dist.rank * 7919 + step)  # resume replays exactly
            lr, hr, pos = random_batch(vols, cfg.data, per_rank, rng)
            lr, hr = (hu_to_unit(torch.from_numpy(a).float(), cfg.data.hu_range).to(device) for a in (lr, hr))
            with runtime.amp_autocast(device, use_amp):
                loss = batch_loss(kind, net, lr, hr, torch.from_numpy(pos).to(device), cfg, vae, schedule, scale)
            if not torch.isfinite(loss):
                raise UserError(f"non-finite loss at step {step + 1}; last good checkpoint kept at {ckpt_path}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            ema.update_parameters(model)
            step += 1
            progress.log(step, loss=loss.item(), grad_norm=grad_norm.item())
            if dist.is_main and (step % cfg.train.ckpt_every == 0 or step == cfg.train.max_steps):
                state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict()}
                runtime.save_checkpoint(ckpt_path, {**facts, **state, "step": step, "rng": runtime.rng_state()})
    return ckpt_path


# --- evaluate ---


class Measure:
    """Wall time, peak resident memory of the process (Linux VmHWM, reset on entry) and peak CUDA memory of a block."""

    def __enter__(self):
        try:  # '5' resets the high-water mark; where that fails, the lifetime peak is the best we can say
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        try:
            self.peak_rss = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024
        except (OSError, IndexError):  # not Linux
            self.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        return False


def cubic_z(lr: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Cubic spline along z only (not-a-knot, scipy); linear when there are too few slices for a cubic."""
    if len(lr) < 4:
        return sample_z(lr, positions)
    return make_interp_spline(np.arange(len(lr)), lr, k=3, axis=0)(positions).astype(np.float32)


def reformat(hu: np.ndarray, axis: int, spacing_zyx) -> np.ndarray:
    """Sagittal (axis=2) or coronal (axis=1) centre plane, superior up, stretched to the physical aspect."""
    plane = np.take(hu, hu.shape[axis] // 2, axis=axis)[::-1]
    return ndimage.zoom(plane, (spacing_zyx[0] / spacing_zyx[3 - axis], 1.0), order=1)


def evaluate(
    cfg: Config,
    out_dir: Path,
    hr_path: Path | None = None,
    unet: Path | None = None,
    ldm: Path | None = None,
    device_name: str = "auto",
    argv: list[str] | None = None,
) -> list[dict]:
    """Simulate LR from a held-out HR volume, upsample it with every method, report masked metrics + time + RAM."""
    device = runtime.pick_device(device_name)
    if hr_path is not None:
        hr = nifti_io.read_volume(hr_path, "CT")
        source = str(hr_path)
    else:
        shape, px = tuple(cfg.data.phantom_shape), cfg.data.phantom_pixel_mm
        hu = phantom(cfg.data, 10**6 + 999).astype(np.float32)
        hr = nifti_io.Volume(hu, np.diag([px, px, cfg.data.hr_spacing_mm, 1.0]), {})
        source = f"held-out synthetic phantom {shape} (seed {10**6 + 999}, noise {cfg.data.phantom_noise_hu} HU)"
    lr = simulate_lr_volume(hr, cfg.data)
    factor = cfg.data.target_spacing_mm / hr.spacing_mm[0]
    if lr.hu.shape[0] < 2:
        raise UserError(f"{source}: only {hr.hu.shape[0]} slices; too few to simulate thick slices")
    positions = output_positions(lr.hu.shape[0], factor)
    ref = sample_z(hr.hu, positions * factor)
    mask = metrics.body_mask(ref, cfg.infer.mask_threshold_hu)
    methods = {
        "trilinear (z-linear)": lambda: sample_z(lr.hu, positions),
        "cubic (scipy spline)": lambda: cubic_z(lr.hu, positions),
    }
    for name, path in (("unet3d", unet), ("ldm", ldm)):
        if path is None:
            continue
        predict, model_cfg, state = load_predictor(path, cfg.infer, device)  # model_cfg.infer is cfg.infer
        if abs(state["factor"] - factor) > 1e-3 or model_cfg.data.profile != cfg.data.profile:
            warnings.warn(
                f"{name} was trained for x{state['factor']:g} with a {model_cfg.data.profile} profile; "
                f"evaluated at x{factor:g} with {cfg.data.profile}",
                stacklevel=2,
            )
        methods[f"{name} (step {state['step']})"] = lambda p=predict, c=model_cfg: upsample_hu(lr.hu, factor, p, c)
    rows, outputs = [], {}
    for name, run in methods.items():
        with Measure() as mem:
            out = run()
        outputs[name] = out
        quality = metrics.image_metrics(out, ref, tuple(cfg.infer.window_hu), mask=mask)
        convention = quality.pop("convention")
        row = {
            "method": name,
            **quality,
            "time_s": round(mem.seconds, 3),
            "peak_rss_mb": round(mem.peak_rss / 2**20, 1),
        }
        if device.type == "cuda":
            row["peak_gpu_mb"] = round(mem.peak_gpu / 2**20, 1)
        rows.append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = [
        f"HR: {source}, {hr.hu.shape} (z, y, x), spacing {tuple(round(s, 3) for s in hr.spacing_mm)} mm",
        f"LR: {cfg.data.profile} slice profile FWHM {cfg.data.target_thickness_mm} mm, spacing "
        f"{cfg.data.target_spacing_mm} mm ({lr.hu.shape[0]} slices); restored x{factor:g}",
        f"PSNR/SSIM: HU clipped to window {list(cfg.infer.window_hu)} mapped to [0, 1], data range 1; 3-D SSIM "
        f"(Gaussian sigma 1.5); MAE in HU unclipped; all inside the body mask HU > {cfg.infer.mask_threshold_hu}"
        f" of the reference ({mask.mean() * 100:.1f} % of voxels)",
        f"metrics convention: {convention}",
        f"time and peak process RSS per method on {device}; command: {' '.join(argv or sys.argv)}",
    ]
    runtime.print_metrics_table(rows, "ct_throughplane_sr evaluate", out_dir / "metrics.json", notes)
    last = list(outputs)[-1]  # the error panel shows the last (most elaborate) method
    for axis, view in ((2, "sagittal"), (1, "coronal")):
        images = [reformat(a, axis, hr.spacing_mm) for a in [*outputs.values(), ref, outputs[last] - ref]]
        viz.save_panel(
            out_dir / f"{view}.png",
            images,
            [*outputs, "HR reference", f"{last.split(' ')[0]} - HR"],
            window=tuple(cfg.infer.window_hu),
            error_index=len(images) - 1,
            suptitle=f"{view} reformat, window {list(cfg.infer.window_hu)} HU",
        )
    return rows


# --- prepare and upsample (files in, files out) ---


def prepare(input_dir: Path, out_dir: Path, val_fraction: float, test_fraction: float, seed: int) -> dict:
    """DICOM series (one per folder) -> NIfTI in HU; NIfTI files are listed as they are. Patient-level split."""
    if not input_dir.is_dir():
        raise UserError(f"{input_dir}: not a folder")
    if out_dir.resolve() == input_dir.resolve() or input_dir.resolve() in out_dir.resolve().parents:
        raise UserError(f"--out {out_dir} is inside the input folder {input_dir}; choose another folder")
    patients: dict[str, list[str]] = {}
    niftis = sorted(p for p in input_dir.rglob("*") if p.name.endswith((".nii", ".nii.gz")) and p.is_file())
    for path in niftis:  # dcm2niix-style names: the patient ID is the part before the first '_'
        nifti_io.read_nifti(path)
        patient = path.name.split("_")[0].removesuffix(".nii.gz").removesuffix(".nii")
        patients.setdefault(patient, []).append(str(path.resolve()))
    folders = sorted({p.parent for p in input_dir.rglob("*") if p.is_file() and p not in niftis})
    for i, folder in enumerate(folders):
        try:
            vol = dicom_io.read_dicom_series(folder, "CT")
        except UserError as exc:
            print(f"skipped: {exc}")
            continue
        ds = vol.meta["datasets"][0]
        patient = "".join(c if c.isalnum() or c in "-." else "-" for c in str(ds.get("PatientID", "") or folder.name))
        name = f"{patient}_{i:04d}.nii.gz"
        nifti_io.write_nifti(out_dir / name, nifti_io.Volume(vol.hu, vol.affine, {}))
        patients.setdefault(patient, []).append(name)
        print(f"{folder} -> {name} {vol.hu.shape} spacing {tuple(round(s, 3) for s in vol.spacing_mm)} mm")
    if not patients:
        raise UserError(f"{input_dir}: no readable DICOM series or NIfTI volumes found")
    ids = sorted(patients)
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n_test = max(1, round(len(ids) * test_fraction)) if len(ids) >= 3 else 0
    n_val = max(1, round(len(ids) * val_fraction)) if len(ids) >= 3 else 0
    split = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    if len(ids) < 3:
        warnings.warn(f"only {len(ids)} patient(s): all in train, none held out", stacklevel=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, members in split.items():
        with runtime.atomic_path(out_dir / f"{name}.txt") as tmp:
            tmp.write_text("".join(f"{f}\n" for p in members for f in patients[p]))
    with runtime.atomic_path(out_dir / "patients.json") as tmp:
        tmp.write_text(json.dumps({"split": split, "files": patients}, indent=2))
    print(f"{len(ids)} patients: " + ", ".join(f"{k} {len(v)}" for k, v in split.items()) + f"; lists in {out_dir}")
    return split


def upsample_file(
    checkpoint: Path,
    input_path: Path,
    output: Path,
    factor: float | None,
    cfg: Config,
    device_name: str = "auto",
    log_dir: Path | None = None,
) -> list[Path]:
    """LR NIfTI or DICOM series in; NIfTI in HU out (and a DICOM series for DICOM input). Everything is read and
    checked before anything is written."""
    if not output.name.endswith((".nii", ".nii.gz")):
        raise UserError(f"--output {output}: must end in .nii or .nii.gz")
    runtime.refuse_overwrite_input(output, input_path)
    device = runtime.pick_device(device_name)
    vol = nifti_io.read_volume(input_path, "CT")
    if vol.hu.shape[0] < 2:
        raise UserError(f"{input_path}: {vol.hu.shape[0]} slice(s); z super-resolution needs at least 2")
    predict, model_cfg, state = load_predictor(checkpoint, cfg.infer, device)
    factor = factor or float(state["factor"])
    if not factor >= 1:
        raise UserError(f"--factor must be >= 1, got {factor}")
    if abs(vol.spacing_mm[0] - model_cfg.data.target_spacing_mm) > 0.1 * model_cfg.data.target_spacing_mm:
        warnings.warn(
            f"{input_path}: slice spacing {vol.spacing_mm[0]:.2f} mm; the model was trained on "
            f"{model_cfg.data.target_spacing_mm} mm input",
            stacklevel=2,
        )
    dicom_dir = output.parent / (output.name.removesuffix(".gz").removesuffix(".nii") + "_dicom")
    from_dicom = "datasets" in vol.meta
    if from_dicom and dicom_dir.exists():
        raise UserError(f"{dicom_dir} exists; remove it or choose another --output")
    with Measure() as mem:
        sr = upsample_hu(vol.hu, factor, predict, model_cfg)
    meta = {k: v for k, v in vol.meta.items() if k == "nifti_header"}
    sr_vol = nifti_io.Volume(sr, nifti_io.scale_z_affine(vol.affine, 1.0 / factor), meta)
    tmp_dir = dicom_dir.parent / f".{dicom_dir.name}.tmp"
    try:  # the DICOM series goes to a temporary folder, renamed only once the NIfTI is written too
        if from_dicom:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            description = f"ct_throughplane_sr {state['kind']} x{factor:g}"
            dicom_io.write_dicom_series(sr_vol, vol.meta["datasets"], tmp_dir, description=description)
        written = [nifti_io.write_nifti(output, sr_vol)]
        if from_dicom:
            os.replace(tmp_dir, dicom_dir)
            written.append(dicom_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    record = {
        "input": str(input_path),
        "output": [str(p) for p in written],
        "kind": state["kind"],
        "factor": factor,
        "shape_in": list(vol.hu.shape),
        "shape_out": list(sr.shape),
        "time_s": round(mem.seconds, 3),
        "peak_rss_mb": round(mem.peak_rss / 2**20, 1),
        "device": str(device),
    }
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        with runtime.atomic_path(log_dir / "upsample.json") as tmp:
            tmp.write_text(json.dumps(record, indent=2))
    print(
        f"{vol.hu.shape} -> {sr.shape} (x{factor:g}) in {mem.seconds:.1f} s, peak RSS {record['peak_rss_mb']} MB; "
        f"wrote {', '.join(map(str, written))}"
    )
    return written


# --- commands ---

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
ConfigOpt = typer.Option(None, "--config", help="YAML config (default: configs/ct_throughplane_sr.yaml)")
PresetOpt = typer.Option("full", "--preset", help="preset in the config file: full (seed 004) or tiny (CPU)")
SetOpt = typer.Option(None, "--set", help="override a value: section.key=value (repeatable)")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda")
DataOpt = typer.Option(None, "--data", help="folder written by `prepare` (default: synthetic phantoms)")


def build_config(
    config: Path | None, preset: str, overrides: list[str] | None, data: str | None = None, max_steps: int | None = None
) -> Config:
    cfg = load_config(Config, config or default_config_path(__file__), preset, overrides)
    if data is not None:
        cfg.data.path = data
    if max_steps is not None:
        cfg.train.max_steps = max_steps
    return cfg


@app.command("prepare")
def prepare_cmd(
    input: Path = typer.Option(..., "--input", help="folder of DICOM series (one per folder) / NIfTI"),
    out: Path = typer.Option(Path("data/ct"), "--out"),
    val_fraction: float = typer.Option(0.1),
    test_fraction: float = typer.Option(0.1),
    config: Path = ConfigOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
):
    """Convert DICOM series to NIfTI in HU and write train/val/test lists split by patient."""
    cfg = build_config(config, preset, set_)
    prepare(input, out, val_fraction, test_fraction, cfg.train.seed)


@app.command("train")
def train_cmd(
    model: str = typer.Option("unet3d", "--model", help="unet3d | ldm"),
    out: Path = typer.Option(None, "--out"),
    data: str = DataOpt,
    vae: Path = typer.Option(None, "--vae", help="VAE checkpoint for --model ldm"),
    max_steps: int = typer.Option(None, "--max-steps"),
    resume: Path = typer.Option(None, "--resume"),
    config: Path = ConfigOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
):
    """Train the SimpleUNet3D baseline or the latent diffusion model (ResShift + ControlNet)."""
    if model not in ("unet3d", "ldm"):
        raise UserError(f"--model must be unet3d or ldm, got '{model}'")
    cfg = build_config(config, preset, set_, data, max_steps)
    train(cfg, model, out or Path(f"runs/{model}"), device, vae, resume, sys.argv)


@app.command("train-vae")
def train_vae_cmd(
    out: Path = typer.Option(Path("runs/vae"), "--out"),
    data: str = DataOpt,
    max_steps: int = typer.Option(None, "--max-steps"),
    resume: Path = typer.Option(None, "--resume"),
    config: Path = ConfigOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
):
    """Train the 3-D KL-VAE on HR and interpolated-LR patches (the LDM's latent space)."""
    train(build_config(config, preset, set_, data, max_steps), "vae", out, device, None, resume, sys.argv)


@app.command("upsample")
def upsample_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint"),
    input: Path = typer.Option(..., "--input"),
    output: Path = typer.Option(..., "--output", help="SR.nii.gz (+ SR_dicom/ for DICOM input)"),
    factor: float = typer.Option(None, "--factor", help="default: the trained spacing ratio"),
    out: Path = typer.Option(None, "--out", help="optional folder for upsample.json (time, memory)"),
    config: Path = ConfigOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
):
    """Upsample an LR volume along z; the model comes from the checkpoint, infer.* from the config."""
    upsample_file(checkpoint, input, output, factor, build_config(config, preset, set_), device, out)


@app.command("evaluate")
def evaluate_cmd(
    hr: Path = typer.Option(None, "--hr", help="held-out HR NIfTI/DICOM (default: a phantom)"),
    unet: Path = typer.Option(None, "--unet", help="unet3d checkpoint"),
    ldm: Path = typer.Option(None, "--ldm", help="ldm checkpoint"),
    out: Path = typer.Option(Path("runs/evaluate"), "--out"),
    config: Path = ConfigOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
):
    """Trilinear, cubic, UNet3D and LDM on LR simulated from an HR volume: masked PSNR/SSIM/HU-MAE, time, RAM."""
    evaluate(build_config(config, preset, set_), out, hr, unet, ldm, device, sys.argv)


if __name__ == "__main__":
    runtime.cli_main(app)
