"""Stage 7's augmentations of ldct_denoise.py (`augment_pair`), one at a time: each keeps the pair aligned and
does what seed 000 asks for."""

import numpy as np
import pytest

import ldct_denoise as ld
from common import metrics, synthetic

WINDOW = (-160.0, 240.0)
NAMES = ("physics_noise", "image_poisson", "gamma", "scale_bias", "histogram_match", "mixup", "patchmix")


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    full_a, full_b = synthetic.ct_phantom(48, rng), synthetic.ct_phantom(48, rng)
    low_a = full_a + rng.normal(0, 40, full_a.shape).astype(np.float32)
    low_b = full_b + rng.normal(0, 40, full_b.shape).astype(np.float32)
    return (low_a, full_a), (low_b, full_b)


def only(name: str) -> ld.UpgradeConfig:
    """An UpgradeConfig that applies exactly one augmentation."""
    a = ld.UpgradeConfig()
    for other in NAMES:
        setattr(a, f"p_{other}", 1.0 if other == name else 0.0)
    return a


def augment(name, a_pair, b_pair, seed=0):
    low, full = ld.augment_pair(
        *a_pair, 0.25, np.random.default_rng(seed), lambda: b_pair, only(name), WINDOW
    )
    assert low.dtype == np.float32 and full.dtype == np.float32
    assert low.shape == full.shape == a_pair[0].shape
    return low, full


def test_mixup_is_one_convex_combination(pairs):
    a, b = pairs
    low, full = augment("mixup", a, b)
    # the same lam in both images: solve it back from each image independently
    lam_low = np.median((low - b[0])[a[0] != b[0]] / (a[0] - b[0])[a[0] != b[0]])
    lam_full = np.median((full - b[1])[a[1] != b[1]] / (a[1] - b[1])[a[1] != b[1]])
    assert lam_low == pytest.approx(lam_full, abs=1e-4) and 0.3 <= lam_low <= 0.7
    np.testing.assert_allclose(low, lam_low * a[0] + (1 - lam_low) * b[0], rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("shape", [(48, 48), (12, 20, 16)])
def test_patchmix_replaces_the_same_box_in_both_images(shape):
    rng = np.random.default_rng(2)
    a = (rng.random(shape, dtype=np.float32), rng.random(shape, dtype=np.float32))
    b = (rng.random(shape, dtype=np.float32) + 2, rng.random(shape, dtype=np.float32) + 2)
    low, full = augment("patchmix", a, b)
    from_b_low, from_b_full = low >= 2, full >= 2
    np.testing.assert_array_equal(from_b_low, from_b_full)
    np.testing.assert_array_equal(low[from_b_low], b[0][from_b_low])
    np.testing.assert_array_equal(full[~from_b_full], a[1][~from_b_full])
    coords = np.argwhere(from_b_low)
    lo, hi = coords.min(0), coords.max(0) + 1
    assert from_b_low.sum() == np.prod(hi - lo)  # one box
    fractions = (hi - lo) / np.array(shape)
    assert np.all(fractions >= 0.2) and np.all(fractions <= 0.55)
    assert a[0].max() < 2  # inputs untouched


def test_scale_bias_jitter_same_alpha_beta_on_both(pairs):
    a, b = pairs
    low, full = augment("scale_bias", a, b)
    alpha, beta = np.polyfit(a[1].ravel(), full.ravel(), 1)
    assert 0.95 <= alpha <= 1.05 and -20 <= beta <= 20 and abs(alpha - 1) + abs(beta) > 1e-3
    np.testing.assert_allclose(low, alpha * a[0] + beta, rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(full, alpha * a[1] + beta, rtol=1e-5, atol=1e-2)


def test_gamma_jitter_changes_only_the_input_inside_the_window(pairs):
    a, b = pairs
    low, full = augment("gamma", a, b)
    np.testing.assert_array_equal(full, a[1])
    inside = (a[0] >= -160) & (a[0] <= 240)
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(low[~inside], a[0][~inside])
    unit, before = metrics.to_unit_window(low, WINDOW)[inside], metrics.to_unit_window(a[0], WINDOW)[inside]
    middle = (before > 0.05) & (before < 0.95)
    gamma = np.median(np.log(unit[middle]) / np.log(before[middle]))
    assert 0.8 <= gamma <= 1.2
    np.testing.assert_allclose(unit, before**gamma, atol=1e-4)
    order = np.argsort(a[0].ravel())
    assert np.all(np.diff(low.ravel()[order]) >= -1e-3)  # monotone: no values swap order


def test_histogram_match_takes_reference_distribution(pairs):
    (low, full), (reference, _) = pairs
    reference = 0.8 * reference + 100  # another scanner's calibration
    matched, target = augment("histogram_match", (low, full), (None, reference))
    np.testing.assert_array_equal(target, full)
    q = np.linspace(0.02, 0.98, 25)
    np.testing.assert_allclose(np.quantile(matched, q), np.quantile(reference, q), atol=1.0)
    assert np.abs(np.quantile(low, q) - np.quantile(reference, q)).max() > 100  # it did have to move
    # ranks of the low-dose image are kept (it is a monotone remapping)
    ranks = np.corrcoef(np.argsort(np.argsort(matched.ravel())), np.argsort(np.argsort(low.ravel())))
    assert ranks[0, 1] > 0.99


def test_image_domain_poisson_noise_grows_as_the_dose_falls():
    full = np.full((64, 64), 40.0, np.float32)
    stds = [ld.image_poisson(full, dose, np.random.default_rng(0)).std() for dose in (1.0, 0.25)]
    assert stds[0] == pytest.approx(20.0, rel=0.1)  # soft tissue at full dose: 20 HU
    assert stds[1] / stds[0] == pytest.approx(2.0, rel=0.1)  # variance ~ 1 / dose
    low, full_out = augment("image_poisson", (full + 1, full), (full, full))
    np.testing.assert_array_equal(full_out, full)
    assert low.std() > stds[0]  # a dose in dose_range (0.1-0.5): noisier than the full dose
