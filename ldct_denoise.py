"""Low-dose CT -> full-dose CT with a pixel-space conditional diffusion model (seeds 003 and 000).

The low-dose slice is concatenated to x_t (seed 003's "concat" conditioning); a UNet with sinusoidal time
embedding, ResNet blocks and self-attention at the low resolutions predicts eps (or x0). Samplers: DDPM
ancestral and DDIM (steps, eta). Sampling uses the EMA weights. Everything works in HU: slices are mapped
to [-1, 1] with one fixed HU range from the config (never per-slice min-max), so outputs map back to HU.

Usage:
  python ldct_denoise.py demo --out runs/demo                         # few CPU minutes on built-in phantoms
  python ldct_denoise.py train --preset tiny --out runs/ldct          # synthetic phantoms (the default data)
  python ldct_denoise.py train --data /data/mayo --out runs/ldct      # AAPM-Mayo: <patient>/{full,quarter}_*/
  python ldct_denoise.py train --data /data/ct_series --set data.dose=0.25   # single dose: simulated low dose
  python ldct_denoise.py train --resume runs/ldct/checkpoint.pt --out runs/ldct
  python ldct_denoise.py denoise --checkpoint runs/ldct/checkpoint.pt --input L067/quarter_1mm --output out/
  python ldct_denoise.py eval --checkpoint runs/ldct/checkpoint.pt [--data /data/mayo]
  torchrun --nproc_per_node 2 ldct_denoise.py train --preset tiny --out runs/ddp
Any config value: --set train.lr=1e-4 --set model.channel_mults=[1,2,4] (see configs/ldct_denoise.yaml).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import typer
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from common import UserError, dicom_io, metrics, nifti_io, runtime, synthetic, viz
from common.config import config_from_dict, config_to_dict, default_config_path, load_config

SCRIPT = Path(__file__).stem

# --- config ---


@dataclass
class DataConfig:
    path: str | None = None  # None: synthetic phantoms; a Mayo-layout folder; or single-dose series/NIfTI
    dose: float = 0.25  # simulated dose fraction for phantoms and single-dose data
    hu_range: tuple[float, float] = (-1024.0, 3072.0)  # maps linearly to [-1, 1]; outputs map back exactly
    crop_size: int = 256
    phantom_size: int = 256  # synthetic slice size (pixels over a 360 mm field of view)
    phantom_train: int = 512  # number of synthetic training slices (generated once, cached in memory)
    phantom_val: int = 16
    val_patients: list[str] = field(default_factory=list)  # Mayo: held-out patients (default: the last one)
    num_workers: int = 0


@dataclass
class ModelConfig:
    base_channels: int = 64
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    num_res_blocks: int = 2
    attention_levels: list[int] = field(default_factory=lambda: [3])  # level index (0 = full resolution)
    attention_head_channels: int = 64
    dropout: float = 0.1


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    schedule: str = "linear"  # linear | cosine
    parameterization: str = "eps"  # eps | x0
    loss: str = "l2"  # l2 | l1 | huber


@dataclass
class TrainConfig:
    max_steps: int = 200_000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 2000
    amp: str = "auto"  # bf16 autocast: auto = on for CUDA only
    compile: str = "auto"
    channels_last: str = "auto"


@dataclass
class SampleConfig:
    sampler: str = "ddim"  # ddim | ddpm
    steps: int = 50
    eta: float = 0.0
    eval_window_hu: tuple[float, float] = (-160.0, 240.0)  # soft-tissue window for metrics
    nlm_strengths: list[float] = field(default_factory=lambda: [0.4, 0.6, 0.8, 1.0, 1.3])


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def hu_to_unit(hu, hu_range):
    lo, hi = hu_range
    return (hu - lo) / (hi - lo) * 2.0 - 1.0


def unit_to_hu(x, hu_range):
    lo, hi = hu_range
    return (x + 1.0) / 2.0 * (hi - lo) + lo


# --- data ---
# A "slice source" is a list of callables, each returning one (low_dose_hu, full_dose_hu) pair of 2-D arrays.
# Three layouts feed it: synthetic phantoms, AAPM-Mayo paired series, single-dose volumes + simulated low dose.


def phantom_sources(n: int, cfg: DataConfig, seed: int) -> list:
    """Lazy synthetic pairs: slice i is the same phantom and noise for a given seed, whenever it is made."""

    def make(i: int):
        rng = np.random.default_rng([seed, i])
        return synthetic.simulate_low_dose_ct(synthetic.ct_phantom(cfg.phantom_size, rng), cfg.dose, rng)

    return [lambda i=i: make(i) for i in range(n)]


def find_mayo_pairs(root: Path) -> dict[str, list[tuple[Path, Path]]]:
    """<root>/<patient>/<full*>/ and <quarter*>/ series, matched by slice position (not by file name)."""
    import pydicom

    pairs: dict[str, list[tuple[Path, Path]]] = {}
    for patient in sorted(p for p in root.iterdir() if p.is_dir()):
        subs = {s.name.lower(): s for s in patient.iterdir() if s.is_dir()}
        full = [s for n, s in subs.items() if n.startswith("full")]
        quarter = [s for n, s in subs.items() if n.startswith(("quarter", "low"))]
        if not full or not quarter:
            continue

        def positions(folder: Path) -> dict[float, Path]:
            out = {}
            for f in sorted(folder.iterdir()):
                try:
                    ds = pydicom.dcmread(f, stop_before_pixels=True)
                    out[round(float(ds.ImagePositionPatient[2]), 2)] = f
                except Exception:  # noqa: BLE001 - non-DICOM files in a series folder are skipped
                    continue
            return out

        fd, ld = positions(full[0]), positions(quarter[0])
        matched = [(ld[z], fd[z]) for z in sorted(set(fd) & set(ld))]
        if matched:
            pairs[patient.name] = matched
    return pairs


def load_slice_sources(cfg: DataConfig, seed: int) -> tuple[list, list, str]:
    """Returns (train_sources, val_sources, description). Each source is a zero-argument callable -> pair."""
    if cfg.path is None:
        train = phantom_sources(cfg.phantom_train, cfg, seed)
        val = phantom_sources(cfg.phantom_val, cfg, seed + 10_000)  # held back: a disjoint seed stream
        return train, val, f"synthetic phantoms {cfg.phantom_size}px, projection-domain dose {cfg.dose}"
    root = Path(cfg.path)
    if not root.exists():
        raise UserError(f"data path not found: {root}")
    mayo = find_mayo_pairs(root) if root.is_dir() else {}
    if mayo:
        patients = sorted(mayo)
        val_patients = cfg.val_patients or patients[-1:]
        unknown = set(val_patients) - set(patients)
        if unknown:
            raise UserError(f"data.val_patients {sorted(unknown)} not found in {root} (have {patients})")

        def src(ld: Path, fd: Path):
            return lambda: (dicom_io.read_dicom(ld)[0], dicom_io.read_dicom(fd)[0])

        train = [src(*p) for pt in patients if pt not in val_patients for p in mayo[pt]]
        val = [src(*p) for pt in val_patients for p in mayo[pt]]
        if not train:
            raise UserError(f"{root}: every patient is in data.val_patients; nothing left to train on")
        return train, val, f"AAPM-Mayo pairs from {root}, val patients {val_patients}"
    # single-dose volumes: NIfTI files or DICOM series folders; low dose simulated per slice, split by volume
    volumes = sorted([p for p in root.rglob("*") if p.name.endswith((".nii", ".nii.gz"))])
    if root.is_file():
        volumes = [root]
    if not volumes:
        volumes = sorted({p.parent for p in root.rglob("*") if p.is_file()}) if root.is_dir() else []
    if not volumes:
        raise UserError(f"{root}: no Mayo pairs, NIfTI volumes or DICOM series found")
    sources = []
    for vi, vol_path in enumerate(volumes):
        vol = nifti_io.read_volume(vol_path)
        for zi in range(vol.hu.shape[0]):
            hu_slice = vol.hu[zi]
            size = max(hu_slice.shape)
            padded = np.full((size, size), -1000.0, np.float32)  # radon needs a square slice
            padded[: hu_slice.shape[0], : hu_slice.shape[1]] = hu_slice

            def simulate(s=padded, shape=hu_slice.shape, key=(vi, zi)):
                rng = np.random.default_rng([seed, *key])
                low, full = synthetic.simulate_low_dose_ct(s, cfg.dose, rng)
                return low[: shape[0], : shape[1]], full[: shape[0], : shape[1]]

            sources.append((vi, simulate))
    n_val_vol = max(1, len(volumes) // 10) if len(volumes) > 1 else 0
    val_ids = set(range(len(volumes) - n_val_vol, len(volumes)))
    train = [s for v, s in sources if v not in val_ids]
    val = [s for v, s in sources if v in val_ids] or train[-max(1, len(train) // 10):]
    return train, val, f"single-dose volumes from {root}, simulated dose {cfg.dose}"


class PairDataset(Dataset):
    """Random aligned crops in [-1, 1]. Crop positions come from (seed, epoch, index), so a resumed run sees
    exactly the same data as an uninterrupted one."""

    def __init__(self, sources: list, cfg: DataConfig, seed: int, crop: bool = True):
        self.sources, self.cfg, self.seed, self.crop, self.epoch = sources, cfg, seed, crop, 0
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.sources)

    def pair_hu(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self.cache:  # simulated/decoded slices are expensive; keep them
            self.cache[i] = self.sources[i]()
        return self.cache[i]

    def __getitem__(self, i: int):
        low, full = self.pair_hu(i)
        if self.crop:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            size = self.cfg.crop_size
            if low.shape[0] < size or low.shape[1] < size:
                raise UserError(f"data.crop_size {size} is larger than a slice {low.shape}")
            y, x = rng.integers(0, low.shape[0] - size + 1), rng.integers(0, low.shape[1] - size + 1)
            low, full = low[y : y + size, x : x + size], full[y : y + size, x : x + size]
        to_t = lambda a: torch.from_numpy(hu_to_unit(np.ascontiguousarray(a, np.float32), self.cfg.hu_range))[None]  # noqa: E731
        return to_t(low), to_t(full)


# --- model ---


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4) if ch >= 4 else 1, ch)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, time_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time = nn.Linear(time_dim, out_ch)
        self.norm2, self.drop, self.conv2 = norm(out_ch), nn.Dropout(dropout), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as identity: stable deep training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, ch: int, head_channels: int):
        super().__init__()
        self.heads = max(1, ch // head_channels)
        self.norm, self.qkv, self.proj = norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # flash/memory-efficient kernels where available
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """DDPM UNet (seed 003): input [x_t, low_dose] (2 channels), output eps or x0 (1 channel)."""

    def __init__(self, cfg: ModelConfig, in_channels: int = 2):
        super().__init__()
        ch, time_dim = cfg.base_channels, cfg.base_channels * 4
        self.base = ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.init_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down, skip_chs, cur = nn.ModuleList(), [ch], ch
        n_levels = len(cfg.channel_mults)
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                block = nn.ModuleList([ResBlock(cur, ch * mult, time_dim, cfg.dropout)])
                cur = ch * mult
                if level in cfg.attention_levels:
                    block.append(SelfAttention(cur, cfg.attention_head_channels))
                self.down.append(block)
                skip_chs.append(cur)
            if level < n_levels - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skip_chs.append(cur)
        self.mid = nn.ModuleList([ResBlock(cur, cur, time_dim, cfg.dropout),
                                  SelfAttention(cur, cfg.attention_head_channels),
                                  ResBlock(cur, cur, time_dim, cfg.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(cur + skip_chs.pop(), ch * mult, time_dim, cfg.dropout)])
                cur = ch * mult
                if level in cfg.attention_levels:
                    block.append(SelfAttention(cur, cfg.attention_head_channels))
                self.up.append(block)
            if level > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(cur, cur, 3, padding=1)]))
        self.out = nn.Sequential(norm(cur), nn.SiLU(), nn.Conv2d(cur, 1, 3, padding=1))
        self.downsample_factor = 2 ** (n_levels - 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, low_dose: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.base))
        h = self.init_conv(torch.cat([x_t, low_dose], dim=1))
        skips = [h]
        for block in self.down:
            if isinstance(block[0], ResBlock):
                h = block[0](h, temb)
                for layer in block[1:]:
                    h = layer(h)
            else:
                h = block[0](h)
            skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
        for block in self.up:
            if isinstance(block[0], ResBlock):
                h = block[0](torch.cat([h, skips.pop()], dim=1), temb)
                for layer in block[1:]:
                    h = layer(h)
            else:
                h = block[1](block[0](h))
        return self.out(h)


# --- diffusion and samplers ---


class Schedule:
    """Noise schedule tensors (linear betas 1e-4..0.02 or the cosine schedule of Nichol & Dhariwal)."""

    def __init__(self, cfg: DiffusionConfig, device: torch.device):
        T = cfg.timesteps
        if cfg.schedule == "linear":
            betas = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
        elif cfg.schedule == "cosine":
            s = torch.linspace(0, T, T + 1, dtype=torch.float64) / T
            f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            raise UserError(f"config: diffusion.schedule must be linear or cosine, got '{cfg.schedule}'")
        if cfg.parameterization not in ("eps", "x0"):
            raise UserError(f"config: diffusion.parameterization must be eps or x0, got '{cfg.parameterization}'")
        self.T, self.parameterization = T, cfg.parameterization
        self.betas = betas.float().to(device)
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float().to(device)

    def _ab(self, t: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[t][:, None, None, None]

    def q_sample(self, x0, t, noise):
        ab = self._ab(t)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def x0_eps(self, model_out, x_t, t):
        """(x0, eps) from the network output under either parameterisation."""
        ab = self._ab(t)
        if self.parameterization == "eps":
            x0 = (x_t - (1 - ab).sqrt() * model_out) / ab.sqrt()
            return x0, model_out
        eps = (x_t - ab.sqrt() * model_out) / (1 - ab).sqrt()
        return model_out, eps


def diffusion_loss(model, schedule: Schedule, full_dose, low_dose, loss_kind: str) -> torch.Tensor:
    t = torch.randint(0, schedule.T, (full_dose.shape[0],), device=full_dose.device)
    noise = torch.randn_like(full_dose)
    out = model(schedule.q_sample(full_dose, t, noise), t, low_dose)
    target = noise if schedule.parameterization == "eps" else full_dose
    if loss_kind == "l2":
        return F.mse_loss(out.float(), target)
    if loss_kind == "l1":
        return F.l1_loss(out.float(), target)
    if loss_kind == "huber":
        return F.smooth_l1_loss(out.float(), target)
    raise UserError(f"config: diffusion.loss must be l2, l1 or huber, got '{loss_kind}'")


@torch.inference_mode()
def sample(model, schedule: Schedule, low_dose: torch.Tensor, sampler: str = "ddim", steps: int = 50,
           eta: float = 0.0, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """Sample full-dose images for a batch of low-dose images in [-1, 1]. Returns (x0, network evaluations).

    DDPM: the ancestral sampler over all T steps. DDIM (Song et al.): `steps` evenly spaced timesteps, eta=0 is
    deterministic. x0 estimates are clipped to [-1, 1] (the HU range of the config)."""
    device = low_dose.device
    x = torch.randn(low_dose.shape, generator=generator, device="cpu").to(device)
    if sampler == "ddpm":
        timesteps, eta = list(range(schedule.T - 1, -1, -1)), 1.0
    elif sampler == "ddim":
        if not 1 <= steps <= schedule.T:
            raise UserError(f"--steps must be between 1 and {schedule.T}, got {steps}")
        timesteps = np.linspace(0, schedule.T - 1, steps).round().astype(int)[::-1].tolist()
    else:
        raise UserError(f"sampler must be ddim or ddpm, got '{sampler}'")
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        tt = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
        x0, eps = schedule.x0_eps(model(x, tt, low_dose).float(), x, tt)
        x0 = x0.clamp(-1, 1)
        ab = schedule.alphas_cumprod[t]
        ab_prev = schedule.alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0, device=device)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # consistent with the clipped x0
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).clamp(min=0).sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
        if t_prev >= 0 and eta > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device="cpu").to(device)
    return x, len(timesteps)


def denoise_hu(model, schedule: Schedule, low_dose_hu: np.ndarray, cfg: Config, device: torch.device,
               sampler: str, steps: int, eta: float, seed: int = 0) -> np.ndarray:
    """One 2-D slice in HU -> denoised HU. Pads to a multiple of the UNet's downsampling (reflect)."""
    f = model.downsample_factor
    h, w = low_dose_hu.shape
    ph, pw = (-h) % f, (-w) % f
    x = torch.from_numpy(hu_to_unit(low_dose_hu.astype(np.float32), cfg.data.hu_range))[None, None]
    x = F.pad(x, (0, pw, 0, ph), mode="reflect") if (ph or pw) else x
    gen = torch.Generator().manual_seed(seed)
    out, _ = sample(model, schedule, x.to(device), sampler, steps, eta, gen)
    return unit_to_hu(out[0, 0, :h, :w].float().cpu().numpy(), cfg.data.hu_range)


# --- train ---


def build_model(cfg: Config, device: torch.device) -> UNet:
    return UNet(cfg.model).to(device)


def train(cfg: Config, out_dir: Path, resume: Path | None = None, device_name: str = "auto",
          argv: list[str] | None = None) -> Path:
    """Train the conditional DDPM; returns the checkpoint path. Works single-process and under torchrun."""
    dist = runtime.init_distributed(device_name)
    device = dist.device
    runtime.seed_everything(cfg.train.seed + dist.rank)
    if dist.is_main:
        runtime.prepare_run_dir(out_dir, cfg, __file__, argv)
    train_sources, _, data_desc = load_slice_sources(cfg.data, cfg.train.seed)
    dataset = PairDataset(train_sources, cfg.data, cfg.train.seed)
    sampler = DistributedSampler(dataset, dist.world_size, dist.rank, shuffle=True, seed=cfg.train.seed,
                                 drop_last=True) if dist.world_size > 1 else None
    per_rank_batch = max(1, cfg.train.batch_size // dist.world_size)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    loader = DataLoader(dataset, per_rank_batch, shuffle=sampler is None, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.num_workers, generator=generator,
                        persistent_workers=cfg.data.num_workers > 0)
    if len(loader) == 0:
        raise UserError(f"only {len(dataset)} training slices for batch size {per_rank_batch}; lower train.batch_size")

    model = build_model(cfg, device)
    schedule = Schedule(cfg.diffusion, device)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(
        cfg.train.ema_decay))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    step = 0
    if resume is not None:
        state = runtime.load_checkpoint(resume, SCRIPT)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        runtime.set_rng_state(state["rng"][dist.rank] if isinstance(state["rng"], list) else state["rng"])
        if dist.is_main:
            print(f"resumed from {resume} at step {step}")
    if runtime.switch_on(cfg.train.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    net = runtime.ddp_wrap(model, dist)
    if runtime.switch_on(cfg.train.compile, device):
        net = torch.compile(net)
    use_amp = runtime.switch_on(cfg.train.amp, device)
    if dist.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"data: {data_desc}; {len(dataset)} training slices; model {n_params / 1e6:.2f} M parameters; "
              f"device {device}, world size {dist.world_size}")

    ckpt_path = out_dir / "checkpoint.pt"
    steps_per_epoch = len(loader)
    with runtime.ProgressLogger(out_dir if dist.is_main else None, cfg.train.max_steps, "train",
                                enabled=dist.is_main, log_every=cfg.train.log_every, start_step=step) as progress:
        while step < cfg.train.max_steps:
            epoch, skip = divmod(step, steps_per_epoch)
            dataset.epoch = epoch
            if sampler is not None:
                sampler.set_epoch(epoch)
            generator.manual_seed(cfg.train.seed + epoch)  # shuffle order depends only on the epoch
            for i, (low_dose, full_dose) in enumerate(loader):
                if i < skip:  # resuming mid-epoch: replay the order, skip what was already trained on
                    continue
                low_dose, full_dose = low_dose.to(device), full_dose.to(device)
                with runtime.amp_autocast(device, use_amp):
                    loss = diffusion_loss(net, schedule, full_dose, low_dose, cfg.diffusion.loss)
                if not torch.isfinite(loss):
                    raise UserError(f"non-finite loss {loss.item()} at step {step + 1}; last good checkpoint "
                                    f"kept at {ckpt_path}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optimizer.step()
                ema.update_parameters(model)
                step += 1
                progress.log(step, loss=loss.item(), grad_norm=grad_norm.item(), lr=cfg.train.lr, epoch=epoch)
                if dist.is_main and (step % cfg.train.ckpt_every == 0 or step == cfg.train.max_steps):
                    save_state(ckpt_path, cfg, model, ema, optimizer, step, dist)
                if step >= cfg.train.max_steps:
                    break
    if dist.is_main:
        save_preview(out_dir, cfg, ema.module, schedule, device)
    return ckpt_path


def save_state(path: Path, cfg: Config, model, ema, optimizer, step: int, dist) -> None:
    runtime.save_checkpoint(path, {"script": SCRIPT, "config": config_to_dict(cfg), "model": model.state_dict(),
                                   "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                   "rng": runtime.rng_state(), "world_size": dist.world_size})


def save_preview(out_dir: Path, cfg: Config, model, schedule: Schedule, device) -> None:
    _, val_sources, _ = load_slice_sources(cfg.data, cfg.train.seed)
    low, full = val_sources[0]()
    out = denoise_hu(model.eval(), schedule, low, cfg, device, cfg.sample.sampler, cfg.sample.steps, cfg.sample.eta)
    w = cfg.sample.eval_window_hu
    viz.save_panel(out_dir / "preview.png", [low, out, full, out - full], ["low dose", "denoised", "full dose",
                   "denoised - full (HU)"], window=w, error_index=3, suptitle=f"window {list(w)} HU")


# --- evaluate ---


def load_model(checkpoint: Path, device: torch.device, use_ema: bool = True):
    state = runtime.load_checkpoint(checkpoint, SCRIPT)
    try:
        cfg = config_from_dict(Config, state["config"])
        model = build_model(cfg, device)
        weights = state["ema"] if use_ema else state["model"]
        # AveragedModel stores the wrapped module under "module." plus a counter
        weights = {k.removeprefix("module."): v for k, v in weights.items() if k != "n_averaged"}
        model.load_state_dict(weights)
    except (KeyError, RuntimeError) as exc:
        raise UserError(f"{checkpoint}: checkpoint does not match this script's model ({str(exc)[:120]})") from None
    return model.eval(), cfg, int(state.get("step", 0))


def nlm_denoise(low_hu: np.ndarray, strength: float, cfg: Config) -> np.ndarray:
    """skimage non-local means on the normalised slice; h = strength * estimated noise sigma."""
    from skimage.restoration import denoise_nl_means

    x = hu_to_unit(low_hu, cfg.data.hu_range)
    sigma = metrics.noise_std(x)
    out = denoise_nl_means(x, h=strength * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True)
    return unit_to_hu(out.astype(np.float32), cfg.data.hu_range)


def evaluate(checkpoint: Path, out_dir: Path, data_path: str | None = None, device_name: str = "auto",
             sampler: str | None = None, steps: int | None = None, max_slices: int = 16) -> list[dict]:
    """Metrics on held-back slices for: the low-dose input, NLM (strength tuned on validation) and the model."""
    device = runtime.pick_device(device_name)
    model, cfg, trained_steps = load_model(checkpoint, device)
    if data_path is not None:
        cfg.data.path = data_path
    sampler, steps = sampler or cfg.sample.sampler, steps or cfg.sample.steps
    schedule = Schedule(cfg.diffusion, device)
    _, val_sources, data_desc = load_slice_sources(cfg.data, cfg.train.seed)
    pairs = [src() for src in val_sources[:max_slices]]
    window = cfg.sample.eval_window_hu
    n_tune = max(1, len(pairs) // 4)
    tune, test = (pairs[:n_tune], pairs[n_tune:]) if len(pairs) > 1 else (pairs, pairs)

    def mean_psnr(fn):
        return np.mean([metrics.psnr(metrics.to_unit_window(fn(lo), window),
                                     metrics.to_unit_window(fu, window), 1.0) for lo, fu in tune])

    best_h = max(cfg.sample.nlm_strengths, key=lambda h: mean_psnr(lambda lo: nlm_denoise(lo, h, cfg)))
    methods = {"low-dose input": lambda lo: lo, f"NLM (h={best_h}σ)": lambda lo: nlm_denoise(lo, best_h, cfg),
               f"diffusion ({sampler} {steps} steps)": lambda lo: denoise_hu(model, schedule, lo, cfg, device,
                                                                             sampler, steps, cfg.sample.eta)}
    rows, outputs = [], {}
    for name, fn in methods.items():
        t0, per_slice = time.perf_counter(), []
        outputs[name] = []
        for lo, fu in test:
            pred = fn(lo)
            outputs[name].append(pred)
            mask = metrics.body_mask(fu)
            m = metrics.image_metrics(pred, fu, window, mask=mask)
            m["noise_std_hu"] = metrics.noise_std(pred)
            per_slice.append(m)
        row = {"method": name}
        for key in ("psnr_db", "ssim", "mae_hu", "noise_std_hu"):
            row[key] = float(np.mean([m[key] for m in per_slice]))
        row["s_per_slice"] = (time.perf_counter() - t0) / len(test)
        rows.append(row)
    lo, fu = test[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(outputs)
    viz.save_panel(out_dir / "eval_panel.png", [lo, outputs[names[1]][0], outputs[names[2]][0], fu,
                                                outputs[names[2]][0] - fu],
                   ["low dose", names[1], names[2], "full dose", "diffusion - full (HU)"], window=window,
                   error_index=4, suptitle=f"window {list(window)} HU")
    notes = [f"data: {data_desc}; {len(test)} test slices ({len(tune)} more used only to tune NLM)",
             f"PSNR/SSIM: HU clipped to window {list(window)} and mapped to [0,1], data range 1, inside the body "
             f"mask (reference HU > -500); SSIM Gaussian sigma 1.5; MAE in HU inside the mask, unclipped",
             f"noise_std_hu: Immerkaer estimate on the whole output slice; checkpoint {checkpoint} at step "
             f"{trained_steps}", "command: " + " ".join(sys.argv)]
    runtime.print_metrics_table(rows, "ldct_denoise evaluation", out_dir / "metrics.json", notes)
    return rows


# --- denoise files ---


def denoise_files(checkpoint: Path, input_path: Path, output: Path, device_name: str, sampler: str | None,
                  steps: int | None, eta: float | None) -> list[Path]:
    """DICOM file, DICOM series folder or NIfTI volume in; the same kind out, in HU, with new UIDs."""
    device = runtime.pick_device(device_name)
    model, cfg, trained_steps = load_model(checkpoint, device)
    sampler, steps = sampler or cfg.sample.sampler, steps or cfg.sample.steps
    eta = cfg.sample.eta if eta is None else eta
    schedule = Schedule(cfg.diffusion, device)
    if not input_path.exists():
        raise UserError(f"input not found: {input_path}")
    runtime.refuse_overwrite_input(output, input_path)
    description = f"ldct_denoise conditional DDPM, {sampler} {steps} steps, eta {eta}, step {trained_steps}"

    def run(hu: np.ndarray, pad_mask: np.ndarray | None) -> np.ndarray:
        out = denoise_hu(model, schedule, hu, cfg, device, sampler, steps, eta)
        if pad_mask is not None:  # padding outside the field of view is "no data": restore it unchanged
            out[pad_mask] = hu[pad_mask]
        return out

    if input_path.name.endswith((".nii", ".nii.gz")):
        vol = nifti_io.read_nifti(input_path)
        out_hu = np.stack([run(s, None) for s in vol.hu])
        out_path = output if output.name.endswith((".nii", ".nii.gz")) else output / input_path.name
        runtime.refuse_overwrite_input(out_path, input_path)
        return [nifti_io.write_nifti(out_path, nifti_io.Volume(out_hu, vol.affine, vol.meta))]
    if input_path.is_dir():
        files = sorted(p for p in input_path.iterdir() if p.is_file() and not p.name.startswith("."))
        dicom_io.read_dicom_series(input_path)  # validates: one series, all readable, before anything is written
    else:
        files = [input_path]
    series_uid = None
    from pydicom.uid import generate_uid

    series_uid = generate_uid()
    written = []
    for f in files:
        hu, ds = dicom_io.read_dicom(f)
        out = run(hu, dicom_io.padding_mask(hu, ds))
        target = output / f"{f.stem}_denoised.dcm" if (input_path.is_dir() or output.suffix == "") else output
        runtime.refuse_overwrite_input(target, f)
        written.append(dicom_io.write_derived_dicom(ds, out, target, description=description,
                                                    series_uid=series_uid,
                                                    series_description=f"{getattr(ds, 'SeriesDescription', '')} "
                                                                       f"denoised"[:64]))
    print(f"wrote {len(written)} file(s) to {output}")
    return written


# --- commands ---

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
ConfigOpt = typer.Option(None, "--config", help="YAML config (default: configs/ldct_denoise.yaml)")
PresetOpt = typer.Option("full", "--preset", help="preset in the config file: full (seeds) or tiny (CPU)")
SetOpt = typer.Option(None, "--set", help="override a value: section.key=value (repeatable)")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda")


def build_config(config: Path | None, preset: str, overrides: list[str] | None) -> Config:
    return load_config(Config, config or default_config_path(__file__), preset, overrides)


@app.command("train")
def train_cmd(out: Path = typer.Option(Path("runs/ldct"), "--out"), stage: int = typer.Option(0, "--stage"),
              data: str = typer.Option(None, "--data", help="data folder (default: synthetic phantoms)"),
              max_steps: int = typer.Option(None, "--max-steps"), resume: Path = typer.Option(None, "--resume"),
              config: Path = ConfigOpt, preset: str = PresetOpt, set_: list[str] = SetOpt, device: str = DeviceOpt):
    """Train the conditional DDPM (stage 0: the seed-003 baseline)."""
    if stage != 0:
        raise UserError("--stage: only stage 0 (the baseline conditional DDPM) exists so far")
    cfg = build_config(config, preset, set_)
    if data is not None:
        cfg.data.path = data
    if max_steps is not None:
        cfg.train.max_steps = max_steps
    train(cfg, out, resume, device, sys.argv)


@app.command("denoise")
def denoise_cmd(checkpoint: Path = typer.Option(..., "--checkpoint"), input: Path = typer.Option(..., "--input"),
                output: Path = typer.Option(..., "--output"), steps: int = typer.Option(None, "--steps"),
                sampler: str = typer.Option(None, "--sampler", help="ddim | ddpm"),
                eta: float = typer.Option(None, "--eta"), device: str = DeviceOpt):
    """Denoise a DICOM file, a DICOM series folder or a NIfTI volume; writes DICOM (or NIfTI) in HU."""
    denoise_files(checkpoint, input, output, device, sampler, steps, eta)


@app.command("eval")
def eval_cmd(checkpoint: Path = typer.Option(..., "--checkpoint"), out: Path = typer.Option(None, "--out"),
             data: str = typer.Option(None, "--data"), steps: int = typer.Option(None, "--steps"),
             sampler: str = typer.Option(None, "--sampler"), max_slices: int = typer.Option(16, "--max-slices"),
             device: str = DeviceOpt):
    """PSNR/SSIM/MAE in a stated HU window for the low-dose input, NLM and the model."""
    evaluate(checkpoint, out or checkpoint.parent / "eval", data, device, sampler, steps, max_slices)


@app.command("demo")
def demo_cmd(out: Path = typer.Option(Path("runs/demo"), "--out"), device: str = DeviceOpt,
             set_: list[str] = SetOpt):
    """Train the tiny preset on synthetic phantoms for a few CPU minutes, then evaluate on held-back phantoms."""
    cfg = build_config(None, "tiny", set_)
    t0 = time.perf_counter()
    ckpt = train(cfg, out, None, device, sys.argv)
    evaluate(ckpt, out / "eval", None, device)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; outputs in {out}")


if __name__ == "__main__":
    runtime.cli_main(app)
