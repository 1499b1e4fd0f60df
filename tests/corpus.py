"""The malformed-input corpus of issue 8, generated on demand into a folder (no binary blobs in the repo).

`build_corpus(root)` writes every case and returns `{name: Case}`; each case is a DICOM file, a DICOM series
folder, a NIfTI file, a YAML config, a checkpoint or a plain folder, plus the valid files they were made from.
Everything is small (48x48 CT, 96x80 MG) so that commands reach the point where they read the data quickly.
"""

from __future__ import annotations

import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from fixtures import make_ct_dataset, make_projection_dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import MRImageStorage, generate_uid

from common import dicom_io

MPEG2_SYNTAX = "1.2.840.10008.1.2.4.100"  # known to pydicom, no pixel decoder exists for it
JPEG_XL_SYNTAX = "1.2.840.10008.1.2.4.112"  # a newer standard syntax this pydicom does not know at all
JPEG_LS_SYNTAX = "1.2.840.10008.1.2.4.80"  # decoder installed, but the codestream is garbage


@dataclass
class Case:
    name: str
    path: Path
    kind: str  # dicom | series | nifti | folder | yaml | ckpt | other
    problem: str  # what is wrong, for the docs table


def ct_hu(shape=(48, 48), seed=0) -> np.ndarray:
    """A small CT-like slice: air outside, a soft-tissue disc with texture and a bone ring."""
    y, x = np.mgrid[: shape[0], : shape[1]]
    r = np.hypot(y - shape[0] / 2, x - shape[1] / 2) / (min(shape) / 2)
    hu = np.where(r < 0.8, 40.0, -1000.0) + np.where((r > 0.6) & (r < 0.7), 900.0, 0.0)
    return np.round(hu + np.random.default_rng(seed).normal(0, 15, shape) * (r < 0.8)).astype(np.float32)


def mg_stored(shape=(96, 80), seed=0) -> np.ndarray:
    from common import synthetic

    return synthetic.mammogram(shape, np.random.default_rng(seed), bits_stored=14)


def _save_raw(ds, path: Path, syntax: str) -> Path:
    """Save with a given transfer syntax (encapsulated pixel data is written as explicit VR little endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.save_as(path, enforce_file_format=False, little_endian=True, implicit_vr=False)
    return path


def _compressed(path: Path, syntax: str) -> Path:
    if syntax == JPEG_XL_SYNTAX:  # pydicom refuses to write a syntax it does not know: patch the UID bytes
        data = _compressed(path, MPEG2_SYNTAX).read_bytes()
        path.write_bytes(data.replace(MPEG2_SYNTAX.encode(), JPEG_XL_SYNTAX.encode(), 1))
        return path
    ds = make_ct_dataset(ct_hu())
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return _save_raw(ds, path, syntax)


def _colour(path: Path, photometric: str) -> Path:
    ds = make_ct_dataset(ct_hu())
    rows, cols = 48, 48
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = photometric
    if photometric == "PALETTE COLOR":
        ds.SamplesPerPixel = 1
        for colour in ("Red", "Green", "Blue"):
            setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
            setattr(ds, f"{colour}PaletteColorLookupTableData", (np.arange(256, dtype="<u2") * 257).tobytes())
        ds.PixelData = (np.arange(rows * cols) % 256).astype(np.uint8).tobytes()
    else:
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.PixelData = np.random.default_rng(1).integers(0, 255, (rows, cols, 3), dtype=np.uint8).tobytes()
    ds["PixelData"].VR = "OB"
    return dicom_io.write_dataset(ds, path)


def _series(
    folder: Path,
    hu_zyx: np.ndarray,
    z_positions,
    *,
    modality="CT",
    series_uid=None,
    study_uid=None,
    patient_id="SYNTH001",
    series_description="corpus",
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid = series_uid or generate_uid(), study_uid or generate_uid()
    for k, (hu, z) in enumerate(zip(hu_zyx, z_positions)):
        ds = make_ct_dataset(
            hu,
            pixel_spacing_mm=(0.8, 0.8),
            position_mm=(-19.2, -19.2, z),
            slice_thickness_mm=2.0,
            instance_number=k + 1,
            patient_id=patient_id,
            study_uid=study_uid,
            series_uid=series_uid,
        )
        ds.SeriesDescription = series_description
        if modality == "MR":
            ds.SOPClassUID, ds.Modality = MRImageStorage, "MR"
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = (
                "SE",
                "NONE",
                "",
                "2D",
            )
            ds.RescaleType = "US"
        dicom_io.write_dataset(ds, folder / f"{series_uid[-6:]}_{k:03d}.dcm")
    return folder


def _anonymise(target: Path, sources: list[Path]) -> Path:
    """Copies of `sources` with the identifiers an anonymiser blanks: one file (target ends in .dcm) or a
    folder of them. The file meta keeps no SOP Class either, so nothing is left to copy it from."""
    for source in sources:
        ds = pydicom.dcmread(source)
        ds.SOPClassUID = ds.SOPInstanceUID = ds.StudyInstanceUID = ds.SeriesInstanceUID = ""
        ds.pop("FrameOfReferenceUID", None)
        ds.file_meta.MediaStorageSOPClassUID = ds.file_meta.MediaStorageSOPInstanceUID = ""
        # in a folder, named like a PACS export: by UID, no suffix (so Path.stem is the same for every file)
        name = (
            target
            if target.suffix == ".dcm"
            else target / f"CT.1.2.826.0.1.3680043.8.498.{ds.InstanceNumber}"
        )
        ds.save_as(name, enforce_file_format=False)
    return target


def _nifti(path: Path, data_xyz: np.ndarray, affine: np.ndarray) -> Path:
    image = nib.Nifti1Image(np.asarray(data_xyz, np.float32), None)
    image.header.set_sform(affine, code=1)  # sform only: a singular affine has no qform decomposition
    image.header.set_qform(None, code=0)
    nib.save(image, str(path))
    return path


def build_corpus(root: str | Path) -> dict[str, Case]:
    """Write every case under `root` (created) and return them by name."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Case] = {}

    def add(name, path, kind, problem):
        cases[name] = Case(name, Path(path), kind, problem)

    # valid references (the mutations below start from these)
    ct = dicom_io.write_dataset(make_ct_dataset(ct_hu()), root / "ct_valid.dcm")
    add("ct_valid", ct, "dicom", "none (valid CT)")
    add(
        "mg_valid",
        dicom_io.write_dataset(make_projection_dataset(mg_stored()), root / "mg_valid.dcm"),
        "dicom",
        "none for mammo commands; an MG image given to a CT-only command",
    )
    vol = np.stack([ct_hu(seed=k) for k in range(6)])
    add("series_valid", _series(root / "series_valid", vol, [2.0 * k for k in range(6)]), "series", "none")
    add(
        "nifti_valid",
        _nifti(root / "valid.nii.gz", vol.transpose(2, 1, 0), np.diag([0.8, 0.8, 2.0, 1.0])),
        "nifti",
        "none",
    )

    # single DICOM files
    data = ct.read_bytes()
    (root / "truncated.dcm").write_bytes(data[: len(data) // 2])
    add("truncated", root / "truncated.dcm", "dicom", "file cut in the middle of PixelData")
    (root / "header_only.dcm").write_bytes(data[:200])
    add("truncated_header", root / "header_only.dcm", "dicom", "file cut inside the header")
    (root / "not_dicom.dcm").write_text("this is a README, not an image\n")
    add("not_dicom", root / "not_dicom.dcm", "dicom", "text file with a .dcm name")
    ds = make_ct_dataset(ct_hu())
    del ds.PixelData
    add(
        "no_pixeldata", dicom_io.write_dataset(ds, root / "no_pixeldata.dcm"), "dicom", "no PixelData element"
    )
    add("rgb", _colour(root / "rgb.dcm", "RGB"), "dicom", "RGB colour (SamplesPerPixel 3)")
    add("ybr_full", _colour(root / "ybr_full.dcm", "YBR_FULL"), "dicom", "YBR_FULL colour")
    add("palette", _colour(root / "palette.dcm", "PALETTE COLOR"), "dicom", "PALETTE COLOR")
    add(
        "compressed_no_decoder",
        _compressed(root / "mpeg2.dcm", MPEG2_SYNTAX),
        "dicom",
        "MPEG2 transfer syntax: no decoder exists",
    )
    add(
        "unknown_syntax",
        _compressed(root / "jpegxl.dcm", JPEG_XL_SYNTAX),
        "dicom",
        "transfer syntax unknown to pydicom (JPEG XL)",
    )
    add(
        "corrupt_codestream",
        _compressed(root / "jpegls_garbage.dcm", JPEG_LS_SYNTAX),
        "dicom",
        "JPEG-LS with a garbage codestream",
    )
    ds = make_ct_dataset(ct_hu())
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData * 3
    add("multiframe", dicom_io.write_dataset(ds, root / "multiframe.dcm"), "dicom", "3 frames in one file")
    add(
        "one_pixel",
        dicom_io.write_dataset(make_ct_dataset(np.zeros((1, 1))), root / "one_pixel.dcm"),
        "dicom",
        "1x1 image",
    )
    add(
        "constant",
        dicom_io.write_dataset(make_ct_dataset(np.full((48, 48), 40.0)), root / "constant.dcm"),
        "dicom",
        "every pixel 40 HU",
    )
    extreme = make_projection_dataset(np.full((96, 80), 65535), bits_stored=16)
    add(
        "extreme_65535",
        dicom_io.write_dataset(extreme, root / "extreme_65535.dcm"),
        "dicom",
        "16-bit MG, every pixel 65535",
    )
    mr_folder = _series(root / "series_mr", vol[:3], [0.0, 2.0, 4.0], modality="MR")
    add("mr", sorted(mr_folder.iterdir())[0], "dicom", "MR image given to a CT-only command")
    add("series_mr", mr_folder, "series", "MR series given to a CT-only command")

    # anonymised: the type-1 identifiers blanked as many anonymisers leave them (valid images otherwise)
    add(
        "dicom_empty_uids",
        _anonymise(root / "empty_uids.dcm", [ct]),
        "dicom",
        "SOPClassUID, Study/Series/SOP Instance UIDs empty, FrameOfReferenceUID missing",
    )
    anonymised = root / "series_empty_uids"
    anonymised.mkdir(exist_ok=True)
    slices = sorted(_series(root / "series_for_anon", vol, [2.0 * k for k in range(6)]).iterdir())
    _anonymise(anonymised, slices)
    shutil.rmtree(root / "series_for_anon")
    add(
        "series_empty_uids",
        anonymised,
        "series",
        "the same for a 6-slice series, files named by UID without a suffix (as PACS exports name them)",
    )

    # folders
    study = generate_uid()
    _series(root / "series_two", vol[:3], [0.0, 2.0, 4.0], study_uid=study)
    _series(root / "series_two", vol[:3], [0.0, 2.0, 4.0], study_uid=study)
    add("series_two", root / "series_two", "series", "two SeriesInstanceUIDs in one folder")
    long_vol = np.stack([ct_hu(seed=k) for k in range(10)])  # 18 mm: thick enough for a training patch
    add(
        "series_gap",
        _series(root / "series_gap", long_vol[[0, 1, 2, 4, 5, 6, 7, 8, 9]], [0, 2, 4, 8, 10, 12, 14, 16, 18]),
        "series",
        "slice at z=6 mm missing (gap 4 mm among 2 mm steps)",
    )
    (root / "empty").mkdir(exist_ok=True)
    add("empty_folder", root / "empty", "folder", "empty folder")
    junk = root / "junk_folder"
    junk.mkdir(exist_ok=True)
    (junk / "README.txt").write_text("no images here\n")
    add("no_dicom_folder", junk, "series", "folder with only a text file")

    # NIfTI
    bad = vol.transpose(2, 1, 0).copy()
    bad[3, 4, 2] = np.nan
    add(
        "nifti_nan", _nifti(root / "nan.nii.gz", bad, np.diag([0.8, 0.8, 2.0, 1.0])), "nifti", "one NaN voxel"
    )
    bad[3, 4, 2] = np.inf
    add(
        "nifti_inf",
        _nifti(root / "inf.nii.gz", bad, np.diag([0.8, 0.8, 2.0, 1.0])),
        "nifti",
        "one +Inf voxel",
    )
    four_d = np.stack([vol.transpose(2, 1, 0)] * 3, axis=-1)
    add(
        "nifti_4d",
        _nifti(root / "four_d.nii.gz", four_d, np.diag([0.8, 0.8, 2.0, 1.0])),
        "nifti",
        "4-D (3 time points)",
    )
    add(
        "nifti_short",
        _nifti(root / "short.nii.gz", vol[:6].transpose(2, 1, 0), np.diag([0.8, 0.8, 2.0, 1.0])),
        "nifti",
        "6 slices: shorter than an 11-voxel 3-D SSIM window",
    )
    sheared = np.array([[0.8, 0.0, 0.5, 0.0], [0.0, 0.8, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0, 0, 0, 1.0]])
    add(
        "nifti_sheared",
        _nifti(root / "sheared.nii.gz", vol.transpose(2, 1, 0), sheared),
        "nifti",
        "non-orthogonal (sheared, gantry-tilt-like) affine",
    )
    add(
        "nifti_singular",
        _nifti(root / "singular.nii.gz", vol.transpose(2, 1, 0), np.diag([0.8, 0.8, 0.0, 1.0])),
        "nifti",
        "singular affine (zero slice spacing)",
    )
    (root / "garbage.nii.gz").write_bytes(b"\x1f\x8b" + bytes(range(200)))
    add("nifti_garbage", root / "garbage.nii.gz", "nifti", "not a NIfTI (broken gzip)")

    # configs
    (root / "unknown_key.yaml").write_text(
        "defaults:\n  train: {no_such_key: 1}\npresets:\n  full: {}\n  tiny: {}\n"
    )
    add("yaml_unknown_key", root / "unknown_key.yaml", "yaml", "unknown key train.no_such_key")
    (root / "wrong_type.yaml").write_text(
        "defaults:\n  train: {lr: fast}\npresets:\n  full: {}\n  tiny: {}\n"
    )
    add("yaml_wrong_type", root / "wrong_type.yaml", "yaml", "train.lr: 'fast' is not a number")
    (root / "partial.yaml").write_text("train: {lr: 2.0e-6}\n")
    add("yaml_partial", root / "partial.yaml", "yaml", "a partial override file (one value), as users write")
    (root / "defaults_only.yaml").write_text("defaults:\n  train: {lr: 2.0e-6}\n")
    add("yaml_defaults_only", root / "defaults_only.yaml", "yaml", "`defaults` without `presets`")
    (root / "python_tag.yaml").write_text("defaults: !!python/object/apply:os.system ['touch PWNED']\n")
    add("yaml_python_tag", root / "python_tag.yaml", "yaml", "!!python/object tag (unsafe YAML)")

    # checkpoints that are not ours (the other-script / other-architecture ones come from real runs)
    (root / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(512))
    add("ckpt_garbage", root / "garbage.pt", "ckpt", "random bytes")
    marker = root / "PWNED_BY_PICKLE"
    (root / "pickle_payload.pt").write_bytes(pickle.dumps({"script": "x", "model": _Touch(str(marker))}))
    add("ckpt_pickle_payload", root / "pickle_payload.pt", "ckpt", "pickle that runs code when unpickled")
    return cases


class _Touch:
    """Unpickling this calls Path(marker).touch(): proof that a loader executed code from a file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))
