"""Low-dose CT -> full-dose CT with a pixel-space conditional diffusion model (seeds 003 and 000).

Stage 0 (seed 003): the low-dose slice is concatenated to x_t; a UNet with sinusoidal time embedding, ResNet
blocks and self-attention at the low resolutions predicts eps (or x0). Samplers: DDPM ancestral and DDIM.
Sampling uses the EMA weights. Everything works in HU: slices map to [-1, 1] with one fixed HU range from the
config (never per-slice min-max), so outputs map back to HU.
Stages 1-8 (seed 000), each a switch in the `stages` config section; `train --stage N` turns on the first N:
1 edge prompts + guided filter modules, 2 MSE+L1+LPIPS loss, 3 global cross-attention, 4 ICR head,
5 Schroedinger-bridge-style training + low-dose-start sampler, 6 adversarial fine-tuning, 7 HU augmentations,
8 masked HU-prediction pre-training. See docs/ldct_denoise.md.

Usage:
  python ldct_denoise.py demo --out runs/demo                         # few CPU minutes on built-in phantoms
  python ldct_denoise.py train --preset tiny --out runs/ldct          # synthetic phantoms (the default data)
  python ldct_denoise.py train --data /data/mayo --out runs/ldct      # AAPM-Mayo: <patient>/{full,quarter}_*/
  python ldct_denoise.py train --data /data/ct_series --set data.dose=0.25   # single dose: simulated low dose
  python ldct_denoise.py train --resume runs/ldct/checkpoint.pt --out runs/ldct
  python ldct_denoise.py train --stage 4 --resume-from runs/s3/checkpoint.pt --out runs/s4   # next stage
  python ldct_denoise.py pretrain --out runs/pre && python ldct_denoise.py train --stage 7 \
      --init-from runs/pre/pretrain.pt --out runs/s8
  python ldct_denoise.py denoise --checkpoint runs/ldct/checkpoint.pt --input L067/quarter_1mm --output out/
  python ldct_denoise.py denoise ... --from-low-dose --start 0.8 --steps 10    # bridge sampler (stage 5)
  python ldct_denoise.py eval --checkpoint runs/ldct/checkpoint.pt [--data /data/mayo] [--doses 0.5,0.25,0.1]
  python ldct_denoise.py baseline --kind unet|nlm --preset tiny --out runs/unet
  python ldct_denoise.py ablate --preset tiny --out runs/ablation            # stages 0..8 + baselines, one table
  torchrun --nproc_per_node 2 ldct_denoise.py train --preset tiny --out runs/ddp
Any config value: --set train.lr=1e-4 --set stages.edges=true (see configs/ldct_denoise.yaml).
"""

from __future__ import annotations

import dataclasses
import functools
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

from common import UserError, augment, dicom_io, losses, metrics, nifti_io, perceptual, runtime, synthetic, viz
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
    eval_window_hu: tuple[float, float] = (-160.0, 240.0)  # soft-tissue window for metrics (and the LPIPS loss)
    nlm_strengths: list[float] = field(default_factory=lambda: [0.4, 0.6, 0.8, 1.0, 1.3])


@dataclass
class StagesConfig:
    """Seed 000's upgrades in the order of its 'Practical Sequencing'; `train --stage N` turns on the first N."""

    edges: bool = False  # 1: frozen edge prompts + one guided filter module per decoder skip
    composite_loss: bool = False  # 2: diffusion loss + lambda_l1 L1(x0) + lambda_lpips LPIPS(x0)
    cross_attention: bool = False  # 3: global cross-attention to the low-dose image at the bottleneck
    icr_head: bool = False  # 4: implicit conditional representation head on [coarse, low dose, x, y]
    bridge: bool = False  # 5: low-dose image as x_t at t_br for a ramped fraction of samples
    adversarial: bool = False  # 6: PatchGAN + LSGAN after upgrade.adv_start_fraction of the steps
    augment: bool = False  # 7: HU-space augmentations (probabilities in `augment`)
    pretrain: bool = False  # 8: masked HU-prediction pre-training, then --init-from it


STAGE_NAMES = [f.name for f in dataclasses.fields(StagesConfig)]


@dataclass
class UpgradeConfig:
    edge_detector: str = "canny"  # canny (OpenCV) | pidinet (TorchScript export loaded from pidinet_path)
    pidinet_path: str | None = None
    edge_window_hu: tuple[float, float] = (-160.0, 240.0)  # HU window mapped to 8 bits for Canny
    edge_blur_sigma: float = 1.5  # Gaussian pre-blur (pixels): Canny on raw low-dose noise finds noise
    canny_thresholds: tuple[float, float] = (50.0, 120.0)
    lambda_l1: float = 1.0
    lambda_lpips: float = 0.1
    lpips_net: str = "vgg"  # seed 000: LPIPS(net='vgg')
    xattn_heads: int = 4
    xattn_extra_level: int = -1  # also cross-attend before leaving this decoder level (-1: bottleneck only)
    icr_hidden: int = 32
    icr_head_only_steps: int = 0  # train only the ICR head for the first K steps (plan: when added to a model)
    bridge_t_fraction: float = 0.05  # t_br = fraction * T (seed 000: "like 50 out of 1000")
    bridge_max_fraction: float = 0.5  # fraction of bridge samples ramps 0 -> this ...
    bridge_ramp_fraction: float = 0.5  # ... over this fraction of train.max_steps
    bridge_start: float = 0.8  # sampler: start from the low dose noised to this fraction of T
    bridge_steps: int = 10
    adv_weight: float = 1e-3
    adv_start_fraction: float = 0.75  # GAN term on for the last quarter of train.max_steps (a short fine-tune)
    d_channels: int = 64
    d_lr: float = 1e-4
    transfer_lr_scale: float = 0.1  # --init-from: transferred tensors train at lr * this


@dataclass
class AugmentConfig:
    """Probabilities of seed 000's augmentations (stage 7), applied in HU before normalisation."""

    p_physics_noise: float = 0.2  # projection-domain noise at a dose in dose_range (common.augment)
    p_image_poisson: float = 0.1  # image-domain Poisson of seed 000 (when physics noise was not drawn)
    dose_range: tuple[float, float] = (0.1, 0.5)
    p_gamma: float = 0.3
    p_scale_bias: float = 0.3
    p_histogram_match: float = 0.05  # sparse, as the plan warns
    p_mixup: float = 0.15
    p_patchmix: float = 0.15


@dataclass
class PretrainConfig:
    max_steps: int = 20_000
    lr: float = 1e-4
    block: int = 16  # square mask blocks (pixels)
    mask_fraction: tuple[float, float] = (0.25, 0.5)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    upgrade: UpgradeConfig = field(default_factory=UpgradeConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


def with_stage(cfg: Config, stage: int) -> Config:
    """A copy of cfg with the first `stage` upgrades switched on (switches already on stay on)."""
    if not 0 <= stage <= len(STAGE_NAMES):
        raise UserError(f"--stage must be between 0 and {len(STAGE_NAMES)}, got {stage}")
    cfg = config_from_dict(Config, config_to_dict(cfg))
    for name in STAGE_NAMES[:stage]:
        setattr(cfg.stages, name, True)
    return cfg


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


def simulate_square(hu: np.ndarray, dose: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Projection-domain low dose of any 2-D slice: radon needs a square, so pad with air and crop back."""
    size = max(hu.shape)
    padded = np.full((size, size), -1000.0, np.float32)
    padded[: hu.shape[0], : hu.shape[1]] = hu
    low, full = synthetic.simulate_low_dose_ct(padded, dose, rng)
    return low[: hu.shape[0], : hu.shape[1]], full[: hu.shape[0], : hu.shape[1]]


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


def load_slice_sources(cfg: DataConfig, seed: int, dose: float | None = None) -> tuple[list, list, str]:
    """Returns (train_sources, val_sources, description). Each source is a zero-argument callable -> pair.
    `dose` (the dose sweep) re-simulates the low dose in the projection domain; Mayo pairs from their full dose."""
    if dose is not None:
        cfg = dataclasses.replace(cfg, dose=dose)
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
            if dose is not None:
                return lambda: simulate_square(dicom_io.read_dicom(fd)[0], dose, np.random.default_rng([seed, 7]))
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
            rng = functools.partial(np.random.default_rng, [seed, vi, zi])
            sources.append((vi, lambda s=vol.hu[zi], r=rng: simulate_square(s, cfg.dose, r())))
    n_val_vol = max(1, len(volumes) // 10) if len(volumes) > 1 else 0
    val_ids = set(range(len(volumes) - n_val_vol, len(volumes)))
    train = [s for v, s in sources if v not in val_ids]
    val = [s for v, s in sources if v in val_ids] or train[-max(1, len(train) // 10):]
    return train, val, f"single-dose volumes from {root}, simulated dose {cfg.dose}"



@functools.lru_cache(maxsize=2)
def load_pidinet(path: str | None) -> torch.jit.ScriptModule:
    """PiDiNet as a TorchScript export (torch.jit.trace of the authors' converted model), from a local file."""
    if not path or not Path(path).is_file():
        raise UserError(f"upgrade.pidinet_path: PiDiNet weights not found at {path!r}; export the authors' model "
                        "with torch.jit.trace to a local file, or use upgrade.edge_detector=canny")
    try:
        net = torch.jit.load(path, map_location="cpu").eval()
    except Exception as exc:  # noqa: BLE001 - any load failure is the user's file
        raise UserError(f"{path}: not a TorchScript PiDiNet export ({type(exc).__name__})") from None
    for p in net.parameters():
        p.requires_grad_(False)  # frozen: a fixed structural prompt
    return net


def edge_map(low_hu: np.ndarray, u: UpgradeConfig) -> np.ndarray:
    """Stage 1: the frozen edge prompt of a low-dose slice, float32 in [0, 1], same shape."""
    if u.edge_detector == "canny":
        import cv2

        lo, hi = u.edge_window_hu
        x = (np.clip((low_hu - lo) / (hi - lo), 0, 1) * 255).astype(np.float32)
        x = cv2.GaussianBlur(x, (0, 0), u.edge_blur_sigma)
        return (cv2.Canny(np.round(x).astype(np.uint8), *u.canny_thresholds) / 255.0).astype(np.float32)
    if u.edge_detector == "pidinet":
        x = torch.from_numpy(metrics.to_unit_window(low_hu, u.edge_window_hu).astype(np.float32))
        with torch.no_grad():
            out = load_pidinet(u.pidinet_path)(x[None, None].repeat(1, 3, 1, 1))
        out = out[-1] if isinstance(out, (list, tuple)) else out  # PiDiNet returns side outputs + the fused map
        return out[0, 0].clamp(0, 1).numpy().astype(np.float32)
    raise UserError(f"config: upgrade.edge_detector must be canny or pidinet, got '{u.edge_detector}'")


def augment_pair(low, full, rng: np.random.Generator, partner, a: AugmentConfig, window) -> tuple:
    """Stage 7: seed 000's augmentations in HU, each with its own probability; input and target stay aligned.
    `partner()` returns another random (low, full) crop for histogram matching, MixUp and PatchMix."""
    if rng.random() < a.p_physics_noise:
        low = augment.physics_noise(full, rng, a.dose_range)
    elif rng.random() < a.p_image_poisson:
        low = synthetic.image_domain_poisson(full, float(rng.uniform(*a.dose_range)), rng)
    if rng.random() < a.p_gamma:
        low, full = augment.gamma_jitter((low, full), rng, window)
    if rng.random() < a.p_scale_bias:
        low, full = augment.scale_bias_jitter((low, full), rng)
    if rng.random() < a.p_histogram_match:
        low = augment.histogram_match(low, partner()[1])  # another slice's histogram: a different "scanner"
    if rng.random() < a.p_mixup:
        low, full = augment.mixup((low, full), partner(), rng)
    elif rng.random() < a.p_patchmix:
        low, full = augment.patchmix((low, full), partner(), rng)
    return low, full


class PairDataset(Dataset):
    """Random aligned crops in [-1, 1] (+ the edge prompt in stage 1). Crop positions and augmentations come
    from (seed, epoch, index), so a resumed run sees exactly the same data as an uninterrupted one."""

    def __init__(self, sources: list, cfg: Config, seed: int, crop: bool = True):
        self.sources, self.cfg, self.seed, self.crop, self.epoch = sources, cfg, seed, crop, 0
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.sources)

    def pair_hu(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if i not in self.cache:  # simulated/decoded slices are expensive; keep them
            self.cache[i] = self.sources[i]()
        low, full = self.cache[i]
        if not self.crop:
            return low, full
        size = self.cfg.data.crop_size
        if low.shape[0] < size or low.shape[1] < size:
            raise UserError(f"data.crop_size {size} is larger than a slice {low.shape}")
        y, x = rng.integers(0, low.shape[0] - size + 1), rng.integers(0, low.shape[1] - size + 1)
        return low[y : y + size, x : x + size], full[y : y + size, x : x + size]

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        low, full = self.pair_hu(i, rng)
        if self.cfg.stages.augment and self.crop:
            partner = lambda: self.pair_hu(int(rng.integers(len(self))), rng)  # noqa: E731
            low, full = augment_pair(low, full, rng, partner, self.cfg.augment, self.cfg.sample.eval_window_hu)
        to_t = lambda a: torch.from_numpy(hu_to_unit(np.ascontiguousarray(a, np.float32), self.cfg.data.hu_range))[None]  # noqa: E731
        if self.cfg.stages.edges:
            return to_t(low), to_t(full), torch.from_numpy(edge_map(low, self.cfg.upgrade))[None]
        return to_t(low), to_t(full)


def make_loader(dataset: PairDataset, cfg: Config, dist) -> tuple[DataLoader, DistributedSampler | None, object]:
    sampler = DistributedSampler(dataset, dist.world_size, dist.rank, shuffle=True, seed=cfg.train.seed,
                                 drop_last=True) if dist.world_size > 1 else None
    per_rank_batch = max(1, cfg.train.batch_size // dist.world_size)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    loader = DataLoader(dataset, per_rank_batch, shuffle=sampler is None, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.num_workers, generator=generator,
                        persistent_workers=cfg.data.num_workers > 0)
    if len(loader) == 0:
        raise UserError(f"only {len(dataset)} training slices for batch size {per_rank_batch}; lower train.batch_size")
    return loader, sampler, generator


def batches(loader, sampler, generator, seed: int, step: int):
    """Endless (epoch, batch) stream from `step` on. The order depends only on (seed, epoch), so a resumed run
    replays the epoch and skips what was already trained on."""
    while True:
        epoch, skip = divmod(step, len(loader))
        loader.dataset.epoch = epoch
        if sampler is not None:
            sampler.set_epoch(epoch)
        generator.manual_seed(seed + epoch)
        for i, batch in enumerate(loader):
            if i >= skip:
                step += 1
                yield epoch, batch


# --- model ---


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4) if ch >= 4 else 1, ch)


def coord_grid(b: int, h: int, w: int, device) -> torch.Tensor:
    """(B, 2, H, W) normalised (x, y) in [-1, 1] over the network input."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=device), torch.linspace(-1, 1, w, device=device),
                            indexing="ij")
    return torch.stack([xs, ys])[None].expand(b, -1, -1, -1)


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


class GuidedFilter(nn.Module):
    """Stage 1 (seed 000, option b): refine a decoder skip with the edge map pooled to its scale:
    concat -> 3x3 conv -> GroupNorm -> SiLU -> same channels. Added to the skip, so a decoder trained without
    edges keeps its inputs when the module is new (--resume-from a stage-0 checkpoint)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(ch + 1, ch, 3, padding=1), norm(ch)

    def forward(self, skip, edges):
        edges = F.interpolate(edges, size=skip.shape[-2:], mode="area")  # the edge pyramid, one level per skip
        return skip + F.silu(self.norm(self.conv(torch.cat([skip, edges], dim=1))))


class CrossAttention(nn.Module):
    """Stage 3: UNet features (queries) attend globally to a projection of the low-dose image area-pooled to
    the same grid (keys/values, with (x, y) so positions are known); pre-LayerNorm, multi-head, residual."""

    def __init__(self, ch: int, heads: int):
        super().__init__()
        if ch % heads:
            raise UserError(f"config: upgrade.xattn_heads={heads} must divide the {ch} channels it attends over")
        self.proj = nn.Sequential(nn.Conv2d(3, ch, 3, padding=1), nn.SiLU(), nn.Conv2d(ch, ch, 1))
        self.norm_q, self.norm_kv = nn.LayerNorm(ch), nn.LayerNorm(ch)
        self.attn = nn.MultiheadAttention(ch, heads, batch_first=True)

    def forward(self, h, low_dose):
        b, c, hh, ww = h.shape
        cond = torch.cat([F.interpolate(low_dose, size=(hh, ww), mode="area"), coord_grid(b, hh, ww, h.device)], 1)
        kv = self.norm_kv(self.proj(cond).flatten(2).transpose(1, 2))
        out, _ = self.attn(self.norm_q(h.flatten(2).transpose(1, 2)), kv, kv, need_weights=False)
        return h + out.transpose(1, 2).reshape(b, c, hh, ww)


class UNet(nn.Module):
    """DDPM UNet (seed 003): input [x_t, low_dose] (2 channels), output eps or x0 (1 channel). The stage
    switches add optional modules under their own names (gfm, xattn, icr), so every stage-0 tensor keeps its
    name and shape and transfers between stages."""

    def __init__(self, cfg: ModelConfig, in_channels: int = 2, stages: StagesConfig | None = None,
                 up: UpgradeConfig | None = None, alphas_cumprod: torch.Tensor | None = None,
                 parameterization: str = "eps"):
        super().__init__()
        stages, up = stages or StagesConfig(), up or UpgradeConfig()
        ch, time_dim = cfg.base_channels, cfg.base_channels * 4
        self.base, self.parameterization = ch, parameterization
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
        self.xattn = nn.ModuleDict({"mid": CrossAttention(cur, up.xattn_heads)}) if stages.cross_attention else None
        if stages.cross_attention and up.xattn_extra_level >= 0:
            if not 1 <= up.xattn_extra_level <= n_levels - 2:
                raise UserError(f"config: upgrade.xattn_extra_level must be -1 or in 1..{n_levels - 2}")
            self.xattn[str(up.xattn_extra_level)] = CrossAttention(ch * cfg.channel_mults[up.xattn_extra_level],
                                                                   up.xattn_heads)
        self.up, self.up_levels, gfm_chs = nn.ModuleList(), [], []
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                gfm_chs.append(skip_chs.pop())
                block = nn.ModuleList([ResBlock(cur + gfm_chs[-1], ch * mult, time_dim, cfg.dropout)])
                cur = ch * mult
                if level in cfg.attention_levels:
                    block.append(SelfAttention(cur, cfg.attention_head_channels))
                self.up.append(block)
                self.up_levels.append(level)
            if level > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(cur, cur, 3, padding=1)]))
                self.up_levels.append(level)
        self.gfm = nn.ModuleList([GuidedFilter(c) for c in gfm_chs]) if stages.edges else None
        self.out = nn.Sequential(norm(cur), nn.SiLU(), nn.Conv2d(cur, 1, 3, padding=1))
        self.icr = None
        if stages.icr_head:  # stage 4: 1x1-conv MLP on [coarse, low dose, x, y] -> residual; zero last layer
            h = up.icr_hidden
            self.icr = nn.Sequential(nn.Conv2d(4, h, 1), nn.ReLU(), nn.Conv2d(h, h, 1), nn.ReLU(), nn.Conv2d(h, 1, 1))
            nn.init.zeros_(self.icr[-1].weight)
            nn.init.zeros_(self.icr[-1].bias)
        ab = alphas_cumprod if alphas_cumprod is not None else torch.ones(1)
        self.register_buffer("alphas_cumprod", ab.float().clone(), persistent=False)  # eps -> x0 for the ICR head
        self.downsample_factor = 2 ** (n_levels - 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, low_dose: torch.Tensor | None,
                edges: torch.Tensor | None = None) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.base))
        h = self.init_conv(torch.cat([x_t, low_dose], dim=1) if low_dose is not None else x_t)
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
        if self.xattn is not None:
            h = self.xattn["mid"](h, low_dose)
        n_skip = 0
        for block, level in zip(self.up, self.up_levels):
            if isinstance(block[0], ResBlock):
                skip = skips.pop()
                if self.gfm is not None:
                    skip = self.gfm[n_skip](skip, edges)
                    n_skip += 1
                h = block[0](torch.cat([h, skip], dim=1), temb)
                for layer in block[1:]:
                    h = layer(h)
            else:
                if self.xattn is not None and str(level) in self.xattn:
                    h = self.xattn[str(level)](h, low_dose)
                h = block[1](block[0](h))
        out = self.out(h)
        return out if self.icr is None else self.refine(out, x_t, t, low_dose)

    def refine(self, out, x_t, t, low_dose):
        """ICR head on the image: with eps output, coarse x0 comes from the schedule and the image residual r is
        mapped back exactly (eps' = eps - sqrt(ab / (1 - ab)) r), so the head is the identity at init either way."""
        b, _, h, w = out.shape
        if self.parameterization == "x0":
            return out + self.icr(torch.cat([out, low_dose, coord_grid(b, h, w, out.device)], 1))
        ab = self.alphas_cumprod[t][:, None, None, None]
        coarse = ((x_t - (1 - ab).sqrt() * out) / ab.sqrt()).clamp(-1, 1)
        r = self.icr(torch.cat([coarse, low_dose, coord_grid(b, h, w, out.device)], 1))
        return out - (ab / (1 - ab)).sqrt() * r


def patch_discriminator(ch: int) -> nn.Sequential:
    """Stage 6: seed 000's PatchGAN (4x4 convs, 3 stride-2, BatchNorm, LeakyReLU) -> a map of patch logits."""
    layers, c_in = [], 1
    for i, (c_out, stride) in enumerate([(ch, 2), (ch * 2, 2), (ch * 4, 2), (ch * 8, 1)]):
        layers += [nn.Conv2d(c_in, c_out, 4, stride, 1)] + ([nn.BatchNorm2d(c_out)] if i else [])
        layers.append(nn.LeakyReLU(0.2))
        c_in = c_out
    return nn.Sequential(*layers, nn.Conv2d(c_in, 1, 4, 1, 1))


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


def diffusion_loss(model, schedule: Schedule, full_dose, low_dose, loss_kind: str, edges=None,
                   bridge_fraction: float = 0.0, bridge_t: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed-003 loss on the parameterisation's target; returns (loss, x0 estimate clipped to [-1, 1]).
    Stage 5 (seed 000 bridge, Method 1): a `bridge_fraction` of the samples get x_t = the low-dose image at
    t = bridge_t, and the target is the noise that would have made it: (low - sqrt(ab) full) / sqrt(1 - ab)."""
    t = torch.randint(0, schedule.T, (full_dose.shape[0],), device=full_dose.device)
    noise = torch.randn_like(full_dose)
    x_t = schedule.q_sample(full_dose, t, noise)
    if bridge_fraction > 0:
        bridge = torch.rand(t.shape, device=t.device) < bridge_fraction
        t = torch.where(bridge, torch.full_like(t, bridge_t), t)
        ab, where = schedule._ab(t), bridge[:, None, None, None]
        noise = torch.where(where, (low_dose - ab.sqrt() * full_dose) / (1 - ab).sqrt(), noise)
        x_t = torch.where(where, low_dose, x_t)
    out = model(x_t, t, low_dose, edges).float()
    target = noise if schedule.parameterization == "eps" else full_dose
    losses_by_kind = {"l2": F.mse_loss, "l1": F.l1_loss, "huber": F.smooth_l1_loss}
    if loss_kind not in losses_by_kind:
        raise UserError(f"config: diffusion.loss must be l2, l1 or huber, got '{loss_kind}'")
    return losses_by_kind[loss_kind](out, target), schedule.x0_eps(out, x_t, t)[0].clamp(-1, 1)


@torch.inference_mode()
def sample(model, schedule: Schedule, low_dose: torch.Tensor, sampler: str = "ddim", steps: int = 50,
           eta: float = 0.0, generator: torch.Generator | None = None, edges: torch.Tensor | None = None,
           start: float | None = None) -> tuple[torch.Tensor, int]:
    """Sample full-dose images for a batch of low-dose images in [-1, 1]. Returns (x0, network evaluations).

    DDPM: the ancestral sampler over all steps. DDIM (Song et al.): `steps` evenly spaced timesteps, eta=0 is
    deterministic. `start` (stage 5 bridge sampler): begin from the low-dose image noised to t = start * T
    instead of pure noise, then run DDIM down from there. x0 estimates are clipped to [-1, 1]."""
    device = low_dose.device
    x = torch.randn(low_dose.shape, generator=generator, device="cpu").to(device)
    t_max = schedule.T - 1
    if start is not None:
        if not 0 < start <= 1:
            raise UserError(f"--start must be in (0, 1], got {start}")
        t_max = max(1, int(round(start * (schedule.T - 1))))
        x = schedule.q_sample(low_dose, torch.full((x.shape[0],), t_max, device=device), x)
    if sampler == "ddpm":
        timesteps, eta = list(range(t_max, -1, -1)), 1.0
    elif sampler == "ddim":
        if not 1 <= steps <= t_max + 1:
            raise UserError(f"--steps must be between 1 and {t_max + 1}, got {steps}")
        timesteps = np.linspace(0, t_max, steps).round().astype(int)[::-1].tolist()
    else:
        raise UserError(f"sampler must be ddim or ddpm, got '{sampler}'")
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        tt = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
        x0, eps = schedule.x0_eps(model(x, tt, low_dose, edges).float(), x, tt)
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
               sampler: str, steps: int, eta: float, seed: int = 0, start: float | None = None) -> np.ndarray:
    """One 2-D slice in HU -> denoised HU. Pads to a multiple of the UNet's downsampling (reflect)."""
    f = model.downsample_factor
    h, w = low_dose_hu.shape
    padded = np.pad(low_dose_hu.astype(np.float32), ((0, (-h) % f), (0, (-w) % f)), mode="reflect")
    x = torch.from_numpy(hu_to_unit(padded, cfg.data.hu_range))[None, None].to(device)
    edges = torch.from_numpy(edge_map(padded, cfg.upgrade))[None, None].to(device) if model.gfm is not None else None
    gen = torch.Generator().manual_seed(seed)
    out, _ = sample(model, schedule, x, sampler, steps, eta, gen, edges, start)
    return unit_to_hu(out[0, 0, :h, :w].float().cpu().numpy(), cfg.data.hu_range)


# --- train ---


def build_model(cfg: Config, device: torch.device) -> UNet:
    ab = Schedule(cfg.diffusion, torch.device("cpu")).alphas_cumprod
    return UNet(cfg.model, 2, cfg.stages, cfg.upgrade, ab, cfg.diffusion.parameterization).to(device)


def ema_weights(state: dict) -> dict:
    """AveragedModel stores the wrapped module under "module." plus a counter."""
    return {k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"}


def transfer_weights(model: nn.Module, weights: dict, source: Path, verbose: bool = True) -> list[str]:
    """Copy every tensor whose name and shape match; print what was copied, left new and not used."""
    own = model.state_dict()
    copied = [k for k, v in weights.items() if k in own and own[k].shape == v.shape]
    model.load_state_dict({k: weights[k] for k in copied}, strict=False)
    new = [k for k in own if k not in copied]
    unused = [k for k in weights if k not in copied]
    if verbose:
        modules = lambda keys: sorted({k.rsplit(".", 1)[0] for k in keys})  # noqa: E731
        print(f"from {source}: copied {len(copied)} tensors ({len(modules(copied))} modules)")
        print(f"  left new (missing in the checkpoint or another shape): {len(new)} tensors: {modules(new)}")
        print(f"  unexpected (in the checkpoint, not used): {len(unused)} tensors: {modules(unused)}")
    return copied


def make_optimizer(model: nn.Module, cfg: Config, transferred: list[str]) -> torch.optim.AdamW:
    """Transferred (pre-trained) tensors get lr * upgrade.transfer_lr_scale, everything else the full lr."""
    params = dict(model.named_parameters())
    groups = [{"params": [p for n, p in params.items() if n not in transferred], "lr": cfg.train.lr}]
    if transferred:
        groups.append({"params": [p for n, p in params.items() if n in transferred],
                       "lr": cfg.train.lr * cfg.upgrade.transfer_lr_scale})
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.train.weight_decay)


def discriminator_step(disc, d_opt, full_dose, fake) -> torch.Tensor:
    """One LSGAN update of D only (fakes detached; real and fake in one forward so DDP sees one pass)."""
    logits = disc(torch.cat([full_dose, fake.detach()]))
    d_loss = losses.lsgan_d_loss(logits[: len(full_dose)], logits[len(full_dose):])
    d_opt.zero_grad(set_to_none=True)
    d_loss.backward()
    d_opt.step()
    return d_loss.detach()


def lpips_term(lpips_model, x0, full_dose, cfg: Config) -> torch.Tensor:
    """LPIPS on [0, 1] images (the eval HU window), grey repeated to 3 channels."""
    lo, hi = cfg.sample.eval_window_hu
    to01 = lambda x: ((unit_to_hu(x, cfg.data.hu_range) - lo) / (hi - lo)).clamp(0, 1).repeat(1, 3, 1, 1)  # noqa: E731
    return lpips_model(to01(x0), to01(full_dose), normalize=True).mean()


def train(cfg: Config, out_dir: Path, resume: Path | None = None, device_name: str = "auto",
          argv: list[str] | None = None, init_from: Path | None = None, resume_from: Path | None = None) -> Path:
    """Train the conditional DDPM with the switched-on stages; returns the checkpoint path. Single-process or
    torchrun. `resume`: continue this run exactly. `resume_from`: start a new stage from an earlier stage's
    checkpoint (matching tensors copied). `init_from`: a `pretrain` checkpoint (stage 8)."""
    if sum(x is not None for x in (resume, resume_from, init_from)) > 1:
        raise UserError("use only one of --resume, --resume-from and --init-from")
    s, u = cfg.stages, cfg.upgrade
    if s.pretrain and resume is None and resume_from is None and init_from is None:
        init_from = pretrain(cfg, out_dir / "pretrain", device_name, argv)  # stage 8: pre-train first
    dist = runtime.init_distributed(device_name)
    device = dist.device
    runtime.seed_everything(cfg.train.seed + dist.rank)
    if dist.is_main:
        runtime.prepare_run_dir(out_dir, cfg, __file__, argv)
    train_sources, _, data_desc = load_slice_sources(cfg.data, cfg.train.seed)
    dataset = PairDataset(train_sources, cfg, cfg.train.seed)
    loader, sampler, generator = make_loader(dataset, cfg, dist)

    model = build_model(cfg, device)
    schedule = Schedule(cfg.diffusion, device)
    step, transferred, state = 0, [], None
    if resume is not None:
        state = runtime.load_checkpoint(resume, SCRIPT)
        transferred = list(state.get("transferred", []))
    elif resume_from is not None or init_from is not None:
        src = runtime.load_checkpoint(resume_from or init_from, SCRIPT)
        weights = ema_weights(src["ema"]) if "ema" in src else src["model"]
        transferred = transfer_weights(model, weights, resume_from or init_from, dist.is_main)
        transferred = transferred if init_from is not None else []  # a stage move trains everything at lr
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(
        cfg.train.ema_decay))
    optimizer = make_optimizer(model, cfg, transferred)
    disc = d_opt = lpips_model = None
    if s.adversarial:
        disc = patch_discriminator(u.d_channels).to(device)
        d_opt = torch.optim.Adam(disc.parameters(), lr=u.d_lr, betas=(0.5, 0.999))
    if s.composite_loss and u.lambda_lpips > 0:
        lpips_model = perceptual.load_lpips(u.lpips_net)  # None (one warning) -> the LPIPS term is off
        lpips_model = lpips_model.to(device) if lpips_model is not None else None
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            if disc is not None and "disc" in state:
                disc.load_state_dict(state["disc"])
                d_opt.load_state_dict(state["d_optimizer"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise UserError(f"{resume}: checkpoint does not match this config ({str(exc)[:120]})") from None
        step = int(state["step"])
        runtime.set_rng_state(state["rng"][dist.rank] if isinstance(state["rng"], list) else state["rng"])
        if dist.is_main:
            print(f"resumed from {resume} at step {step}")
    if runtime.switch_on(cfg.train.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    net = runtime.ddp_wrap(model, dist)
    disc_net = runtime.ddp_wrap(disc, dist) if disc is not None else None
    if runtime.switch_on(cfg.train.compile, device):
        net = torch.compile(net)
    use_amp = runtime.switch_on(cfg.train.amp, device)
    body_params = [p for n, p in model.named_parameters() if not n.startswith("icr.")] if s.icr_head else []
    if dist.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        on = [n for n in STAGE_NAMES if getattr(s, n)] or ["none (stage 0)"]
        print(f"data: {data_desc}; {len(dataset)} training slices; model {n_params / 1e6:.2f} M parameters; "
              f"stages: {', '.join(on)}; device {device}, world size {dist.world_size}")

    ckpt_path = out_dir / "checkpoint.pt"
    bridge_t = int(round(u.bridge_t_fraction * (schedule.T - 1)))
    with runtime.ProgressLogger(out_dir if dist.is_main else None, cfg.train.max_steps, "train",
                                enabled=dist.is_main, log_every=cfg.train.log_every, start_step=step) as progress:
        for epoch, batch in batches(loader, sampler, generator, cfg.train.seed, step):
            if step >= cfg.train.max_steps:
                break
            low_dose, full_dose, *edges = (b.to(device) for b in batch)
            edges = edges[0] if edges else None
            ramp = step / max(1.0, u.bridge_ramp_fraction * cfg.train.max_steps)
            bridge_fraction = u.bridge_max_fraction * min(1.0, ramp) if s.bridge else 0.0
            logs = {}
            with runtime.amp_autocast(device, use_amp):
                loss, x0 = diffusion_loss(net, schedule, full_dose, low_dose, cfg.diffusion.loss, edges,
                                          bridge_fraction, bridge_t)
                logs["loss_diff"] = loss.detach()
                if s.composite_loss:  # stage 2: MSE + lambda1 L1(x0) + lambda2 LPIPS(x0)
                    logs["loss_l1"] = F.l1_loss(x0, full_dose)
                    loss = loss + u.lambda_l1 * logs["loss_l1"]
                    if lpips_model is not None:
                        logs["loss_lpips"] = lpips_term(lpips_model, x0, full_dose, cfg)
                        loss = loss + u.lambda_lpips * logs["loss_lpips"]
                if disc is not None and step >= u.adv_start_fraction * cfg.train.max_steps:  # stage 6: D, then G
                    logs["loss_d"] = discriminator_step(disc_net, d_opt, full_dose, x0)
                    logs["loss_adv"] = losses.lsgan_g_loss(disc_net(x0))
                    loss = loss + u.adv_weight * logs["loss_adv"]
            if not torch.isfinite(loss):
                raise UserError(f"non-finite loss {loss.item()} at step {step + 1}; last good checkpoint "
                                f"kept at {ckpt_path}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if step < u.icr_head_only_steps:  # stage 4 schedule: only the ICR head learns at first
                for p in body_params:
                    p.grad = None
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            ema.update_parameters(model)
            step += 1
            extra = {"bridge_fraction": bridge_fraction} if s.bridge else {}
            progress.log(step, loss=loss.item(), **{k: v.item() for k, v in logs.items()}, **extra,
                         grad_norm=grad_norm.item(), lr=cfg.train.lr, epoch=epoch)
            if dist.is_main and (step % cfg.train.ckpt_every == 0 or step == cfg.train.max_steps):
                save_state(ckpt_path, cfg, model, ema, optimizer, step, dist, disc, d_opt, transferred)
    if dist.is_main:
        save_preview(out_dir, cfg, ema.module, schedule, device)
    return ckpt_path


def save_state(path: Path, cfg: Config, model, ema, optimizer, step: int, dist, disc=None, d_opt=None,
               transferred: list[str] = ()) -> None:
    state = {"script": SCRIPT, "kind": "diffusion", "config": config_to_dict(cfg), "model": model.state_dict(),
             "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "rng": runtime.rng_state(), "world_size": dist.world_size, "transferred": list(transferred)}
    if disc is not None:
        state.update(disc=disc.state_dict(), d_optimizer=d_opt.state_dict())
    runtime.save_checkpoint(path, state)


def save_preview(out_dir: Path, cfg: Config, model, schedule: Schedule, device) -> None:
    _, val_sources, _ = load_slice_sources(cfg.data, cfg.train.seed)
    low, full = val_sources[0]()
    out = denoise_hu(model.eval(), schedule, low, cfg, device, cfg.sample.sampler, cfg.sample.steps, cfg.sample.eta)
    w = cfg.sample.eval_window_hu
    viz.save_panel(out_dir / "preview.png", [low, out, full, out - full], ["low dose", "denoised", "full dose",
                   "denoised - full (HU)"], window=w, error_index=3, suptitle=f"window {list(w)} HU")


def block_mask(shape: tuple[int, ...], block: int, fraction: tuple[float, float], gen: torch.Generator):
    """(B, 1, H, W) mask, 1 = visible, 0 = hidden: random block x block squares covering `fraction` of each image."""
    b, _, h, w = shape
    gh, gw = -(-h // block), -(-w // block)
    keep = torch.ones(b, gh * gw)
    for i in range(b):
        n = round(float(torch.empty(1).uniform_(*fraction, generator=gen)) * gh * gw)
        keep[i, torch.randperm(gh * gw, generator=gen)[:max(1, n)]] = 0
    return keep.reshape(b, 1, gh, gw).repeat_interleave(block, 2).repeat_interleave(block, 3)[..., :h, :w]


def regression_run(cfg: Config, out_dir: Path, device_name: str, argv, kind: str) -> Path:
    """The two non-diffusion trainings, same data/batch/steps as `train`: `pretrain` (stage 8: the stage-0 UNet
    fills 16x16 masked blocks of low-dose crops from [masked image, mask], L1 on hidden pixels only) and the
    `unet` baseline (the same UNet, t = 0, no x_t: low dose -> low dose + residual, MSE; RED-CNN's recipe)."""
    dist = runtime.init_distributed(device_name)
    device = dist.device
    runtime.seed_everything(cfg.train.seed + dist.rank)
    plain = dataclasses.replace(cfg, stages=StagesConfig())
    if dist.is_main:
        runtime.prepare_run_dir(out_dir, cfg, __file__, argv)
    loader, sampler, generator = make_loader(PairDataset(load_slice_sources(cfg.data, cfg.train.seed)[0], plain,
                                                         cfg.train.seed), plain, dist)
    model = UNet(cfg.model, in_channels=2 if kind == "pretrain" else 1).to(device)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(
        cfg.train.ema_decay))
    net = runtime.ddp_wrap(model, dist)
    lr, max_steps = (cfg.pretrain.lr, cfg.pretrain.max_steps) if kind == "pretrain" else (cfg.train.lr,
                                                                                          cfg.train.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.train.weight_decay)
    mask_gen = torch.Generator().manual_seed(cfg.train.seed + 1000 * dist.rank)
    step, path = 0, out_dir / f"{kind}.pt"
    with runtime.ProgressLogger(out_dir if dist.is_main else None, max_steps, kind, enabled=dist.is_main,
                                log_every=cfg.train.log_every) as progress:
        for epoch, (low_dose, full_dose) in batches(loader, sampler, generator, cfg.train.seed, 0):
            if step >= max_steps:
                break
            low_dose, full_dose = low_dose.to(device), full_dose.to(device)
            t0 = torch.zeros(len(low_dose), dtype=torch.long, device=device)
            if kind == "pretrain":
                mask = block_mask(low_dose.shape, cfg.pretrain.block, cfg.pretrain.mask_fraction, mask_gen).to(device)
                hidden = 1 - mask
                loss = ((net(low_dose * mask, t0, mask) - low_dose).abs() * hidden).sum() / hidden.sum()
            else:
                loss = F.mse_loss(low_dose + net(low_dose, t0, None), full_dose)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            ema.update_parameters(model)
            step += 1
            progress.log(step, loss=loss.item(), epoch=epoch)
    if dist.is_main:
        runtime.save_checkpoint(path, {"script": SCRIPT, "kind": kind, "config": config_to_dict(cfg), "step": step,
                                       "model": model.state_dict(), "ema": ema.state_dict()})
    if dist.world_size > 1:
        torch.distributed.barrier()  # the other ranks read this file next (stage 8)
    return path


def pretrain(cfg: Config, out_dir: Path, device_name: str = "auto", argv=None) -> Path:
    return regression_run(cfg, out_dir, device_name, argv, "pretrain")


# --- evaluate ---


def load_model(checkpoint: Path, device: torch.device, use_ema: bool = True):
    state = runtime.load_checkpoint(checkpoint, SCRIPT)
    if state.get("kind", "diffusion") != "diffusion":
        raise UserError(f"{checkpoint}: a '{state['kind']}' checkpoint, not a diffusion model")
    try:
        cfg = config_from_dict(Config, state["config"])
        model = build_model(cfg, device)
        model.load_state_dict(ema_weights(state["ema"]) if use_ema else state["model"])
    except (KeyError, RuntimeError) as exc:
        raise UserError(f"{checkpoint}: checkpoint does not match this script's model ({str(exc)[:120]})") from None
    return model.eval(), cfg, int(state.get("step", 0))


def unet_baseline(checkpoint: Path, device: torch.device, cfg: Config):
    """The `baseline --kind unet` model as a HU -> HU function."""
    state = runtime.load_checkpoint(checkpoint, SCRIPT)
    model = UNet(config_from_dict(Config, state["config"]).model, in_channels=1).to(device)
    model.load_state_dict(ema_weights(state["ema"]))
    model.eval()

    @torch.inference_mode()
    def run(low_hu: np.ndarray) -> np.ndarray:
        f, (h, w) = model.downsample_factor, low_hu.shape
        x = hu_to_unit(np.pad(low_hu.astype(np.float32), ((0, (-h) % f), (0, (-w) % f)), mode="reflect"),
                       cfg.data.hu_range)
        x = torch.from_numpy(x)[None, None].to(device)
        out = (x + model(x, torch.zeros(1, dtype=torch.long, device=device), None)).clamp(-1, 1)
        return unit_to_hu(out[0, 0, :h, :w].cpu().numpy(), cfg.data.hu_range)

    return run


def nlm_denoise(low_hu: np.ndarray, strength: float, cfg: Config) -> np.ndarray:
    """skimage non-local means on the normalised slice; h = strength * estimated noise sigma."""
    from skimage.restoration import denoise_nl_means

    x = hu_to_unit(low_hu, cfg.data.hu_range)
    sigma = metrics.noise_std(x)
    out = denoise_nl_means(x, h=strength * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True)
    return unit_to_hu(out.astype(np.float32), cfg.data.hu_range)


def val_split(cfg: Config, max_slices: int, dose: float | None = None):
    """(tune, test, description): held-back slices; the first quarter only tunes NLM."""
    _, val_sources, data_desc = load_slice_sources(cfg.data, cfg.train.seed, dose)
    pairs = [src() for src in val_sources[:max_slices]]
    n_tune = max(1, len(pairs) // 4)
    tune, test = (pairs[:n_tune], pairs[n_tune:]) if len(pairs) > 1 else (pairs, pairs)
    return tune, test, data_desc


def tuned_nlm(tune: list, cfg: Config) -> tuple[str, tuple]:
    """NLM with the strength that maximises PSNR on the tuning slices, as a (name, (function, 0 NFE)) method."""
    window = cfg.sample.eval_window_hu

    def mean_psnr(h):
        return np.mean([metrics.psnr(metrics.to_unit_window(nlm_denoise(lo, h, cfg), window),
                                     metrics.to_unit_window(fu, window), 1.0) for lo, fu in tune])

    best_h = max(cfg.sample.nlm_strengths, key=mean_psnr)
    return f"NLM (h={best_h}σ)", (lambda lo: nlm_denoise(lo, best_h, cfg), 0)


def score(methods: dict, test: list, window, lpips_model=None, time_slice: np.ndarray | None = None):
    """Metrics per method over the test pairs. methods: name -> (HU -> HU function, network evaluations)."""
    rows, outputs = [], {}
    for name, (fn, nfe) in methods.items():
        t0 = time.perf_counter()
        outputs[name] = [fn(lo) for lo, _ in test]
        seconds = (time.perf_counter() - t0) / len(test)
        per_slice = [metrics.image_metrics(pred, fu, window, mask=metrics.body_mask(fu), lpips_model=lpips_model)
                     for pred, (_, fu) in zip(outputs[name], test)]
        row = {"method": name}
        for key in ("psnr_db", "ssim", "mae_hu") + (("lpips",) if lpips_model is not None else ()):
            row[key] = float(np.mean([m[key] for m in per_slice]))
        row["noise_std_hu"] = float(np.mean([metrics.noise_std(p) for p in outputs[name]]))
        row["nfe"], row["s_per_slice"] = nfe, seconds
        if time_slice is not None:
            t0 = time.perf_counter()
            fn(time_slice)
            row[f"s_per_{time_slice.shape[0]}px_slice"] = time.perf_counter() - t0
        rows.append(row)
    return rows, outputs


def metric_notes(window, data_desc: str, n_test: int, n_tune: int, lpips_on: bool) -> list[str]:
    return [f"data: {data_desc}; {n_test} test slices ({n_tune} more used only to tune NLM)",
            f"PSNR/SSIM: HU clipped to window {list(window)} and mapped to [0,1], data range 1, inside the body "
            f"mask (reference HU > -500); SSIM Gaussian sigma 1.5; MAE in HU inside the mask, unclipped",
            "LPIPS (alex, pretrained) on the whole windowed slice" if lpips_on else "LPIPS: no pretrained weights",
            "noise_std_hu: Immerkaer estimate on the whole output slice; nfe: network evaluations per slice",
            "command: " + " ".join(sys.argv)]


def diffusion_method(model, schedule, cfg: Config, device, sampler: str, steps: int, start: float | None):
    name = (f"diffusion (bridge from low dose at {start} T, ddim {steps} steps)" if start is not None
            else f"diffusion ({sampler} {steps} steps)")
    nfe = steps if sampler == "ddim" else (schedule.T if start is None else int(round(start * (schedule.T - 1))) + 1)
    return name, (lambda lo: denoise_hu(model, schedule, lo, cfg, device, sampler, steps, cfg.sample.eta,
                                        start=start), nfe)


def evaluate(checkpoint: Path, out_dir: Path, data_path: str | None = None, device_name: str = "auto",
             sampler: str | None = None, steps: int | None = None, max_slices: int = 16,
             doses: list[float] | None = None, start: float | None = None) -> list[dict]:
    """Metrics on held-back slices for the low-dose input, NLM (tuned on validation) and the model; with
    `doses`, the same at each dose simulated in the projection domain (the dose sweep)."""
    device = runtime.pick_device(device_name)
    model, cfg, trained_steps = load_model(checkpoint, device)
    if data_path is not None:
        cfg.data.path = data_path
    sampler, steps = sampler or cfg.sample.sampler, steps or cfg.sample.steps
    schedule = Schedule(cfg.diffusion, device)
    window, lpips_model, rows = cfg.sample.eval_window_hu, perceptual.load_lpips("alex"), []
    for dose in doses or [None]:
        tune, test, data_desc = val_split(cfg, max_slices, dose)
        methods = dict([("low-dose input", (lambda lo: lo, 0)), tuned_nlm(tune, cfg),
                        diffusion_method(model, schedule, cfg, device, sampler, steps, start)])
        dose_rows, outputs = score(methods, test, window, lpips_model)
        rows += [{"dose": dose, **r} if dose is not None else r for r in dose_rows]
    lo, fu = test[0]
    names = list(outputs)
    viz.save_panel(out_dir / "eval_panel.png", [lo, outputs[names[1]][0], outputs[names[2]][0], fu,
                                                outputs[names[2]][0] - fu],
                   ["low dose", names[1], names[2], "full dose", "diffusion - full (HU)"], window=window,
                   error_index=4, suptitle=f"window {list(window)} HU")
    notes = metric_notes(window, data_desc, len(test), len(tune), lpips_model is not None)
    notes.insert(-1, f"checkpoint {checkpoint} at step {trained_steps}" +
                 (f"; doses {doses} of the data's full dose, projection-domain simulation" if doses else ""))
    runtime.print_metrics_table(rows, "ldct_denoise evaluation", out_dir / "metrics.json", notes)
    return rows


def markdown_table(rows: list[dict], notes: list[str]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def ablate(cfg: Config, out_dir: Path, device_name: str = "auto", stages: list[int] | None = None,
           steps: int = 50, bridge_steps: int = 10, bridge_start: float = 0.8, max_slices: int = 8,
           time_size: int = 512, argv=None) -> list[dict]:
    """Seed 003's study over seed 000's stages: train stages 0..7 (and 8 = pre-training + 7) and the U-Net
    baseline with identical data, seed and step budget; score every stage with DDIM from noise and with the
    bridge sampler beside the input, NLM and U-Net rows; one table (+ markdown) and one PNG panel per stage."""
    stages = list(range(len(STAGE_NAMES) + 1)) if stages is None else stages
    device = runtime.pick_device(device_name)
    ckpts = {k: train(with_stage(cfg, k), out_dir / f"stage{k}", None, device_name, argv) for k in stages}
    unet = regression_run(cfg, out_dir / "unet", device_name, argv, "unet")
    tune, test, data_desc = val_split(cfg, max_slices)
    methods = dict([("low-dose input", (lambda lo: lo, 0)), tuned_nlm(tune, cfg),
                    ("U-Net regression (RED-CNN-like)", (unet_baseline(unet, device, cfg), 1))])
    per_stage = {}
    for k, ckpt in ckpts.items():
        model, cfg_k, _ = load_model(ckpt, device)
        schedule = Schedule(cfg_k.diffusion, device)
        for start, n in ((None, steps), (bridge_start, bridge_steps)):
            name = f"stage {k}: ddim {n} " + (f"from low dose at {start} T" if start else "from noise")
            methods[name] = diffusion_method(model, schedule, cfg_k, device, "ddim", n, start)[1]
            per_stage.setdefault(k, []).append(name)
    time_slice = synthetic.ct_phantom(time_size, np.random.default_rng(0)) if time_size else None
    lpips_model = perceptual.load_lpips("alex")
    rows, outputs = score(methods, test, cfg.sample.eval_window_hu, lpips_model, time_slice)
    window, (lo, fu) = cfg.sample.eval_window_hu, test[0]
    for k, names in per_stage.items():
        viz.save_panel(out_dir / f"panel_stage{k}.png", [lo, *(outputs[n][0] for n in names), fu,
                                                         outputs[names[1]][0] - fu],
                       ["low dose", f"stage {k} ddim {steps} from noise",
                        f"stage {k} bridge {bridge_start}, {bridge_steps} steps", "full dose", "bridge - full (HU)"],
                       window=window, error_index=4, suptitle=f"stage {k}: {', '.join(STAGE_NAMES[:k]) or 'baseline'}")
    psnr = {r["method"]: r["psnr_db"] for r in rows}
    notes = metric_notes(window, data_desc, len(test), len(tune), lpips_model is not None)
    notes.insert(-1, f"every run: preset budget of {cfg.train.max_steps} steps, batch {cfg.train.batch_size}, "
                     f"crop {cfg.data.crop_size}, seed {cfg.train.seed}; stage 8 = {cfg.pretrain.max_steps} "
                     f"pre-training steps + stage 7; s_per_{time_size}px_slice on device {device}")
    notes.insert(-1, "bridge vs DDIM from noise (PSNR dB, NFE): " + "; ".join(
        f"stage {k}: {psnr[n[1]]:.2f} @ {bridge_steps} vs {psnr[n[0]]:.2f} @ {steps} "
        f"({'equal or better' if psnr[n[1]] >= psnr[n[0]] else 'worse'})" for k, n in per_stage.items()))
    runtime.print_metrics_table(rows, "ldct_denoise ablation", out_dir / "ablation.json", notes)
    with runtime.atomic_path(out_dir / "ablation.md") as tmp:
        tmp.write_text(markdown_table(rows, notes))
    return rows
# --- denoise files ---


def denoise_files(checkpoint: Path, input_path: Path, output: Path, device_name: str, sampler: str | None,
                  steps: int | None, eta: float | None, start: float | None = None) -> list[Path]:
    """DICOM file, DICOM series folder or NIfTI volume in; the same kind out, in HU, with new UIDs.
    `start`: the bridge sampler (begin from the low dose noised to start * T)."""
    device = runtime.pick_device(device_name)
    model, cfg, trained_steps = load_model(checkpoint, device)
    sampler, steps = sampler or cfg.sample.sampler, steps or cfg.sample.steps
    eta = cfg.sample.eta if eta is None else eta
    schedule = Schedule(cfg.diffusion, device)
    if not input_path.exists():
        raise UserError(f"input not found: {input_path}")
    runtime.refuse_overwrite_input(output, input_path)
    description = (f"ldct_denoise conditional DDPM, {sampler} {steps} steps, eta {eta}, step {trained_steps}"
                   + (f", from low dose at {start} T" if start is not None else ""))

    def run(hu: np.ndarray, pad_mask: np.ndarray | None) -> np.ndarray:
        out = denoise_hu(model, schedule, hu, cfg, device, sampler, steps, eta, start=start)
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
DataOpt = typer.Option(None, "--data", help="data folder (default: synthetic phantoms)")
FromLowDoseOpt = typer.Option(False, "--from-low-dose", help="bridge sampler: start from the noised low dose")
StartOpt = typer.Option(None, "--start", help="bridge start as a fraction of T (default upgrade.bridge_start)")


def build_config(config: Path | None, preset: str, overrides: list[str] | None, data: str | None = None,
                 max_steps: int | None = None) -> Config:
    cfg = load_config(Config, config or default_config_path(__file__), preset, overrides)
    if data is not None:
        cfg.data.path = data
    if max_steps is not None:
        cfg.train.max_steps = max_steps
    return cfg


def bridge_start(from_low_dose: bool, start: float | None, default: float) -> float | None:
    if start is not None and not from_low_dose:
        raise UserError("--start needs --from-low-dose")
    return (default if start is None else start) if from_low_dose else None


@app.command("train")
def train_cmd(out: Path = typer.Option(Path("runs/ldct"), "--out"),
              stage: int = typer.Option(0, "--stage", help="turn on upgrades 1..N (8: + masked pre-training)"),
              data: str = DataOpt, max_steps: int = typer.Option(None, "--max-steps"),
              resume: Path = typer.Option(None, "--resume", help="continue this run exactly"),
              resume_from: Path = typer.Option(None, "--resume-from", help="checkpoint of an earlier stage"),
              init_from: Path = typer.Option(None, "--init-from", help="`pretrain` checkpoint (stage 8)"),
              config: Path = ConfigOpt, preset: str = PresetOpt, set_: list[str] = SetOpt, device: str = DeviceOpt):
    """Train the conditional DDPM with stages 0..N of seed 000."""
    cfg = with_stage(build_config(config, preset, set_, data, max_steps), stage)
    train(cfg, out, resume, device, sys.argv, init_from, resume_from)


@app.command("pretrain")
def pretrain_cmd(out: Path = typer.Option(Path("runs/ldct_pretrain"), "--out"), data: str = DataOpt,
                 max_steps: int = typer.Option(None, "--max-steps"), config: Path = ConfigOpt,
                 preset: str = PresetOpt, set_: list[str] = SetOpt, device: str = DeviceOpt):
    """Stage 8: masked HU-prediction pre-training of the UNet; writes OUT/pretrain.pt for `train --init-from`."""
    cfg = build_config(config, preset, set_, data)
    if max_steps is not None:
        cfg.pretrain.max_steps = max_steps
    print(f"wrote {pretrain(cfg, out, device, sys.argv)}")


@app.command("baseline")
def baseline_cmd(kind: str = typer.Option(..., "--kind", help="unet | nlm"),
                 out: Path = typer.Option(Path("runs/ldct_baseline"), "--out"), data: str = DataOpt,
                 max_steps: int = typer.Option(None, "--max-steps"), max_slices: int = typer.Option(16, "--max-slices"),
                 config: Path = ConfigOpt, preset: str = PresetOpt, set_: list[str] = SetOpt, device: str = DeviceOpt):
    """Baselines on the same data and budget: a plain U-Net regression (RED-CNN-like) or NLM tuned on validation."""
    if kind not in ("unet", "nlm"):
        raise UserError(f"--kind must be unet or nlm, got '{kind}'")
    cfg = build_config(config, preset, set_, data, max_steps)
    tune, test, data_desc = val_split(cfg, max_slices)
    methods = dict([("low-dose input", (lambda lo: lo, 0)), tuned_nlm(tune, cfg)])
    if kind == "unet":
        ckpt = regression_run(cfg, out, device, sys.argv, "unet")
        methods = {"low-dose input": methods["low-dose input"],
                   "U-Net regression (RED-CNN-like)": (unet_baseline(ckpt, runtime.pick_device(device), cfg), 1)}
    lpips_model = perceptual.load_lpips("alex")
    rows, _ = score(methods, test, cfg.sample.eval_window_hu, lpips_model)
    notes = metric_notes(cfg.sample.eval_window_hu, data_desc, len(test), len(tune), lpips_model is not None)
    runtime.print_metrics_table(rows, f"ldct_denoise baseline: {kind}", out / "metrics.json", notes)


@app.command("ablate")
def ablate_cmd(out: Path = typer.Option(Path("runs/ldct_ablation"), "--out"), data: str = DataOpt,
               max_steps: int = typer.Option(None, "--max-steps", help="step budget of every run"),
               stages: str = typer.Option("0,1,2,3,4,5,6,7,8", "--stages"),
               steps: int = typer.Option(50, "--steps", help="DDIM steps from noise"),
               bridge_steps: int = typer.Option(10, "--bridge-steps"), start: float = typer.Option(0.8, "--start"),
               max_slices: int = typer.Option(8, "--max-slices"),
               time_size: int = typer.Option(512, "--time-size", help="time one slice of this size (0: skip)"),
               config: Path = ConfigOpt, preset: str = PresetOpt, set_: list[str] = SetOpt, device: str = DeviceOpt):
    """Train stages 0..8 and the U-Net baseline with one budget; one table with input/NLM/U-Net rows."""
    cfg = build_config(config, preset, set_, data, max_steps)
    try:
        stage_list = [int(s) for s in stages.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--stages must be comma-separated integers, got '{stages}'") from None
    ablate(cfg, out, device, stage_list, steps, bridge_steps, start, max_slices, time_size, sys.argv)


@app.command("denoise")
def denoise_cmd(checkpoint: Path = typer.Option(..., "--checkpoint"), input: Path = typer.Option(..., "--input"),
                output: Path = typer.Option(..., "--output"), steps: int = typer.Option(None, "--steps"),
                sampler: str = typer.Option(None, "--sampler", help="ddim | ddpm"),
                eta: float = typer.Option(None, "--eta"), from_low_dose: bool = FromLowDoseOpt,
                start: float = StartOpt, device: str = DeviceOpt):
    """Denoise a DICOM file, a DICOM series folder or a NIfTI volume; writes DICOM (or NIfTI) in HU."""
    denoise_files(checkpoint, input, output, device, sampler, steps, eta,
                  bridge_start(from_low_dose, start, UpgradeConfig.bridge_start))


@app.command("eval")
def eval_cmd(checkpoint: Path = typer.Option(..., "--checkpoint"), out: Path = typer.Option(None, "--out"),
             data: str = typer.Option(None, "--data"), steps: int = typer.Option(None, "--steps"),
             sampler: str = typer.Option(None, "--sampler"), max_slices: int = typer.Option(16, "--max-slices"),
             doses: str = typer.Option(None, "--doses", help="dose sweep, e.g. 0.5,0.25,0.1,0.05"),
             from_low_dose: bool = FromLowDoseOpt, start: float = StartOpt, device: str = DeviceOpt):
    """PSNR/SSIM/MAE (+ LPIPS) in a stated HU window for the low-dose input, NLM and the model."""
    try:
        dose_list = [float(d) for d in doses.split(",")] if doses else None
    except ValueError:
        raise UserError(f"--doses must be comma-separated numbers, got '{doses}'") from None
    if dose_list and not all(0 < d <= 1 for d in dose_list):
        raise UserError(f"--doses must be fractions in (0, 1], got {dose_list}")
    evaluate(checkpoint, out or checkpoint.parent / "eval", data, device, sampler, steps, max_slices, dose_list,
             bridge_start(from_low_dose, start, UpgradeConfig.bridge_start))


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
