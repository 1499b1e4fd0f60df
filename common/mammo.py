"""Mammograms for `mammo_vqvae.py` and `mammo_ldm.py`: finding files, reading 16-bit values exactly, the
geometry that maps a mammogram to the model canvas and back, and the low-dose model.

Pipeline (every step is undone on output by `paste_back`):
  file -> physical values (dicom_io.read_dicom, or a 16-bit PNG read as is)
       -> unit image in [0, 1], dense = bright: (v - lo) / (hi - lo) over the file's representable range
          (DICOM BitsStored range after rescale, PNG dtype range); MONOCHROME1 is mirrored, (hi - v) / (hi -
          lo)
       -> breast mask: threshold + largest connected component, so burned-in labels ("LCC", rulers) are not
       tissue -> crop to the mask's bounding box, pixels outside the mask set to 0 (background) -> flip
       left-right so the chest wall is on the left for every image (consistent laterality) -> resize keeping
       the aspect ratio to fit the canvas (1024 x 768 by default), pad with 0 on the right and
          evenly above/below.
Normalisation policy: a FIXED map from the file's representable value range (not per-image statistics), so the
clean and low-dose images of a pair share it, it needs nothing but the header, and it inverts exactly.
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy import ndimage

from common import UserError, dicom_io, synthetic

IMAGE_SUFFIXES = (".dcm", ".dicom", ".png")
CBIS_CSV_GLOB = "*case_description*set.csv"  # mass_case_description_train_set.csv, calc_..._test_set.csv, ...

# --- config shared by both scripts ---


@dataclass
class MammoDataConfig:
    path: str | None = (
        None  # None: synthetic mammograms; a CBIS-DDSM root (CSVs + TCIA tree) or a folder of files
    )
    image_size: list[int] = field(default_factory=lambda: [1024, 768])  # canvas (rows, cols)
    crop_margin: float = 0.01  # extra border around the breast bounding box, fraction of the image size
    test_fraction: float = 0.1  # plain folders without train/ and test/ subfolders: hashed split
    synthetic_shape: list[int] = field(default_factory=lambda: [1280, 960])  # native size of synthetic images
    synthetic_train: int = 200
    synthetic_test: int = 16
    # Low-dose model (see `degrade`): quanta = Poisson + electronic noise on a linear signal; gaussian = white
    # noise
    dose_model: str = "quanta"  # quanta | gaussian
    dose: float = 0.2  # fraction of the full dose
    quanta_full_dose: float = 4000.0  # detector quanta per CANVAS pixel behind no tissue at full dose
    attenuation_range: float = (
        3.0  # unit value 1 = exp(-3) transmission: log dynamic range of the stored values
    )
    electronic_noise: float = 5.0  # electronic noise std in quanta per pixel (dose independent)
    gaussian_sigma_full: float = 0.01  # gaussian model: std in unit values at dose 1, scaled by 1/sqrt(dose)
    cache_images: int = (
        64  # datasets up to this many images keep their clean canvases in memory (no re-decoding)
    )
    num_workers: int = 4
    seed: int = 0


# --- reading ---


@dataclass
class Mammogram:
    values: np.ndarray  # physical values (stored x slope + intercept), float32, as in the file
    value_range: tuple[float, float]  # representable range of the file (stored bits / PNG dtype)
    monochrome1: bool
    dataset: object | None  # pydicom Dataset (template for the output) or None for PNG / synthetic
    name: str


def read_mammogram(path: str | Path) -> Mammogram:
    """A DICOM (any decodable syntax: uncompressed, RLE, JPEG 2000 via pylibjpeg) or a greyscale PNG."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # keeps 16 bits exactly
        if image is None:
            raise UserError(f"{path}: not a readable PNG")
        if image.ndim != 2:
            raise UserError(f"{path}: colour PNG ({image.shape[-1]} channels); only greyscale is supported")
        if image.dtype not in (np.uint8, np.uint16):
            raise UserError(f"{path}: unsupported PNG sample type {image.dtype}")
        return Mammogram(
            image.astype(np.float32), (0.0, float(np.iinfo(image.dtype).max)), False, None, str(path)
        )
    values, ds = dicom_io.read_dicom(path)
    check_modality(ds, path)
    if min(values.shape) < 64:
        raise UserError(
            f"{path}: image of {values.shape[0]}x{values.shape[1]} pixels is too small for a mammogram"
        )
    return Mammogram(
        values, dicom_io.stored_range(ds), str(ds.PhotometricInterpretation) == "MONOCHROME1", ds, str(path)
    )


def check_modality(ds, path: Path) -> None:
    """Mammograms only: a CT or MR slice would be "restored" into nonsense without a word. CR/DX are allowed
    with
    a warning (film digitisers and some older systems label mammograms so); a missing tag only warns."""
    found = str(ds.get("Modality", "") or "").strip().upper()
    if not found:
        warnings.warn(f"{path}: no Modality tag; processing it as a mammogram", stacklevel=2)
    elif found in ("CR", "DX"):
        warnings.warn(f"{path}: modality {found}, not MG; processing it as a mammogram", stacklevel=2)
    elif found != "MG":
        raise UserError(f"{path}: modality {found}, but the mammography scripts need mammograms (MG)")


def synthetic_source(split: str, index: int, cfg: MammoDataConfig) -> Mammogram:
    """A 14-bit MONOCHROME2 synthetic mammogram; every other one is a right breast (chest wall right)."""
    rng = np.random.default_rng([cfg.seed, 0 if split == "train" else 1, index])
    stored = synthetic.mammogram(tuple(cfg.synthetic_shape), rng, bits_stored=14)
    if index % 2:
        stored = stored[:, ::-1]
    return Mammogram(
        stored.astype(np.float32), (0.0, float(2**14 - 1)), False, None, f"synthetic_{split}_{index:05d}"
    )


def to_unit(m: Mammogram) -> np.ndarray:
    lo, hi = m.value_range
    unit = (m.values - lo) / (hi - lo)
    return np.clip(1.0 - unit if m.monochrome1 else unit, 0.0, 1.0).astype(np.float32)


def from_unit(unit: np.ndarray, m: Mammogram) -> np.ndarray:
    """Back to the file's values: same polarity, same range, integers when the file stores integers."""
    lo, hi = m.value_range
    unit = np.clip(unit.astype(np.float64), 0.0, 1.0)
    values = lo + (1.0 - unit if m.monochrome1 else unit) * (hi - lo)
    return np.clip(np.rint(values) if float(lo).is_integer() and float(hi).is_integer() else values, lo, hi)


# --- finding files: CBIS-DDSM tree + CSVs, or a plain folder ---


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _cbis_rows(csvs: list[Path]) -> list[tuple[str, str, bool]]:
    """(subject folder, patient id, listed in a test CSV) for every row of every description CSV. The CSV's
    'image file path' names the subject folder first (e.g. Mass-Training_P_00001_LEFT_CC)."""
    rows = []
    for csv_path in csvs:
        is_test = "test" in csv_path.name.lower()
        with open(csv_path, newline="") as fh:
            reader = csv.DictReader(fh)
            column = next(
                (c for c in reader.fieldnames or [] if c.strip().lower() == "image file path"), None
            )
            if column is None:
                raise UserError(f"{csv_path}: no 'image file path' column; not a CBIS-DDSM description CSV")
            for row in reader:
                if not row[column]:
                    continue
                subject = row[column].strip().replace("\\", "/").split("/")[0]
                patient = re.search(r"P_\d+", subject)
                rows.append(
                    (subject, patient.group(0) if patient else row.get("patient_id", subject), is_test)
                )
    return rows


def _cbis_ddsm(root: Path, csvs: list[Path], split: str) -> list[Path]:
    """Split BY PATIENT across the Mass and Calc CSVs: the official Mass and Calc splits were drawn
    separately, so one patient can be in Mass-Training and Calc-Test; such a patient goes wholly to test (the
    official test side wins) and nobody is in both splits. UID folders and file names below the subject folder
    differ between TCIA downloads, so the full-image DICOM is searched inside it (ROI and crop images live in
    `<subject>_1`)."""
    rows = _cbis_rows(csvs)
    test_patients = {patient for _, patient, is_test in rows if is_test}
    moved = {patient for _, patient, is_test in rows if not is_test and patient in test_patients}
    if moved and split == "train":
        warnings.warn(
            f"{root}: {len(moved)} patients are in both a training and a test CSV; all their images go "
            "to test",
            stacklevel=2,
        )
    subjects = [subject for subject, patient, _ in rows if (patient in test_patients) == (split == "test")]
    folders = {d.name: d for d in root.rglob("*") if d.is_dir()}
    found, missing = [], 0
    for subject in dict.fromkeys(subjects):  # one image can carry several abnormalities (rows)
        files = sorted(folders[subject].rglob("*.dcm")) if subject in folders else []
        if files:
            found.append(files[0])
        else:
            missing += 1
    if missing:
        warnings.warn(
            f"{root}: {missing} of {len(found) + missing} {split} images listed in the CSVs not found",
            stacklevel=2,
        )
    return found


def list_sources(cfg: MammoDataConfig, split: str) -> list[str]:
    """Source names for a split: file paths, or 'synthetic:<split>:<index>' for the built-in data."""
    if cfg.path is None:
        n = cfg.synthetic_train if split == "train" else cfg.synthetic_test
        return [f"synthetic:{split}:{i}" for i in range(n)]
    root = Path(cfg.path)
    if root.is_file():
        return [str(root)]
    if not root.is_dir():
        raise UserError(f"data.path {root}: no such file or folder")
    csvs = sorted(root.rglob(CBIS_CSV_GLOB))
    if csvs:
        files = _cbis_ddsm(root, csvs, split)
    elif (root / "train").is_dir() and (root / "test").is_dir():
        files = _image_files(root / split)
    else:  # stable hashed split: adding files never moves an existing file to the other split

        def is_test(p: Path) -> bool:
            digest = hashlib.sha1(str(p.relative_to(root)).encode()).digest()
            return int.from_bytes(digest[:4], "big") / 2**32 < cfg.test_fraction

        files = [p for p in _image_files(root) if is_test(p) == (split == "test")]
    if not files:
        raise UserError(
            f"data.path {root}: no {split} images found (DICOM .dcm or 16-bit .png; CBIS-DDSM CSVs)"
        )
    return [str(p) for p in files]


def load_source(source: str, cfg: MammoDataConfig) -> Mammogram:
    if source.startswith("synthetic:"):
        _, split, index = source.split(":")
        return synthetic_source(split, int(index), cfg)
    return read_mammogram(source)


# --- breast mask and geometry ---


def breast_mask(unit: np.ndarray, work_side: int = 512) -> np.ndarray:
    """Breast = the largest bright connected component. Computed on a reduced copy (fast on 4.5k x 2.8k
    images; median filter so low-dose noise does not fragment it); labels and markers are separate, smaller
    components."""
    h, w = unit.shape
    factor = max(1, math.ceil(max(h, w) / work_side))
    small = cv2.resize(unit, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_AREA)
    small = cv2.medianBlur(small.astype(np.float32), 5)
    lo, hi = np.percentile(small, [1, 99])
    if hi - lo < 1e-3:
        raise UserError("image is uniform: no breast found")
    otsu = _otsu(small)
    background = float(np.median(small[small <= otsu])) if (small <= otsu).any() else lo
    fg = small > background + 0.3 * (otsu - background)  # low threshold keeps the thin, faint skin edge
    fg = ndimage.binary_opening(fg, iterations=2)  # breaks thin bridges between a label and the breast
    labels, n = ndimage.label(fg)
    if n == 0:
        raise UserError("no breast found (nothing above the background)")
    sizes = ndimage.sum_labels(fg, labels, index=np.arange(1, n + 1))
    mask = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    mask = ndimage.binary_dilation(mask, iterations=2)  # the opening ate the outer skin line
    return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)


def _otsu(image: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(image, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = ((hist * centres).sum() - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    return float(centres[int(np.argmax(w0 * w1 * (m0 - m1) ** 2))])


@dataclass
class Geometry:
    """How a source image maps onto the canvas; `from_canvas` undoes it exactly (up to resampling)."""

    source_shape: tuple[int, int]
    crop: tuple[int, int, int, int]  # row0, row1, col0, col1 in source pixels
    flipped: bool  # left-right flip after cropping (chest wall moved to the left)
    resized_shape: tuple[int, int]
    offset: tuple[int, int]  # top, left of the resized crop on the canvas
    canvas_shape: tuple[int, int]


def plan_geometry(mask: np.ndarray, canvas_shape, margin: float) -> Geometry:
    rows, cols = np.nonzero(mask)
    h, w = mask.shape
    pad_r, pad_c = int(round(margin * h)), int(round(margin * w))
    r0, r1 = max(0, rows.min() - pad_r), min(h, rows.max() + 1 + pad_r)
    c0, c1 = max(0, cols.min() - pad_c), min(w, cols.max() + 1 + pad_c)
    flipped = bool(cols.mean() > w / 2)  # more tissue on the right: the chest wall is on the right
    ch, cw = int(canvas_shape[0]), int(canvas_shape[1])
    scale = min(ch / (r1 - r0), cw / (c1 - c0))
    rh, rw = min(ch, max(1, round((r1 - r0) * scale))), min(cw, max(1, round((c1 - c0) * scale)))
    return Geometry(
        (h, w), (int(r0), int(r1), int(c0), int(c1)), flipped, (rh, rw), ((ch - rh) // 2, 0), (ch, cw)
    )


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    shrinking = shape[0] * shape[1] < image.shape[0] * image.shape[1]
    out = cv2.resize(
        image.astype(np.float32),
        (shape[1], shape[0]),
        interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC,
    )
    return np.clip(out, 0.0, 1.0)  # cubic overshoot would leave the representable range


def to_canvas(unit: np.ndarray, geom: Geometry, mask: np.ndarray) -> np.ndarray:
    r0, r1, c0, c1 = geom.crop
    crop = np.where(mask[r0:r1, c0:c1], unit[r0:r1, c0:c1], 0.0)
    if geom.flipped:
        crop = crop[:, ::-1]
    canvas = np.zeros(geom.canvas_shape, np.float32)
    (top, left), (rh, rw) = geom.offset, geom.resized_shape
    canvas[top : top + rh, left : left + rw] = _resize(np.ascontiguousarray(crop), (rh, rw))
    return canvas


def from_canvas(canvas: np.ndarray, geom: Geometry) -> np.ndarray:
    """Un-pad, un-resize to the crop's size, un-flip: an image of the crop's shape in source orientation."""
    (top, left), (rh, rw) = geom.offset, geom.resized_shape
    r0, r1, c0, c1 = geom.crop
    crop = _resize(canvas[top : top + rh, left : left + rw], (r1 - r0, c1 - c0))
    return crop[:, ::-1] if geom.flipped else crop


def paste_back(source_unit: np.ndarray, canvas: np.ndarray, geom: Geometry, mask: np.ndarray) -> np.ndarray:
    """Restored values inside the breast mask; the input's own values everywhere else (labels, background)."""
    out = source_unit.copy()
    r0, r1, c0, c1 = geom.crop
    region = out[r0:r1, c0:c1]
    inside = mask[r0:r1, c0:c1]
    region[inside] = from_canvas(canvas, geom)[inside]
    return out


def unit_to_model(unit: np.ndarray | torch.Tensor):
    return unit * 2.0 - 1.0


def model_to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


# --- low-dose model ---


def _check_dose(cfg: MammoDataConfig) -> None:
    if not cfg.dose > 0:
        raise UserError(f"config: data.dose must be > 0, got {cfg.dose}")
    if cfg.dose_model not in ("quanta", "gaussian"):
        raise UserError(f"config: data.dose_model must be quanta or gaussian, got '{cfg.dose_model}'")
    if not (cfg.quanta_full_dose > 0 and cfg.attenuation_range > 0 and cfg.electronic_noise >= 0):
        raise UserError(
            "config: data.quanta_full_dose and data.attenuation_range must be > 0, data.electronic_noise >= 0"
        )


def expected_counts(unit: np.ndarray, cfg: MammoDataConfig) -> np.ndarray:
    """Mean detector quanta per canvas pixel at `cfg.dose`: unit values are log attenuation (For-Presentation
    mammograms store ~log exposure), so denser tissue (higher unit) lets fewer quanta through."""
    return cfg.dose * cfg.quanta_full_dose * np.exp(-cfg.attenuation_range * np.asarray(unit, np.float64))


def detector_counts(unit: np.ndarray, cfg: MammoDataConfig, rng: np.random.Generator) -> np.ndarray:
    """One low-dose acquisition: Poisson quanta + Gaussian electronic noise (dose independent)."""
    expected = expected_counts(unit, cfg)
    return rng.poisson(expected) + rng.normal(0.0, cfg.electronic_noise, expected.shape)


def counts_to_unit(counts: np.ndarray, cfg: MammoDataConfig) -> np.ndarray:
    """Back through the detector's log; counts at or below 0 (pure electronic noise) are clipped to 0.5."""
    counts = np.maximum(counts, 0.5)
    return -np.log(counts / (cfg.dose * cfg.quanta_full_dose)) / cfg.attenuation_range


def degrade(unit: np.ndarray, cfg: MammoDataConfig, rng: np.random.Generator, mask=None) -> np.ndarray:
    """Simulate an acquisition at `cfg.dose` of the full dose from a clean unit image ON THE CANVAS.

    Why on the canvas: simulated at a 4.5k x 2.8k film's native resolution, the noise is averaged away by the
    resize to the canvas (~19 native pixels per pixel at 1024 x 768, ~1,000 at 128 x 96), and the model would
    be scored on a task with almost no noise. So `quanta_full_dose` counts quanta per canvas pixel and the
    noise level the model sees is the same at every canvas and source resolution (docs/mammo.md lists it per
    preset). quanta: unit' = -log(Poisson(dose N) + Normal(0, electronic_noise)) / attenuation_range with N =
    quanta_full_dose exp(-attenuation_range unit); the clean image is the expected signal, so noise is signal
    dependent (dense = fewer quanta = more noise) and grows as 1/sqrt(dose). gaussian (for comparison): unit +
    Normal(0, gaussian_sigma_full / sqrt(dose)). Pixels outside `mask` (background) are left as they are.
    """
    _check_dose(cfg)
    if cfg.dose_model == "gaussian":
        noisy = unit + rng.normal(0.0, cfg.gaussian_sigma_full / math.sqrt(cfg.dose), unit.shape)
    else:
        noisy = counts_to_unit(detector_counts(unit, cfg, rng), cfg)
    noisy = np.clip(noisy, 0.0, 1.0).astype(np.float32)
    return noisy if mask is None else np.where(mask, noisy, unit).astype(np.float32)


def noise_variance(unit: np.ndarray, cfg: MammoDataConfig) -> np.ndarray:
    """Per-pixel variance of `degrade` in unit values (delta method: var(log c) = (N + e^2) / N^2)."""
    if cfg.dose_model == "gaussian":
        return np.full(np.shape(unit), cfg.gaussian_sigma_full**2 / cfg.dose)
    expected = expected_counts(unit, cfg)
    return (expected + cfg.electronic_noise**2) / expected**2 / cfg.attenuation_range**2


def bm3d_anscombe(low_unit: np.ndarray, cfg: MammoDataConfig, mask: np.ndarray) -> np.ndarray:
    """BM3D on the generalised-Anscombe-transformed counts (Makitalo & Foi 2013): counts are recovered from
    the log image with the dose model, 2 sqrt(c + 3/8 + e^2) makes their noise ~unit Gaussian, BM3D (sigma 1)
    denoises, the asymptotically unbiased inverse (A/2)^2 - 1/8 - e^2 and the log map back. Gaussian dose
    model:
    plain BM3D with the known sigma."""
    import bm3d

    if cfg.dose_model == "gaussian":
        out = bm3d.bm3d(low_unit, sigma_psd=cfg.gaussian_sigma_full / math.sqrt(cfg.dose))
    else:
        counts = (
            cfg.dose * cfg.quanta_full_dose * np.exp(-cfg.attenuation_range * low_unit.astype(np.float64))
        )
        stabilised = 2.0 * np.sqrt(counts + 3.0 / 8.0 + cfg.electronic_noise**2)
        denoised = bm3d.bm3d(stabilised, sigma_psd=1.0)
        out = counts_to_unit((denoised / 2.0) ** 2 - 1.0 / 8.0 - cfg.electronic_noise**2, cfg)
    return np.where(mask, np.clip(out, 0.0, 1.0), low_unit).astype(np.float32)


def nlm(low_unit: np.ndarray, cfg: MammoDataConfig, mask: np.ndarray) -> np.ndarray:
    """scikit-image non-local means, h = 0.8 x the mean noise std of the dose model inside the breast."""
    from skimage.restoration import denoise_nl_means

    sigma = float(np.sqrt(noise_variance(low_unit[mask], cfg).mean()))
    out = denoise_nl_means(
        low_unit, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True
    )
    return np.where(mask, np.clip(out, 0.0, 1.0), low_unit).astype(np.float32)


def dose_description(cfg: MammoDataConfig) -> str:
    if cfg.dose_model == "gaussian":
        return (
            f"gaussian noise, sigma {cfg.gaussian_sigma_full:g}/sqrt(dose), dose {cfg.dose:g}, on the canvas"
        )
    return (
        f"quanta model on the {cfg.image_size[0]}x{cfg.image_size[1]} canvas, dose {cfg.dose:g}: Poisson on "
        f"{cfg.quanta_full_dose:g} quanta/pixel x exp(-{cfg.attenuation_range:g} x unit) + electronic noise "
        f"{cfg.electronic_noise:g} quanta"
    )


DOSE_KEYS = (
    "image_size",
    "dose_model",
    "dose",
    "quanta_full_dose",
    "attenuation_range",
    "electronic_noise",
    "gaussian_sigma_full",
    "crop_margin",
)


def dose_mismatch(made: dict, wanted: MammoDataConfig) -> str | None:
    """The first canvas/dose setting in which `made` (a saved data config) differs from `wanted`, as text."""
    for key in DOSE_KEYS:
        if key in made and made[key] != getattr(wanted, key):
            return f"data.{key} {made[key]} (latents) vs {getattr(wanted, key)} (model)"
    return None


# --- dataset ---


@dataclass
class Prepared:
    source: Mammogram
    unit: np.ndarray  # whole image, dense = bright, [0, 1]
    mask: np.ndarray  # breast mask at source resolution
    geometry: Geometry
    canvas: np.ndarray  # (rows, cols) of the canvas, [0, 1]
    canvas_mask: np.ndarray  # breast mask on the canvas


def prepare(m: Mammogram, cfg: MammoDataConfig, unit: np.ndarray | None = None) -> Prepared:
    unit = to_unit(m) if unit is None else unit
    try:
        mask = breast_mask(unit)
    except UserError as exc:
        raise UserError(f"{m.name}: {exc}") from None
    geom = plan_geometry(mask, cfg.image_size, cfg.crop_margin)
    canvas_mask = to_canvas(mask.astype(np.float32), geom, mask) > 0.5
    return Prepared(m, unit, mask, geom, to_canvas(unit, geom, mask), canvas_mask)


def epoch_order(
    n_items: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1
) -> list[int]:
    """This rank's sample indices for one epoch, whole batches only. The order depends on (seed, epoch) alone,
    not on the global RNG, so a run resumed mid-epoch skips exactly the batches it already trained on."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    per_rank = n_items // (world_size * batch_size) * batch_size
    return torch.randperm(n_items, generator=generator)[rank * per_rank : (rank + 1) * per_rank].tolist()


def loader_generator(seed: int, epoch: int) -> torch.Generator:
    """A DataLoader draws its worker seed from this instead of the global RNG (which a resume restores)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def random_crop(shape, crop, mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a crop whose centre lies in the breast (background-only crops teach nothing)."""
    rows, cols = shape[0] - crop[0], shape[1] - crop[1]
    for _ in range(20):
        top, left = int(rng.integers(0, rows + 1)), int(rng.integers(0, cols + 1))
        if mask[top + crop[0] // 2, left + crop[1] // 2]:
            break
    return top, left


class MammoDataset(torch.utils.data.Dataset):
    """Canvas tensors (1, rows, cols) in [-1, 1]: 'clean', 'degraded' (when paired), 'mask' (breast, 0/1).

    Noise is redrawn every epoch (set `.epoch`) unless `fixed_noise`, which evaluation and latent extraction
    use so that their pairs are reproducible. `crop` (rows, cols): a random crop centred in the breast per
    item and epoch (training on crops of the full canvas is how a CPU trains the convolutional models at 1024
    x 768);
    `repeats`: each image appears that many times per epoch (several crops of few large images)."""

    def __init__(
        self, sources: list[str], cfg: MammoDataConfig, paired: bool, fixed_noise=False, crop=None, repeats=1
    ):
        self.sources, self.cfg, self.paired, self.fixed_noise = sources, cfg, paired, fixed_noise
        self.epoch, self.repeats = 0, max(1, int(repeats))
        self.crop = tuple(crop) if crop and min(crop) > 0 else None
        if self.crop and (self.crop[0] > cfg.image_size[0] or self.crop[1] > cfg.image_size[1]):
            raise UserError(
                f"config: crop {list(self.crop)} larger than the canvas data.image_size {cfg.image_size}"
            )
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.sources) * self.repeats

    def canvas(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i in self.cache:
            return self.cache[i]
        prepared = prepare(load_source(self.sources[i], self.cfg), self.cfg)
        result = (prepared.canvas, prepared.canvas_mask)
        if len(self.sources) <= self.cfg.cache_images:
            self.cache[i] = result
        return result

    def __getitem__(self, i: int) -> dict:
        clean, mask = self.canvas(i % len(self.sources))
        rng = np.random.default_rng([self.cfg.seed, i, 0 if self.fixed_noise else self.epoch + 1])
        if self.crop is not None:  # crop first: the noise is independent per pixel, so only the crop needs it
            top, left = random_crop(clean.shape, self.crop, mask, rng)
            clean, mask = (v[top : top + self.crop[0], left : left + self.crop[1]] for v in (clean, mask))
        images = {"clean": clean, "mask": mask.astype(np.float32)}
        if self.paired:
            images["degraded"] = degrade(clean, self.cfg, rng, mask)
        item = {k: torch.from_numpy(np.ascontiguousarray(v))[None] for k, v in images.items()}
        item["clean"] = unit_to_model(item["clean"])
        if "degraded" in item:
            item["degraded"] = unit_to_model(item["degraded"])
        return item


def resume_rng(rng: dict, world_size: int, rank: int, seed: int) -> None:
    """Exact continuation on one process; under DDP each rank reseeds (the checkpoint holds rank 0's RNG)."""
    from common import runtime

    if world_size == 1:
        runtime.set_rng_state(rng)
    else:
        runtime.seed_everything(seed + rank)
