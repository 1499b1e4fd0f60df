"""Built-in synthetic data: CT phantoms in HU (2-D and 3-D), projection-domain low-dose CT simulation, the
cheap image-domain Poisson version of seed 000, and synthetic 14-bit mammograms.

Everything takes a `np.random.Generator` so a seed reproduces a data set exactly.
"""

from __future__ import annotations

import numpy as np
from skimage.transform import iradon, radon

MU_WATER_PER_MM = 0.0192  # linear attenuation of water at ~70 keV effective energy

# (HU, relative size) of tissue classes used by the phantoms
TISSUE_HU = {
    "air": -1000.0,
    "lung": -850.0,
    "fat": -100.0,
    "soft": 40.0,
    "liver": 60.0,
    "contrast": 180.0,
    "bone": 700.0,
}


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Coordinates in [-1, 1] along each axis (isotropic phantom space)."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    return np.meshgrid(*axes, indexing="ij")


def _ellipse(y, x, cy, cx, ry, rx, angle):
    c, s = np.cos(angle), np.sin(angle)
    yy, xx = (y - cy), (x - cx)
    u, v = c * xx + s * yy, -s * xx + c * yy
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def ct_phantom(shape: int | tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random axial CT-like slice in HU: body, fat rim, lungs, spine/ribs, organs, vessels with contrast and
    small low-contrast lesions (+5..+20 HU), air outside."""
    if isinstance(shape, int):
        shape = (shape, shape)
    y, x = _grid(shape)
    img = np.full(shape, TISSUE_HU["air"], np.float32)
    body_ry, body_rx = rng.uniform(0.55, 0.75), rng.uniform(0.75, 0.92)
    body_cy = rng.uniform(-0.05, 0.05)
    img[_ellipse(y, x, body_cy, 0, body_ry, body_rx, 0)] = TISSUE_HU["fat"]
    inner = _ellipse(y, x, body_cy, 0, body_ry - 0.06, body_rx - 0.06, 0)
    img[inner] = TISSUE_HU["soft"] + rng.normal(0, 5)
    if rng.random() < 0.6:  # thorax: two lungs
        for side in (-1, 1):
            lung = _ellipse(
                y,
                x,
                body_cy - 0.05,
                side * rng.uniform(0.3, 0.42),
                rng.uniform(0.3, 0.45),
                rng.uniform(0.18, 0.28),
                rng.uniform(-0.3, 0.3),
            )
            img[lung & inner] = TISSUE_HU["lung"] + rng.normal(0, 15)
    else:  # abdomen: liver-like organ and a contrast-filled one
        img[_ellipse(y, x, body_cy - 0.1, -0.3, 0.35, 0.3, 0.3) & inner] = TISSUE_HU["liver"]
        img[_ellipse(y, x, body_cy + 0.05, 0.35, 0.12, 0.1, 0.0) & inner] = TISSUE_HU["contrast"]
    # spine and a few ribs
    img[_ellipse(y, x, body_cy + body_ry - 0.22, 0, 0.1, 0.09, 0)] = TISSUE_HU["bone"] + rng.uniform(
        -100, 200
    )
    img[_ellipse(y, x, body_cy + body_ry - 0.22, 0, 0.05, 0.045, 0)] = 250.0  # marrow
    for _ in range(rng.integers(2, 6)):
        t = rng.uniform(0, 2 * np.pi)
        cy, cx = body_cy + (body_ry - 0.1) * np.sin(t), (body_rx - 0.1) * np.cos(t)
        img[_ellipse(y, x, cy, cx, 0.035, 0.025, t)] = TISSUE_HU["bone"]
    # vessels (contrast) and small low-contrast lesions: the structures a denoiser must not erase
    for _ in range(rng.integers(2, 6)):
        cy, cx = body_cy + rng.uniform(-0.3, 0.3), rng.uniform(-0.5, 0.5)
        r = rng.uniform(0.02, 0.05)
        img[_ellipse(y, x, cy, cx, r, r, 0) & inner] = TISSUE_HU["contrast"] + rng.uniform(-60, 60)
    for _ in range(rng.integers(3, 8)):
        cy, cx = body_cy + rng.uniform(-0.4, 0.4), rng.uniform(-0.6, 0.6)
        r = rng.uniform(0.015, 0.05)
        region = _ellipse(y, x, cy, cx, r, r * rng.uniform(0.7, 1.3), rng.uniform(0, np.pi)) & inner
        img[region] += rng.uniform(5, 20) * rng.choice([-1, 1])
    return img


def ct_phantom_volume(shape_zyx: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """A 3-D CT-like phantom in HU whose structures vary smoothly along z (ellipsoids, tilted vessels,
    spheres): through-plane detail exists, so z super-resolution has something to recover."""
    z, y, x = _grid(shape_zyx)
    vol = np.full(shape_zyx, TISSUE_HU["air"], np.float32)
    body_ry, body_rx = rng.uniform(0.6, 0.75), rng.uniform(0.75, 0.9)
    taper = 1.0 - 0.15 * z**2  # body gets narrower towards the ends
    body = (x / (body_rx * taper)) ** 2 + (y / (body_ry * taper)) ** 2 <= 1
    inner = (x / (body_rx * taper - 0.06)) ** 2 + (y / (body_ry * taper - 0.06)) ** 2 <= 1
    vol[body] = TISSUE_HU["fat"]
    vol[inner] = TISSUE_HU["soft"]
    for side in (-1, 1):  # lungs as ellipsoids that start and end within the volume
        cz = rng.uniform(-0.3, 0.1)
        lung = ((x - side * 0.38) / 0.24) ** 2 + ((y + 0.05) / 0.38) ** 2 + ((z - cz) / 0.7) ** 2 <= 1
        vol[lung & inner] = TISSUE_HU["lung"]
    spine = (x / 0.09) ** 2 + ((y - body_ry + 0.2) / 0.1) ** 2 <= 1
    # vertebrae separated by discs: a periodic structure along z
    discs = np.cos(z * np.pi * rng.uniform(4, 7)) > 0.6
    vol[spine & ~discs] = TISSUE_HU["bone"]
    vol[spine & discs] = 80.0
    for _ in range(rng.integers(3, 7)):  # tilted contrast vessels
        cx, cy = rng.uniform(-0.5, 0.5), rng.uniform(-0.3, 0.3)
        tx, ty = rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4)
        r = rng.uniform(0.03, 0.06)
        vessel = (x - cx - tx * z) ** 2 + (y - cy - ty * z) ** 2 <= r**2
        vol[vessel & inner] = TISSUE_HU["contrast"] + rng.uniform(-50, 80)
    for _ in range(rng.integers(4, 10)):  # lesions: small spheres, some only a few slices thick
        c = rng.uniform(-0.6, 0.6, size=3)
        r = rng.uniform(0.04, 0.12)
        sphere = (z - c[0]) ** 2 + (y - c[1] * 0.6) ** 2 + (x - c[2]) ** 2 <= r**2
        vol[sphere & inner] += rng.uniform(10, 40) * rng.choice([-1, 1])
    return vol


# --- low-dose simulation ---


def _fbp(sinogram: np.ndarray, theta: np.ndarray, size: int) -> np.ndarray:
    # Shepp-Logan filter + nearest-neighbour back-projection: its noise power spectrum matched real scanner
    # noise much better than ramp + linear (DATA_NOTES.md).
    return iradon(
        sinogram,
        theta=theta,
        output_size=size,
        filter_name="shepp-logan",
        interpolation="nearest",
        circle=False,
    ).astype(np.float32)


def simulate_low_dose_ct(
    hu: np.ndarray,
    dose: float,
    rng: np.random.Generator,
    *,
    noise_std_full_hu: float = 20.0,
    electronic_std: float = 5.0,
    n_angles: int | None = None,
    fov_mm: float = 360.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Projection-domain low-dose simulation of one square slice in HU.

    HU -> linear attenuation -> parallel-beam line integrals (radon) -> Beer-Lambert counts with incident
    photons I0 -> Poisson + electronic Gaussian noise -> log -> FBP -> HU. I0 at full dose is set per slice so
    that dose 1 gives about `noise_std_full_hu` of noise in the body (routine dose ~20 HU, quarter dose then
    ~40 HU); `dose` scales I0. Returns (low_dose_hu, full_dose_hu) where full_dose is the noise-free sinogram
    through the SAME FBP, so input and target share the reconstruction blur.
    """
    if hu.ndim != 2 or hu.shape[0] != hu.shape[1]:
        raise ValueError(f"simulate_low_dose_ct expects a square 2-D slice, got shape {hu.shape}")
    if not dose > 0:
        raise ValueError(f"dose must be > 0, got {dose}")
    size = hu.shape[0]
    pixel_mm = fov_mm / size
    n_angles = n_angles or int(np.ceil(np.pi / 2 * size))
    theta = np.linspace(0.0, 180.0, n_angles, endpoint=False)
    mu = np.clip(MU_WATER_PER_MM * (1.0 + hu / 1000.0), 0.0, None)
    line_integrals = radon(mu, theta=theta, circle=False) * pixel_mm
    to_hu = 1000.0 / MU_WATER_PER_MM / pixel_mm  # recon of integrals/pixel_mm is mu; mu -> HU

    def recon_hu(sino: np.ndarray) -> np.ndarray:
        return _fbp(sino, theta, size) * to_hu - 1000.0

    # Calibrate I0 on this slice: with Gaussian-approximated Poisson noise the FBP noise std scales as
    # 1/sqrt(I0), so one reconstruction of unit-I0 noise fixes the I0 that gives the target std (measured
    # inside the body).
    body = hu > -500
    calib_integrals = line_integrals
    if (
        body.mean() < 0.01
    ):  # no tissue to calibrate on (an air crop): calibrate on a water disk of half the FOV
        y, x = np.mgrid[:size, :size] - (size - 1) / 2
        body = np.hypot(y, x) < size / 4
        calib_integrals = radon(np.where(body, MU_WATER_PER_MM, 0.0), theta=theta, circle=False) * pixel_mm
    unit_noise = rng.standard_normal(line_integrals.shape) * np.exp(calib_integrals / 2)
    std_unit = float((_fbp(unit_noise, theta, size) * to_hu)[body].std())
    i0_full = (std_unit / noise_std_full_hu) ** 2
    i0 = i0_full * dose
    counts = rng.poisson(i0 * np.exp(-line_integrals)).astype(np.float64)
    counts += rng.normal(0.0, electronic_std, counts.shape)
    noisy_integrals = -np.log(np.clip(counts, 1.0, None) / i0)
    low = recon_hu(noisy_integrals)
    full = recon_hu(line_integrals)
    return low.astype(np.float32), full.astype(np.float32)


def image_domain_poisson(
    hu: np.ndarray, dose: float, rng: np.random.Generator, *, noise_std_full_hu: float = 20.0
) -> np.ndarray:
    """Seed 000's cheap augmentation, done in HU: map [-1024, 3072] HU to [0, 1] 'intensity', draw Poisson
    counts with N0*dose photons, map back. N0 is set so soft tissue at dose 1 gets `noise_std_full_hu`.
    It is white noise (no FBP texture): an augmentation, not physics."""
    lo, span = -1024.0, 4096.0
    soft = (40.0 - lo) / span
    n0 = soft * (span / noise_std_full_hu) ** 2
    intensity = np.clip((hu - lo) / span, 1e-6, 1.0)
    counts = rng.poisson(intensity * n0 * dose)
    return (counts / (n0 * dose) * span + lo).astype(np.float32)


# --- mammograms ---


def _power_law_noise(shape: tuple[int, int], beta: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian random field with power spectrum 1/f^beta (beta ~ 3 matches fibroglandular texture)."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    amplitude = f ** (-beta / 2)
    amplitude[0, 0] = 0.0
    spectrum = amplitude * (rng.standard_normal(amplitude.shape) + 1j * rng.standard_normal(amplitude.shape))
    field = np.fft.irfft2(spectrum, s=shape)
    return ((field - field.mean()) / (field.std() + 1e-12)).astype(np.float32)


def mammogram(
    shape: tuple[int, int], rng: np.random.Generator, *, bits_stored: int = 14, beta: float = 3.0
) -> np.ndarray:
    """A synthetic cranio-caudal mammogram as stored values (MONOCHROME2: dense = bright, background 0).

    Breast outline as a half-ellipse against the chest wall (left edge), fat/fibroglandular mixture from a
    1/f^beta field, a thickness fall-off towards the skin, a bright skin line and micro-calcification
    clusters.
    """
    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, ry, rx = h * rng.uniform(0.45, 0.55), h * rng.uniform(0.38, 0.47), w * rng.uniform(0.6, 0.85)
    r = np.sqrt(((y - cy) / ry) ** 2 + (x / rx) ** 2)
    breast = r <= 1.0
    thickness = (
        np.clip(np.sqrt(np.clip(1.0 - r**2, 0, 1)), 0, 1) ** 0.5
    )  # compressed breast thins at the edge
    density = 1 / (1 + np.exp(-(_power_law_noise(shape, beta, rng) * 1.5 + rng.uniform(-1.0, 0.5))))
    density *= np.clip(1.2 - r, 0, 1)  # fibroglandular tissue sits away from the skin
    signal = 0.25 + 0.35 * thickness + 0.35 * density
    skin = breast & (r > 0.975)
    signal[skin] += 0.08
    n_clusters = rng.integers(1, 4)
    for _ in range(n_clusters):  # micro-calcifications: tiny very bright dots in small clusters
        ccy, ccx = cy + rng.uniform(-0.6, 0.6) * ry, rng.uniform(0.1, 0.6) * rx
        for _ in range(rng.integers(3, 12)):
            py, px = ccy + rng.normal(0, h * 0.01), ccx + rng.normal(0, w * 0.01)
            rad = rng.uniform(0.6, 2.0) * max(h, w) / 1024
            signal[((y - py) ** 2 + (x - px) ** 2) <= rad**2] = rng.uniform(0.95, 1.0)
    max_stored = 2**bits_stored - 1
    stored = np.where(breast, np.clip(signal, 0, 1) * max_stored, 0.0)
    return np.round(stored).astype(np.uint16)
