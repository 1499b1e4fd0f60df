"""NIfTI volumes in and out with nibabel, `read_volume` (a NIfTI file or a DICOM series folder) and affine
helpers. `Volume` (common.volume) is re-exported here: `nifti_io.Volume`.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from common import UserError, dicom_io
from common.files import atomic_path, refuse_overwrite_input
from common.volume import Volume

__all__ = ["Volume", "read_nifti", "read_volume", "write_nifti"]


def read_nifti(path: str | Path) -> Volume:
    """A 3-D NIfTI (a trailing singleton 4th dim is dropped); header kept in meta['nifti_header']."""
    path = Path(path)
    try:
        image = nib.load(path)
        if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
            raise UserError(f"{path}: not a NIfTI image ({type(image).__name__})")
        data = image.get_fdata(dtype=np.float32)
    except UserError:
        raise
    except Exception as e:  # nibabel raises many types on damaged or non-image files; the user needs one line
        raise UserError(
            f"{path}: unreadable NIfTI ({type(e).__name__}: {' '.join(str(e).split())})"
        ) from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise UserError(f"{path}: shape {data.shape}; expected a 3-D volume (one 4-D time point at most)")
    bad = int((~np.isfinite(data)).sum())
    if bad:
        raise UserError(f"{path}: {bad} NaN/Inf voxels")
    affine = np.array(image.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise UserError(
            f"{path}: affine (sform/qform) is singular or not finite; voxel size and orientation unknown"
        )
    hu = np.ascontiguousarray(data.transpose(2, 1, 0))
    return Volume(hu, affine, {"nifti_header": image.header.copy(), "source": str(path)})


def write_nifti(path: str | Path, volume: Volume) -> Path:
    """Atomic .nii/.nii.gz; int16 when every value is an integer in range, else float32; affine exact."""
    path = Path(path)
    if volume.meta.get("source"):
        refuse_overwrite_input(path, volume.meta["source"])
    data = np.asarray(volume.hu).transpose(2, 1, 0)
    if not np.isfinite(data).all():
        raise UserError(f"{path}: values to write contain NaN/Inf; nothing written")
    if np.array_equal(data, np.rint(data)) and data.min() >= -32768 and data.max() <= 32767:
        data = data.astype(np.int16)
    else:
        data = data.astype(np.float32)
    header = volume.meta.get("nifti_header")
    header = nib.Nifti1Header() if header is None else header.copy()
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = image_class(data, None, header=header)
    image.set_data_dtype(data.dtype)
    header = image.header
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"] = header["cal_max"] = 0
    affine = np.asarray(volume.affine, dtype=np.float64)
    # Leave an unchanged header geometry alone: recomputing the qform quaternion would not be bit-exact.
    if not np.array_equal(header.get_best_affine(), affine):
        sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
        new = volume.meta.get("nifti_header") is None  # from DICOM: scanner coordinates, like dcm2niix
        header.set_sform(affine, code=sform_code or (1 if new else 2))
        header.set_qform(affine, code=qform_code or (1 if new else 0))
    raw = image.to_bytes()
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(raw, compresslevel=6) if path.name.endswith(".gz") else raw)
    return path


def read_volume(path: str | Path, modality: str | None = None) -> Volume:
    """A `.nii`/`.nii.gz` file or a folder holding one DICOM series (of `modality`, when given)."""
    path = Path(path)
    if path.is_dir():
        return dicom_io.read_dicom_series(path, modality)
    if path.name.endswith((".nii", ".nii.gz")) and path.is_file():
        return read_nifti(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    raise UserError(f"{path}: expected a .nii/.nii.gz file or a folder of DICOM files")
