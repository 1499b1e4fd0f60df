"""Fast projection-domain dose simulation for 2-D CT slices in torch (batched, CPU or GPU).

A slice in HU -> linear attenuation -> line integrals -> Beer-Lambert counts with Poisson + electronic
noise -> log -> filtered back-projection (FBP) of the noise -> HU. The slice's real PixelSpacing sets the
geometry; whole slices only (a crop would be simulated as if it were the whole body).

Geometries:
- `fan` (default, close to a Siemens SOMATOM Definition: source-isocentre 595 mm, source-detector 1085.6 mm,
  736 channels of 1.2858 mm on an arc at the detector, 1152 views per rotation, 500 mm scan field of view).
  Fan data are rebinned to parallel rays as the scanner's own reconstruction does: a parallel sample at
  (theta, u) stands for the fan rays with gamma = asin(u / SID); it collects 2 / cos(gamma) of them (the ray
  and its conjugate, over a full rotation), each with the bowtie's flux at its fan angle.
- `parallel`: views over 180 degrees, detector pitch = pixel size unless given (the textbook geometry of
  skimage's radon/iradon, kept as a reference in the tests).

Noise insertion: `Simulator.noise_hu` returns only the noise a dose draw adds, so a real routine-dose slice
becomes `hu + noise` with its own anatomy untouched. The clean line integrals (one projection per slice, which
only sets each ray's photon count) are computed once and reused: each further dose draw costs one FBP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MU_WATER_PER_MM = 0.0192  # linear attenuation of water at ~70 keV effective energy
FILTERS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann")


@dataclass(frozen=True)
class Geometry:
    kind: str = "fan"  # fan | parallel
    views: int = 1152  # per rotation (fan: 360 degrees; parallel: 180 degrees); 0 = from the slice (parallel)
    channels: int = 736  # 0 = enough to cover the slice's diagonal (parallel)
    channel_mm: float = 1.2858  # fan: pitch on the detector arc; parallel: pitch at the isocentre (0 = pixel)
    sid_mm: float = 595.0  # source to isocentre (fan)
    sdd_mm: float = 1085.6  # source to detector (fan)
    bowtie: float = 0.0  # flux at the fan edge = 1 - bowtie (cosine-squared profile); 0 = no bowtie
    filter: str = "shepp-logan"  # FBP window on the ramp: ram-lak | shepp-logan | cosine | hamming | hann


def parallel_geometry(**kw) -> Geometry:
    """Parallel beam with views and detector derived from the slice (pi/2 * N views, pixel-pitch detector)."""
    return Geometry(
        kind="parallel",
        views=kw.pop("views", 0),
        channels=kw.pop("channels", 0),
        channel_mm=kw.pop("channel_mm", 0.0),
        **kw,
    )


def hu_to_mu(hu: torch.Tensor) -> torch.Tensor:
    return (MU_WATER_PER_MM * (1.0 + hu / 1000.0)).clamp(min=0.0)


def ramp_filter(n: int, du: float, window: str) -> torch.Tensor:
    """The ramp of Kak & Slaney built from its spatial kernel (no DC bias), times a window; rfft layout."""
    if window not in FILTERS:
        raise ValueError(f"filter must be one of {FILTERS}, got '{window}'")
    k = np.arange(-(n // 2), n - n // 2)
    h = np.zeros(n)
    h[k == 0] = 1 / (4 * du**2)
    odd = k % 2 == 1
    h[odd] = -1 / (np.pi * k[odd] * du) ** 2
    ramp = np.abs(np.fft.rfft(np.fft.ifftshift(h))) * du  # * du: the convolution integral's step
    f = np.fft.rfftfreq(n)  # cycles per sample, 0..0.5
    if window == "shepp-logan":
        ramp[1:] *= np.sin(np.pi * f[1:]) / (np.pi * f[1:])
    elif window == "cosine":
        ramp *= np.cos(np.pi * f)
    elif window == "hamming":
        ramp *= 0.54 + 0.46 * np.cos(2 * np.pi * f)
    elif window == "hann":
        ramp *= 0.5 + 0.5 * np.cos(2 * np.pi * f)
    return torch.from_numpy(ramp).float()


class Simulator:
    """Projector, noise model and FBP for slices of one shape and pixel spacing (reuse it across a volume)."""

    def __init__(
        self,
        shape: tuple[int, int],
        pixel_mm: tuple[float, float],
        geometry: Geometry = Geometry(),
        device: str | torch.device = "cpu",
    ):
        self.shape, self.geometry, self.device = tuple(shape), geometry, torch.device(device)
        (h, w), (py, px) = self.shape, (float(pixel_mm[0]), float(pixel_mm[1]))
        self.pixel_mm = (py, px)
        self.y = (torch.arange(h, dtype=torch.float32) - (h - 1) / 2) * py  # rows: y grows downwards
        self.x = (torch.arange(w, dtype=torch.float32) - (w - 1) / 2) * px
        radius = math.hypot(h * py, w * px) / 2
        g = geometry
        if g.kind == "parallel":
            self.du = g.channel_mm or min(py, px)
            n_u = g.channels or 2 * math.ceil(radius / self.du) + 1
            n_views = g.views or math.ceil(math.pi / 2 * max(h, w))
            self.u = (torch.arange(n_u, dtype=torch.float32) - (n_u - 1) / 2) * self.du
            rays_per_sample, flux = torch.ones(n_u), torch.ones(n_u)
        elif g.kind == "fan":
            d_gamma = g.channel_mm / g.sdd_mm
            u_max = g.sid_mm * math.sin((g.channels - 1) / 2 * d_gamma)
            # pixels coarser than the rebinned pitch: bin k channels (summed counts), else FBP aliases noise
            binning = max(1, round(min(py, px) / (g.sid_mm * d_gamma)))
            self.du = g.sid_mm * d_gamma * binning
            n_half = int(u_max / self.du)
            self.u = torch.arange(-n_half, n_half + 1, dtype=torch.float32) * self.du
            gamma = torch.asin(self.u / g.sid_mm)
            rays_per_sample = (
                2 * binning / torch.cos(gamma)
            )  # a ray and its conjugate per rotation, fan density
            flux = 1 - g.bowtie * (gamma / gamma.abs().max()).square()
            n_views = g.views // 2  # the conjugate halves are combined: views over 180 degrees
            if radius > u_max:
                self.fov_note = f"slice half-diagonal {radius:.0f} mm exceeds the {u_max:.0f} mm scan field"
        else:
            raise ValueError(f"geometry kind must be fan or parallel, got '{g.kind}'")
        self.theta = torch.arange(n_views, dtype=torch.float32) * math.pi / n_views
        self.rays_per_sample, self.flux = rays_per_sample.to(self.device), flux.to(self.device)
        n_pad = 2 ** math.ceil(math.log2(2 * len(self.u)))
        self.filter = ramp_filter(n_pad, self.du, g.filter).to(self.device)

    # --- projector (clean line integrals: once per slice) ---

    def project(self, hu: torch.Tensor, coarse: int = 1) -> torch.Tensor:
        """(B, H, W) HU -> (B, views, U) line integrals of mu (unitless), ray-driven with bilinear samples.
        coarse = k: rays every k-th view and detector sample, k/2 pixels apart along the ray, linearly
        interpolated back (the noise model needs each ray's photon count, not a sharp sinogram): faster."""
        mu = hu_to_mu(hu.to(self.device, torch.float32))[:, None]
        if coarse > 1:
            mu = F.avg_pool2d(mu, 2, ceil_mode=True) if min(self.shape) >= 64 else mu
        h, w = self.shape
        py, px = self.pixel_mm
        ds = max(1.0, coarse / 2) * min(py, px)
        radius = math.hypot(h * py, w * px) / 2
        s = torch.arange(-radius, radius + ds / 2, ds, device=self.device)
        u, theta_all = self.u[::coarse].to(self.device), self.theta[::coarse].to(self.device)
        out = []
        for theta in theta_all.split(16):
            c, sn = theta.cos()[:, None, None], theta.sin()[:, None, None]
            x = u[None, :, None] * c - s[None, None, :] * sn  # (views, U, S) in mm
            y = u[None, :, None] * sn + s[None, None, :] * c
            grid = torch.stack([x / (w * px / 2), y / (h * py / 2)], -1)  # align_corners=False units
            grid = grid.reshape(1, -1, len(s), 2).expand(mu.shape[0], -1, -1, -1)
            samples = F.grid_sample(mu, grid, align_corners=False, padding_mode="zeros")
            out.append(samples.sum(-1).reshape(mu.shape[0], len(theta), len(u)) * ds)
        sino = torch.cat(out, 1)
        if coarse > 1:  # back to every view (periodic: theta = pi is theta = 0 with u mirrored) and sample
            sino = torch.cat([sino, sino[:, :1].flip(-1)], 1)
            sino = F.interpolate(
                sino[:, None],
                size=(len(theta_all) * coarse + 1, len(self.u[::coarse])),
                mode="bilinear",
                align_corners=True,
            )[:, 0, : len(self.theta)]
            sino = F.interpolate(sino, size=len(self.u), mode="linear", align_corners=True)
        return sino

    # --- noise model ---

    def noisy_integrals(
        self,
        integrals: torch.Tensor,
        i0: float,
        electronic_std: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Beer-Lambert counts (i0 photons per fan ray x bowtie) -> Poisson + electronic noise -> log."""
        n = self.rays_per_sample
        expected = n * i0 * self.flux * torch.exp(-integrals)
        counts = torch.poisson(expected, generator=generator)
        if electronic_std > 0:
            noise = torch.randn(counts.shape, generator=generator, device=counts.device)
            counts = counts + noise * electronic_std * n.sqrt()
        return -torch.log(counts.clamp(min=1.0) / (n * i0 * self.flux))

    # --- FBP ---

    def fbp(self, sinogram: torch.Tensor) -> torch.Tensor:
        """(B, views, U) line integrals -> (B, H, W) mu (1/mm): ramp x window, pixel-driven backprojection."""
        n_u = sinogram.shape[-1]
        spectrum = torch.fft.rfft(sinogram.float(), n=2 * (len(self.filter) - 1), dim=-1)
        q = torch.fft.irfft(spectrum * self.filter, dim=-1)[..., :n_u]
        return self.backproject(q) * (math.pi / len(self.theta))

    def backproject(self, q: torch.Tensor, chunk: int = 4) -> torch.Tensor:
        """Sum over views of q(theta, x cos(theta) + y sin(theta)), linear in u: (B, V, U) -> (B, H, W)."""
        b, n_views, n_u = q.shape
        h, w = self.shape
        q = F.pad(q, (1, 1))  # a zero either side: rays beyond the detector add nothing
        x, y = self.x.to(q.device) / self.du, self.y.to(q.device) / self.du
        offset = 1 - float(self.u[0]) / self.du  # position in the padded detector, in samples
        out = torch.zeros(b, h * w, device=q.device)
        for v0 in range(0, n_views, chunk):
            theta = self.theta[v0 : v0 + chunk].to(q.device)
            along_x = x[None, :] * theta.cos()[:, None]  # the position is separable: (views, W) + (views, H)
            along_y = y[None, :] * theta.sin()[:, None] + offset
            pos = (along_y[:, :, None] + along_x[:, None, :]).reshape(1, len(theta), -1).clamp_(0, n_u + 1)
            left = pos.long().clamp_(max=n_u)
            frac = pos.sub_(left)
            rows = q[:, v0 : v0 + len(theta)]
            index = left.expand(b, -1, -1)
            value = torch.lerp(rows.gather(2, index), rows.gather(2, index + 1), frac)
            out += value.sum(1)
        return out.reshape(b, h, w)

    # --- dose draws ---

    def noise_hu(
        self,
        integrals: torch.Tensor,
        i0: float,
        electronic_std: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The noise (HU) one dose draw adds: FBP of (noisy - clean) line integrals, for each of B slices."""
        noise = self.noisy_integrals(integrals, i0, electronic_std, generator) - integrals
        return self.fbp(noise) * (1000.0 / MU_WATER_PER_MM)

    def reconstruct_hu(self, integrals: torch.Tensor) -> torch.Tensor:
        return self.fbp(integrals) * (1000.0 / MU_WATER_PER_MM) - 1000.0


def added_dose_i0(i0_full: float, dose: float) -> float:
    """Photons per ray of the noise to ADD to a routine-dose image to reach `dose` of it: the image already
    holds variance s^2 (~1 / i0_full), dose d needs s^2 / d, so the missing s^2 (1 / d - 1) is a draw at
    i0 d / (1 - d)."""
    if not 0 < dose < 1:
        raise ValueError(f"dose must be a fraction in (0, 1) of the routine dose, got {dose}")
    return i0_full * dose / (1 - dose)
