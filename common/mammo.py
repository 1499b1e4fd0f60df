"""Mammograms for `mammo_vqvae.py` and `mammo_ldm.py`: finding files, reading 16-bit values exactly, the
geometry that maps a mammogram to the model canvas and back, and the low-dose model.

Pipeline (every step is undone on output by `paste_back`):
  file -> physical values (dicom_io.read_dicom, or a 16-bit PNG read as is)
       -> unit image in [0, 1], dense = bright: (v - lo) / (hi - lo) over the file's representable range
          (DICOM BitsStored range after rescale, PNG dtype range); MONOCHROME1 is mirrored, (hi - v) / (hi - lo)
       -> breast mask: threshold + largest connected component, so burned-in labels ("LCC", rulers) are not tissue
       -> crop to the mask's bounding box, pixels outside the mask set to 0 (background)
       -> flip left-right so the chest wall is on the left for every image (consistent laterality)
       -> resize keeping the aspect ratio to fit the canvas (1024 x 768 by default), pad with 0 on the right and
          evenly above/below.
Normalisation policy: a FIXED map from the file's representable value range (not per-image statistics), so the
clean and low-dose images of a pair share it, it needs nothing but the header, and it inverts exactly.
"""

from __future__ import annotations

import csv
import hashlib
import math
import warnings
from dataclasses import asdict, dataclass, field
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
    path: str | None = None  # None: synthetic mammograms; a CBIS-DDSM root (CSVs + TCIA tree) or a folder of files
    image_size: list[int] = field(default_factory=lambda: [1024, 768])  # canvas (rows, cols)
    crop_margin: float = 0.01  # extra border around the breast bounding box, fraction of the image size
    test_fraction: float = 0.1  # plain folders without train/ and test/ subfolders: hashed split
    synthetic_shape: list[int] = field(default_factory=lambda: [1280, 960])  # native size of synthetic images
    synthetic_train: int = 200
    synthetic_test: int = 16
    # Low-dose model (see `degrade`): quanta = Poisson + electronic noise on a linear signal; gaussian = white noise
    dose_model: str = "quanta"  # quanta | gaussian
    dose: float = 0.2  # fraction of the full dose
    quanta_full_dose: float = 4000.0  # detector quanta per native pixel behind no tissue at full dose
    attenuation_range: float = 3.0  # unit value 1 = exp(-3) transmission: log dynamic range of the stored values
    electronic_noise: float = 5.0  # electronic noise std in quanta per pixel (dose independent)
    gaussian_sigma_full: float = 0.01  # gaussian model: std in unit values at dose 1, scaled by 1/sqrt(dose)
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
        return Mammogram(image.astype(np.float32), (0.0, float(np.iinfo(image.dtype).max)), False, None, str(path))
    values, ds = dicom_io.read_dicom(path)
    if min(values.shape) < 64:
        raise UserError(f"{path}: image of {values.shape[0]}x{values.shape[1]} pixels is too small for a mammogram")
    return Mammogram(values, dicom_io.stored_range(ds), str(ds.PhotometricInterpretation) == "MONOCHROME1", ds,
                     str(path))


def synthetic_source(split: str, index: int, cfg: MammoDataConfig) -> Mammogram:
    """A 14-bit MONOCHROME2 synthetic mammogram; every other one is a right breast (chest wall on the right)."""
    rng = np.random.default_rng([cfg.seed, 0 if split == "train" else 1, index])
    stored = synthetic.mammogram(tuple(cfg.synthetic_shape), rng, bits_stored=14)
    if index % 2:
        stored = stored[:, ::-1]
    return Mammogram(stored.astype(np.float32), (0.0, float(2**14 - 1)), False, None, f"synthetic_{split}_{index:05d}")


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


def _cbis_ddsm(root: Path, csvs: list[Path], split: str) -> list[Path]:
    """The CSV's 'image file path' names the subject folder first (e.g. Mass-Training_P_00001_LEFT_CC); the
    UID folders and file names below it differ between TCIA downloads, so the full-image DICOM is searched
    inside that folder (ROI and crop images live in separate `<subject>_1` folders)."""
    subjects = []
    for csv_path in csvs:
        if split not in csv_path.name.lower():
            continue
        with open(csv_path, newline="") as fh:
            reader = csv.DictReader(fh)
            column = next((c for c in reader.fieldnames or [] if c.strip().lower() == "image file path"), None)
            if column is None:
                raise UserError(f"{csv_path}: no 'image file path' column; not a CBIS-DDSM description CSV")
            subjects += [row[column].strip().replace("\\", "/").split("/")[0] for row in reader if row[column]]
    folders = {d.name: d for d in root.rglob("*") if d.is_dir()}
    found, missing = [], 0
    for subject in dict.fromkeys(subjects):  # one image can carry several abnormalities (rows)
        files = sorted(folders[subject].rglob("*.dcm")) if subject in folders else []
        if files:
            found.append(files[0])
        else:
            missing += 1
    if missing:
        warnings.warn(f"{root}: {missing} of {len(found) + missing} {split} images listed in the CSVs not found",
                      stacklevel=2)
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
        raise UserError(f"data.path {root}: no {split} images found (DICOM .dcm or 16-bit .png; CBIS-DDSM CSVs)")
    return [str(p) for p in files]


def load_source(source: str, cfg: MammoDataConfig) -> Mammogram:
    if source.startswith("synthetic:"):
        _, split, index = source.split(":")
        return synthetic_source(split, int(index), cfg)
    return read_mammogram(source)


# --- breast mask and geometry ---


def breast_mask(unit: np.ndarray, work_side: int = 512) -> np.ndarray:
    """Breast = the largest bright connected component. Computed on a reduced copy (fast on 4.5k x 2.8k images;
    median filter so low-dose noise does not fragment it); labels and markers are separate, smaller components."""
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

    def to_dict(self) -> dict:
        return asdict(self)


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
    return Geometry((h, w), (int(r0), int(r1), int(c0), int(c1)), flipped, (rh, rw), ((ch - rh) // 2, 0), (ch, cw))


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    shrinking = shape[0] * shape[1] < image.shape[0] * image.shape[1]
    out = cv2.resize(image.astype(np.float32), (shape[1], shape[0]),
                     interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
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


def degrade(unit: np.ndarray, cfg: MammoDataConfig, rng: np.random.Generator) -> np.ndarray:
    """Simulate an acquisition at `cfg.dose` of the full dose from a (clean) unit image.

    quanta: unit values are treated as log attenuation (For-Presentation mammograms store ~log exposure), so the
    expected detector signal is N = quanta_full_dose * exp(-attenuation_range * unit) quanta per pixel. The
    low-dose acquisition draws Poisson(dose * N) + Normal(0, electronic_noise) and maps it back through the same
    log: unit' = -log(counts / (dose * quanta_full_dose)) / attenuation_range. The clean image is taken as the
    expected signal, so noise is signal dependent (denser tissue = fewer quanta = more noise) and grows as
    1/sqrt(dose). gaussian (for comparison): unit + Normal(0, gaussian_sigma_full / sqrt(dose)).
    """
    if not cfg.dose > 0:
        raise UserError(f"config: data.dose must be > 0, got {cfg.dose}")
    if cfg.dose_model == "gaussian":
        noisy = unit + rng.normal(0.0, cfg.gaussian_sigma_full / math.sqrt(cfg.dose), unit.shape)
    elif cfg.dose_model == "quanta":
        if not (cfg.quanta_full_dose > 0 and cfg.attenuation_range > 0 and cfg.electronic_noise >= 0):
            raise UserError("config: data.quanta_full_dose and data.attenuation_range must be > 0, "
                            "data.electronic_noise >= 0")
        expected = cfg.dose * cfg.quanta_full_dose * np.exp(-cfg.attenuation_range * unit.astype(np.float64))
        counts = rng.poisson(expected) + rng.normal(0.0, cfg.electronic_noise, unit.shape)
        counts = np.maximum(counts, 0.5)  # log of zero or negative counts (pure electronic noise) is undefined
        noisy = -np.log(counts / (cfg.dose * cfg.quanta_full_dose)) / cfg.attenuation_range
    else:
        raise UserError(f"config: data.dose_model must be quanta or gaussian, got '{cfg.dose_model}'")
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


def dose_description(cfg: MammoDataConfig) -> str:
    if cfg.dose_model == "gaussian":
        return f"gaussian noise, sigma {cfg.gaussian_sigma_full:g}/sqrt(dose), dose {cfg.dose:g}"
    return (f"quanta model, dose {cfg.dose:g}: Poisson on {cfg.quanta_full_dose:g} quanta/pixel x "
            f"exp(-{cfg.attenuation_range:g} x unit) + electronic noise {cfg.electronic_noise:g} quanta")


# --- dataset ---


@dataclass
class Prepared:
    source: Mammogram
    unit: np.ndarray  # whole image, dense = bright, [0, 1]
    mask: np.ndarray  # breast mask at source resolution
    geometry: Geometry
    canvas: np.ndarray  # (rows, cols) of the canvas, [0, 1]


def prepare(m: Mammogram, cfg: MammoDataConfig, unit: np.ndarray | None = None) -> Prepared:
    unit = to_unit(m) if unit is None else unit
    try:
        mask = breast_mask(unit)
    except UserError as exc:
        raise UserError(f"{m.name}: {exc}") from None
    geom = plan_geometry(mask, cfg.image_size, cfg.crop_margin)
    return Prepared(m, unit, mask, geom, to_canvas(unit, geom, mask))


def clean_and_degraded(source: str, cfg: MammoDataConfig, noise_seed: list[int]) -> tuple[Prepared, np.ndarray]:
    """The clean image on its canvas, and a low-dose version simulated at NATIVE resolution (where detector noise
    lives) then mapped with the clean image's geometry and mask, so the pair is pixel-aligned."""
    clean = prepare(load_source(source, cfg), cfg)
    low_unit = degrade(clean.unit, cfg, np.random.default_rng(noise_seed))
    return clean, to_canvas(low_unit, clean.geometry, clean.mask)


def epoch_order(n_items: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """This rank's sample indices for one epoch, whole batches only. The order depends on (seed, epoch) alone, not
    on the global RNG, so a run resumed mid-epoch skips exactly the batches it already trained on."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    per_rank = n_items // (world_size * batch_size) * batch_size
    return torch.randperm(n_items, generator=generator)[rank * per_rank : (rank + 1) * per_rank].tolist()


class MammoDataset(torch.utils.data.Dataset):
    """Canvas tensors (1, rows, cols) in [-1, 1]: 'clean', 'degraded' (when paired), 'mask' (breast, 0/1).

    Noise is redrawn every epoch (set `.epoch`) unless `fixed_noise`, which evaluation and latent extraction use
    so that their pairs are reproducible."""

    def __init__(self, sources: list[str], cfg: MammoDataConfig, paired: bool, fixed_noise: bool = False):
        self.sources, self.cfg, self.paired, self.fixed_noise, self.epoch = sources, cfg, paired, fixed_noise, 0

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict:
        seed = [self.cfg.seed, i, 0 if self.fixed_noise else self.epoch + 1]
        if self.paired:
            clean, low = clean_and_degraded(self.sources[i], self.cfg, seed)
        else:
            clean, low = prepare(load_source(self.sources[i], self.cfg), self.cfg), None
        item = {"clean": torch.from_numpy(unit_to_model(clean.canvas))[None],
                "mask": torch.from_numpy((clean.canvas > 0).astype(np.float32))[None]}
        if low is not None:
            item["degraded"] = torch.from_numpy(unit_to_model(low))[None]
        return item
