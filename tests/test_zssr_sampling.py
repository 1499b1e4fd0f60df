"""dicom_zero_shot_sr.py: samplers against an oracle, seeds that matter, the DDIM grid, and the output
geometry (a landmark keeps its patient coordinate through the upscaling, oblique orientations included)."""

import io

import numpy as np
import pydicom
import pytest
import torch
from fixtures import make_ct_dataset

import dicom_zero_shot_sr as zssr
from common import dicom_io


def raw_image(values: np.ndarray) -> dicom_io.RawImage:
    return dicom_io.RawImage(io.BytesIO(np.asarray(values, "<f4").tobytes()), values.shape)


def tiny_cfg(*overrides):
    return zssr.load_config(
        zssr.Config, None, "tiny", list(overrides), shipped=zssr.default_config_path(zssr.__file__)
    )


# --- samplers ---


class Oracle(torch.nn.Module):
    """Predicts the true clean image x0 whatever it is given, and records every x_t it sees with its t."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0, self.seen = x0, []

    def forward(self, x_t, cond, t):
        self.seen.append((int(t[0]), x_t.clone()))
        return self.x0.expand_as(x_t)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampler_with_oracle_returns_the_clean_image_and_keeps_the_forward_marginals(sampler):
    """With x0 known, every x_t the sampler visits must look like the forward process: (x_t - sqrt(abar)
    x0) / sqrt(1 - abar) is unit white noise. A wrong posterior coefficient, schedule index or DDIM update
    breaks this long before the end; the end result must be x0."""
    cfg = tiny_cfg(f"sample.sampler={sampler}", "sample.ddim_steps=7")
    schedule = zssr.Schedule(cfg.diffusion.timesteps, cfg.diffusion.schedule)
    x0 = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (4, 1, 64, 64)).astype(np.float32))
    oracle = Oracle(x0)
    out = zssr.sample(oracle, schedule, torch.zeros_like(x0), cfg.sample, torch.Generator().manual_seed(1))
    assert torch.allclose(out, x0, atol=1e-5)
    expected = (
        list(range(schedule.T - 1, -1, -1)) if sampler == "ddpm" else list(zssr.ddim_timesteps(schedule.T, 7))
    )
    assert [t for t, _ in oracle.seen] == expected
    first_noise = None
    for t, x_t in oracle.seen:
        abar = float(schedule.abar[t])
        noise = (x_t - abar**0.5 * x0) / (1 - abar) ** 0.5
        assert abs(float(noise.mean())) < 0.02 and abs(float(noise.std()) - 1) < 0.02, (t, noise.std())
        first_noise = noise if first_noise is None else first_noise
        if sampler == "ddim":  # eta = 0: the same noise all the way down
            assert torch.allclose(noise, first_noise, atol=2e-3)


def test_ddim_grid_is_diffusers_trailing_and_always_has_exactly_steps_timesteps():
    for T in (50, 200, 1000):
        for steps in range(1, T + 1):
            grid = zssr.ddim_timesteps(T, steps)
            assert len(grid) == steps == len(set(grid)) and grid[0] == T - 1 and grid.min() >= 0
            assert np.all(np.diff(grid) < 0)
    diffusers = (np.round(np.arange(200, 0, -200 / 20)) - 1).astype(int)  # where its float arange is exact
    assert np.array_equal(zssr.ddim_timesteps(200, 20), diffusers)
    assert np.array_equal(zssr.ddim_timesteps(50, 50), np.arange(49, -1, -1))


def test_time_embedding_is_sin_then_cos():
    emb = zssr.timestep_embedding(torch.tensor([0, 7]), 16)
    assert torch.equal(emb[0, :8], torch.zeros(8)) and torch.equal(emb[0, 8:], torch.ones(8))
    assert torch.isclose(emb[1, 0], torch.sin(torch.tensor(7.0))) and torch.isclose(
        emb[1, 8], torch.cos(torch.tensor(7.0))
    )


def random_model(cfg) -> zssr.UNet:
    """A UNet whose zero-initialised output layer is made random: its output now depends on x_t (an untrained
    model ignores x_t entirely and would make any seed test pass)."""
    torch.manual_seed(5)
    model = zssr.UNet(cfg.model).eval()
    torch.nn.init.normal_(model.out[-1].weight, std=0.3)
    return model


@pytest.mark.parametrize("sampler", [pytest.param("ddpm", marks=pytest.mark.slow), "ddim"])
def test_same_seed_repeats_and_other_seeds_differ(sampler):
    cfg = tiny_cfg(f"sample.sampler={sampler}")
    model = random_model(cfg)
    schedule = zssr.Schedule(cfg.diffusion.timesteps, cfg.diffusion.schedule)
    cond = torch.from_numpy(np.random.default_rng(2).uniform(-1, 1, (1, 1, 24, 16)).astype(np.float32))

    def draw(seed):
        return zssr.sample(model, schedule, cond, cfg.sample, torch.Generator().manual_seed(seed))

    a, b, c = draw(3), draw(3), draw(4)
    assert a.shape == cond.shape and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.05 * (a - cond).abs().mean() and (a - c).abs().max() > 1e-3


def test_ddpm_default_sampler_through_the_tiled_inference_path():
    """The full preset's sampler (all T ancestral steps) once end to end on a tiny image: finite, in range,
    and the samples of a random model differ (std > 0), reproducibly for the same train.seed."""
    cfg = tiny_cfg("sample.sampler=ddpm", "sample.n_samples=2")
    model, schedule = random_model(cfg), zssr.Schedule(cfg.diffusion.timesteps, cfg.diffusion.schedule)
    values = np.random.default_rng(3).normal(100, 50, (12, 10)).astype(np.float32)
    normaliser = zssr.Normaliser.fit(values, cfg.data.percentiles)

    def run():
        strips = zssr.super_resolve(
            model, schedule, values, None, normaliser, 2, cfg, torch.device("cpu"), (-1e4, 1e4)
        )
        strips = list(strips)
        return np.concatenate([m for _, m, _ in strips]), np.concatenate([s for _, _, s in strips])

    (sr, std), (sr2, _) = run(), run()
    assert np.isfinite(sr).all() and std.min() >= 0 and std.mean() > 0.1 and np.array_equal(sr, sr2)


# --- geometry ---


def pixel_to_patient(ds, row: float, col: float) -> np.ndarray:
    """DICOM PS3.3 C.7.6.2.1.1: P = IPP + col * col_spacing * IOP[:3] + row * row_spacing * IOP[3:]."""
    position = np.array([float(v) for v in ds.ImagePositionPatient])
    orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    return position + col * col_spacing * orientation[:3] + row * row_spacing * orientation[3:]


def oblique_orientation() -> list[float]:
    rot = torch.linalg.matrix_exp(
        torch.tensor([[0, -0.3, 0.2], [0.3, 0, -0.5], [-0.2, 0.5, 0]], dtype=torch.float64)
    )
    return [*rot[:, 0].tolist(), *rot[:, 1].tolist()]


@pytest.mark.parametrize("factor", [2, 3, 4])
@pytest.mark.parametrize("orientation", ["axial", "oblique"])
def test_landmark_keeps_its_patient_coordinate_in_the_sr_dicom(tmp_path, factor, orientation):
    """A source pixel centre (r, c) is output pixel (K (r + 0.5) - 0.5, K (c + 0.5) - 0.5) (the sampling grid
    of `upsample`, checked below on a point image): both must map to one patient coordinate within 0.01 mm."""
    ds = make_ct_dataset(
        np.zeros((20, 14), np.int16), pixel_spacing_mm=(0.49, 0.73), position_mm=(-120.3, 88.1, 41.7)
    )
    if orientation == "oblique":
        ds.ImageOrientationPatient = oblique_orientation()
    cfg = tiny_cfg()
    blank = raw_image(np.zeros((20 * factor, 14 * factor)))
    info = zssr.write_outputs(tmp_path, tmp_path / "in.dcm", ds, blank, blank, 0.0, factor, cfg)
    for path in (info["sr_dicom"], info["uncertainty_dicom"]):
        out = pydicom.dcmread(path)
        assert [float(v) for v in out.ImageOrientationPatient] == pytest.approx(
            [float(v) for v in ds.ImageOrientationPatient], abs=1e-9
        )
        for r, c in [(0, 0), (19, 13), (7, 2), (3.5, 11)]:
            expected = pixel_to_patient(ds, r, c)
            found = pixel_to_patient(out, factor * (r + 0.5) - 0.5, factor * (c + 0.5) - 0.5)
            assert np.abs(found - expected).max() < 0.01, (r, c, found - expected)
    shift = np.linalg.norm(pixel_to_patient(out, 0, 0) - pixel_to_patient(ds, 0, 0))
    assert shift == pytest.approx((factor - 1) / (2 * factor) * np.hypot(0.49, 0.73), abs=1e-4)  # it did move


@pytest.mark.parametrize("factor", [2, 3])
def test_upsampling_puts_a_point_where_the_geometry_says(factor):
    """The centroid of an upsampled point source lies at output coordinate K (r + 0.5) - 0.5, the grid the
    written ImagePositionPatient assumes."""
    low = torch.zeros(21, 17)
    low[9, 6] = 1.0
    up = zssr.upsample(low, factor).double()
    rows, cols = torch.meshgrid(torch.arange(up.shape[0]), torch.arange(up.shape[1]), indexing="ij")
    centroid = [float((up * rows).sum() / up.sum()), float((up * cols).sum() / up.sum())]
    assert centroid == pytest.approx([factor * 9.5 - 0.5, factor * 6.5 - 0.5], abs=1e-6)


def test_projection_image_without_position_is_left_without_one(tmp_path):
    from fixtures import make_projection_dataset

    ds = make_projection_dataset(np.ones((8, 8), np.uint16), modality="DX", bits_stored=12)
    assert zssr.sr_image_position(ds, 2) is None
    sr, std = raw_image(np.ones((16, 16))), raw_image(np.zeros((16, 16)))
    info = zssr.write_outputs(tmp_path, tmp_path / "in.dcm", ds, sr, std, 0.0, 2, tiny_cfg())
    out = pydicom.dcmread(info["sr_dicom"])
    assert "ImagePositionPatient" not in out and [float(v) for v in out.ImagerPixelSpacing] == [0.035, 0.035]


def test_missing_orientation_warns_and_keeps_the_position():
    ds = make_ct_dataset(np.zeros((8, 8), np.int16))
    del ds.ImageOrientationPatient
    with pytest.warns(UserWarning, match="keeps the input's position"):
        assert zssr.sr_image_position(ds, 2) is None
