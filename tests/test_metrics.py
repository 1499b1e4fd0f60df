import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from common import metrics


def _smooth(shape, rng):
    """Structured image in [0, 1]: smooth blobs plus noise, so SSIM is far from 0 and 1."""
    from scipy import ndimage

    x = ndimage.gaussian_filter(rng.random(shape), 3)
    x = (x - x.min()) / (x.max() - x.min())
    return x


@pytest.mark.parametrize("shape", [(48, 40), (16, 24, 20)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unmasked_agrees_with_skimage(shape, dtype):
    rng = np.random.default_rng(0)
    ref = _smooth(shape, rng).astype(dtype)
    pred = np.clip(ref + rng.normal(0, 0.1, shape), 0, 1).astype(dtype)
    assert metrics.psnr(pred, ref, 1.0) == pytest.approx(
        peak_signal_noise_ratio(ref, pred, data_range=1.0), abs=1e-4
    )
    expected = structural_similarity(
        ref, pred, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert metrics.ssim(pred, ref, 1.0) == pytest.approx(expected, abs=1e-4)
    assert 0.1 < expected < 0.95  # a meaningful comparison, not two saturated values
    assert metrics.mae(pred, ref) == pytest.approx(np.abs(pred.astype(float) - ref).mean(), rel=1e-9)


def test_ssim_with_hu_data_range_agrees_with_skimage():
    rng = np.random.default_rng(1)
    ref = (_smooth((40, 40), rng) * 400 - 160).astype(np.float32)
    pred = ref + rng.normal(0, 30, ref.shape).astype(np.float32)
    expected = structural_similarity(
        ref, pred, data_range=400.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert metrics.ssim(pred, ref, 400.0) == pytest.approx(expected, abs=1e-4)


def test_short_volume_ssim_is_2d_per_slice_and_says_so():
    """A 6-slice volume cannot hold the 11-px 3-D window: SSIM is the mean of skimage's 2-D SSIM per slice."""
    rng = np.random.default_rng(6)
    ref = _smooth((6, 40, 36), rng)
    pred = np.clip(ref + rng.normal(0, 0.08, ref.shape), 0, 1)
    per_slice = [
        structural_similarity(
            r, p, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        for r, p in zip(ref, pred)
    ]
    assert metrics.ssim(pred, ref, 1.0) == pytest.approx(np.mean(per_slice), abs=1e-4)
    assert "2-D per slice" in metrics.ssim_convention(ref.shape) and "6 slices" in metrics.ssim_convention(
        ref.shape
    )
    assert metrics.ssim_convention((16, 24, 20)) == "SSIM 3-D, 11-px window"
    mask = np.zeros(ref.shape, bool)
    mask[:, 10:30, 10:30] = True
    assert metrics.ssim(pred, ref, 1.0, mask) == pytest.approx(metrics.ssim_map(pred, ref, 1.0)[mask].mean())
    hu = ref * 400 - 160
    out = metrics.image_metrics(hu, hu + 10 * rng.normal(size=hu.shape), (-160, 240), metrics.body_mask(hu))
    assert "2-D per slice" in out["convention"] and 0 < out["ssim"] < 1


@pytest.mark.parametrize("shape, window", [((7, 30), "7-px"), ((4, 9, 30), "9-px"), ((3, 3), "3-px")])
def test_small_images_get_a_smaller_window_and_say_so(shape, window):
    rng = np.random.default_rng(7)
    ref = rng.random(shape)
    assert window in metrics.ssim_convention(shape) and "too small" in metrics.ssim_convention(shape)
    assert metrics.ssim(ref, ref, 1.0) == pytest.approx(1.0)
    assert 0 < metrics.ssim(np.clip(ref + 0.1 * rng.normal(size=shape), 0, 1), ref, 1.0) < 1


def test_ssim_too_small_image_is_refused():
    for shape in [(2, 30), (5, 30, 2)]:
        with pytest.raises(ValueError, match="at least 3 pixels"):
            metrics.ssim(np.zeros(shape), np.zeros(shape), 1.0)


def test_masked_metrics_ignore_pixels_outside_the_mask():
    rng = np.random.default_rng(2)
    ref = _smooth((64, 64), rng)
    pred = np.clip(ref + rng.normal(0, 0.05, ref.shape), 0, 1)
    mask = np.zeros(ref.shape, bool)
    mask[10:30, 12:40] = True
    corrupted = pred.copy()
    corrupted[40:, :] = 1.0 - corrupted[40:, :]  # > SSIM radius away from the mask
    for fn in (metrics.psnr, metrics.ssim):
        assert fn(corrupted, ref, 1.0, mask) == pytest.approx(fn(pred, ref, 1.0, mask), abs=1e-12)
        assert fn(corrupted, ref, 1.0) < fn(pred, ref, 1.0) - 0.01
    assert metrics.mae(corrupted, ref, mask) == pytest.approx(np.abs(pred - ref)[mask].mean())
    mse = ((pred - ref)[mask] ** 2).mean()
    assert metrics.psnr(pred, ref, 1.0, mask) == pytest.approx(10 * np.log10(1 / mse))
    s_map = metrics.ssim_map(pred, ref, 1.0)
    assert metrics.ssim(pred, ref, 1.0, mask) == pytest.approx(s_map[mask].mean())
    with pytest.raises(ValueError, match="empty"):
        metrics.ssim(pred, ref, 1.0, np.zeros(ref.shape, bool))


def test_masked_3d_ssim_averages_the_map_inside_the_mask():
    rng = np.random.default_rng(3)
    ref = _smooth((14, 24, 24), rng)
    pred = np.clip(ref + rng.normal(0, 0.05, ref.shape), 0, 1)
    mask = np.zeros(ref.shape, bool)
    mask[5:9, 6:18, 6:18] = True
    assert metrics.ssim(pred, ref, 1.0, mask) == pytest.approx(metrics.ssim_map(pred, ref, 1.0)[mask].mean())


def test_window_and_body_mask():
    hu = np.array([[-1000.0, -160.0, 40.0], [240.0, 1000.0, -600.0]], np.float32)
    unit = metrics.to_unit_window(hu, (-160, 240))
    np.testing.assert_allclose(unit, [[0, 0, 0.5], [1, 1, 0]])
    assert unit.dtype == np.float32
    np.testing.assert_array_equal(metrics.body_mask(hu), [[False, True, True], [True, True, False]])
    with pytest.raises(ValueError):
        metrics.to_unit_window(hu, (240, -160))


def test_image_metrics_keys_values_and_convention():
    rng = np.random.default_rng(4)
    ref = (_smooth((48, 48), rng) * 1200 - 1000).astype(np.float32)
    pred = ref + rng.normal(0, 20, ref.shape).astype(np.float32)
    window = (-160, 240)
    out = metrics.image_metrics(pred, ref, window)
    assert set(out) == {"psnr_db", "ssim", "mae_hu", "convention"}
    assert out["convention"] == (
        "window [-160, 240] HU -> [0,1], data_range 1, SSIM gaussian sigma 1.5, SSIM 2-D, 11-px window"
    )
    p01, r01 = metrics.to_unit_window(pred, window), metrics.to_unit_window(ref, window)
    assert out["psnr_db"] == pytest.approx(peak_signal_noise_ratio(r01, p01, data_range=1.0), abs=1e-4)
    assert out["mae_hu"] == pytest.approx(np.abs(pred - ref).mean(), rel=1e-5)  # unclipped HU
    masked = metrics.image_metrics(pred, ref, window, mask=metrics.body_mask(ref))
    assert "mask" in masked["convention"] and masked["mae_hu"] != out["mae_hu"]


@pytest.mark.parametrize("shape", [(256, 256), (4, 96, 96)])
def test_noise_std_recovers_gaussian_noise(shape):
    rng = np.random.default_rng(5)
    yy, xx = np.meshgrid(np.linspace(0, 1, shape[-2]), np.linspace(0, 1, shape[-1]), indexing="ij")
    clean = np.broadcast_to(0.3 + 0.4 * xx + 0.2 * np.sin(3 * yy), shape)
    for sigma in (0.01, 0.05):
        estimate = metrics.noise_std(clean + rng.normal(0, sigma, shape))
        assert estimate == pytest.approx(sigma, rel=0.1)
    assert metrics.noise_std(clean) < 0.002


images = arrays(
    np.float64,
    st.tuples(st.integers(11, 16), st.integers(11, 16)),
    elements=st.floats(0, 1, allow_nan=False, width=32),
)


@settings(max_examples=40, deadline=None)
@given(images, st.integers(0, 2**32 - 1))
def test_metric_invariants(x, seed):
    rng = np.random.default_rng(seed)
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    assert metrics.psnr(x, x, 1.0) == math.inf
    assert metrics.ssim(x, x, 1.0) == pytest.approx(1.0, abs=1e-9)
    assert metrics.mae(x, x) == 0.0
    assert metrics.psnr(x, y, 1.0) == pytest.approx(metrics.psnr(y, x, 1.0))
    assert metrics.ssim(x, y, 1.0) == pytest.approx(metrics.ssim(y, x, 1.0), abs=1e-12)
    assert metrics.ssim(x, y, 1.0) <= 1.0 + 1e-12
    assert metrics.mae(x, y) >= 0.0 and metrics.mae(x, y) == pytest.approx(metrics.mae(y, x))
    everything = np.ones(x.shape, bool)
    assert metrics.psnr(x, y, 1.0, everything) == pytest.approx(metrics.psnr(x, y, 1.0))
    assert metrics.ssim(x, y, 1.0, everything) == pytest.approx(metrics.ssim(x, y, 1.0), abs=1e-12)
    assert metrics.mae(x, y, everything) == pytest.approx(metrics.mae(x, y))
