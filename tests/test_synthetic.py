import numpy as np
import pytest

from common import synthetic


def test_phantom_is_hu_and_reproducible():
    a = synthetic.ct_phantom(96, np.random.default_rng(4))
    b = synthetic.ct_phantom(96, np.random.default_rng(4))
    assert a.dtype == np.float32 and a.shape == (96, 96) and np.array_equal(a, b)
    assert a.min() == -1000 and a.max() > 300  # air outside, bone inside
    assert (a > -500).mean() > 0.25
    assert synthetic.ct_phantom((64, 80), np.random.default_rng(0)).shape == (64, 80)


def test_projection_noise_grows_as_dose_falls():
    hu = synthetic.ct_phantom(96, np.random.default_rng(0))
    body = hu > -500
    stds = []
    for dose in (1.0, 0.25, 0.05):
        low, full = synthetic.simulate_low_dose_ct(hu, dose, np.random.default_rng(1))
        stds.append(float((low - full)[body].std()))
    assert stds[0] < stds[1] < stds[2]
    assert 14 < stds[0] < 28  # calibrated to ~20 HU at full dose (routine dose)
    assert stds[1] / stds[0] == pytest.approx(2.0, rel=0.3)  # quarter dose: ~2x the noise


def test_full_dose_target_is_noise_free_fbp_of_the_phantom():
    hu = synthetic.ct_phantom(96, np.random.default_rng(2))
    _, full = synthetic.simulate_low_dose_ct(hu, 0.25, np.random.default_rng(3))
    body = hu > -500
    assert np.median(np.abs(full - hu)[body]) < 15  # same image, only reconstruction blur
    _, full2 = synthetic.simulate_low_dose_ct(hu, 0.1, np.random.default_rng(9))
    assert np.allclose(full, full2)  # target does not depend on the dose or the noise draw


def test_image_domain_poisson_noise_level():
    hu = np.full((128, 128), 40.0, np.float32)
    for dose, expected in ((1.0, 20.0), (0.25, 40.0)):
        noisy = synthetic.image_domain_poisson(hu, dose, np.random.default_rng(0))
        assert noisy.std() == pytest.approx(expected, rel=0.1)
        assert abs(noisy.mean() - 40.0) < 3


def test_volume_and_mammogram():
    vol = synthetic.ct_phantom_volume((16, 48, 48), np.random.default_rng(0))
    assert vol.shape == (16, 48, 48) and vol.dtype == np.float32
    assert not np.array_equal(vol[0], vol[8])  # structure changes along z
    mg = synthetic.mammogram((128, 96), np.random.default_rng(0), bits_stored=14)
    assert mg.dtype == np.uint16 and mg.max() <= 2**14 - 1 and mg.max() > 2**13
    assert mg[:, -1].max() == 0 and 0.2 < (mg > 0).mean() < 0.8  # background, breast against the left edge


def test_air_only_slice_gets_a_sane_photon_count():
    air = np.full((48, 48), -1000.0, np.float32)
    low, full = synthetic.simulate_low_dose_ct(air, 0.25, np.random.default_rng(0))
    assert np.isfinite(low).all() and (low - full).std() < 100  # calibrated on a water disk, not on nothing
