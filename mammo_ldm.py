"""Low-dose mammogram restoration by latent diffusion in a frozen VQ-VAE-2 (seed 002, stage 2).

The latent is the VQ-VAE-2's level-0 encoder output BEFORE quantisation (128 x 256 x 192 for a 1024 x 768
canvas with the seed's model). Why that one: every higher level is computed from it by the frozen encoders, so one
tensor determines the whole hierarchy and `decode_latent` (encoders 1.., quantisation, decoders) maps it back to
pixels; it is continuous, so Gaussian diffusion is well defined (code indices are not); and quantisation after
sampling snaps small sampling errors back onto the codebooks. Its 128 channels are the seed's UNet sizes (256 in =
noisy latent + degraded latent concatenated, 128 out). Latents are standardised by the training set's mean/std
(CompVis' scale_by_std, one scalar each).

A UNet (base 192, multipliers [1, 2, 4], 2 residual blocks, self-attention at levels 1 and 2 with 64-channel heads
via F.scaled_dot_product_attention, optional gradient checkpointing) predicts the noise (L_simple) of the clean
latent, conditioned by concatenating the degraded image's latent. Schedule: CompVis' "linear" (linear in sqrt(beta))
from 0.0015 to 0.0195 over T = 1000 steps. EMA of the weights (0.9999 with CompVis' LitEma warm-up); DDIM sampling,
50 steps, eta 0, with the EMA weights.

Needs mammo_vqvae.py beside it (the frozen first stage) and common/ (data, geometry, dose model).

Usage:
  python mammo_ldm.py train --vqvae runs/vqvae/checkpoint.pt --latents runs/latents --out runs/ldm
  python mammo_ldm.py train --vqvae runs/vqvae/checkpoint.pt --out runs/ldm     # latents on the fly, fresh noise
  python mammo_ldm.py restore --vqvae runs/vqvae/checkpoint.pt --checkpoint runs/ldm/checkpoint.pt \
      --input low_dose.dcm --output restored.dcm                               # or folders; DICOM/PNG in and out
  python mammo_ldm.py evaluate --vqvae runs/vqvae/checkpoint.pt --checkpoint runs/ldm/checkpoint.pt
Any config value: --set train.lr=1e-4 --set sample.steps=100 (see configs/mammo_ldm.yaml). Use the same preset as
the VQ-VAE (both `tiny` or both `full`).
"""

from __future__ import annotations

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

import mammo_vqvae
from common import UserError, dicom_io, metrics, runtime, viz
from common.config import config_from_dict, config_to_dict, default_config_path, load_config
from common.mammo import (
    IMAGE_SUFFIXES,
    MammoDataConfig,
    MammoDataset,
    dose_description,
    epoch_order,
    from_unit,
    list_sources,
    model_to_unit,
    paste_back,
    prepare,
    read_mammogram,
    unit_to_model,
)
from common.perceptual import load_lpips, lpips_distance

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
    log_every: int = 50
    seed: int = 0


@dataclass
class SampleConfig:
    steps: int = 50
    eta: float = 0.0
    seed: int = 0


@dataclass
class EvalConfig:
    max_images: int = 0  # 0: the whole test split
    panel_images: int = 2


@dataclass
class Config:
    data: MammoDataConfig = field(default_factory=MammoDataConfig)  # used when latents are made on the fly
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --- data: latent pairs ---


class LatentPairs(Dataset):
    """Pairs written by `mammo_vqvae.py extract-latents` (one fp16 file per image, listed in index.json)."""

    def __init__(self, root: Path, index: dict, split: str):
        self.files = [root / item["file"] for item in index["items"] if item["split"] == split]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        pair = torch.load(self.files[i], map_location="cpu", weights_only=True)
        return {"clean": pair["clean"].float(), "degraded": pair["degraded"].float()}


def read_latent_index(latents: Path, vqvae_print: str) -> dict:
    path = latents / "index.json"
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path}: missing or not JSON; write it with mammo_vqvae.py extract-latents") from None
    if index.get("vqvae_fingerprint") != vqvae_print:
        raise UserError(f"{latents}: latents come from another VQ-VAE ({index.get('vqvae_checkpoint')}) than --vqvae")
    return index


# --- model ---


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


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
        self.out_layers = nn.Sequential(norm(out_ch), nn.SiLU(), nn.Dropout(dropout),
                                        zero(nn.Conv2d(out_ch, out_ch, 3, padding=1)))
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
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels on GPU
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Down(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(x)


class Up(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """eps(x_t, t | degraded latent): input is concat(x_t, degraded), 2C channels; output C channels."""

    def __init__(self, cfg: ModelConfig, latent_channels: int):
        super().__init__()
        base, mults, head = cfg.base_channels, cfg.channel_mults, cfg.attention_head_channels
        emb_dim = 4 * base
        self.base, self.checkpointing = base, cfg.gradient_checkpointing
        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input = nn.Conv2d(2 * latent_channels, base, 3, padding=1)
        self.down, skips, ch = nn.ModuleList(), [base], base
        for level, mult in enumerate(mults):
            for _ in range(cfg.num_res_blocks):
                blocks = [ResBlock(ch, base * mult, emb_dim, cfg.dropout)]
                ch = base * mult
                if level in cfg.attention_levels:
                    blocks.append(Attention(ch, head))
                self.down.append(nn.ModuleList(blocks))
                skips.append(ch)
            if level < len(mults) - 1:
                self.down.append(nn.ModuleList([Down(ch)]))
                skips.append(ch)
        self.middle = nn.ModuleList([ResBlock(ch, ch, emb_dim, cfg.dropout), Attention(ch, head),
                                     ResBlock(ch, ch, emb_dim, cfg.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(cfg.num_res_blocks + 1):
                blocks = [ResBlock(ch + skips.pop(), base * mult, emb_dim, cfg.dropout)]
                ch = base * mult
                if level in cfg.attention_levels:
                    blocks.append(Attention(ch, head))
                if level > 0 and i == cfg.num_res_blocks:
                    blocks.append(Up(ch))
                self.up.append(nn.ModuleList(blocks))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero(nn.Conv2d(ch, latent_channels, 3, padding=1)))
        self.factor = 2 ** (len(mults) - 1)

    def _run(self, blocks: nn.ModuleList, h, emb):
        for block in blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                h = grad_checkpoint(block, h, emb, use_reentrant=False)
            else:
                h = block(h, emb)
        return h

    def forward(self, x_t, t, cond):
        if x_t.shape[-2] % self.factor or x_t.shape[-1] % self.factor:
            raise UserError(f"latent {tuple(x_t.shape[-2:])} not divisible by {self.factor} (UNet downsampling)")
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


# --- diffusion and sampler ---


class Schedule:
    """CompVis' "linear" schedule: beta linear in sqrt from beta_start to beta_end."""

    def __init__(self, cfg: DiffusionConfig, device: torch.device):
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.timesteps, dtype=torch.float64) ** 2
        self.timesteps = cfg.timesteps
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0).float().to(device)

    def q_sample(self, x0, t, noise):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def diffusion_loss(net, schedule: Schedule, clean_z, degraded_z) -> torch.Tensor:
    """L_simple: MSE between the true and predicted noise at a uniformly drawn step."""
    t = torch.randint(0, schedule.timesteps, (clean_z.shape[0],), device=clean_z.device)
    noise = torch.randn_like(clean_z)
    return F.mse_loss(net(schedule.q_sample(clean_z, t, noise), t, degraded_z).float(), noise)


@torch.no_grad()
def ddim_sample(model, schedule: Schedule, cond: torch.Tensor, steps: int, eta: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021) on CompVis' uniform step grid (0, c, 2c, ...) + 1; eta 0 = deterministic.
    Returns the predicted clean latent of the last step."""
    if not 1 <= steps <= schedule.timesteps:
        raise UserError(f"sample.steps must be in [1, {schedule.timesteps}], got {steps}")
    grid = list(range(0, schedule.timesteps, schedule.timesteps // steps))
    grid = [min(t + 1, schedule.timesteps - 1) for t in grid]
    acp = schedule.alphas_cumprod
    x = torch.randn(cond.shape, generator=generator, device=cond.device)
    for i in reversed(range(len(grid))):
        t = torch.full((cond.shape[0],), grid[i], device=cond.device, dtype=torch.long)
        # last step to alpha 1 (the clean x0; diffusers' set_alpha_to_one), not CompVis' acp[0], which leaves
        # sqrt(beta_0) ~ 0.04 of the predicted noise in the result
        a_t, a_prev = acp[grid[i]], acp[grid[i - 1]] if i > 0 else torch.ones((), device=cond.device)
        eps = model(x, t, cond).float()
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        noise = torch.randn(x.shape, generator=generator, device=x.device) if eta > 0 else 0.0
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps + sigma * noise
    return x


@dataclass
class Restorer:
    """Everything a restoration needs: frozen VQ-VAE-2, EMA UNet, schedule, latent statistics."""

    vqvae: mammo_vqvae.VQVAE2
    unet: UNet
    schedule: Schedule
    latent_mean: float
    latent_std: float
    cfg: Config
    device: torch.device

    @torch.no_grad()
    def __call__(self, degraded_canvas: np.ndarray, steps: int | None = None) -> np.ndarray:
        x = torch.from_numpy(unit_to_model(degraded_canvas))[None, None].to(self.device)
        cond = (self.vqvae.encode_latent(x) - self.latent_mean) / self.latent_std
        generator = torch.Generator(self.device).manual_seed(self.cfg.sample.seed)
        z = ddim_sample(self.unet, self.schedule, cond, steps or self.cfg.sample.steps, self.cfg.sample.eta, generator)
        image, _, _ = self.vqvae.decode_latent(z * self.latent_std + self.latent_mean)
        return model_to_unit(image.float())[0, 0].cpu().numpy()


def load_restorer(vqvae_ckpt: Path, checkpoint: Path, device: torch.device) -> Restorer:
    vqvae, _ = mammo_vqvae.load_vqvae(vqvae_ckpt, device)
    state = runtime.load_checkpoint(checkpoint, SCRIPT)
    if state["vqvae_fingerprint"] != mammo_vqvae.fingerprint(vqvae):
        raise UserError(f"{checkpoint}: trained on the latents of {state['vqvae_checkpoint']}, not of {vqvae_ckpt}")
    cfg = config_from_dict(Config, state["config"])
    unet = UNet(cfg.model, state["latent_channels"])
    try:
        unet.load_state_dict({k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"})
    except RuntimeError as exc:  # its config asks for another architecture than its weights have
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"{checkpoint}: weights do not match its model config (size mismatch: {detail})") from None
    return Restorer(vqvae, unet.to(device).eval(), Schedule(cfg.diffusion, device), state["latent_mean"],
                    state["latent_std"], cfg, device)


# --- train ---


def ema_avg_fn(decay: float):
    """CompVis LitEma: decay min(decay, (1 + n) / (10 + n)) so early averages are not stuck at initialisation."""

    def avg(averaged, current, num_averaged):
        d = min(decay, (1 + float(num_averaged)) / (10 + float(num_averaged)))
        return d * averaged + (1 - d) * current

    return avg


@torch.no_grad()
def latent_stats(vqvae, dataset: MammoDataset, device, n: int = 16) -> tuple[float, float]:
    z = torch.cat([vqvae.encode_latent(dataset[i]["clean"][None].to(device)).float().flatten()
                   for i in range(min(n, len(dataset)))])
    return float(z.mean()), float(z.std())


def train(cfg: Config, vqvae_ckpt: Path, out_dir: Path, latents: Path | None = None, device_name: str = "auto",
          resume: Path | None = None, argv: list[str] | None = None) -> Path:
    dist = runtime.init_distributed(device_name)
    device = dist.device
    runtime.seed_everything(cfg.train.seed + dist.rank)
    vqvae, vq_cfg = mammo_vqvae.load_vqvae(vqvae_ckpt, device)
    vq_print = mammo_vqvae.fingerprint(vqvae)
    if latents is not None:
        index = read_latent_index(latents, vq_print)
        dataset, (mean, std) = LatentPairs(latents, index, "train"), (index["train_mean"], index["train_std"])
        data_desc = f"latent pairs from {latents} ({index['degradation']})"
    else:
        if list(cfg.data.image_size) != list(vq_cfg.data.image_size):
            raise UserError(f"data.image_size {cfg.data.image_size} differs from the VQ-VAE's "
                            f"{vq_cfg.data.image_size}; use the same preset for both scripts")
        dataset = MammoDataset(list_sources(cfg.data, "train"), cfg.data, paired=True)
        mean, std = latent_stats(vqvae, dataset, device)
        data_desc = f"{cfg.data.path or 'synthetic mammograms'}, latents on the fly ({dose_description(cfg.data)})"
    per_rank_batch = max(1, cfg.train.batch_size // dist.world_size)
    workers = 0 if latents is not None else cfg.data.num_workers
    steps_per_epoch = len(dataset) // (dist.world_size * per_rank_batch)  # whole batches on every rank
    if steps_per_epoch == 0:
        raise UserError(f"only {len(dataset)} training pairs for batch size {per_rank_batch}; lower train.batch_size")
    latent_channels = vq_cfg.model.hidden_channels
    model = UNet(cfg.model, latent_channels).to(device)
    ema = torch.optim.swa_utils.AveragedModel(model, avg_fn=ema_avg_fn(cfg.train.ema_decay))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    step = 0
    if resume is not None:
        state = runtime.load_checkpoint(resume, SCRIPT)
        if state.get("vqvae_fingerprint") != vq_print:
            raise UserError(f"{resume}: trained on the latents of {state.get('vqvae_checkpoint')}, not of {vqvae_ckpt}")
        try:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"{resume}: checkpoint does not match this config ({str(exc)[:120]})") from None
        step, mean, std = int(state["step"]), state["latent_mean"], state["latent_std"]
        mammo_vqvae.restore_rng(state["rng"], dist, cfg.train.seed + step)
    schedule = Schedule(cfg.diffusion, device)
    net = runtime.ddp_wrap(model, dist)
    use_amp = runtime.switch_on(cfg.train.amp, device)
    if dist.is_main:
        runtime.prepare_run_dir(out_dir, cfg, __file__, argv)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"data: {data_desc}; {len(dataset)} training pairs; UNet {n_params / 1e6:.2f} M parameters; latent "
              f"{latent_channels} channels, mean {mean:.3g} std {std:.3g}; device {device}")
    extra = {"latent_channels": latent_channels, "latent_mean": mean, "latent_std": std,
             "vqvae_fingerprint": vq_print, "vqvae_checkpoint": str(vqvae_ckpt)}
    max_steps = cfg.train.max_steps or cfg.train.max_epochs * steps_per_epoch
    ckpt_path = out_dir / "checkpoint.pt"
    with runtime.ProgressLogger(out_dir if dist.is_main else None, max_steps, "ldm", enabled=dist.is_main,
                                log_every=cfg.train.log_every, start_step=step) as progress:
        for epoch in range(step // steps_per_epoch, cfg.train.max_epochs):
            if step >= max_steps:
                break
            dataset.epoch = epoch  # on-the-fly pairs: fresh low-dose noise every epoch
            order = epoch_order(len(dataset), per_rank_batch, epoch, cfg.train.seed, dist.rank, dist.world_size)
            done = (step - epoch * steps_per_epoch) * per_rank_batch  # > 0 only in the epoch a resume starts in
            loader = DataLoader(dataset, per_rank_batch, sampler=order[done:], drop_last=True, num_workers=workers,
                                generator=mammo_vqvae.loader_generator(cfg.train.seed, epoch))
            model.train()
            for batch in loader:
                clean, degraded = batch["clean"].to(device), batch["degraded"].to(device)
                if latents is None:
                    with torch.no_grad():
                        clean, degraded = vqvae.encode_latent(clean).float(), vqvae.encode_latent(degraded).float()
                clean, degraded = (clean - mean) / std, (degraded - mean) / std
                with runtime.amp_autocast(device, use_amp):
                    loss = diffusion_loss(net, schedule, clean, degraded)
                if not torch.isfinite(loss):  # stop before the update: no NaN reaches the weights or a checkpoint
                    raise UserError(mammo_vqvae.non_finite_message(loss, step, ckpt_path))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optimizer.step()
                ema.update_parameters(model)
                step += 1
                progress.log(step, loss=loss.item(), grad_norm=grad_norm.item(), epoch=epoch)
                if step >= max_steps:
                    break
            if dist.is_main:
                runtime.save_checkpoint(ckpt_path, {
                    "script": SCRIPT, "config": config_to_dict(cfg), "model": model.state_dict(),
                    "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                    "rng": runtime.rng_state(), **extra})
    if dist.is_main:
        restorer = load_restorer(vqvae_ckpt, ckpt_path, device)
        item = MammoDataset(list_sources(vq_cfg.data, "test")[:1], vq_cfg.data, paired=True, fixed_noise=True)[0]
        clean, degraded = (model_to_unit(item[k][0]).numpy() for k in ("clean", "degraded"))
        save_comparison(out_dir / "preview.png", degraded, restorer(degraded), clean)
    return ckpt_path


def save_comparison(path: Path, degraded, restored, clean=None) -> None:
    images, titles = [degraded, restored], ["low dose", "restored"]
    if clean is not None:
        images, titles = images + [clean, restored - clean], titles + ["full dose", "restored - full dose"]
    else:
        images, titles = images + [restored - degraded], titles + ["restored - low dose"]
    viz.save_panel(path, images, titles, window=(0.0, 1.0), error_index=len(images) - 1,
                   suptitle="model canvas, values mapped to [0, 1] (dense = bright)")


# --- restore files ---


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


def restore_files(vqvae_ckpt: Path, checkpoint: Path, input_path: Path, output: Path, device_name: str = "auto",
                  steps: int | None = None) -> list[Path]:
    """Restore one file or every DICOM/PNG under a folder; outputs keep the input's size, range and polarity."""
    device = runtime.pick_device(device_name)
    if input_path.is_dir():
        files = sorted(p for p in input_path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    elif input_path.is_file():
        files = [input_path]
    else:
        raise UserError(f"--input {input_path}: no such file or folder")
    if not files:
        raise UserError(f"--input {input_path}: no .dcm or .png files")
    restorer = load_restorer(vqvae_ckpt, checkpoint, device)
    series_uid, written = generate_uid(), []
    for file in files:
        m = read_mammogram(file)
        out = output_path(input_path, file, output, ".dcm" if m.dataset is not None else ".png")
        runtime.refuse_overwrite_input(out, file)
        prepared = prepare(m, restorer.cfg.data)
        restored = restorer(prepared.canvas, steps)
        values = from_unit(paste_back(prepared.unit, restored, prepared.geometry, prepared.mask), m)
        if m.dataset is not None:
            dicom_io.write_derived_dicom(
                m.dataset, values, out, series_uid=series_uid, series_description="restored (mammo_ldm)",
                description=f"mammo_ldm latent diffusion restoration, DDIM {steps or restorer.cfg.sample.steps} "
                            f"steps, checkpoint {checkpoint.name}")
        else:
            write_png16(out, values, m.value_range)
        save_comparison(out.with_name(f"{out.stem}_panel.png"), prepared.canvas, restored)
        written.append(out)
        print(f"{file} -> {out} ({values.shape[0]}x{values.shape[1]})", flush=True)
    return written


# --- evaluate ---


def evaluate(vqvae_ckpt: Path, checkpoint: Path, out_dir: Path, device_name: str = "auto",
             data_path: str | None = None, steps: int | None = None) -> dict:
    """PSNR/SSIM (+ LPIPS) of the low-dose input, the VQ-VAE-2 reconstruction of the clean image (the ceiling:
    the best any latent restoration can reach) and the restored image, all against the clean image."""
    device = runtime.pick_device(device_name)
    restorer = load_restorer(vqvae_ckpt, checkpoint, device)
    cfg = restorer.cfg
    if data_path is not None:
        cfg.data.path = data_path
    sources = list_sources(cfg.data, "test")
    sources = sources[: cfg.eval.max_images] if cfg.eval.max_images > 0 else sources
    dataset = MammoDataset(sources, cfg.data, paired=True, fixed_noise=True)
    lpips_model = load_lpips("alex")
    if lpips_model is not None:
        lpips_model = lpips_model.to(device)
    names = ["low-dose input", "VQ-VAE-2 reconstruction of full dose (ceiling)", "LDM restored"]
    scores = {name: [] for name in names}
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(len(dataset)):
        item = dataset[i]
        clean, degraded = (model_to_unit(item[k][0]).numpy() for k in ("clean", "degraded"))
        with torch.no_grad():
            recon = model_to_unit(restorer.vqvae(item["clean"][None].to(device))[0].float())[0, 0].cpu().numpy()
        restored = restorer(degraded, steps)
        mask = item["mask"][0].numpy() > 0
        for name, out in zip(names, [degraded, recon, restored]):
            row = {"psnr_db": metrics.psnr(out, clean, 1.0, mask), "ssim": metrics.ssim(out, clean, 1.0, mask),
                   "noise_std": metrics.noise_std(out)}
            if lpips_model is not None:
                row["lpips"] = lpips_distance(lpips_model, torch.from_numpy(out), torch.from_numpy(clean))
            scores[name].append(row)
        if i < cfg.eval.panel_images:
            save_comparison(out_dir / f"restored_{i:02d}.png", degraded, restored, clean)
    rows = [{"method": name, **{k: float(np.mean([r[k] for r in vals])) for k in vals[0]}, "images": len(vals)}
            for name, vals in scores.items()]
    notes = [f"test split of {cfg.data.path or 'synthetic mammograms'}; {len(dataset)} images; "
             f"{dose_description(cfg.data)}",
             f"{cfg.data.image_size[0]}x{cfg.data.image_size[1]} canvas, values: file range -> [0,1] (dense = bright), "
             f"data_range 1; PSNR/SSIM inside the breast mask, SSIM gaussian sigma {metrics.SSIM_SIGMA}; noise_std "
             "(Immerkaer) and LPIPS-alex on the whole canvas" + ("" if lpips_model else " (LPIPS weights not found)"),
             f"DDIM {steps or cfg.sample.steps} steps, eta {cfg.sample.eta}, EMA weights",
             f"command: python {SCRIPT}.py evaluate --vqvae {vqvae_ckpt} --checkpoint {checkpoint}"]
    runtime.print_metrics_table(rows, "Low-dose mammogram restoration (test split)", out_dir / "metrics.json", notes)
    return {"rows": rows, "notes": notes}


# --- commands ---

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
ConfigOpt = typer.Option(None, "--config", help="YAML config (default: configs/mammo_ldm.yaml)")
PresetOpt = typer.Option("full", "--preset", help="preset in the config file: full (seed) or tiny (CPU)")
SetOpt = typer.Option(None, "--set", help="override a value: section.key=value (repeatable)")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda")
VqvaeOpt = typer.Option(..., "--vqvae", help="checkpoint of mammo_vqvae.py train (the frozen first stage)")
StepsOpt = typer.Option(None, "--steps", help="DDIM steps (default: sample.steps)")


def build_config(config: Path | None, preset: str, overrides: list[str] | None) -> Config:
    return load_config(Config, config or default_config_path(__file__), preset, overrides)


@app.command("train")
def train_cmd(vqvae: Path = VqvaeOpt, latents: Path = typer.Option(None, "--latents", help="extract-latents folder"),
              out: Path = typer.Option(Path("runs/ldm"), "--out"), data: str = typer.Option(None, "--data"),
              resume: Path = typer.Option(None, "--resume"), config: Path = ConfigOpt, preset: str = PresetOpt,
              set_: list[str] = SetOpt, device: str = DeviceOpt):
    """Train the latent denoiser (latents from --latents, else encoded on the fly from the data)."""
    cfg = build_config(config, preset, set_)
    if data is not None:
        cfg.data.path = data
    train(cfg, vqvae, out, latents, device, resume, sys.argv)


@app.command("restore")
def restore_cmd(vqvae: Path = VqvaeOpt, checkpoint: Path = typer.Option(..., "--checkpoint"),
                input: Path = typer.Option(..., "--input", help="a DICOM/PNG file or a folder of them"),
                output: Path = typer.Option(..., "--output", help="file (single input) or folder"),
                steps: int = StepsOpt, device: str = DeviceOpt):
    """Restore low-dose mammograms: DICOM out (new UIDs, input size and stored range) + a PNG panel each."""
    restore_files(vqvae, checkpoint, input, output, device, steps)


@app.command("evaluate")
def evaluate_cmd(vqvae: Path = VqvaeOpt, checkpoint: Path = typer.Option(..., "--checkpoint"),
                 out: Path = typer.Option(None, "--out"), data: str = typer.Option(None, "--data"),
                 steps: int = StepsOpt, device: str = DeviceOpt):
    """PSNR/SSIM/LPIPS of low-dose input, VQ-VAE-2 ceiling and restored images on the test split."""
    evaluate(vqvae, checkpoint, out or checkpoint.parent / "eval", device, data, steps)


if __name__ == "__main__":
    runtime.cli_main(app)
