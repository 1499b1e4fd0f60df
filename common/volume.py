"""The `Volume` type shared by NIfTI files and DICOM series (its own module so neither I/O module imports the
other's reader to get it), and the one rule for calling a slice stack sheared or oblique."""

from __future__ import annotations

import math
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


def obliqueness(affine: np.ndarray) -> str | None:
    """What is unusual about a slice stack's geometry, for a warning: a sheared affine (slice axis off the
    slice normal, e.g. gantry tilt), else oblique slices (normal off every patient axis), else None."""
    columns = np.asarray(affine, np.float64)[:3, :3]
    columns = columns / np.linalg.norm(columns, axis=0)
    normal = np.cross(columns[:, 0], columns[:, 1])
    normal /= np.linalg.norm(normal)
    shear = math.degrees(math.acos(min(1.0, abs(float(columns[:, 2] @ normal)))))
    tilt = math.degrees(math.acos(min(1.0, float(np.abs(normal).max()))))
    if shear > 0.2:
        return f"sheared affine (slice axis {shear:.1f} deg off the slice normal, e.g. gantry tilt)"
    return f"oblique slices ({tilt:.1f} deg from the nearest patient axis)" if tilt > 0.5 else None
