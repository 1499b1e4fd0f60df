"""Low-dose mammogram restoration by latent diffusion in a frozen VQ-VAE-2 (seed 002, stage 2).

The latent is the VQ-VAE-2's level-0 encoder output BEFORE quantisation (128 x 256 x 192 for a 1024 x 768
canvas with the seed's model). Why that one: every higher level is computed from it by the frozen encoders, so
one tensor determines the whole hierarchy and `decode_latent` (encoders 1.., quantisation, decoders) maps it
back to pixels; it is continuous, so Gaussian diffusion is well defined (code indices are not); and
quantisation after sampling snaps small sampling errors back onto the codebooks. Latents are standardised by
the training set's mean/std (CompVis' scale_by_std, one scalar each).

A UNet (the seed's sizes in ModelConfig) sees the degraded image's latent concatenated to its input;
CompVis' "linear" schedule, EMA weights with LitEma's warm-up, DDIM 50 steps, eta 0.

Options beyond the seed, each with an ablation row in docs/mammo.md (`full` keeps the seed's eps-prediction
from pure noise): `diffusion.prediction`, `diffusion.residual`, `sample.start` (SDEdit),
`sample.consistency_sigma` (data_consistency) and the `refine` command (Refiner).

Conventions written out here, as in every script: `norm(ch)` = GroupNorm(gcd(32, ch), ch); time embedding
[sin, cos] (sin first) like diffusers' get_timestep_embedding(flip_sin_to_cos=False, downscale_freq_shift=0);
DDIM step grid = diffusers' "trailing" spacing.

Needs mammo_vqvae.py beside it (the frozen first stage's model and loader) and common/.

Usage:
  python mammo_ldm.py train --vqvae runs/vqvae/checkpoint.pt --latents runs/latents --out runs/ldm
  python mammo_ldm.py train --vqvae runs/vqvae/checkpoint.pt --out runs/ldm     # latents on the fly
  python mammo_ldm.py restore --vqvae runs/vqvae/checkpoint.pt --checkpoint runs/ldm/checkpoint.pt \\
      --input low_dose.dcm --output restored.dcm               # or folders; DICOM or PNG in and out
  python mammo_ldm.py refine --vqvae runs/vqvae/checkpoint.pt --checkpoint runs/ldm/checkpoint.pt \\
      --out runs/ldm_refined                     # restore/evaluate then take runs/ldm_refined/checkpoint.pt
  python mammo_ldm.py evaluate --vqvae runs/vqvae/checkpoint.pt --checkpoint runs/ldm/checkpoint.pt
Any config value: --set train.lr=1e-4 --set sample.steps=100 (see configs/mammo_ldm.yaml). Use the same preset
as the VQ-VAE (both `tiny`, both `small` or both `full`).
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import typer
from pydicom.uid import generate_uid
from torch.utils.checkpoint import checkpoint as grad_checkpoint
from torch.utils.data import DataLoader, Dataset

from common import UserError, dicom_io, mammo, metrics, runtime, viz
from common.config import config_to_dict, default_config_path, load_config
from common.mammo import IMAGE_SUFFIXES
from common.perceptual import load_lpips, lpips_distance
from mammo_vqvae import VQVAE2, config_with_sets, fingerprint, load_vqvae

SCRIPT = Path(__file__).stem

# --- config ---


@dataclass
class ModelConfig:
    base_channels: int = 192
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4])
    num_res_blocks: int = 2
    attention_levels: list[int] = field(default_factory=lambda: [1, 2])  # level index (0 = latent resolution)
    attention_head_channels: int = 64
    dropout: float = 0.0
    gradient_checkpointing: bool = True  # recompute activations in backward: less memory, ~30 % more time


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    prediction: str = "eps"  # eps (seed) | x0 | v: what the UNet outputs
    residual: bool = False  # diffuse (clean - degraded latent) / its std instead of the clean latent


@dataclass
class TrainConfig:
    max_epochs: int = 200
    max_steps: int = 0  # 0: epochs decide
    batch_size: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.01  # AdamW's default, as in CompVis
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    amp: str = "auto"
    crop_size: list[int] = field(default_factory=lambda: [0, 0])  # on-the-fly latents: random canvas crops
    crops_per_image: int = 1
    log_every: int = 50
    seed: int = 0


@dataclass
class SampleConfig:
    steps: int = 50
    eta: float = 0.0
    start: float = 1.0  # 1: pure noise (seed); < 1: SDEdit from the degraded latent noised to t = start * T
    consistency_sigma: float = 0.0  # > 0: data-consistency step, Gaussian sigma in canvas pixels
    tile: int = 0  # > 0: the UNet runs on overlapping tiles of this many latent pixels (see unet_on_tiles)
    seed: int = 0


@dataclass
class EvalConfig:
    max_images: int = 0  # 0: the whole test split
    panel_images: int = 2
    baselines: bool = True  # NLM and BM3D-Anscombe rows (BM3D: ~1 min per 1024x768 image on one CPU thread)


@dataclass
class RefineConfig:  # `refine`: a CNN on [image, low-dose image] fitted after the LDM (see Refiner)
    source: str = "ldm"  # what it refines: ldm | first_stage (VQ-VAE-2 + DC, ablation) | input (plain CNN)
    draws: int = 4  # noise draws of each training image
    steps: int = 6000  # 2000 and a 12-layer net were worse on the training films (docs/mammo.md)
    channels: int = 32
    layers: int = 7  # 3x3 convolutions: a 15-pixel receptive field
    crop: int = 64
    batch_size: int = 16
    lr: float = 1e-3


@dataclass
class Config:
    data: mammo.MammoDataConfig = field(default_factory=mammo.MammoDataConfig)  # what it is trained for
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)


# --- data: latent pairs ---

PAIR = ("clean", "degraded")


class LatentPairs(Dataset):
    """Pairs written by `mammo_vqvae.py extract-latents` (one fp16 file per image, listed in index.json)."""

    def __init__(self, root: Path, index: dict, split: str):
        self.files = [root / item["file"] for item in index["items"] if item["split"] == split]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        pair = torch.load(self.files[i], map_location="cpu", weights_only=True)
        return {k: pair[k].float() for k in PAIR}


def read_latent_index(latents: Path, vqvae_print: str, data: mammo.MammoDataConfig) -> dict:
    """index.json of an extract-latents folder, refused unless it was made by this VQ-VAE at this canvas and
    dose: a model trained or scored on other pairs than it claims would report numbers for another task."""
    path = latents / "index.json"
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path}: missing or not JSON; run mammo_vqvae.py extract-latents") from None
    if index.get("vqvae_fingerprint") != vqvae_print:
        made_by = index.get("vqvae_checkpoint")
        raise UserError(f"{latents}: latents come from another VQ-VAE ({made_by}) than --vqvae")
    mismatch = mammo.dose_mismatch(index.get("data", {}), data)
    if mismatch:
        raise UserError(f"{latents}: latents made with another canvas or dose: {mismatch}")
    return index


def unit_pair(item: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(full dose, low dose, breast mask) of a MammoDataset item, on the [0, 1] canvas."""
    clean, degraded = (mammo.model_to_unit(item[k][0]).numpy() for k in PAIR)
    return clean, degraded, item["mask"][0].numpy() > 0


# --- model ---


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[sin, cos] with frequencies exp(-log(10000) i / half): diffusers' get_timestep_embedding(t, dim,
    flip_sin_to_cos=False, downscale_freq_shift=0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch)


def zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(
            norm(out_ch), nn.SiLU(), nn.Dropout(dropout), zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        )
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    def __init__(self, ch: int, head_channels: int):
        super().__init__()
        self.heads = max(1, ch // head_channels)
        self.norm, self.qkv, self.proj = norm(ch), nn.Conv2d(ch, 3 * ch, 1), zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x, emb=None):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels on GPU
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Resample(nn.Module):
    """A stride-2 convolution down, or nearest-neighbour upsampling and a convolution up."""

    def __init__(self, ch: int, up: bool):
        super().__init__()
        self.up, self.conv = up, nn.Conv2d(ch, ch, 3, stride=1 if up else 2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest") if self.up else x)


def level_blocks(cfg: ModelConfig, level: int, in_ch: int, out_ch: int, emb_dim: int) -> nn.ModuleList:
    """One ResBlock, then self-attention at the levels that have it."""
    blocks = nn.ModuleList([ResBlock(in_ch, out_ch, emb_dim, cfg.dropout)])
    if level in cfg.attention_levels:
        blocks.append(Attention(out_ch, cfg.attention_head_channels))
    return blocks


class UNet(nn.Module):
    """eps(x_t, t | degraded latent): input is concat(x_t, degraded), 2C channels; output C channels."""

    def __init__(self, cfg: ModelConfig, latent_channels: int):
        super().__init__()
        base, mults = cfg.base_channels, cfg.channel_mults
        emb_dim = 4 * base
        self.base, self.checkpointing, self.factor = base, cfg.gradient_checkpointing, 2 ** (len(mults) - 1)
        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input = nn.Conv2d(2 * latent_channels, base, 3, padding=1)
        self.down, skips, ch = nn.ModuleList(), [base], base
        for level, mult in enumerate(mults):
            for _ in range(cfg.num_res_blocks):
                self.down.append(level_blocks(cfg, level, ch, base * mult, emb_dim))
                ch = base * mult
                skips.append(ch)
            if level < len(mults) - 1:
                self.down.append(nn.ModuleList([Resample(ch, up=False)]))
                skips.append(ch)
        # CompVis' middle block; its attention only where the deepest level has attention (a CPU preset
        # without attention would otherwise attend over tens of thousands of latent pixels)
        middle = [ResBlock(ch, ch, emb_dim, cfg.dropout)]
        if len(mults) - 1 in cfg.attention_levels:
            middle.append(Attention(ch, cfg.attention_head_channels))
        self.middle = nn.ModuleList([*middle, ResBlock(ch, ch, emb_dim, cfg.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(cfg.num_res_blocks + 1):
                blocks = level_blocks(cfg, level, ch + skips.pop(), base * mult, emb_dim)
                ch = base * mult
                if level > 0 and i == cfg.num_res_blocks:
                    blocks.append(Resample(ch, up=True))
                self.up.append(blocks)
        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero(nn.Conv2d(ch, latent_channels, 3, padding=1)))

    def _run(self, blocks: nn.ModuleList, h, emb):
        for block in blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                h = grad_checkpoint(block, h, emb, use_reentrant=False)
            else:
                h = block(h, emb)
        return h

    def forward(self, x_t, t, cond):
        rows, cols = x_t.shape[-2:]
        if rows % self.factor or cols % self.factor:
            raise UserError(f"latent {rows}x{cols} not divisible by {self.factor} (UNet downsampling)")
        emb = self.time_embed(timestep_embedding(t, self.base))
        h = self.input(torch.cat([x_t, cond], 1))
        hs = [h]
        for blocks in self.down:
            h = self._run(blocks, h, emb)
            hs.append(h)
        h = self._run(self.middle, h, emb)
        for blocks in self.up:
            h = self._run(blocks, torch.cat([h, hs.pop()], 1), emb)
        return self.out(h)


class Refiner(nn.Module):
    """image + CNN([image, low dose]) on the [0, 1] canvas. Why: the latent cannot hold every detail of the
    film (the VQ-VAE-2 ceiling); the low-dose image holds them under noise, and a CNN that sees both can take
    them back. No normalisation layers, so a whole canvas sees what the training crops saw; the last layer
    starts at zero, so an untrained refiner returns its input."""

    def __init__(self, cfg: RefineConfig):
        super().__init__()
        layers = [nn.Conv2d(2, cfg.channels, 3, padding=1), nn.ReLU()]
        for _ in range(cfg.layers - 2):
            layers += [nn.Conv2d(cfg.channels, cfg.channels, 3, padding=1), nn.ReLU()]
        self.net = nn.Sequential(*layers, zero(nn.Conv2d(cfg.channels, 1, 3, padding=1)))

    def forward(self, image: torch.Tensor, low_dose: torch.Tensor) -> torch.Tensor:
        return image + self.net(torch.cat([image, low_dose], 1))


# --- diffusion and sampler ---


class Schedule:
    """CompVis' "linear" schedule: beta linear in sqrt from beta_start to beta_end."""

    def __init__(self, cfg: DiffusionConfig, device: torch.device):
        if cfg.prediction not in ("eps", "x0", "v"):
            raise UserError(f"config: diffusion.prediction must be eps, x0 or v, got '{cfg.prediction}'")
        first, last = cfg.beta_start**0.5, cfg.beta_end**0.5
        sqrt_betas = torch.linspace(first, last, cfg.timesteps, dtype=torch.float64)
        self.timesteps, self.prediction = cfg.timesteps, cfg.prediction
        self.alphas_cumprod = torch.cumprod(1.0 - sqrt_betas**2, 0).float().to(device)

    def q_sample(self, x0, t, noise):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0, t, noise):
        """The UNet's training target: the noise, the clean target, or v = sqrt(a) eps - sqrt(1-a) x0."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def split(self, out, x_t, a):
        """(x0, eps) implied by the UNet's output at a noisy x_t with alpha-bar a."""
        if self.prediction == "eps":
            return (x_t - (1 - a).sqrt() * out) / a.sqrt(), out
        if self.prediction == "x0":
            return out, (x_t - a.sqrt() * out) / (1 - a).sqrt()
        return a.sqrt() * x_t - (1 - a).sqrt() * out, (1 - a).sqrt() * x_t + a.sqrt() * out


def diffusion_loss(net, schedule: Schedule, target, cond) -> torch.Tensor:
    """L_simple in the chosen parameterisation at a uniformly drawn step."""
    t = torch.randint(0, schedule.timesteps, (target.shape[0],), device=target.device)
    noise = torch.randn_like(target)
    out = net(schedule.q_sample(target, t, noise), t, cond).float()
    return F.mse_loss(out, schedule.target(target, t, noise))


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """diffusers' "trailing" spacing, round(arange(T, 0, -T / steps)) - 1: `steps` distinct timesteps from
    T - 1 down. The float arange can yield one extra element (-1, e.g. T 1000, 61 steps); only the first
    `steps` count."""
    if not 1 <= steps <= timesteps:
        raise UserError(f"sample.steps must be in [1, {timesteps}] (with sample.start), got {steps}")
    return (np.round(np.arange(timesteps, 0, -timesteps / steps)).astype(np.int64) - 1)[:steps].tolist()


@torch.no_grad()
def ddim_sample(net, schedule: Schedule, cond, steps: int, eta: float, generator=None, start=1.0, init=None):
    """DDIM (Song et al. 2021), eta 0 = deterministic. start = 1: from pure noise (seed); start < 1 (SDEdit,
    Meng et al. 2022): from `init` noised to the first timestep of a grid over the first start * T steps.
    Returns the clean estimate of the last step (alpha-bar 1, diffusers' set_alpha_to_one)."""
    grid = ddim_timesteps(max(1, round(start * schedule.timesteps)), steps)
    acp = schedule.alphas_cumprod
    x = torch.randn(cond.shape, generator=generator, device=cond.device)
    if start < 1.0 and init is not None:
        x = schedule.q_sample(init, torch.full((cond.shape[0],), grid[0], device=cond.device), x)
    for i, step in enumerate(grid):
        t = torch.full((cond.shape[0],), step, device=cond.device, dtype=torch.long)
        a_t = acp[step]
        a_prev = acp[grid[i + 1]] if i + 1 < len(grid) else torch.ones((), device=cond.device)
        x0, eps = schedule.split(net(x, t, cond).float(), x, a_t)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        noise = torch.randn(x.shape, generator=generator, device=x.device) if eta > 0 else 0.0
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps + sigma * noise
    return x


def tile_starts(size: int, tile: int) -> list[int]:
    """Tile origins along one axis: a quarter-tile overlap, the last tile flush with the edge."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - tile // 4)) + [size - tile]


def _ramp(n: int, device) -> torch.Tensor:
    """Blend weight along one tile axis: rises linearly over a quarter tile from each edge, then flat."""
    i = torch.arange(n, device=device, dtype=torch.float32)
    return torch.minimum(i + 1, n - i).clamp(max=max(1, n // 4)) / max(1, n // 4)


def unet_on_tiles(unet: nn.Module, tile: int):
    """The UNet applied to overlapping tile x tile windows of the latent, blended with weights that fall off
    linearly towards each tile's edge. Why: a UNet trained on crops has GroupNorm statistics of crops centred
    in the breast; on the whole canvas (about half background) those statistics shift and the output carries
    large low-frequency errors. Tiles of the training crop's latent size keep the UNet in distribution."""
    if tile <= 0:
        return unet

    def run(x, t, cond):
        rows, cols = x.shape[-2:]
        th, tw = min(tile, rows), min(tile, cols)
        weight = torch.outer(_ramp(th, x.device), _ramp(tw, x.device))
        windows = [(r, c) for r in tile_starts(rows, th) for c in tile_starts(cols, tw)]
        out = torch.zeros_like(x)
        total = torch.zeros(rows, cols, device=x.device)
        for i in range(0, len(windows), 64):  # 64 tiles per UNet call bound the memory
            chunk = windows[i : i + 64]
            xs, conds = (torch.cat([v[..., r : r + th, c : c + tw] for r, c in chunk]) for v in (x, cond))
            pred = unet(xs, t.repeat(len(chunk)), conds).float()
            for k, (r, c) in enumerate(chunk):
                out[..., r : r + th, c : c + tw] += pred[k * len(x) : (k + 1) * len(x)] * weight
                total[r : r + th, c : c + tw] += weight
        return out / total

    return run


def data_consistency(restored: np.ndarray, low_dose: np.ndarray, mask: np.ndarray, sigma: float):
    """restored + G_sigma * (low_dose - restored) inside the breast, normalised by the blurred mask (so the
    skin line pulls in no background). Why: the low-dose image's local mean is unbiased and its noise averages
    out under the Gaussian, while first-stage errors (intensity drifts, lost detail) are low-frequency."""
    weight = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma)
    diff = cv2.GaussianBlur(((low_dose - restored) * mask).astype(np.float32), (0, 0), sigma)
    out = restored + np.where(mask, diff / np.maximum(weight, 1e-6), 0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


STATS = ("latent_mean", "latent_std", "residual_std")


@dataclass
class Restorer:
    """Everything a restoration needs: frozen VQ-VAE-2, EMA UNet, schedule, latent statistics, refiner."""

    vqvae: VQVAE2
    unet: nn.Module
    schedule: Schedule
    stats: dict  # STATS
    cfg: Config
    device: torch.device
    refiner: nn.Module | None = None
    checkpoint: Path | None = None  # the file it was loaded from

    def encode(self, unit: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(mammo.unit_to_model(unit))[None, None].to(self.device)
        return (self.vqvae.encode_latent(x).float() - self.stats["latent_mean"]) / self.stats["latent_std"]

    def decode(self, z: torch.Tensor) -> np.ndarray:
        image, _, _ = self.vqvae.decode_latent(z * self.stats["latent_std"] + self.stats["latent_mean"])
        return mammo.model_to_unit(image.float())[0, 0].cpu().numpy()

    @torch.no_grad()
    def restore_latent(self, degraded_canvas: np.ndarray) -> torch.Tensor:
        """The restored standardised latent: DDIM on the clean latent (or on the residual, added back)."""
        cond = self.encode(degraded_canvas)
        residual, sample = self.cfg.diffusion.residual, self.cfg.sample
        generator = torch.Generator(self.device).manual_seed(sample.seed)
        init = torch.zeros_like(cond) if residual else cond
        unet = unet_on_tiles(self.unet, sample.tile)
        y = ddim_sample(unet, self.schedule, cond, sample.steps, sample.eta, generator, sample.start, init)
        return cond + y * self.stats["residual_std"] if residual else y

    @torch.no_grad()
    def refine(self, image: np.ndarray, degraded_canvas: np.ndarray, mask: np.ndarray) -> np.ndarray:
        image_t, low_t = (torch.from_numpy(v)[None, None].to(self.device) for v in (image, degraded_canvas))
        out = self.refiner(image_t, low_t)[0, 0].clamp(0, 1).cpu().numpy()
        return np.where(mask, out, image).astype(np.float32)

    @torch.no_grad()
    def refiner_input(self, degraded_canvas: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """What the refiner refines (`refine.source`); first_stage and input are the ablations of the LDM."""
        source, sigma = self.cfg.refine.source, self.cfg.sample.consistency_sigma
        if source == "ldm":
            return self(degraded_canvas, mask, refine=False)
        if source == "first_stage":
            first_stage = self.decode(self.encode(degraded_canvas))
            return data_consistency(first_stage, degraded_canvas, mask, sigma) if sigma > 0 else first_stage
        if source == "input":
            return degraded_canvas
        raise UserError(f"refine.source must be ldm, first_stage or input, got '{source}'")

    @torch.no_grad()
    def __call__(self, degraded_canvas: np.ndarray, mask=None, refine=True):
        """The restored canvas: LDM, decoder, data consistency, then the refiner (if fitted on LDM output)."""
        restored = self.decode(self.restore_latent(degraded_canvas))
        mask = degraded_canvas > 0 if mask is None else mask
        if self.cfg.sample.consistency_sigma > 0:
            restored = data_consistency(restored, degraded_canvas, mask, self.cfg.sample.consistency_sigma)
        if refine and self.refiner is not None and self.cfg.refine.source == "ldm":
            restored = self.refine(restored, degraded_canvas, mask)
        return restored


def check_first_stage(cfg: Config, vq_cfg, state: dict | None, vq_print: str, path, vqvae_ckpt: Path) -> None:
    """A latent model runs only with the canvas and the very VQ-VAE-2 whose latents it learnt."""
    ours, theirs = list(cfg.data.image_size), list(vq_cfg.data.image_size)
    if ours != theirs:
        raise UserError(f"data.image_size {ours} differs from the VQ-VAE's {theirs}; use the same preset")
    if state is not None and state.get("vqvae_fingerprint") != vq_print:
        trained_on = state.get("vqvae_checkpoint")
        raise UserError(f"{path}: trained on the latents of {trained_on}, not of {vqvae_ckpt}")


def load_restorer(vqvae_ckpt: Path, checkpoint: Path, device, overrides=None, data_path=None) -> Restorer:
    """The models of a checkpoint, with `--set` overrides and `--data` (what evaluate and refine read)."""
    vqvae, vq_cfg = load_vqvae(vqvae_ckpt, device)
    state = runtime.load_checkpoint(checkpoint, SCRIPT)
    cfg = config_with_sets(Config, state["config"], overrides)
    cfg.data.path = data_path or cfg.data.path
    check_first_stage(cfg, vq_cfg, state, fingerprint(vqvae), checkpoint, vqvae_ckpt)
    unet = UNet(cfg.model, state["latent_channels"])
    ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}
    try:
        unet.load_state_dict(ema)
    except RuntimeError as exc:  # its config asks for another architecture than its weights have
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"{checkpoint}: weights do not match its model config ({detail})") from None
    refiner = None
    if "refiner" in state:
        refiner = Refiner(cfg.refine).to(device).eval()
        refiner.load_state_dict(state["refiner"])
    schedule, stats = Schedule(cfg.diffusion, device), {k: state[k] for k in STATS}
    return Restorer(vqvae, unet.to(device).eval(), schedule, stats, cfg, device, refiner, checkpoint)


# --- train ---


def ema_avg_fn(decay: float):
    """CompVis LitEma: decay min(decay, (1 + n) / (10 + n)), so early averages do not stick to the init."""

    def avg(averaged, current, num_averaged):
        d = min(decay, (1 + float(num_averaged)) / (10 + float(num_averaged)))
        return d * averaged + (1 - d) * current

    return avg


@torch.no_grad()
def latent_stats(items: list[dict], vqvae: VQVAE2 | None = None) -> dict:
    """Mean/std of clean latents and the std of the standardised residual (clean - degraded) latent; with
    `vqvae`, the items are image pairs, encoded first."""
    if vqvae is not None:
        device = next(vqvae.parameters()).device
        items = [{k: vqvae.encode_latent(b[k][None].to(device)).float().cpu() for k in PAIR} for b in items]
    clean, degraded = (torch.cat([b[k].flatten() for b in items]) for k in PAIR)
    mean, std = float(clean.mean()), float(clean.std())
    return {"latent_mean": mean, "latent_std": std, "residual_std": float(((clean - degraded) / std).std())}


def training_pairs(cfg: Config, vqvae: VQVAE2, vq_print: str, latents: Path | None):
    """(dataset, its encoder (None: latent pairs), description, latent statistics of its first 16 pairs)."""
    if latents is not None:
        index = read_latent_index(latents, vq_print, cfg.data)
        dataset, encoder = LatentPairs(latents, index, "train"), None
        desc = f"latent pairs from {latents} ({index['degradation']})"
    else:
        crop, repeats = cfg.train.crop_size, cfg.train.crops_per_image
        sources = mammo.list_sources(cfg.data, "train")
        dataset = mammo.MammoDataset(sources, cfg.data, paired=True, crop=crop, repeats=repeats)
        encoder, dose = vqvae, mammo.dose_description(cfg.data)
        desc = f"{cfg.data.path or 'synthetic mammograms'}, latents on the fly ({dose})"
    stats = latent_stats([dataset[i] for i in range(min(16, len(dataset)))], encoder)
    return dataset, encoder, desc, stats


def train_batches(dataset, encoder: VQVAE2 | None, cfg: Config, dist, per_rank_batch: int, step: int):
    """(epoch, clean latents, degraded latents) from where a run at `step` stands. The order depends on the
    seed and epoch alone (mammo.epoch_order), so a resumed run sees the batches an uninterrupted one sees."""
    steps_per_epoch = len(dataset) // (dist.world_size * per_rank_batch)
    skip = step % steps_per_epoch * per_rank_batch  # only in the epoch a resume starts in
    workers, seed = cfg.data.num_workers if encoder is not None else 0, cfg.train.seed
    for epoch in range(step // steps_per_epoch, cfg.train.max_epochs):
        dataset.epoch = epoch  # on-the-fly pairs: fresh low-dose noise (and crops) every epoch
        order = mammo.epoch_order(len(dataset), per_rank_batch, epoch, seed, dist.rank, dist.world_size)
        generator = mammo.loader_generator(seed, epoch)
        loader = DataLoader(
            dataset, per_rank_batch, sampler=order[skip:], num_workers=workers, generator=generator
        )
        skip = 0
        for batch in loader:
            clean, degraded = (batch[k].to(dist.device) for k in PAIR)
            if encoder is not None:
                with torch.no_grad():
                    clean, degraded = (encoder.encode_latent(x).float() for x in (clean, degraded))
            yield epoch, clean, degraded


def diffusion_target(clean, degraded, cfg: Config, stats: dict):
    """Standardised latents; the target is the clean latent, or the residual scaled to unit std."""
    clean = (clean - stats["latent_mean"]) / stats["latent_std"]
    degraded = (degraded - stats["latent_mean"]) / stats["latent_std"]
    return ((clean - degraded) / stats["residual_std"] if cfg.diffusion.residual else clean), degraded


def train(
    cfg: Config,
    vqvae_ckpt: Path,
    out_dir: Path,
    latents: Path | None = None,
    device_name: str = "auto",
    resume: Path | None = None,
    argv: list[str] | None = None,
) -> Path:
    dist = runtime.init_distributed(device_name)
    device = dist.device
    runtime.seed_everything(cfg.train.seed + dist.rank)
    vqvae, vq_cfg = load_vqvae(vqvae_ckpt, device)
    vq_print = fingerprint(vqvae)
    state = runtime.load_checkpoint(resume, SCRIPT) if resume is not None else None
    check_first_stage(cfg, vq_cfg, state, vq_print, resume, vqvae_ckpt)
    dataset, encoder, data_desc, stats = training_pairs(cfg, vqvae, vq_print, latents)
    per_rank_batch = max(1, cfg.train.batch_size // dist.world_size)
    steps_per_epoch = len(dataset) // (dist.world_size * per_rank_batch)  # whole batches on every rank
    if steps_per_epoch == 0:
        raise UserError(f"only {len(dataset)} training pairs; lower train.batch_size ({per_rank_batch})")
    latent_channels = vq_cfg.model.hidden_channels
    model = UNet(cfg.model, latent_channels).to(device)
    ema = torch.optim.swa_utils.AveragedModel(model, avg_fn=ema_avg_fn(cfg.train.ema_decay))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    schedule, step = Schedule(cfg.diffusion, device), 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"{resume}: checkpoint does not match this config ({str(exc)[:120]})") from None
        step, stats = int(state["step"]), {k: state[k] for k in STATS}
        mammo.resume_rng(state["rng"], dist.world_size, dist.rank, cfg.train.seed + step)
    net = runtime.ddp_wrap(model, dist)
    use_amp = runtime.switch_on(cfg.train.amp, device)
    if dist.is_main:
        runtime.prepare_run_dir(out_dir, cfg, __file__, argv)
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        print(
            f"data: {data_desc}; {len(dataset)} training pairs; UNet {n_params:.2f} M parameters; latent "
            f"{latent_channels} channels, mean {stats['latent_mean']:.3g} std {stats['latent_std']:.3g}; "
            f"{cfg.diffusion.prediction}-prediction{', residual target' if cfg.diffusion.residual else ''}; "
            f"device {device}"
        )
    record = {"script": SCRIPT, "config": config_to_dict(cfg), **stats, "latent_channels": latent_channels}
    record |= {"vqvae_fingerprint": vq_print, "vqvae_checkpoint": str(vqvae_ckpt)}
    max_steps = cfg.train.max_steps or cfg.train.max_epochs * steps_per_epoch
    ckpt_path = out_dir / "checkpoint.pt"
    batches = train_batches(dataset, encoder, cfg, dist, per_rank_batch, step)
    model.train()
    with runtime.ProgressLogger(
        out_dir, max_steps, "ldm", enabled=dist.is_main, log_every=cfg.train.log_every, start_step=step
    ) as progress:
        for epoch, clean, degraded in itertools.islice(batches, max(0, max_steps - step)):
            target, cond = diffusion_target(clean, degraded, cfg, stats)
            with runtime.amp_autocast(device, use_amp):
                loss = diffusion_loss(net, schedule, target, cond)
            runtime.stop_if_not_finite(loss, step, ckpt_path)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            ema.update_parameters(model)
            step += 1
            progress.log(step, loss=loss.item(), grad_norm=grad_norm.item(), epoch=epoch)
            if dist.is_main and (step % steps_per_epoch == 0 or step == max_steps):  # epoch end or last step
                state = {**record, "model": model.state_dict(), "ema": ema.state_dict(), "step": step}
                state |= {"optimizer": optimizer.state_dict(), "epoch": epoch, "rng": runtime.rng_state()}
                runtime.save_checkpoint(ckpt_path, state)
    if dist.is_main:
        save_preview(vqvae_ckpt, ckpt_path, out_dir, device)
    return ckpt_path


def save_preview(vqvae_ckpt: Path, ckpt_path: Path, out_dir: Path, device) -> None:
    restorer = load_restorer(vqvae_ckpt, ckpt_path, device)
    data = restorer.cfg.data
    dataset = mammo.MammoDataset(mammo.list_sources(data, "test")[:1], data, paired=True, fixed_noise=True)
    clean, degraded, mask = unit_pair(dataset[0])
    save_comparison(out_dir / "preview.png", degraded, restorer(degraded, mask), clean)


def save_comparison(path: Path, degraded, restored, clean=None) -> None:
    images, titles = [degraded, restored], ["low dose", "restored"]
    if clean is not None:
        images, titles = images + [clean, restored - clean], titles + ["full dose", "restored - full dose"]
    else:
        images, titles = images + [restored - degraded], titles + ["restored - low dose"]
    note = "model canvas, values mapped to [0, 1] (dense = bright)"
    viz.save_panel(path, images, titles, window=(0.0, 1.0), error_index=len(images) - 1, suptitle=note)


# --- refine: the decoder's output conditioned on the low-dose image ---


def fit_refiner(restorer: Restorer, out_dir: Path, argv: list[str] | None = None) -> Path:
    """Fit the refiner (the LDM and VQ-VAE-2 frozen) on crops of the training images' restored canvases,
    `refine.draws` noise draws each, restored exactly as `restore` does; MSE inside the breast. Writes
    OUT/checkpoint.pt = the LDM checkpoint + the refiner and its config. Minutes on a CPU, so no resume."""
    cfg, rc, device = restorer.cfg, restorer.cfg.refine, restorer.device
    runtime.seed_everything(cfg.train.seed)
    runtime.prepare_run_dir(out_dir, cfg, __file__, argv)
    dataset = mammo.MammoDataset(mammo.list_sources(cfg.data, "train"), cfg.data, paired=True)
    canvases = []  # per training image and noise draw: [refiner input, low dose, full dose, mask]
    for draw in range(rc.draws):
        dataset.epoch = draw
        for i in range(len(dataset)):
            clean, degraded, mask = unit_pair(dataset[i])
            image = restorer.refiner_input(degraded, mask)
            canvases.append(np.stack([image, degraded, clean, mask]).astype(np.float32))
        print(f"refiner inputs ({rc.source}): noise draw {draw + 1}/{rc.draws} of {len(dataset)} images")
    refiner = Refiner(rc).to(device)
    optimizer = torch.optim.Adam(refiner.parameters(), lr=rc.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, rc.steps)
    rng, ckpt_path = np.random.default_rng(cfg.train.seed), out_dir / "checkpoint.pt"
    with runtime.ProgressLogger(out_dir, rc.steps, "refine", log_every=cfg.train.log_every) as progress:
        for step in range(1, rc.steps + 1):
            crops = []
            for k in rng.integers(len(canvases), size=rc.batch_size):
                top, left = mammo.random_crop(canvases[k].shape[1:], (rc.crop,) * 2, canvases[k][3] > 0, rng)
                crops.append(canvases[k][:, top : top + rc.crop, left : left + rc.crop])
            image, low, clean, mask = torch.from_numpy(np.stack(crops)).to(device).split(1, dim=1)
            loss = (((refiner(image, low) - clean) * mask) ** 2).sum() / mask.sum().clamp(min=1.0)
            runtime.stop_if_not_finite(loss, step, ckpt_path)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            progress.log(step, rmse=loss.item() ** 0.5)
    state = runtime.load_checkpoint(restorer.checkpoint, SCRIPT)
    state |= {"config": config_to_dict(cfg), "refiner": refiner.state_dict()}
    runtime.save_checkpoint(ckpt_path, state)
    return ckpt_path


# --- restore files ---


def input_files(input_path: Path) -> list[Path]:
    if input_path.is_dir():
        files = sorted(p for p in input_path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    elif input_path.is_file():
        files = [input_path]
    else:
        raise UserError(f"--input {input_path}: no such file or folder")
    if not files:
        raise UserError(f"--input {input_path}: no .dcm or .png files")
    return files


def output_path(input_root: Path, file: Path, output: Path, suffix: str) -> Path:
    if input_root.is_file():
        return output if output.suffix.lower() in IMAGE_SUFFIXES else output / f"{file.stem}{suffix}"
    return output / file.relative_to(input_root).parent / f"{file.stem}{suffix}"


def write_png16(path: Path, values: np.ndarray, value_range) -> None:
    dtype = np.uint8 if value_range[1] <= 255 else np.uint16
    ok, data = cv2.imencode(".png", values.astype(dtype))
    if not ok:
        raise UserError(f"{path}: PNG encoding failed")
    with runtime.atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())


def restore_files(restorer: Restorer, input_path: Path, output: Path, latents=None) -> list[Path]:
    """Restore one file or every DICOM/PNG under a folder; outputs keep the input's size, range, polarity."""
    files = input_files(input_path)
    if latents is not None:
        read_latent_index(latents, fingerprint(restorer.vqvae), restorer.cfg.data)
    steps, name = restorer.cfg.sample.steps, restorer.checkpoint.name
    description = f"mammo_ldm latent diffusion restoration, DDIM {steps} steps, checkpoint {name}"
    series = dict(
        series_uid=generate_uid(), series_description="restored (mammo_ldm)", description=description
    )
    written = []
    for file in files:
        m = mammo.read_mammogram(file)
        out = output_path(input_path, file, output, ".dcm" if m.dataset is not None else ".png")
        runtime.refuse_overwrite_input(out, file)
        prepared = mammo.prepare(m, restorer.cfg.data)
        restored = restorer(prepared.canvas, prepared.canvas_mask)
        pasted = mammo.paste_back(prepared.unit, restored, prepared.geometry, prepared.mask)
        values = mammo.from_unit(pasted, m)
        if m.dataset is None:
            write_png16(out, values, m.value_range)
        else:
            dicom_io.write_derived_dicom(m.dataset, values, out, **series)
        save_comparison(out.with_name(f"{out.stem}_panel.png"), prepared.canvas, restored)
        written.append(out)
        print(f"{file} -> {out} ({values.shape[0]}x{values.shape[1]})", flush=True)
    return written


# --- evaluate ---


def score(out: np.ndarray, clean: np.ndarray, mask: np.ndarray, lpips_model) -> dict:
    row = {"psnr_db": metrics.psnr(out, clean, 1.0, mask), "ssim": metrics.ssim(out, clean, 1.0, mask)}
    row["noise_std"] = float((out - clean)[mask].std())
    if lpips_model is not None:
        row["lpips"] = lpips_distance(lpips_model, torch.from_numpy(out), torch.from_numpy(clean))
    return row


REFINED_ROWS = {
    "ldm": "LDM restored + refiner",
    "first_stage": "refiner on the VQ-VAE-2 of the low dose + DC (no diffusion)",
    "input": "refiner on the low-dose input alone (a plain CNN)",
}


@torch.no_grad()
def candidates(restorer: Restorer, clean, degraded, mask, with_baselines: bool) -> dict[str, np.ndarray]:
    """Every row's output for one test pair: the input, classical denoisers, the VQ-VAE-2 alone, the LDM."""
    data, sigma = restorer.cfg.data, restorer.cfg.sample.consistency_sigma
    outputs = {"low-dose input": degraded}
    if with_baselines:
        outputs["NLM (scikit-image)"] = mammo.nlm(degraded, data, mask)
        outputs["BM3D on Anscombe-transformed counts"] = mammo.bm3d_anscombe(degraded, data, mask)
    if sigma > 0:  # what the data-consistency step's low-pass part gives without any model
        smoothed = data_consistency(np.zeros_like(degraded), degraded, mask, sigma)
        outputs[f"Gaussian smoothing of the input (sigma {sigma:g} px)"] = smoothed
    outputs["VQ-VAE-2 of the full-dose image (ceiling)"] = restorer.decode(restorer.encode(clean))
    first_stage = restorer.decode(restorer.encode(degraded))
    outputs["VQ-VAE-2 of the low-dose image (no diffusion)"] = first_stage
    if sigma > 0:  # the same step on the first stage alone: what the diffusion adds
        first_stage_dc = data_consistency(first_stage, degraded, mask, sigma)
        outputs["... + data consistency (no diffusion)"] = first_stage_dc
    outputs["LDM restored"] = restorer(degraded, mask, refine=False)
    if restorer.refiner is not None:
        source = restorer.cfg.refine.source
        image = outputs["LDM restored"] if source == "ldm" else restorer.refiner_input(degraded, mask)
        outputs[REFINED_ROWS[source]] = restorer.refine(image, degraded, mask)
    return outputs


def evaluate(restorer: Restorer, out_dir: Path, latents: Path | None = None, argv=None) -> dict:
    """PSNR/SSIM/LPIPS against the full-dose image of every row of `candidates`; the VQ-VAE-2 of the full-dose
    image is the ceiling of any latent restoration. `latents`: score the test pairs of that extract-latents
    folder (refused when it was made with another VQ-VAE, canvas or dose than the models)."""
    cfg = restorer.cfg
    if latents is not None:
        index = read_latent_index(latents, fingerprint(restorer.vqvae), cfg.data)
        sources = [item["source"] for item in index["items"] if item["split"] == "test"]
    else:
        sources = mammo.list_sources(cfg.data, "test")
    sources = sources[: cfg.eval.max_images] if cfg.eval.max_images > 0 else sources
    dataset = mammo.MammoDataset(sources, cfg.data, paired=True, fixed_noise=True)
    lpips_model = load_lpips("alex")
    lpips_model = lpips_model.to(restorer.device) if lpips_model is not None else None
    scores: dict[str, list] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(len(dataset)):
        clean, degraded, mask = unit_pair(dataset[i])
        outputs = candidates(restorer, clean, degraded, mask, cfg.eval.baselines)
        for name, out in outputs.items():
            scores.setdefault(name, []).append(score(out, clean, mask, lpips_model))
        if i < cfg.eval.panel_images:
            final = outputs.get(REFINED_ROWS["ldm"], outputs["LDM restored"])
            save_comparison(out_dir / f"restored_{i:02d}.png", degraded, final, clean)
    rows = [
        {"method": name, **{k: float(np.mean([r[k] for r in vals])) for k in vals[0]}, "images": len(vals)}
        for name, vals in scores.items()
    ]
    sample, diffusion, rc = cfg.sample, cfg.diffusion, cfg.refine
    notes = [
        f"test images: {', '.join(Path(s).name for s in sources)}; {mammo.dose_description(cfg.data)}",
        f"{cfg.data.image_size[0]}x{cfg.data.image_size[1]} canvas, values: file range -> [0,1] (dense = "
        "bright), data_range 1; PSNR/SSIM/noise_std (std of output - full dose) inside the breast mask, SSIM "
        f"gaussian sigma {metrics.SSIM_SIGMA}; LPIPS-alex on the whole canvas"
        + ("" if lpips_model else " (LPIPS weights not found)"),
        f"LDM: {diffusion.prediction}-prediction{', residual target' if diffusion.residual else ''}; DDIM "
        f"{sample.steps} steps, eta {sample.eta}, start {sample.start} x T, data consistency sigma "
        f"{sample.consistency_sigma}; EMA weights",
        "command: python " + " ".join(argv if argv is not None else sys.argv),
    ]
    if restorer.refiner is not None:
        notes.insert(
            -1,
            f"refiner: on {rc.source}, {rc.layers} conv layers x {rc.channels} channels, {rc.steps} steps on "
            f"{rc.crop} px crops of {rc.draws} noise draws of each training image",
        )
    title = "Low-dose mammogram restoration (test split)"
    runtime.print_metrics_table(rows, title, out_dir / "metrics.json", notes)
    return {"rows": rows, "notes": notes}


# --- commands ---

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
ConfigOpt = typer.Option(None, "--config", help="YAML config or partial override file; repeatable")
PresetOpt = typer.Option("full", "--preset", help="full (seed), small (CPU, 1024x768) or tiny (tests)")
SetOpt = typer.Option(None, "--set", help="override a value: section.key=value (repeatable)")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda")
VqvaeOpt = typer.Option(..., "--vqvae", help="checkpoint of mammo_vqvae.py train (the frozen first stage)")
CheckpointOpt = typer.Option(..., "--checkpoint", help="checkpoint.pt of mammo_ldm.py train")
LatentsOpt = typer.Option(None, "--latents", help="folder written by mammo_vqvae.py extract-latents")
StepsOpt = typer.Option(None, "--steps", help="DDIM steps (sample.steps)", hidden=True)
DataOpt = typer.Option(None, "--data", help="CBIS-DDSM root or folder of DICOM/PNG (default: synthetic)")


def with_steps(overrides: list[str] | None, steps: int | None) -> list[str]:
    return [*(overrides or []), *([f"sample.steps={steps}"] if steps is not None else [])]


@app.command("train")
def train_cmd(
    vqvae: Path = VqvaeOpt,
    latents: Path = LatentsOpt,
    out: Path = typer.Option(Path("runs/ldm"), "--out"),
    data: str = DataOpt,
    resume: Path = typer.Option(None, "--resume"),
    max_steps: int = typer.Option(None, "--max-steps", help="stop after this many steps (train.max_steps)"),
    config: list[Path] | None = ConfigOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
):
    """Train the latent denoiser (latents from --latents, else encoded on the fly from the data)."""
    cfg = load_config(Config, config, preset, set_, shipped=default_config_path(__file__))
    cfg.data.path = data or cfg.data.path
    cfg.train.max_steps = cfg.train.max_steps if max_steps is None else max_steps
    train(cfg, vqvae, out, latents, device, resume, sys.argv)


@app.command("restore")
def restore_cmd(
    vqvae: Path = VqvaeOpt,
    checkpoint: Path = CheckpointOpt,
    input: Path = typer.Option(..., "--input", help="a DICOM/PNG file or a folder of them"),
    output: Path = typer.Option(..., "--output", help="file (single input) or folder"),
    latents: Path = LatentsOpt,
    set_: list[str] = SetOpt,
    steps: int = StepsOpt,
    device: str = DeviceOpt,
):
    """Restore low-dose mammograms: DICOM out (new UIDs, input size and stored range) + a PNG panel each."""
    input_files(input)  # a wrong --input is reported before the models load
    restorer = load_restorer(vqvae, checkpoint, runtime.pick_device(device), with_steps(set_, steps))
    restore_files(restorer, input, output, latents)


@app.command("evaluate")
def evaluate_cmd(
    vqvae: Path = VqvaeOpt,
    checkpoint: Path = CheckpointOpt,
    out: Path = typer.Option(None, "--out"),
    data: str = DataOpt,
    latents: Path = LatentsOpt,
    set_: list[str] = SetOpt,
    steps: int = StepsOpt,
    device: str = DeviceOpt,
):
    """Input, NLM, BM3D-Anscombe, VQ-VAE-2 ceiling and LDM on the test split: PSNR/SSIM/LPIPS."""
    restorer = load_restorer(vqvae, checkpoint, runtime.pick_device(device), with_steps(set_, steps), data)
    evaluate(restorer, out or checkpoint.parent / "eval", latents, sys.argv)


app.command("eval", hidden=True)(evaluate_cmd)


@app.command("refine")
def refine_cmd(
    vqvae: Path = VqvaeOpt,
    checkpoint: Path = CheckpointOpt,
    out: Path = typer.Option(..., "--out"),
    data: str = DataOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
):
    """Fit the refiner (a CNN on the restored and the low-dose image) on a trained LDM: OUT/checkpoint.pt."""
    fit_refiner(load_restorer(vqvae, checkpoint, runtime.pick_device(device), set_, data), out, sys.argv)


if __name__ == "__main__":
    runtime.cli_main(app)
