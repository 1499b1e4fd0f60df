import numpy as np

from common import synthetic


def test_phantom_is_hu_and_reproducible():
    a = synthetic.ct_phantom(96, np.random.default_rng(4))
    b = synthetic.ct_phantom(96, np.random.default_rng(4))
    assert a.dtype == np.float32 and a.shape == (96, 96) and np.array_equal(a, b)
    assert a.min() == -1000 and a.max() > 300  # air outside, bone inside
    assert (a > -500).mean() > 0.25
    assert synthetic.ct_phantom((64, 80), np.random.default_rng(0)).shape == (64, 80)


def test_volume_and_mammogram():
    vol = synthetic.ct_phantom_volume((16, 48, 48), np.random.default_rng(0))
    assert vol.shape == (16, 48, 48) and vol.dtype == np.float32
    assert not np.array_equal(vol[0], vol[8])  # structure changes along z
    mg = synthetic.mammogram((128, 96), np.random.default_rng(0), bits_stored=14)
    assert mg.dtype == np.uint16 and mg.max() <= 2**14 - 1 and mg.max() > 2**13
    assert mg[:, -1].max() == 0 and 0.2 < (mg > 0).mean() < 0.8  # background, breast against the left edge
