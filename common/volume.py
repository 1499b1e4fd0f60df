"""The `Volume` type shared by NIfTI files and DICOM series (its own module so neither I/O module imports the
other's reader to get it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Volume:
    """`hu` is (z, y, x) float32; `affine` is nibabel's: voxel (i, j, k) = (x/col, y/row, z/slice) to RAS mm,
    so `nib.load(p).get_fdata()` equals `hu.transpose(2, 1, 0)`."""

    hu: np.ndarray
    affine: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """(z, y, x) voxel size: lengths of the affine's k, j, i columns."""
        i, j, k = np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0)
        return float(k), float(j), float(i)
