"""Hierarchical VQ-VAE-2 for mammograms (seed 002, stage 1): the frozen first stage of `mammo_ldm.py`.

Any number of levels (5 by default, per-level downsampling [4, 2, 2, 2, 2]: 1x1024x768 -> 256x192, 128x96,
64x48, 32x24, 16x12). Encoders are chained bottom-up; quantisation and decoding run top-down, each level's
codebook sees its encoder output concatenated with the decoder output of the level above, and each decoder
sees its own codes plus the codes of every level above (upsampled). Codebooks are updated by EMA (0.99), the
encoder is pulled towards them by the commitment loss (beta 0.25), gradients pass the quantiser straight
through. Residual blocks are ReZero (a learnt gate initialised at 0). Each epoch logs per-level code usage and
perplexity and restarts dead codes from recent encoder outputs.

Data (see common/mammo.py): synthetic mammograms by default; `--data` a CBIS-DDSM root (TCIA tree + the
*_case_description_*_set.csv files, which give the official split), or a folder of DICOM / 16-bit PNG files.

Usage:
  python mammo_vqvae.py train --preset tiny --out runs/vqvae                 # CPU minutes, synthetic data
  python mammo_vqvae.py train --data /data/CBIS-DDSM --out runs/vqvae        # the seed's model (GPU)
  python mammo_vqvae.py evaluate --checkpoint runs/vqvae/checkpoint.pt
  python mammo_vqvae.py extract-latents --checkpoint runs/vqvae/checkpoint.pt --out runs/latents
  torchrun --nproc_per_node 2 mammo_vqvae.py train --data /data/CBIS-DDSM --out runs/vqvae
Any config value: --set model.levels=3 --set model.scaling_rates=[4,2,2] (see configs/mammo_vqvae.yaml).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
import typer
import yaml
from torch.utils.data import DataLoader

from common import UserError, metrics, runtime, viz
from common.config import config_from_dict, config_to_dict, default_config_path, load_config
from common.mammo import (
    MammoDataConfig,
    MammoDataset,
    dose_description,
    epoch_order,
    list_sources,
    loader_generator,
    model_to_unit,
    resume_rng,
)

SCRIPT = Path(__file__).stem

# --- config ---


@dataclass
class ModelConfig:
    in_channels: int = 1
    hidden_channels: int = 128
    residual_channels: int = 32
    residual_layers: int = 2
    levels: int = 5
    scaling_rates: list[int] = field(default_factory=lambda: [4, 2, 2, 2, 2])  # level 0 (bottom) first
    embed_dim: int = 64
    codebook_size: int = 512
    ema_decay: float = 0.99
    commitment_beta: float = 0.25


@dataclass
class TrainConfig:
    max_epochs: int = 100
    max_steps: int = 0  # 0: epochs decide; > 0: stop after this many optimiser steps (tests, quick looks)
    batch_size: int = 4
    lr: float = 1e-4
    lr_schedule: str = "constant"  # constant (the seed) | cosine: decays to 0 at the last step
    freeze_batch_norm_at: float = 0.0  # > 0: from this fraction of the steps on, BatchNorm uses running stats
    amp: str = "auto"  # bf16 autocast: auto = on for CUDA
    crop_size: list[int] = field(default_factory=lambda: [0, 0])  # > 0: train on random crops of the canvas
    crops_per_image: int = 1  # with crop_size: crops of each image per epoch
    dead_code_threshold: float = 1.0  # codes used fewer times than this in an epoch are restarted
    log_every: int = 50
    seed: int = 0


@dataclass
class EvalConfig:
    max_images: int = 0  # 0: the whole test split
    panel_images: int = 4


@dataclass
class Config:
    data: MammoDataConfig = field(default_factory=MammoDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --- model ---


def _steps(rate: int) -> int:
    steps = int(round(math.log2(rate)))
    if rate < 2 or 2**steps != rate:
        raise UserError(f"config: model.scaling_rates must be powers of two >= 2, got {rate}")
    return steps


class ReZero(nn.Module):
    """x + alpha * f(x), alpha = 0 at start: every block begins as the identity (Bachlechner et al. 2020)."""

    def __init__(self, channels: int, residual_channels: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(channels, residual_channels, 3, padding=1),
            nn.BatchNorm2d(residual_channels),
            nn.ReLU(True),
            nn.Conv2d(residual_channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(True),
        )
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x + self.alpha * self.layers(x)


class Encoder(nn.Module):
    """log2(rate) stride-2 4x4 convs, a 3x3 conv, then a ReZero stack (vvvm23/vqvae-2 layout)."""

    def __init__(self, in_ch: int, hidden: int, residual: int, n_residual: int, rate: int):
        super().__init__()
        layers, ch, nxt = [], in_ch, hidden // 2
        for _ in range(_steps(rate)):
            layers += [nn.Conv2d(ch, nxt, 4, stride=2, padding=1), nn.BatchNorm2d(nxt), nn.ReLU(True)]
            ch, nxt = nxt, hidden
        layers += [nn.Conv2d(ch, hidden, 3, padding=1), nn.BatchNorm2d(hidden)]
        layers += [ReZero(hidden, residual) for _ in range(n_residual)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class Decoder(nn.Module):
    """3x3 conv, ReZero stack, log2(rate) stride-2 transposed convs, a 3x3 conv to the output channels."""

    def __init__(self, in_ch: int, hidden: int, out_ch: int, residual: int, n_residual: int, rate: int):
        super().__init__()
        layers = [nn.Conv2d(in_ch, hidden, 3, padding=1), nn.BatchNorm2d(hidden)]
        layers += [ReZero(hidden, residual) for _ in range(n_residual)]
        ch = hidden
        for _ in range(_steps(rate)):
            layers += [
                nn.ConvTranspose2d(ch, hidden // 2, 4, stride=2, padding=1),
                nn.BatchNorm2d(hidden // 2),
                nn.ReLU(True),
            ]
            ch = hidden // 2
        layers.append(nn.Conv2d(ch, out_ch, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class Quantizer(nn.Module):
    """Nearest-code quantiser with EMA codebook updates (van den Oord et al. 2017, appendix; Razavi et al.
    2019).

    Always fp32 (distances in bf16 pick wrong codes). `usage` counts assignments since the last `reset_usage`
    (one epoch in training); `restart_dead_codes` moves unused codes onto recent encoder outputs."""

    def __init__(self, dim: int, size: int, decay: float, eps: float = 1e-5, reservoir: int = 4096):
        super().__init__()
        self.dim, self.size, self.decay, self.eps, self.reservoir_size = dim, size, decay, eps, reservoir
        embed = torch.randn(dim, size)
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("cluster_size", torch.zeros(size))
        self.register_buffer("usage", torch.zeros(size))
        self.reservoir: torch.Tensor | None = None

    def forward(self, x: torch.Tensor):
        b, d, h, w = x.shape
        with torch.autocast("cuda" if x.is_cuda else "cpu", enabled=False):
            flat = x.float().permute(0, 2, 3, 1).reshape(-1, d)
            dist = (
                flat.pow(2).sum(1, keepdim=True)
                - 2 * flat @ self.embed
                + self.embed.pow(2).sum(0, keepdim=True)
            )
            ids = dist.argmin(1)
            quant = F.embedding(ids, self.embed.t())
            if flat.device.type != "meta":  # shape checks on the meta device carry no values to count
                counts = torch.bincount(ids, minlength=self.size).float()
                self.usage += counts
                if self.training:
                    self._ema_update(flat.detach(), ids, counts)
            diff = (quant.detach() - flat).pow(2).mean()
            quant = flat + (quant - flat).detach()  # straight-through: d quant / d x = identity
        return quant.view(b, h, w, d).permute(0, 3, 1, 2), diff, ids.view(b, h, w)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> None:
        embed_sum = torch.zeros_like(self.embed).index_add_(1, ids, flat.t())
        if torch_dist.is_initialized():
            torch_dist.all_reduce(counts)
            torch_dist.all_reduce(embed_sum)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(embed_sum, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        size = (
            (self.cluster_size + self.eps) / (n + self.size * self.eps) * n
        )  # Laplace smoothing: no 0 division
        self.embed.copy_(self.embed_avg / size.unsqueeze(0))
        keep = torch.randperm(flat.shape[0], device=flat.device)[: self.reservoir_size]
        self.reservoir = flat[keep]

    def stats(self) -> dict:
        total = float(self.usage.sum())
        p = self.usage / max(total, 1.0)
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        return {
            "used": int((self.usage > 0).sum()),
            "usage": float((self.usage > 0).float().mean()),
            "perplexity": float(entropy.exp()),
        }

    def reset_usage(self) -> None:
        self.usage.zero_()

    @torch.no_grad()
    def restart_dead_codes(self, threshold: float) -> int:
        dead = (self.usage < threshold).nonzero().flatten()
        if len(dead) == 0 or self.reservoir is None or len(self.reservoir) == 0:
            return 0
        pick = torch.randint(len(self.reservoir), (len(dead),), device=self.reservoir.device)
        new = self.reservoir[pick].t() + 1e-3 * torch.randn(self.dim, len(dead), device=self.reservoir.device)
        self.embed[:, dead] = new
        self.embed_avg[:, dead] = new
        self.cluster_size[dead] = 1.0
        return len(dead)


class CodeLayer(nn.Module):
    def __init__(self, in_ch: int, cfg: ModelConfig):
        super().__init__()
        self.project = nn.Conv2d(in_ch, cfg.embed_dim, 1)
        self.quantizer = Quantizer(cfg.embed_dim, cfg.codebook_size, cfg.ema_decay)

    def forward(self, x):
        return self.quantizer(self.project(x))


def _upsampler(embed_dim: int, rate: int) -> nn.Sequential:
    layers = []
    for _ in range(_steps(rate)):
        layers += [
            nn.ConvTranspose2d(embed_dim, embed_dim, 4, stride=2, padding=1),
            nn.BatchNorm2d(embed_dim),
            nn.ReLU(True),
        ]
    return nn.Sequential(*layers)


class VQVAE2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n, rates, hid, emb = cfg.levels, list(cfg.scaling_rates), cfg.hidden_channels, cfg.embed_dim
        if n < 1 or len(rates) != n:
            raise UserError(f"config: model.scaling_rates needs one rate per level ({n}), got {rates}")
        res = (cfg.residual_channels, cfg.residual_layers)
        self.levels, self.rates = n, rates
        self.encoders = nn.ModuleList(
            [Encoder(cfg.in_channels if i == 0 else hid, hid, *res, rates[i]) for i in range(n)]
        )
        self.codebooks = nn.ModuleList([CodeLayer(hid + (emb if i < n - 1 else 0), cfg) for i in range(n)])
        # decoder i sees its codes + the codes of the n-1-i levels above; it outputs level i-1's resolution
        self.decoders = nn.ModuleList(
            [
                Decoder(emb * (n - i), hid, cfg.in_channels if i == 0 else emb, *res, rates[i])
                for i in range(n)
            ]
        )
        # upscalers[j][k] carries level j's codes from level j-k to level j-k-1
        self.upscalers = nn.ModuleList(
            [nn.ModuleList([_upsampler(emb, rates[j - k]) for k in range(j)]) for j in range(n)]
        )

    def downsampling(self) -> int:
        return math.prod(self.rates)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Level-0 encoder output before quantisation: the LDM's latent (every level above is computed from
        it)."""
        return self.encoders[0](x)

    def decode_latent(self, h0: torch.Tensor):
        """Encoders 1.. on h0, then quantise and decode top-down. Returns (image, commitment diffs, ids)."""
        encoded = [h0]
        for encoder in self.encoders[1:]:
            encoded.append(encoder(encoded[-1]))
        codes, diffs, ids, decoded = [], [], [], None
        for level in reversed(range(self.levels)):
            inp = encoded[level] if decoded is None else torch.cat([encoded[level], decoded], 1)
            quant, diff, idx = self.codebooks[level](inp)
            codes = [(self.upscalers[j][j - level - 1](c), j) for c, j in codes]
            decoded = self.decoders[level](torch.cat([quant, *[c for c, _ in codes]], 1))
            codes.append((quant, level))
            diffs.append(diff)
            ids.append(idx)
        return decoded, diffs[::-1], ids[::-1]  # level 0 first

    def forward(self, x: torch.Tensor):
        return self.decode_latent(self.encode_latent(x))

    def quantizers(self) -> list[Quantizer]:
        return [c.quantizer for c in self.codebooks]


def check_input_shape(cfg: Config, model: VQVAE2) -> None:
    factor = model.downsampling()
    for name, (rows, cols) in (
        ("data.image_size", cfg.data.image_size),
        ("train.crop_size", cfg.train.crop_size),
    ):
        if rows % factor or cols % factor:
            raise UserError(
                f"config: {name} {rows}x{cols} must be divisible by the product of model.scaling_rates "
                f"({factor})"
            )


def fingerprint(model: nn.Module) -> str:
    """Identifies the frozen first stage so an LDM is never paired with a different VQ-VAE by mistake."""
    digest = hashlib.sha1()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_vqvae(checkpoint: Path, device: torch.device) -> tuple[VQVAE2, Config]:
    state = runtime.load_checkpoint(checkpoint, SCRIPT)
    cfg = config_from_dict(Config, state["config"])
    model = VQVAE2(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:  # its config asks for another architecture than its weights have
        detail = " ".join(str(exc).split())[:200]
        raise UserError(
            f"{checkpoint}: weights do not match its model config (size mismatch: {detail})"
        ) from None
    return model.to(device).eval().requires_grad_(False), cfg


# --- train ---


def codebook_report(model: VQVAE2) -> dict:
    return {f"level{i}_{k}": v for i, q in enumerate(model.quantizers()) for k, v in q.stats().items()}


def save_state(path: Path, cfg: Config, model: VQVAE2, optimizer, step: int, epoch: int) -> None:
    runtime.save_checkpoint(
        path,
        {
            "script": SCRIPT,
            "config": config_to_dict(cfg),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "epoch": epoch,
            "rng": runtime.rng_state(),
        },
    )


def train(
    cfg: Config,
    out_dir: Path,
    device_name: str = "auto",
    resume: Path | None = None,
    argv: list[str] | None = None,
) -> Path:
    """Train on clean mammograms; a checkpoint after every epoch and at the last step. `resume` continues
    exactly where the checkpoint stopped, mid-epoch included: batch order depends only on (seed, epoch), RNGs
    are restored."""
    dist = runtime.init_distributed(device_name)
    device = dist.device
    runtime.seed_everything(cfg.train.seed + dist.rank)
    model = VQVAE2(cfg.model).to(device)
    check_input_shape(cfg, model)
    learning_rate(cfg.train, 0, 1)  # checks train.lr_schedule before any output is written
    sources = list_sources(cfg.data, "train")
    dataset = MammoDataset(
        sources, cfg.data, False, crop=cfg.train.crop_size, repeats=cfg.train.crops_per_image
    )
    per_rank_batch = max(1, cfg.train.batch_size // dist.world_size)
    steps_per_epoch = len(dataset) // (dist.world_size * per_rank_batch)  # whole batches on every rank
    if steps_per_epoch == 0:
        raise UserError(
            f"only {len(dataset)} training images for batch size {per_rank_batch}; lower train.batch_size"
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    step = 0
    if resume is not None:
        state = runtime.load_checkpoint(resume, SCRIPT)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"{resume}: checkpoint does not match this config ({str(exc)[:120]})") from None
        step = int(state["step"])
        resume_rng(state["rng"], dist.world_size, dist.rank, cfg.train.seed + step)
    if dist.is_main:
        runtime.prepare_run_dir(out_dir, cfg, __file__, argv)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"data: {len(dataset)} training images ({cfg.data.path or 'synthetic'}); model "
            f"{n_params / 1e6:.2f} M "
            f"parameters, {cfg.model.levels} levels; device {device}, world size {dist.world_size}"
            + (f"; resumed from {resume} at step {step}" if resume else "")
        )
    net = runtime.ddp_wrap(model, dist)
    use_amp = runtime.switch_on(cfg.train.amp, device)
    max_steps = cfg.train.max_steps or cfg.train.max_epochs * steps_per_epoch
    ckpt_path = out_dir / "checkpoint.pt"
    with runtime.ProgressLogger(
        out_dir if dist.is_main else None,
        max_steps,
        "vqvae",
        enabled=dist.is_main,
        log_every=cfg.train.log_every,
        start_step=step,
    ) as progress:
        for epoch in range(step // steps_per_epoch, cfg.train.max_epochs):
            if step >= max_steps:
                break
            dataset.epoch = epoch
            order = epoch_order(
                len(dataset), per_rank_batch, epoch, cfg.train.seed, dist.rank, dist.world_size
            )
            done = (
                step - epoch * steps_per_epoch
            ) * per_rank_batch  # > 0 only in the epoch a resume starts in
            loader = DataLoader(
                dataset,
                per_rank_batch,
                sampler=order[done:],
                drop_last=True,
                num_workers=cfg.data.num_workers,
                generator=loader_generator(cfg.train.seed, epoch),
            )
            model.train()
            for batch in loader:
                if 0 < cfg.train.freeze_batch_norm_at * max_steps <= step:
                    freeze_batch_norm(model)
                x = batch["clean"].to(device)
                with runtime.amp_autocast(device, use_amp):
                    recon, diffs, _ = net(x)
                reconstruction = F.mse_loss(recon.float(), x)
                commitment = torch.stack(diffs).sum()
                loss = reconstruction + cfg.model.commitment_beta * commitment
                runtime.stop_if_not_finite(loss, step, ckpt_path)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(cfg.train, step, max_steps)
                optimizer.step()
                step += 1
                progress.log(
                    step,
                    loss=loss.item(),
                    mse=reconstruction.item(),
                    commitment=commitment.item(),
                    epoch=epoch,
                )
                if step >= max_steps:
                    break
            if step == (epoch + 1) * steps_per_epoch:  # a whole epoch: codebook health and dead-code restart
                end_of_epoch(model, cfg, out_dir, epoch, dist.is_main)
            if dist.is_main:
                save_state(ckpt_path, cfg, model, optimizer, step, epoch)
    if dist.is_main:
        save_preview(model.eval(), cfg, out_dir, device)
    return ckpt_path


def learning_rate(train_cfg: TrainConfig, step: int, max_steps: int) -> float:
    """A function of the step alone, so a resumed run follows the same schedule."""
    if train_cfg.lr_schedule == "constant":
        return train_cfg.lr
    if train_cfg.lr_schedule == "cosine":
        return train_cfg.lr * 0.5 * (1 + math.cos(math.pi * min(step / max_steps, 1.0)))
    raise UserError(f"config: train.lr_schedule must be constant or cosine, got '{train_cfg.lr_schedule}'")


def freeze_batch_norm(model: nn.Module) -> None:
    """BatchNorm on its running statistics, as evaluation uses it; the weights keep training. Why: trained on
    small batches of crops, the network learns under per-batch normalisation and its running statistics follow
    the last few batches, so the whole-canvas reconstruction with running statistics drifts (on a real film it
    swung by several dB from one epoch's checkpoint to another). The last part of training then adapts
    the weights to the statistics they are evaluated with."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()


def end_of_epoch(model: VQVAE2, cfg: Config, out_dir: Path, epoch: int, is_main: bool) -> None:
    """Codebook health: usage and perplexity per level over the epoch, then dead-code restart."""
    report = {"epoch": epoch, **codebook_report(model)}
    for i, q in enumerate(model.quantizers()):
        report[f"level{i}_restarted"] = q.restart_dead_codes(cfg.train.dead_code_threshold)
        q.reset_usage()
    if is_main:
        with open(out_dir / "codebook.jsonl", "a") as fh:
            fh.write(json.dumps(report) + "\n")
        levels = ", ".join(
            f"L{i} {report[f'level{i}_used']}/{cfg.model.codebook_size} used, "
            f"ppl {report[f'level{i}_perplexity']:.1f}, {report[f'level{i}_restarted']} restarted"
            for i in range(cfg.model.levels)
        )
        print(f"epoch {epoch} codebooks: {levels}", flush=True)


@torch.no_grad()
def save_preview(model: VQVAE2, cfg: Config, out_dir: Path, device) -> None:
    item = MammoDataset(list_sources(cfg.data, "test")[:1], cfg.data, paired=False)[0]
    recon, _, _ = model(item["clean"][None].to(device))
    clean, out = model_to_unit(item["clean"][0]).numpy(), model_to_unit(recon[0, 0].float()).cpu().numpy()
    viz.save_panel(
        out_dir / "preview.png",
        [clean, out, out - clean],
        ["original", "VQ-VAE-2", "difference"],
        window=(0.0, 1.0),
        error_index=2,
    )


# --- evaluate ---


def downsample_baseline(unit: np.ndarray, factor: int) -> np.ndarray:
    """Bicubic down by the bottom latent's factor and back up: what that spatial compression gives alone."""
    t = torch.from_numpy(unit)[None, None]
    small = F.interpolate(t, scale_factor=1 / factor, mode="area")
    return (
        F.interpolate(small, size=unit.shape, mode="bicubic", align_corners=False).clamp(0, 1)[0, 0].numpy()
    )


def score(out: np.ndarray, clean: np.ndarray, mask: np.ndarray) -> dict:
    return {
        "psnr_db": metrics.psnr(out, clean, 1.0, mask),
        "ssim": metrics.ssim(out, clean, 1.0, mask),
        "noise_std": float((out - clean)[mask].std()),
    }


def mean_rows(scores: dict[str, list[dict]]) -> list[dict]:
    return [
        {"method": name, **{k: float(np.mean([r[k] for r in vals])) for k in vals[0]}, "images": len(vals)}
        for name, vals in scores.items()
    ]


@torch.no_grad()
def evaluate(
    checkpoint: Path, out_dir: Path, device_name: str = "auto", data_path: str | None = None, overrides=None
) -> dict:
    """Reconstruction of the clean test images beside the low-dose input (the dose model on the same canvas:
    the input a restoration through this VQ-VAE has to beat) and a bicubic down/up at the bottom level's
    factor."""
    device = runtime.pick_device(device_name)
    model, cfg = load_vqvae(checkpoint, device)
    cfg = config_with_sets(Config, config_to_dict(cfg), overrides)
    cfg.data.path = data_path or cfg.data.path
    check_input_shape(cfg, model)
    sources = list_sources(cfg.data, "test")
    sources = sources[: cfg.eval.max_images] if cfg.eval.max_images > 0 else sources
    dataset = MammoDataset(sources, cfg.data, paired=True, fixed_noise=True)
    for q in model.quantizers():
        q.reset_usage()
    names = ["low-dose input", "VQ-VAE-2 reconstruction", f"bicubic x{cfg.model.scaling_rates[0]} down/up"]
    scores: dict[str, list] = {name: [] for name in names}
    for i in range(len(dataset)):  # no mkdir up front: the panels and the table create it (bad input: none)
        item = dataset[i]
        recon, _, _ = model(item["clean"][None].to(device))
        clean, low = (model_to_unit(item[k][0]).numpy() for k in ("clean", "degraded"))
        recon = model_to_unit(recon[0, 0].float()).cpu().numpy()
        outputs = [low, recon, downsample_baseline(clean, cfg.model.scaling_rates[0])]
        mask = item["mask"][0].numpy() > 0
        for name, out in zip(names, outputs):
            scores[name].append(score(out, clean, mask))
        if i < cfg.eval.panel_images:
            viz.save_panel(
                out_dir / f"reconstruction_{i:02d}.png",
                [clean, recon, recon - clean],
                ["original", "VQ-VAE-2 reconstruction", "difference"],
                window=(0.0, 1.0),
                error_index=2,
            )
    usage = codebook_report(model)
    rows = mean_rows(scores) + [
        {
            "method": f"codebook level {i}",
            "used": usage[f"level{i}_used"],
            "perplexity": usage[f"level{i}_perplexity"],
        }
        for i in range(cfg.model.levels)
    ]
    notes = [
        f"test split of {cfg.data.path or 'synthetic mammograms'}: {len(dataset)} images on the "
        f"{cfg.data.image_size[0]}x{cfg.data.image_size[1]} canvas; low-dose input: "
        f"{dose_description(cfg.data)}",
        "values: file range -> [0,1] (dense = bright), data_range 1; PSNR/SSIM/noise_std (std of output - "
        f"clean) inside the breast mask, SSIM gaussian sigma {metrics.SSIM_SIGMA}; codebook use over the "
        "test images",
        f"command: python {SCRIPT}.py evaluate --checkpoint {checkpoint}",
    ]
    runtime.print_metrics_table(rows, "VQ-VAE-2 reconstruction (test split)", out_dir / "metrics.json", notes)
    return {"rows": rows, "notes": notes}


def config_with_sets(cfg_cls, saved: dict, overrides: list[str] | None):
    """A saved config with `--set section.key=value` applied, validated like any config."""
    updated = copy.deepcopy(saved)
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"config: --set expects section.key=value, got '{item}'")
        dotted, text = item.split("=", 1)
        *sections, key = dotted.strip().split(".")
        node = updated
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = yaml.safe_load(text) if text.strip() else ""
    return config_from_dict(cfg_cls, updated)


# --- latents for the LDM ---


@torch.no_grad()
def write_latents(model: VQVAE2, cfg: Config, out_dir: Path, device) -> tuple[list[dict], dict, tuple]:
    items, total, total_sq, count, shape = [], 0.0, 0.0, 0, ()
    for split in ("train", "test"):
        dataset = MammoDataset(list_sources(cfg.data, split), cfg.data, paired=True, fixed_noise=True)
        with runtime.ProgressLogger(None, len(dataset), f"latents {split}") as progress:
            for i in range(len(dataset)):
                item = dataset[i]
                clean = model.encode_latent(item["clean"][None].to(device)).float()[0].cpu()
                degraded = model.encode_latent(item["degraded"][None].to(device)).float()[0].cpu()
                name = f"{split}/{i:05d}.pt"
                with runtime.atomic_path(out_dir / name) as tmp:
                    torch.save({"clean": clean.half(), "degraded": degraded.half()}, tmp)
                items.append({"file": name, "split": split, "source": dataset.sources[i]})
                if split == "train":
                    total += clean.sum().item()
                    total_sq += clean.pow(2).sum().item()
                    count += clean.numel()
                shape = tuple(clean.shape)
                progress.log(i + 1)
    mean = total / max(count, 1)
    return (
        items,
        {"train_mean": mean, "train_std": math.sqrt(max(total_sq / max(count, 1) - mean**2, 1e-12))},
        shape,
    )


def extract_latents(
    checkpoint: Path, out_dir: Path, device_name: str = "auto", data_path: str | None = None, overrides=None
) -> Path:
    """Paired clean / low-dose level-0 latents (fp16, one file per image) and `index.json` describing them:
    the VQ-VAE's fingerprint and the data config (canvas, dose) they were made with, which the LDM checks."""
    device = runtime.pick_device(device_name)
    model, cfg = load_vqvae(checkpoint, device)
    cfg = config_with_sets(Config, config_to_dict(cfg), overrides)
    cfg.data.path = data_path or cfg.data.path
    check_input_shape(cfg, model)
    list_sources(cfg.data, "train"), list_sources(cfg.data, "test")  # bad data fails before any folder exists
    created = not out_dir.exists()
    try:
        items, stats, shape = write_latents(model, cfg, out_dir, device)
        index = {
            "script": SCRIPT,
            "vqvae_checkpoint": str(checkpoint),
            "vqvae_fingerprint": fingerprint(model),
            "latent": "level-0 encoder output before quantisation",
            "shape": list(shape),
            **stats,
            "degradation": dose_description(cfg.data),
            "data": config_to_dict(cfg.data),
            "items": items,
        }
        with runtime.atomic_path(out_dir / "index.json") as tmp:
            tmp.write_text(json.dumps(index, indent=1))
    except BaseException:
        if created:  # a failed run leaves no folder behind, not even a half-filled one
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    print(f"{len(items)} latent pairs {shape} written to {out_dir}")
    return out_dir / "index.json"


# --- commands ---

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
ConfigOpt = typer.Option(None, "--config", help="YAML config or partial override file; repeatable")
PresetOpt = typer.Option(
    "full", "--preset", help="preset: full (seed), small (CPU, 1024x768) or tiny (tests)"
)
SetOpt = typer.Option(None, "--set", help="override a value: section.key=value (repeatable)")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda")
DataOpt = typer.Option(None, "--data", help="CBIS-DDSM root or folder of DICOM/PNG (default: synthetic)")
CheckpointOpt = typer.Option(..., "--checkpoint", help="checkpoint.pt of mammo_vqvae.py train")


@app.command("train")
def train_cmd(
    out: Path = typer.Option(Path("runs/vqvae"), "--out"),
    data: str = DataOpt,
    resume: Path = typer.Option(None, "--resume"),
    max_steps: int = typer.Option(None, "--max-steps", help="stop after this many steps (train.max_steps)"),
    config: list[Path] | None = ConfigOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
):
    """Train the VQ-VAE-2 on clean mammograms."""
    cfg = load_config(Config, config, preset, set_, shipped=default_config_path(__file__))
    cfg.data.path = data or cfg.data.path
    cfg.train.max_steps = cfg.train.max_steps if max_steps is None else max_steps
    train(cfg, out, device, resume, sys.argv)


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Path = CheckpointOpt,
    out: Path = typer.Option(None, "--out"),
    data: str = DataOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
):
    """Reconstruction PSNR/SSIM beside the low-dose input on the test split, code usage per level, PNGs."""
    evaluate(checkpoint, out or checkpoint.parent / "eval", device, data, set_)


app.command("eval", hidden=True)(evaluate_cmd)


@app.command("extract-latents")
def extract_latents_cmd(
    checkpoint: Path = CheckpointOpt,
    out: Path = typer.Option(..., "--out"),
    data: str = DataOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
):
    """Paired clean / low-dose latents of both splits for `mammo_ldm.py train --latents`."""
    extract_latents(checkpoint, out, device, data, set_)


if __name__ == "__main__":
    runtime.cli_main(app)
