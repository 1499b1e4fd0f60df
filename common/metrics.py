"""Image-quality metrics with one stated convention (`convention`): window -> [0, 1], data range 1,
Gaussian SSIM.

Unmasked PSNR/SSIM equal `skimage.metrics` (gaussian_weights=True, sigma=1.5, use_sample_covariance=False);
masked variants average the same per-pixel quantities over the mask only. Inputs too short for the 11-px SSIM
window (a 6-slice volume) are measured per 2-D slice or with a smaller window; `ssim_convention` says which.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SSIM_SIGMA = 1.5
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)  # skimage's truncate=3.5 -> 11 taps, as in Wang et al. 2004
SSIM_K1, SSIM_K2 = 0.01, 0.03


def convention(window: tuple[float, float], masked: bool = False) -> str:
    text = (
        f"window [{window[0]:g}, {window[1]:g}] HU -> [0,1], data_range 1, SSIM gaussian sigma {SSIM_SIGMA:g}"
    )
    return text + (", PSNR/SSIM/MAE inside the mask" if masked else "")


def hu_to_unit(hu, hu_range):
    """HU -> [-1, 1] by one fixed range (never per slice), so a model's output maps back to HU exactly."""
    return (hu - hu_range[0]) / (hu_range[1] - hu_range[0]) * 2.0 - 1.0


def unit_to_hu(x, hu_range):
    return (x + 1.0) / 2.0 * (hu_range[1] - hu_range[0]) + hu_range[0]


def to_unit_window(x: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"window must have hi > lo, got {window}")
    return np.clip((np.asarray(x, np.float64) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def body_mask(hu: np.ndarray, threshold_hu: float = -500.0) -> np.ndarray:
    return np.asarray(hu) > threshold_hu


def _check(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, np.float64), np.asarray(ref, np.float64)
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {pred.shape} vs {ref.shape}")
    if mask is not None and (np.shape(mask) != pred.shape):
        raise ValueError(f"mask shape {np.shape(mask)} differs from image shape {pred.shape}")
    return pred, ref


def _masked_mean(values: np.ndarray, mask: np.ndarray | None) -> float:
    if mask is None:
        return float(values.mean())
    mask = np.asarray(mask, bool)
    if not mask.any():
        # an empty mask has no honest value; NaN would silently vanish in later means
        raise ValueError("metric mask is empty (no pixels to average over)")
    return float(values[mask].mean())


def psnr(pred: np.ndarray, ref: np.ndarray, data_range: float, mask: np.ndarray | None = None) -> float:
    pred, ref = _check(pred, ref, mask)
    mse = _masked_mean((pred - ref) ** 2, mask)
    return float("inf") if mse == 0 else float(10.0 * np.log10(float(data_range) ** 2 / mse))


def mae(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    pred, ref = _check(pred, ref, mask)
    return _masked_mean(np.abs(pred - ref), mask)


def ssim_plan(shape: tuple[int, ...]) -> tuple[bool, int]:
    """(per_slice, radius) of the Gaussian window that fits `shape`: the full 11-px window along every axis
    when it fits; a volume with fewer than 11 slices is measured per 2-D slice (along axis 0); an image or
    slice under 11 px gets the largest window that fits (radius >= 1, i.e. at least 3 px)."""
    full = 2 * SSIM_RADIUS + 1
    if len(shape) not in (2, 3):
        raise ValueError(f"SSIM expects a 2-D image or a 3-D volume, got shape {tuple(shape)}")
    per_slice = len(shape) == 3 and min(shape) < full
    plane = shape[1:] if per_slice else shape
    radius = min(SSIM_RADIUS, (min(plane) - 1) // 2)
    if radius < 1:
        raise ValueError(f"SSIM needs at least 3 pixels along every image axis, got shape {tuple(shape)}")
    return per_slice, radius


def ssim_convention(shape: tuple[int, ...]) -> str:
    """How `ssim` measures an image of `shape`, for table notes (differs from n-D only for short inputs)."""
    per_slice, radius = ssim_plan(shape)
    window = f"{2 * radius + 1}-px window" + ("" if radius == SSIM_RADIUS else " (image too small for 11)")
    if per_slice:
        return f"SSIM 2-D per slice, {window} (only {shape[0]} slices: too few for a 3-D window)"
    return f"SSIM {len(shape)}-D, {window}"


def ssim_map(pred: np.ndarray, ref: np.ndarray, data_range: float) -> np.ndarray:
    """Per-pixel SSIM with the window of `ssim_plan` (per 2-D slice for short volumes). Pixels within the
    window radius of an image border see padding; `ssim` leaves them out."""
    pred, ref = _check(pred, ref, None)
    per_slice, radius = ssim_plan(pred.shape)
    sigma = [0.0] * int(per_slice) + [SSIM_SIGMA] * (pred.ndim - int(per_slice))  # 0: no blur across slices

    def blur(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, sigma, truncate=(radius + 0.25) / SSIM_SIGMA, mode="reflect")

    ux, uy = blur(pred), blur(ref)
    vx, vy, vxy = blur(pred * pred) - ux * ux, blur(ref * ref) - uy * uy, blur(pred * ref) - ux * uy
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))


def ssim(pred: np.ndarray, ref: np.ndarray, data_range: float, mask: np.ndarray | None = None) -> float:
    """Mean SSIM over the pixels whose window lies inside the image (and inside `mask`); the window and
    dimensionality follow `ssim_plan`, and `ssim_convention(shape)` says which were used."""
    s = ssim_map(pred, ref, data_range)
    skip, radius = (int(v) for v in ssim_plan(s.shape))  # skip: the slice axis has no window and no border
    interior = np.zeros(s.shape, bool)
    interior[(slice(None),) * skip + tuple(slice(radius, n - radius) for n in s.shape[skip:])] = True
    if mask is not None:
        _check(pred, ref, mask)
        interior &= np.asarray(mask, bool)
    return _masked_mean(s, interior)


def noise_std(img: np.ndarray) -> float:
    """Immerkaer (1996) fast noise estimate: the 3x3 kernel is a difference of two Laplacians, so it cancels
    smooth structure (up to quadratic) and leaves mostly noise. 3-D input: pooled over its 2-D slices."""
    img = np.asarray(img, np.float64)
    slices = img[None] if img.ndim == 2 else img
    if slices.ndim != 3 or min(slices.shape[1:]) < 3:
        raise ValueError(f"noise_std expects a 2-D image or a 3-D stack of slices >= 3x3, got {img.shape}")
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)
    total = sum(np.abs(ndimage.correlate(s, kernel)[1:-1, 1:-1]).sum() for s in slices)
    n = slices.shape[0] * (slices.shape[1] - 2) * (slices.shape[2] - 2)
    return float(np.sqrt(np.pi / 2.0) * total / (6.0 * n))


def image_metrics(
    pred_hu: np.ndarray,
    ref_hu: np.ndarray,
    window: tuple[float, float],
    mask: np.ndarray | None = None,
    lpips_model=None,
) -> dict:
    """PSNR/SSIM on the windowed [0, 1] images, MAE in HU on unclipped values, LPIPS (unmasked, per slice for
    volumes) when a model is given; `convention` says how, so every report can carry it."""
    pred01, ref01 = to_unit_window(pred_hu, window), to_unit_window(ref_hu, window)
    out = {
        "psnr_db": psnr(pred01, ref01, 1.0, mask),
        "ssim": ssim(pred01, ref01, 1.0, mask),
        "mae_hu": mae(pred_hu, ref_hu, mask),
        "convention": f"{convention(window, mask is not None)}, {ssim_convention(pred01.shape)}",
    }
    if lpips_model is not None:
        import torch

        from common.perceptual import lpips_distance

        to_batch = (lambda a: torch.from_numpy(a)[:, None]) if pred01.ndim == 3 else torch.from_numpy
        out["lpips"] = lpips_distance(lpips_model, to_batch(pred01), to_batch(ref01))
        out["convention"] += ", LPIPS on the whole windowed image"
    return out
