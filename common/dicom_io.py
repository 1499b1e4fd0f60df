"""DICOM in and out: physical values (HU for CT) from single-frame greyscale files, series folders as volumes,
derived DICOMs that keep the study and get new UIDs (test-only writers: tests/fixtures.py).

MONOCHROME1 policy: values are never inverted; we work in physical values (stored x slope + intercept) and
copy PhotometricInterpretation to outputs, so a derived image displays like its source.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import tempfile
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from common import UserError
from common.files import atomic_path, refuse_overwrite_input
from common.volume import Volume

DECODER_PACKAGES = "pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg"
MAMMO_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
MIN_SIZE = 8  # no restoration method here means anything on a smaller image (and 3x3 convs need room)
# DX, MG and intra-oral IODs fix RescaleSlope 1 / Intercept 0: derived values are clipped, never rescaled.
FIXED_RESCALE_PREFIX = "1.2.840.10008.5.1.4.1.1.1."
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# The single-frame storage class of each modality, for sources whose SOPClassUID an anonymiser emptied.
SOP_CLASS_BY_MODALITY = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "MG": MAMMO_FOR_PRESENTATION,
    "DX": DX_FOR_PRESENTATION,
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "IO": "1.2.840.10008.5.1.4.1.1.1.3",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
    "NM": "1.2.840.10008.5.1.4.1.1.20",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "XA": "1.2.840.10008.5.1.4.1.1.12.1",
    "RF": "1.2.840.10008.5.1.4.1.1.12.2",
}
# Study-level values every slice of a series shares: with the source folder they name the (unknown) study
# when an anonymiser emptied its UIDs, so all slices of one derived series get the same generated UIDs.
SHARED_BY_SERIES = (
    "PatientID PatientName PatientBirthDate StudyDate StudyTime AccessionNumber StudyID StudyDescription "
    "SeriesInstanceUID SeriesNumber SeriesDate SeriesTime SeriesDescription FrameOfReferenceUID Modality"
).split()
_reported_sources: set[str] = set()  # one warning per source series, not one per slice
# Wrong once the pixels change: histogram extremes, thumbnail, old pixel encodings (overlays are dropped too).
STALE_KEYWORDS = (
    "SmallestImagePixelValue LargestImagePixelValue SmallestPixelValueInSeries LargestPixelValueInSeries "
    "IconImageSequence ModalityLUTSequence ExtendedOffsetTable ExtendedOffsetTableLengths FloatPixelData "
    "DoubleFloatPixelData PixelData"
).split()

# --- reading ---


def read_dicom(path: str | Path, modality: str | None = None) -> tuple[np.ndarray, Dataset]:
    """Physical values (Rows, Cols) float32 and the dataset; any bad input raises UserError naming the file.
    `modality="CT"`: refuse other modalities (an MR or MG has no Hounsfield units)."""
    path = Path(path)
    ds = _read_header(path, stop_before_pixels=False)
    if ds is None:
        raise UserError(f"{path}: not a DICOM file (no 'DICM' header)")
    check_modality(ds, path, modality)
    try:
        return _physical_values(path, ds), ds
    except UserError:
        raise
    except Exception as e:  # truncated pixels, bad group 0028 values, corrupt codestream or transfer syntax
        raise UserError(f"{path}: cannot decode pixel data ({_one_line(e)})") from None


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


def _read_header(path: Path, stop_before_pixels: bool) -> Dataset | None:
    """The parsed dataset, every element converted now (pydicom parses values lazily, so a damaged element
    would otherwise raise later, anywhere); None when the file is not DICOM at all."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        return None
    except Exception as e:  # pydicom raises many types on damaged files; the user needs one line
        raise UserError(f"{path}: unreadable DICOM ({_one_line(e)})") from None
    try:
        with (
            warnings.catch_warnings()
        ):  # pydicom warns per odd value (a UID with a space...): noise, not errors
            warnings.simplefilter("ignore", UserWarning)
            for _ in ds.iterall():
                pass
            for _ in ds.file_meta.iterall():
                pass
    except Exception as e:
        raise UserError(f"{path}: damaged DICOM header ({_one_line(e)})") from None
    return ds


def check_modality(ds: Dataset, path: Path, modality: str | None) -> None:
    """For commands that need one modality (CT: Hounsfield units): refuse others, and images too small to
    process. Plain reads (modality None) accept any size: the I/O itself has no minimum."""
    if modality is None:
        return
    found = str(ds.get("Modality", "") or "").strip().upper()
    if found and found != modality:
        raise UserError(f"{path}: modality {found}, but this command needs {modality} images")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if "Rows" in ds and min(rows, cols) < MIN_SIZE:
        raise UserError(
            f"{path}: image of {rows}x{cols} pixels is too small (under {MIN_SIZE} pixels a side)"
        )


def _physical_values(path: Path, ds: Dataset) -> np.ndarray:
    if "PixelData" not in ds:
        raise UserError(f"{path}: no PixelData (not an image, or the file is truncated)")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if int(ds.get("SamplesPerPixel", 1)) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UserError(
            f"{path}: colour image ({photometric or 'SamplesPerPixel > 1'}); only greyscale is supported"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UserError(
            f"{path}: multi-frame image ({frames} frames); split it into single-frame files first"
        )
    syntax = pydicom.uid.UID(str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)))
    if not syntax.is_transfer_syntax:
        raise UserError(
            f"{path}: unknown transfer syntax {syntax}; convert the file to uncompressed (e.g. dcmdjpeg)"
        )
    if syntax.is_compressed:
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:  # video and other syntaxes pydicom has no decoder plugins for at all
            raise UserError(
                f"{path}: compressed ({syntax.name}) and no decoder exists for it in pydicom"
            ) from None
        if not available:
            raise UserError(
                f"{path}: compressed ({syntax.name}) and no decoder installed: pip install {DECODER_PACKAGES}"
            )
    slope, intercept = _rescale(ds)
    # pydicom >= 3 masks bits above BitsStored (old overlays, garbage) and sign-extends signed data.
    with np.errstate(over="ignore", invalid="ignore"):
        if "ModalityLUTSequence" in ds:  # rare (XA, old CR): a lookup table replaces slope/intercept
            values = apply_modality_lut(ds.pixel_array, ds)
        else:
            values = ds.pixel_array * slope + intercept
        values = values.astype(np.float32)
    if not np.isfinite(values).all():
        raise UserError(f"{path}: non-finite values (NaN/Inf) after RescaleSlope/RescaleIntercept")
    return values


def _rescale(ds: Dataset) -> tuple[float, float]:
    return float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0)


def _int_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def stored_range(ds: Dataset) -> tuple[float, float]:
    """Physical value range representable by the file's stored bits."""
    lo, hi = _int_range(int(ds.BitsStored), int(ds.PixelRepresentation) == 1)
    slope, intercept = _rescale(ds)
    return tuple(sorted((lo * slope + intercept, hi * slope + intercept)))


def padding_mask(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """True where PixelPaddingValue (up to PixelPaddingRangeLimit) applies; None when the file has none."""
    if ds.get("PixelPaddingValue") is None:
        return None
    slope, intercept = _rescale(ds)
    stored = np.rint((np.asarray(values, np.float64) - intercept) / slope)
    pad = [int(ds.PixelPaddingValue), int(ds.get("PixelPaddingRangeLimit", ds.PixelPaddingValue))]
    return (stored >= min(pad)) & (stored <= max(pad))


def pixel_spacing_mm(ds: Dataset) -> tuple[float, float] | None:
    """(row, col) from PixelSpacing, else ImagerPixelSpacing; None if missing or zero (never invented)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if np.isfinite([row, col]).all() and row > 0 and col > 0:
            return row, col
    return None


def read_dicom_series(folder: str | Path, modality: str | None = None) -> Volume:
    """All DICOM images in `folder` as one volume sorted along the slice normal (never by file name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder of DICOM files")
    try:
        return _read_series(folder, modality)
    except UserError:
        raise
    except Exception as e:  # a header value that parses but makes no sense (the readers are fuzzed)
        raise UserError(f"{folder}: inconsistent DICOM headers ({_one_line(e)})") from None


def _read_series(folder: Path, modality: str | None) -> Volume:
    headers = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        header = _read_header(path, stop_before_pixels=True)
        if (
            header is not None and "Rows" in header
        ):  # README/.DS_Store (not DICOM), DICOMDIR, reports: no image
            headers.append((path, header))
    if not headers:
        raise UserError(f"{folder}: no DICOM images in this folder")
    series: dict[str, list[Path]] = {}
    for path, header in headers:
        series.setdefault(str(header.get("SeriesInstanceUID", "?")), []).append(path)
    if len(series) > 1:
        listing = ", ".join(
            f"{uid} ({len(paths)} files, e.g. {paths[0].name})" for uid, paths in series.items()
        )
        raise UserError(
            f"{folder}: {len(series)} series in one folder ({listing}); put each series in its own folder"
        )
    check_modality(headers[0][1], headers[0][0], modality)
    try:
        orientation = np.array([float(v) for v in headers[0][1].ImageOrientationPatient]).reshape(2, 3)
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for _, h in headers])
        orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for _, h in headers])
    except (AttributeError, TypeError, ValueError):
        raise UserError(
            f"{folder}: no ImagePositionPatient/ImageOrientationPatient; cannot order slices"
        ) from None
    if not (np.isfinite(positions).all() and np.isfinite(orientations).all()):
        raise UserError(
            f"{folder}: non-numeric ImagePositionPatient/ImageOrientationPatient; cannot order slices"
        )
    if np.abs(orientations - orientation.ravel()).max() > 1e-4:
        raise UserError(f"{folder}: slices have different ImageOrientationPatient; not one volume")
    normal = np.cross(orientation[0], orientation[1])
    if abs(np.linalg.norm(normal) - 1.0) > 0.01:
        raise UserError(f"{folder}: ImageOrientationPatient is not two perpendicular unit vectors")
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    if len(gaps) and gaps.min() < 1e-3:
        raise UserError(
            f"{folder}: two slices share a position (repeated acquisitions or echoes?); not one volume"
        )
    slices, datasets = [], []
    for index in order:
        values, ds = read_dicom(headers[index][0])
        if slices and values.shape != slices[0].shape:
            raise UserError(
                f"{headers[index][0]}: {values.shape} pixels, other slices have {slices[0].shape}"
            )
        del ds.PixelData  # keep headers as templates, not a second copy of the volume
        slices.append(values)
        datasets.append(ds)
    spacing = pixel_spacing_mm(datasets[0])
    if spacing is None:
        raise UserError(f"{headers[order[0]][0]}: no valid PixelSpacing; cannot build the volume geometry")
    if len(gaps) and np.ptp(gaps) > max(0.01 * gaps.mean(), 0.011):  # positions are often rounded to 0.01 mm
        gap_range = f"{gaps.min():.3f} to {gaps.max():.3f} mm"
        warnings.warn(
            f"{folder}: uneven slice gaps ({gap_range}); volume assumes {gaps.mean():.3f} mm", stacklevel=2
        )
    # The step between first and last position (not normal * spacing) keeps gantry-tilted stacks exact.
    first, last = positions[order[0]], positions[order[-1]]
    thickness = float(datasets[0].get("SliceThickness") or 1.0)  # one slice: z spacing only labels the file
    step = (last - first) / (len(order) - 1) if len(order) > 1 else normal * thickness
    lps = np.eye(4)
    lps[:3, :] = np.column_stack([orientation[0] * spacing[1], orientation[1] * spacing[0], step, first])
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM is LPS, NIfTI/nibabel RAS
    return Volume(np.stack(slices), affine, {"datasets": datasets, "source": str(folder)})


# --- writing ---


def _ds_number(x: float) -> float:
    """The value a reader will parse back from a DS string (at most 16 characters)."""
    return float(format_number_as_ds(float(x)))


@dataclasses.dataclass(frozen=True)
class RawImage:
    """A float32 image held in an open binary file, row after row. A large derived image (a 9k x 6k
    super-resolution) is written strip by strip and encoded from there, so it never sits in memory whole; a
    np.memmap would not do, since the pages it touches count as resident memory."""

    file: BinaryIO
    shape: tuple[int, int]

    def rows(self, y0: int, y1: int) -> np.ndarray:
        width = self.shape[1]
        self.file.seek(y0 * width * 4)
        return np.frombuffer(self.file.read((y1 - y0) * width * 4), "<f4").reshape(y1 - y0, width).copy()

    def blocks(self, rows: int = 256):
        """(first row, float32 block of up to `rows` rows), top to bottom."""
        for r in range(0, self.shape[0], rows):
            yield r, self.rows(r, min(r + rows, self.shape[0]))


def _blocks(values: np.ndarray | RawImage, rows: int = 256):
    """(first row, float64 block) of an array or a RawImage: no full-size float64 copy is ever made."""
    if isinstance(values, RawImage):
        yield from ((r, block.astype(np.float64)) for r, block in values.blocks(rows))
    else:
        yield from (
            (r, np.asarray(values[r : r + rows], np.float64)) for r in range(0, values.shape[0], rows)
        )


def _value_range(values: np.ndarray | RawImage) -> tuple[float, float]:
    """(min, max); NaN if any value is not finite."""
    vmin, vmax = np.inf, -np.inf
    for _, block in _blocks(values):
        if not np.isfinite(block).all():
            return np.nan, np.nan
        vmin, vmax = min(vmin, float(block.min())), max(vmax, float(block.max()))
    return vmin, vmax


def _encode(values: np.ndarray | RawImage, ds: Dataset, pixel_file: BinaryIO | None = None) -> None:
    """Store `values` in 16-bit PixelData with slope/intercept that round-trip within half a stored unit.

    Candidates, first that fits wins: the template's bits and rescale; 16 bits; the template's slope with the
    intercept moved by whole stored units (integer data stays exact); a new slope. Templates whose IOD fixes
    the rescale (DX/MG) or that have none are clipped to 16 bits instead of rescaled. Encoded by row blocks;
    with a `pixel_file`, PixelData is streamed through it rather than held in memory.
    """
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    slope, intercept = (_ds_number(v) for v in _rescale(ds))
    bits0 = int(ds.get("BitsStored", 16)) if int(ds.get("BitsAllocated", 16)) == 16 else 16
    fixed = "RescaleSlope" not in ds or str(ds.get("SOPClassUID", "")).startswith(FIXED_RESCALE_PREFIX)
    lo16, hi16 = _int_range(16, signed)
    vmin, vmax = _value_range(values)
    shift = np.rint((vmin - intercept) / slope) - lo16
    new_slope = _ds_number(max((vmax - vmin) / (hi16 - lo16 - 2), np.finfo(np.float32).tiny))
    candidates = [(bits0, slope, intercept), (16, slope, intercept)]
    if not fixed:
        candidates += [
            (16, slope, _ds_number(intercept + shift * slope)),
            (16, new_slope, _ds_number(vmin - (lo16 + 1) * new_slope)),
        ]
    for bits, s, b in candidates:
        ends = np.rint(
            (np.array([vmin, vmax]) - b) / s
        )  # rint((v - b) / s) is monotonic: the extremes decide
        lo, hi = _int_range(bits, signed)
        if ends.min() >= lo and ends.max() <= hi:
            break
    if (s, b) != (slope, intercept) or not lo <= int(ds.get("PixelPaddingValue", lo)) <= hi:
        for keyword in ("PixelPaddingValue", "PixelPaddingRangeLimit"):
            ds.pop(keyword, None)  # stored padding no longer means the same physical value
    if "RescaleSlope" in ds or (s, b) != (1.0, 0.0):
        ds.RescaleSlope, ds.RescaleIntercept = format_number_as_ds(s), format_number_as_ds(b)
    ds.Rows, ds.Columns = values.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, int(signed)
    ds.SamplesPerPixel = 1
    dtype = "<i2" if signed else "<u2"
    stored = None if pixel_file is not None else np.empty(values.shape, dtype)
    for r, block in _blocks(values):
        block = np.clip(np.rint((block - b) / s), lo, hi)  # clip only bites for fixed-rescale templates
        if stored is None:
            pixel_file.write(block.astype(dtype).tobytes())
        else:
            stored[r : r + len(block)] = block
    if pixel_file is not None:
        pixel_file.seek(0)
    ds["PixelData"] = pydicom.DataElement(
        0x7FE00010, "OW", pixel_file if stored is None else stored.tobytes()
    )


def write_derived_dicom(
    template: Dataset,
    values: np.ndarray | RawImage,
    out_path: str | Path,
    *,
    description: str,
    series_uid: str | None = None,
    series_description: str | None = None,
    spacing_scale: tuple[float, float] = (1.0, 1.0),
    image_position=None,
    instance_number: int | None = None,
    slice_thickness_mm: float | None = None,
    spacing_between_slices_mm: float | None = None,
) -> Path:
    """A new image in the template's study: new SOPInstanceUID, given or new SeriesInstanceUID, DERIVED.
    `values` in physical units, an array or a RawImage; the pixels are encoded by row blocks through an
    anonymous temporary file beside `out_path`, so writing adds little memory even for a 9k x 6k image."""
    out_path = Path(out_path)
    if isinstance(getattr(template, "filename", None), (str, Path)):
        refuse_overwrite_input(out_path, template.filename)
    values = values if isinstance(values, RawImage) else np.asarray(values)
    if len(values.shape) != 2:
        raise ValueError(f"write_derived_dicom expects a 2-D image, got shape {values.shape}")
    if not np.isfinite(_value_range(values)).all():
        raise UserError(f"{out_path}: values to write contain NaN/Inf; nothing written")
    # A fresh Dataset holds parsed values, so a big-endian or implicit-VR template can be written as explicit
    # little endian. Overlays/curves (60xx/50xx) lie on the old grid and group lengths (gggg,0000) go stale.
    ds = Dataset()
    for elem in template:
        if (
            elem.keyword not in STALE_KEYWORDS
            and elem.tag.group & 0xFF00 not in (0x5000, 0x6000)
            and elem.tag.element
        ):
            ds.add(copy.deepcopy(elem))
    if "ModalityLUTSequence" in template:  # its output values are stored through a plain rescale instead
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "US"
    now = datetime.datetime.now()
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.ImageType = ["DERIVED", "SECONDARY", *list(template.get("ImageType", []))[2:]]
    ds.DerivationDescription = description[:1024]
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    if _uid(template, "SOPInstanceUID") and _uid(template, "SOPClassUID"):
        ds.SourceImageSequence = [Dataset()]
        ds.SourceImageSequence[0].ReferencedSOPClassUID = template.SOPClassUID
        ds.SourceImageSequence[0].ReferencedSOPInstanceUID = template.SOPInstanceUID
    else:
        ds.pop("SourceImageSequence", None)  # the source's own sources are not ours
    _fill_identifiers(ds, template)
    if series_description is not None:
        ds.SeriesDescription = series_description[:64]
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if keyword in ds:
            ds[keyword].value = [
                format_number_as_ds(float(v) * k) for v, k in zip(ds[keyword].value, spacing_scale)
            ]
    if image_position is not None:
        ds.ImagePositionPatient = [format_number_as_ds(float(v)) for v in image_position]
    if instance_number is not None:
        ds.InstanceNumber = int(instance_number)
    if slice_thickness_mm is not None:
        ds.SliceThickness = format_number_as_ds(float(slice_thickness_mm))
    if spacing_between_slices_mm is not None:
        ds.SpacingBetweenSlices = format_number_as_ds(float(spacing_between_slices_mm))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=out_path.parent) as pixel_file:  # unlinked: gone even after a crash
        _encode(values, ds, pixel_file)
        write_dataset(ds, out_path)
    return out_path


def _uid(ds: Dataset, keyword: str) -> str:
    """The UID value, "" when missing or empty (anonymisers often blank type-1 UIDs instead of removing)."""
    return str(ds.get(keyword, "") or "").strip()


def _sop_class(template: Dataset) -> tuple[str, str]:
    """(SOP Class UID, where it came from) for a source without one: its file meta, else its modality's
    single-frame storage class, else Secondary Capture (valid for any image)."""
    media = str(getattr(template, "file_meta", Dataset()).get("MediaStorageSOPClassUID", "") or "").strip()
    if media:
        return media, "the file meta"
    modality = str(template.get("Modality", "") or "").strip().upper()
    if modality in SOP_CLASS_BY_MODALITY:
        return SOP_CLASS_BY_MODALITY[modality], f"Modality {modality}"
    return SECONDARY_CAPTURE, "no usable Modality"


def _secondary_capture_attributes(ds: Dataset) -> None:
    """What the SC Image IOD requires and an image of another modality need not have."""
    ds.ConversionType = "WSD"  # workstation
    if not str(ds.get("Modality", "") or "").strip():
        ds.Modality = "OT"
    if "RescaleSlope" in ds and not ds.get("RescaleType"):
        ds.RescaleType = "US"  # unspecified units
    if "PatientOrientation" not in ds:
        ds.PatientOrientation = ""  # type 2: present, value unknown


def _source_name(template: Dataset) -> str:
    filename = getattr(template, "filename", None)
    if isinstance(filename, (str, Path)):
        return str(Path(filename).resolve().parent)  # the series folder: shared by all its slices
    return "<dataset in memory>"


def _fill_identifiers(ds: Dataset, template: Dataset) -> None:
    """Empty or missing type-1 identifiers of the source (SOPClassUID, Study, FrameOfReference) filled in.
    Study-level UIDs are derived from what a series shares, so all its slices land in one generated study."""
    filled = []
    if not _uid(ds, "SOPClassUID"):
        ds.SOPClassUID, origin = _sop_class(template)
        filled.append(f"SOPClassUID {pydicom.uid.UID(ds.SOPClassUID).name} (from {origin})")
        if ds.SOPClassUID == SECONDARY_CAPTURE:
            _secondary_capture_attributes(ds)
    key = [_source_name(template), *(str(template.get(k, "") or "") for k in SHARED_BY_SERIES)]
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):
        needed = keyword == "StudyInstanceUID" or "ImagePositionPatient" in ds
        if needed and not _uid(ds, keyword):
            setattr(ds, keyword, generate_uid(entropy_srcs=[*key, keyword]))
            filled.append(f"a generated {keyword} (one per source series)")
    report = f"{key[0]}: {', '.join(filled)}"
    if filled and report not in _reported_sources:
        _reported_sources.add(report)
        warnings.warn(
            f"{key[0]}: source DICOM has empty or missing identifiers; derived files get {', '.join(filled)}",
            stacklevel=3,
        )


def write_dataset(ds: Dataset, path: str | Path) -> Path:
    """Atomic write as uncompressed Explicit VR Little Endian with fresh, consistent file meta."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return Path(path)


def write_dicom_series(
    volume: Volume, templates: list[Dataset], out_folder: str | Path, *, description: str
) -> list[Path]:
    """One derived file per slice, geometry from `volume.affine`; slice k uses template k * n_templates // n_z
    (so fewer or more slices than templates work)."""
    out_folder = Path(out_folder)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    spacing_z, spacing_row, spacing_col = volume.spacing_mm
    normal = np.cross(lps[:3, 0] / spacing_col, lps[:3, 1] / spacing_row)
    series_uid, paths = generate_uid(), []
    for k, values in enumerate(volume.hu):
        template = copy.deepcopy(templates[min(len(templates) - 1, k * len(templates) // len(volume.hu))])
        template.ImageOrientationPatient = [
            format_number_as_ds(float(v)) for v in [*(lps[:3, 0] / spacing_col), *(lps[:3, 1] / spacing_row)]
        ]
        position = lps[:3, :] @ [0.0, 0.0, k, 1.0]
        if "SliceLocation" in template:
            template.SliceLocation = format_number_as_ds(float(position @ normal))
        old = pixel_spacing_mm(template) or (spacing_row, spacing_col)
        paths.append(
            write_derived_dicom(
                template,
                values,
                out_folder / f"{k + 1:04d}.dcm",
                description=description,
                series_uid=series_uid,
                spacing_scale=(spacing_row / old[0], spacing_col / old[1]),
                image_position=position,
                instance_number=k + 1,
                slice_thickness_mm=spacing_z,
                spacing_between_slices_mm=spacing_z,
            )
        )
    return paths
