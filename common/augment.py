"""Augmentations for (low_dose, full_dose) pairs in HU, applied before normalisation.

A pair is a tuple of same-shape float32 arrays. Every function returns a new pair whose two images stay
aligned: geometric/mixing operations act identically on both, intensity jitter is either shared or touches
only the input (so the target keeps its meaning). Random draws come only from the `rng` argument.
"""

from __future__ import annotations

import numpy as np
from skimage.exposure import match_histograms

from common.synthetic import simulate_low_dose_ct

Pair = tuple[np.ndarray, np.ndarray]


def _check_pair(pair: Pair) -> Pair:
    low, full = pair
    if np.shape(low) != np.shape(full):
        raise ValueError(f"pair images differ in shape: {np.shape(low)} vs {np.shape(full)}")
    return np.asarray(low, np.float32), np.asarray(full, np.float32)


def physics_noise(
    full_dose_hu: np.ndarray, rng: np.random.Generator, dose_range: tuple[float, float] = (0.1, 0.5)
) -> np.ndarray:
    """A new low-dose input for `full_dose_hu` at a dose fraction drawn from `dose_range` (of the full dose).

    The noise comes from the projection-domain simulator (Poisson + electronic noise, FBP texture). A
    routine-dose image already carries the full-dose noise (variance s^2), and a dose fraction d has variance
    s^2/d, so only the missing s^2 (1/d - 1) is inserted: the simulator runs at dose d / (1 - d). Only the
    simulated noise (low minus the noise-free reconstruction) is added, so the input keeps the target's
    sharpness and alignment. 3-D input: each slice gets its own noise at one shared dose. Non-square slices
    are edge-padded to square. Cost grows ~ n^3 with the side n (0.05 s at 64, 0.5 s at 128, 5 s at 256 on one
    core): use it on crops. A slice with no tissue (nothing > -500 HU) is returned unchanged: the simulator
    calibrates its photon count on tissue and would otherwise give hundreds of HU of noise in pure air.
    """
    lo, hi = dose_range
    if not 0 < lo <= hi < 1:
        raise ValueError(
            f"dose_range must satisfy 0 < lo <= hi < 1 (fractions of the full dose), got {dose_range}"
        )
    hu = np.asarray(full_dose_hu, np.float32)
    if hu.ndim == 3:
        dose = float(rng.uniform(lo, hi))
        return np.stack([physics_noise(s, rng, (dose, dose)) for s in hu])
    if hu.ndim != 2:
        raise ValueError(f"physics_noise expects a 2-D slice or a 3-D stack, got shape {hu.shape}")
    dose = float(rng.uniform(lo, hi))
    if not (hu > -500).any():
        return hu.copy()
    size = max(hu.shape)
    square = np.pad(hu, [(0, size - hu.shape[0]), (0, size - hu.shape[1])], mode="edge")
    low_sim, clean_sim = simulate_low_dose_ct(square, dose / (1.0 - dose), rng)
    noise = (low_sim - clean_sim)[: hu.shape[0], : hu.shape[1]]
    return (hu + noise).astype(np.float32)


def gamma_jitter(
    pair: Pair,
    rng: np.random.Generator,
    window: tuple[float, float],
    gamma_range: tuple[float, float] = (0.8, 1.2),
) -> Pair:
    """Gamma curve on the low-dose image inside `window` (mapped to [0, 1]); HU outside the window are kept,
    so the curve is continuous and monotone and bone/air values are not clipped. The target is unchanged."""
    low, full = _check_pair(pair)
    lo, hi = float(window[0]), float(window[1])
    gamma = rng.uniform(*gamma_range)
    inside = (low >= lo) & (low <= hi)
    out = low.copy()
    out[inside] = lo + ((low[inside] - lo) / (hi - lo)) ** gamma * (hi - lo)
    return out.astype(np.float32), full


def scale_bias_jitter(
    pair: Pair,
    rng: np.random.Generator,
    scale_range: tuple[float, float] = (0.95, 1.05),
    bias_range_hu: tuple[float, float] = (-20.0, 20.0),
) -> Pair:
    """The same HU -> alpha * HU + beta on both images (calibration differences between scanners)."""
    low, full = _check_pair(pair)
    alpha, beta = rng.uniform(*scale_range), rng.uniform(*bias_range_hu)
    return (alpha * low + beta).astype(np.float32), (alpha * full + beta).astype(np.float32)


def histogram_match(low_dose: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`low_dose` with its grey-level histogram matched to `reference` (e.g. another scanner's images)."""
    return match_histograms(np.asarray(low_dose, np.float32), np.asarray(reference, np.float32)).astype(
        np.float32
    )


def mixup(
    pair_a: Pair, pair_b: Pair, rng: np.random.Generator, lam_range: tuple[float, float] = (0.3, 0.7)
) -> Pair:
    """lam * a + (1 - lam) * b with ONE lam for input and target: the mixed target is the mixed input's."""
    (a_low, a_full), (b_low, b_full) = _check_pair(pair_a), _check_pair(pair_b)
    if a_low.shape != b_low.shape:
        raise ValueError(f"mixup pairs differ in shape: {a_low.shape} vs {b_low.shape}")
    lam = np.float32(rng.uniform(*lam_range))
    return lam * a_low + (1 - lam) * b_low, lam * a_full + (1 - lam) * b_full


def patchmix(
    pair_a: Pair, pair_b: Pair, rng: np.random.Generator, side_range: tuple[float, float] = (0.25, 0.5)
) -> Pair:
    """Pair a with one random box (each side a fraction in `side_range` of the image) taken from pair b, the
    same box in input and target (CutMix for restoration: b's target stays b's target inside the box)."""
    (a_low, a_full), (b_low, b_full) = _check_pair(pair_a), _check_pair(pair_b)
    if a_low.shape != b_low.shape:
        raise ValueError(f"patchmix pairs differ in shape: {a_low.shape} vs {b_low.shape}")
    box = []
    for n in a_low.shape:
        side = max(1, int(round(n * rng.uniform(*side_range))))
        start = int(rng.integers(0, n - side + 1))
        box.append(slice(start, start + side))
    box = tuple(box)
    low, full = a_low.copy(), a_full.copy()
    low[box], full[box] = b_low[box], b_full[box]
    return low, full
