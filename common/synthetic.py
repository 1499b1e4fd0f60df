"""Built-in synthetic data: CT phantoms in HU (2-D and 3-D) and synthetic 14-bit mammograms (low-dose CT is
simulated from them by `common/ct_sim.py`).

Everything takes a `np.random.Generator` so a seed reproduces a data set exactly.
"""

from __future__ import annotations

import numpy as np

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
