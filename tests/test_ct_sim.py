"""The torch dose simulator (common/ct_sim.py) against skimage's radon/iradon and against analytic facts."""

import math

import numpy as np
import pytest
import torch
from skimage.transform import iradon, radon

from common import ct_sim, synthetic


def water_cylinder(n: int, pixel_mm: float, diameter_mm: float) -> np.ndarray:
    r = (np.arange(n) - (n - 1) / 2) * pixel_mm
    inside = np.hypot(r[:, None], r[None, :]) <= diameter_mm / 2
    return np.where(inside, 0.0, -1000.0).astype(np.float32)


def skimage_low_dose(hu: np.ndarray, pixel_mm: float, i0: float, electronic_std: float, rng) -> np.ndarray:
    """The project's earlier projection-domain path (skimage) at a fixed photon count: radon,
    Poisson + electronic noise, log, Shepp-Logan FBP with linear interpolation."""
    n = hu.shape[0]
    theta = np.linspace(0.0, 180.0, math.ceil(math.pi / 2 * n), endpoint=False)
    mu = np.clip(ct_sim.MU_WATER_PER_MM * (1 + hu / 1000), 0, None)
    integrals = radon(mu, theta=theta, circle=False) * pixel_mm
    counts = rng.poisson(i0 * np.exp(-integrals)) + rng.normal(0, electronic_std, integrals.shape)
    noisy = -np.log(np.clip(counts, 1, None) / i0)
    recon = iradon(noisy, theta=theta, output_size=n, filter_name="shepp-logan", circle=False) / pixel_mm
    return (recon / ct_sim.MU_WATER_PER_MM - 1) * 1000


def test_parallel_beam_matches_the_skimage_path():
    n, pixel = 96, 360 / 96
    hu = synthetic.ct_phantom(n, np.random.default_rng(0))
    inner = water_cylinder(n, pixel, 200) > -500  # well inside the body: no edge blur in the noise estimate
    sim = ct_sim.Simulator((n, n), (pixel, pixel), ct_sim.parallel_geometry())
    integrals = sim.project(torch.from_numpy(hu)[None])
    clean = sim.reconstruct_hu(integrals)[0].numpy()
    ref_clean = skimage_low_dose(hu, pixel, 1e12, 0.0, np.random.default_rng(1))
    ours_error, ref_error = (np.median(np.abs(x - hu)[inner]) for x in (clean, ref_clean))
    assert ours_error < 8 and ours_error < 1.1 * ref_error  # the phantom back, as closely as skimage's path
    ours, ref = [], []
    for k in range(3):
        gen = torch.Generator().manual_seed(k)
        ours.append(hu + sim.noise_hu(integrals, 2e4, 5.0, gen)[0].numpy())
        ref.append(skimage_low_dose(hu, pixel, 2e4, 5.0, np.random.default_rng(k)))
    ours, ref = np.stack(ours), np.stack(ref)
    assert abs(ours[:, inner].mean() - ref[:, inner].mean()) < 3  # same mean (HU)
    std_ours = (ours - hu)[:, inner].std()
    std_ref = (ref - ref_clean)[:, inner].std()
    assert std_ours == pytest.approx(std_ref, rel=0.1)  # noise std within 10 %


def test_noise_variance_goes_as_one_over_dose():
    n, pixel = 96, 3.0
    hu = water_cylinder(n, pixel, 240)
    inside = water_cylinder(n, pixel, 200) > -500
    sim = ct_sim.Simulator((n, n), (pixel, pixel))
    integrals = sim.project(torch.from_numpy(hu)[None], coarse=4)  # the noise model needs counts, not detail
    variance = {}
    for dose in (0.5, 0.25, 0.125):
        noise = sim.noise_hu(integrals.expand(4, -1, -1), 2e5 * dose, 0.0, torch.Generator().manual_seed(0))
        variance[dose] = float(noise[:, torch.from_numpy(inside)].var())
    for dose in (0.25, 0.125):
        assert variance[dose] * dose == pytest.approx(variance[0.5] * 0.5, rel=0.1)


def test_fan_beam_water_cylinder_noise_grows_towards_the_centre():
    n, pixel = 128, 2.5
    hu = water_cylinder(n, pixel, 300)
    sim = ct_sim.Simulator((n, n), (pixel, pixel), ct_sim.Geometry(bowtie=0.5))
    assert sim.geometry.sid_mm == 595 and sim.geometry.channels == 736 and sim.geometry.views == 1152
    integrals = sim.project(torch.from_numpy(hu)[None], coarse=4)
    noise = sim.noise_hu(integrals.expand(4, -1, -1), 1e5, 10.0, torch.Generator().manual_seed(0)).numpy()
    r = (np.arange(n) - (n - 1) / 2) * pixel
    radius = np.hypot(r[:, None], r[None, :])
    centre, rim = noise[:, radius < 40].std(), noise[:, (radius > 110) & (radius < 140)].std()
    assert centre > 1.2 * rim


def test_pixel_spacing_sets_the_physical_size():
    """A 200 mm water cylinder: the central line integral is 200 mm x mu_water at any pixel size."""
    for n, pixel in ((64, 4.0), (128, 2.0), (80, 3.2)):
        hu = water_cylinder(n, pixel, 200)
        sim = ct_sim.Simulator((n, n), (pixel, pixel))
        integrals = sim.project(torch.from_numpy(hu)[None])
        assert float(integrals.max()) == pytest.approx(200 * ct_sim.MU_WATER_PER_MM, rel=0.02)
        recon = sim.reconstruct_hu(integrals)[0].numpy()
        assert abs(float(np.median(recon[hu > -500]))) < 10  # water reconstructs to ~0 HU


def test_filters_trade_noise_for_sharpness_and_batches_equal_single_slices():
    n, pixel = 64, 4.0
    hu = water_cylinder(n, pixel, 200)
    inside = torch.from_numpy(hu > -500)
    stds = {}
    for name in ("ram-lak", "shepp-logan", "hann"):
        sim = ct_sim.Simulator((n, n), (pixel, pixel), ct_sim.parallel_geometry(filter=name))
        integrals = sim.project(torch.from_numpy(hu)[None])
        stds[name] = float(
            sim.noise_hu(integrals, 1e4, 0.0, torch.Generator().manual_seed(0))[0][inside].std()
        )
    assert stds["ram-lak"] > stds["shepp-logan"] > stds["hann"]
    with pytest.raises(ValueError, match="filter"):
        ct_sim.Simulator((n, n), (pixel, pixel), ct_sim.parallel_geometry(filter="butterworth"))
    sim = ct_sim.Simulator((n, n), (pixel, pixel))
    pair = torch.from_numpy(np.stack([hu, synthetic.ct_phantom(n, np.random.default_rng(1))]))
    both = sim.fbp(sim.project(pair))
    one = sim.fbp(sim.project(pair[1:]))
    assert torch.allclose(both[1:], one, atol=1e-5)
