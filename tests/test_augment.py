import numpy as np
import pytest
from scipy import ndimage

from common import augment, metrics, synthetic


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    full_a, full_b = synthetic.ct_phantom(48, rng), synthetic.ct_phantom(48, rng)
    low_a = full_a + rng.normal(0, 40, full_a.shape).astype(np.float32)
    low_b = full_b + rng.normal(0, 40, full_b.shape).astype(np.float32)
    return (low_a, full_a), (low_b, full_b)


def _same_draws(seed):
    return np.random.default_rng(seed), np.random.default_rng(seed)


def _check(pair, shape):
    for img in pair:
        assert img.dtype == np.float32 and img.shape == shape


def test_mixup_is_one_convex_combination(pairs):
    a, b = pairs
    rng, replay = _same_draws(1)
    low, full = augment.mixup(a, b, rng)
    lam = np.float32(replay.uniform(0.3, 0.7))
    _check((low, full), a[0].shape)
    np.testing.assert_allclose(low, lam * a[0] + (1 - lam) * b[0], rtol=1e-6)
    np.testing.assert_allclose(full, lam * a[1] + (1 - lam) * b[1], rtol=1e-6)
    # the same lam in both images: solve it back from each image independently
    lam_low = np.median((low - b[0])[a[0] != b[0]] / (a[0] - b[0])[a[0] != b[0]])
    lam_full = np.median((full - b[1])[a[1] != b[1]] / (a[1] - b[1])[a[1] != b[1]])
    assert lam_low == pytest.approx(lam_full, abs=1e-4) and 0.3 <= lam_low <= 0.7


@pytest.mark.parametrize("shape", [(48, 48), (12, 20, 16)])
def test_patchmix_replaces_the_same_box_in_both_images(shape):
    rng = np.random.default_rng(2)
    a = (rng.random(shape, dtype=np.float32), rng.random(shape, dtype=np.float32))
    b = (rng.random(shape, dtype=np.float32) + 2, rng.random(shape, dtype=np.float32) + 2)
    low, full = augment.patchmix(a, b, rng)
    _check((low, full), shape)
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
    a, _ = pairs
    rng, replay = _same_draws(3)
    low, full = augment.scale_bias_jitter(a, rng)
    alpha, beta = replay.uniform(0.95, 1.05), replay.uniform(-20, 20)
    _check((low, full), a[0].shape)
    np.testing.assert_allclose(low, alpha * a[0] + beta, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(full, alpha * a[1] + beta, rtol=1e-5, atol=1e-3)


def test_gamma_jitter_changes_only_the_input_inside_the_window(pairs):
    a, _ = pairs
    window = (-160.0, 240.0)
    rng, replay = _same_draws(4)
    low, full = augment.gamma_jitter(a, rng, window)
    gamma = replay.uniform(0.8, 1.2)
    _check((low, full), a[0].shape)
    np.testing.assert_array_equal(full, a[1])
    inside = (a[0] >= -160) & (a[0] <= 240)
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(low[~inside], a[0][~inside])
    unit = metrics.to_unit_window(low, window)[inside]
    np.testing.assert_allclose(unit, metrics.to_unit_window(a[0], window)[inside] ** gamma, atol=1e-5)
    order = np.argsort(a[0].ravel())
    assert np.all(np.diff(low.ravel()[order]) >= -1e-3)  # monotone: no values swap order


def test_histogram_match_takes_reference_distribution(pairs):
    (low, _), (reference, _) = pairs
    reference = 0.8 * reference + 100  # another scanner's calibration
    matched = augment.histogram_match(low, reference)
    assert matched.dtype == np.float32 and matched.shape == low.shape
    q = np.linspace(0.02, 0.98, 25)
    np.testing.assert_allclose(np.quantile(matched, q), np.quantile(reference, q), atol=1.0)
    assert np.abs(np.quantile(low, q) - np.quantile(reference, q)).max() > 100  # it did have to move
    # ranks of the low-dose image are kept (it is a monotone remapping)
    assert (
        np.corrcoef(np.argsort(np.argsort(matched.ravel())), np.argsort(np.argsort(low.ravel())))[0, 1] > 0.99
    )


def test_physics_noise_inserts_only_the_missing_dose_noise():
    rng = np.random.default_rng(5)
    full = synthetic.ct_phantom(96, rng)
    inner = ndimage.binary_erosion(metrics.body_mask(full), iterations=3)
    added = {d: augment.physics_noise(full, rng, (d, d)) - full for d in (0.25, 0.5)}
    for d, noise in added.items():
        assert noise.dtype == np.float32
        # a routine-dose image already has ~20 HU; dose d needs 20 / sqrt(d) in all: 20 sqrt(1/d - 1) more
        assert noise[inner].std() == pytest.approx(20 * np.sqrt(1 / d - 1), rel=0.2)
        assert abs(noise[inner].mean()) < 3.0  # noise only: no blur or bias relative to the target
    ratio = added[0.25][inner].std() / added[0.5][inner].std()
    assert ratio == pytest.approx(np.sqrt(3), rel=0.1)  # adding the full s^2/d instead would give sqrt(2)


def test_physics_noise_shapes_and_dose_range():
    rng = np.random.default_rng(6)
    full = synthetic.ct_phantom(48, rng)[:, :40]
    low = augment.physics_noise(full, rng)
    assert low.shape == full.shape and low.dtype == np.float32 and not np.array_equal(low, full)
    volume = np.stack([full, full])
    low3 = augment.physics_noise(volume, rng)
    assert low3.shape == volume.shape and not np.array_equal(low3[0], low3[1])
    air = np.full((32, 32), -1000.0, np.float32)
    np.testing.assert_array_equal(augment.physics_noise(air, rng), air)
    with pytest.raises(ValueError, match="dose_range"):
        augment.physics_noise(full, rng, (0.5, 1.0))


def test_pair_shape_mismatch_is_refused(pairs):
    a, _ = pairs
    with pytest.raises(ValueError):
        augment.mixup(a, (a[0][:10], a[1][:10]), np.random.default_rng(0))
    with pytest.raises(ValueError):
        augment.scale_bias_jitter((a[0], a[1][:10]), np.random.default_rng(0))
