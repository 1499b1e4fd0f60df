"""ct_throughplane_sr.py: slice-profile simulation, geometry (slice axis from the affine, landmarks through
input and output geometry), patch blending, samplers (in process), and the real CLI chained in subprocesses on
tiny synthetic volumes (prepare -> train unet3d / vae / ldm -> upsample -> evaluate)."""

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import run_cli
from fixtures import make_ct_dataset, write_ct_series
from pydicom.uid import generate_uid
from scipy.interpolate import make_interp_spline

import ct_throughplane_sr as sr
from common import dicom_io, nifti_io, synthetic
from common.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "ct_throughplane_sr.py"
TINY = ["--preset", "tiny", "--device", "cpu", "--set", "data.phantom_train=2", "--set", "train.log_every=1"]


def tiny_cfg(*overrides):
    return load_config(sr.Config, ROOT / "configs" / "ct_throughplane_sr.yaml", "tiny", list(overrides))


def profile_cfg(spacing_mm, thickness_mm, profile):
    return sr.DataConfig(target_spacing_mm=spacing_mm, target_thickness_mm=thickness_mm, profile=profile)


def rotation(angle_deg: float) -> np.ndarray:
    th = np.deg2rad(angle_deg)
    return np.array([[1, 0, 0], [0, np.cos(th), -np.sin(th)], [0, np.sin(th), np.cos(th)]])


def oblique_affine(spacing_zyx, angle_deg=10.0, origin=(12.0, -20.0, 35.0)) -> np.ndarray:
    """A tilted, x-flipped affine: the geometry tests must not pass by accident of an identity matrix."""
    affine = np.eye(4)
    affine[:3, :3] = (
        rotation(angle_deg) @ np.diag([-1, 1, 1]) * [spacing_zyx[2], spacing_zyx[1], spacing_zyx[0]]
    )
    affine[:3, 3] = origin
    return affine


def world(affine, k):
    return (affine @ [2.0, 3.0, k, 1.0])[:3]


# --- slice-profile simulation ---


@pytest.mark.parametrize("profile", ["gaussian", "rect"])
@pytest.mark.parametrize("spacing,target", [(1.0, 3.0), (1.0, 2.0), (0.8, 3.0)])
def test_constant_volume_stays_constant(profile, spacing, target):
    hu = np.full((40, 6, 5), 37.0, np.float32)
    lr, _ = sr.simulate_thick_slices(hu, spacing, profile_cfg(target, target, profile))
    assert np.abs(lr - 37.0).max() < 1e-4


@pytest.mark.parametrize("spacing,target", [(1.0, 3.0), (1.0, 4.0), (0.8, 3.0)])
def test_lr_volume_spacing_and_affine(spacing, target):
    affine = oblique_affine((spacing, 0.7, 0.7))
    hu, positions = sr.simulate_thick_slices(
        np.zeros((41, 4, 4)), spacing, profile_cfg(target, target, "gaussian")
    )
    lr = nifti_io.Volume(hu, sr.resampled_affine(affine, positions), {})
    ratio = target / spacing
    assert lr.hu.shape == (int(np.floor(40 / ratio + 1e-6)) + 1, 4, 4)
    assert lr.spacing_mm == pytest.approx((target, 0.7, 0.7))
    np.testing.assert_allclose(lr.affine[:3, :2], affine[:3, :2])  # in-plane axes untouched
    for j in range(lr.hu.shape[0]):  # LR slice j lies where HR slice j * ratio lies
        np.testing.assert_allclose(world(lr.affine, j), world(affine, j * ratio), atol=1e-9)


def test_thin_sheet_spreads_over_the_slice_thickness():
    sheet = np.zeros((41, 3, 3), np.float32)
    sheet[20] = 300.0
    lr, _ = sr.simulate_thick_slices(
        sheet, 1.0, profile_cfg(1.0, 3.0, "rect")
    )  # 3 mm rect on 1 mm: three thirds
    assert np.flatnonzero(lr[:, 1, 1] > 1e-6).tolist() == [19, 20, 21]
    np.testing.assert_allclose(lr[19:22, 1, 1], 100.0, rtol=1e-6)
    for fwhm in (3.0, 5.0):  # Gaussian: the slices above half maximum are the FWHM
        lr, _ = sr.simulate_thick_slices(sheet, 1.0, profile_cfg(1.0, fwhm, "gaussian"))
        assert int((lr[:, 1, 1] > lr[:, 1, 1].max() / 2).sum()) == int(fwhm)
    lr, positions = sr.simulate_thick_slices(
        sheet, 1.0, profile_cfg(2.0, 4.0, "rect")
    )  # the sheet's HU x mm is conserved
    assert np.flatnonzero(lr[:, 1, 1] > 1e-6).tolist() == [9, 10, 11] and positions[10] == 20.0
    assert lr[:, 1, 1].sum() * 2.0 == pytest.approx(300.0, rel=1e-5)
    for z in (20, 21, 22):  # x3 (3 mm rect): LR slice 7 sits at HR slice 21 and integrates HR slices 20-22
        sheet = np.zeros((41, 3, 3), np.float32)
        sheet[z] = 300.0
        lr, positions = sr.simulate_thick_slices(sheet, 1.0, profile_cfg(3.0, 3.0, "rect"))
        assert np.flatnonzero(lr[:, 1, 1] > 1e-6).tolist() == [7] and positions[7] == 21.0
        assert lr[7, 1, 1] * 3.0 == pytest.approx(300.0, rel=1e-5)


def test_non_integer_ratio_resamples_between_slices():
    ramp = (np.arange(60, dtype=np.float32) * 5.0)[:, None, None] * np.ones((1, 2, 2), np.float32)
    lr, positions = sr.simulate_thick_slices(ramp, 1.0, profile_cfg(2.5, 2.5, "gaussian"))
    assert positions[:3].tolist() == [0.0, 2.5, 5.0]  # half-slice positions: resampling, not striding
    inner = (positions > 6) & (positions < 50)  # a symmetric blur keeps a ramp away from the ends
    np.testing.assert_allclose(lr[inner, 0, 0], 5.0 * positions[inner], atol=1e-3)


# --- geometry ---


def test_slice_axis_is_read_from_the_affine():
    assert sr.slice_axis(oblique_affine((3.0, 0.7, 0.7))) == 0  # thick k
    assert sr.slice_axis(np.diag([0.7, 3.0, 0.7, 1.0])) == 1  # thick j (axes permuted on disk)
    assert sr.slice_axis(np.diag([2.5, 0.8, 0.8, 1.0])) == 2  # thick i
    iso = np.zeros((4, 4))
    iso[:3, :3] = [[0, 0, 1.0], [1.0, 0, 0], [0, 1.0, 0]]  # isotropic: the head-foot axis (here j)
    assert sr.slice_axis(iso) == 1


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_axis_first_keeps_every_voxel_where_it_was(axis):
    rng = np.random.default_rng(axis)
    affine = oblique_affine((1.3, 0.9, 0.7))
    vol = nifti_io.Volume(rng.normal(size=(5, 6, 7)).astype(np.float32), affine, {})
    moved = sr.axis_first(vol, axis)
    assert moved.hu.shape[0] == vol.hu.shape[axis] and moved.spacing_mm[0] == pytest.approx(
        vol.spacing_mm[axis]
    )
    for k, j, i in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:  # same value at the same patient position
        kji = [k, j, i]
        new = [kji[axis]] + [kji[a] for a in range(3) if a != axis]
        assert moved.hu[tuple(new)] == vol.hu[k, j, i]
        np.testing.assert_allclose(moved.affine @ [*new[::-1], 1], affine @ [i, j, k, 1], atol=1e-9)
    back = sr.axis_first(moved, axis, back=True)
    np.testing.assert_array_equal(back.hu, vol.hu)
    np.testing.assert_allclose(back.affine, affine)


def test_sheared_and_oblique_affines_warn_once():
    sheared = np.diag([0.8, 0.8, 2.0, 1.0])
    sheared[1, 2] = 2.0 * np.tan(np.deg2rad(15))  # gantry tilt: k leans along y
    with pytest.warns(UserWarning, match=r"sheared affine \(slice axis 15.0 deg.*keeps this grid"):
        sr.check_geometry(sheared, "tilt.nii.gz")
    with pytest.warns(UserWarning, match="oblique slices"):
        sr.check_geometry(oblique_affine((2.0, 0.8, 0.8)), "oblique.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sr.check_geometry(np.diag([-0.8, 0.8, 2.0, 1.0]), "axial.nii.gz")


@pytest.mark.parametrize("n,factor", [(9, 3.0), (10, 2.5), (7, 2.2)])
def test_output_grid_is_centred_and_the_affine_follows_it(n, factor):
    positions = sr.output_positions(n, factor)
    np.testing.assert_allclose(np.diff(positions), 1 / factor)
    assert positions[0] == pytest.approx(n - 1 - positions[-1])  # same margin at both ends
    affine = oblique_affine((3.0, 0.6, 0.6))
    new = sr.resampled_affine(affine, positions)
    np.testing.assert_allclose(new[:3, :2], affine[:3, :2])  # spacing changes along the slice axis only
    for m, p in enumerate(positions):  # output slice m lies at input slice index positions[m]
        np.testing.assert_allclose(world(new, m), world(affine, p), atol=1e-9)


# --- blending, padding, overlap ---


def identity_model(lr, rel):
    return sr.lerp_z(lr, rel)[0, 0].numpy()


def test_blending_an_identity_model_reproduces_the_input():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 2000, size=(13, 40, 37)).astype(np.float32)
    seen = []

    def recording_model(lr, rel):
        seen.append(tuple(lr.shape[2:]))
        return identity_model(lr, rel)

    out = sr.blend_patches(hu, np.arange(13.0), recording_model, (4, 16, 16), 0.25)
    assert out.shape == hu.shape and np.abs(out - hu).max() < 1e-3
    assert set(seen) == {(4, 16, 16)} and len(seen) == 4 * 3 * 3  # z starts 0,3,6,9; y 0,12,24; x 0,12,21
    cfg = tiny_cfg("infer.patch_lr=[4,16,16]")
    np.testing.assert_array_equal(sr.upsample_hu(hu, np.arange(13.0), identity_model, cfg), hu)  # exact
    positions = sr.output_positions(13, 2.0)  # x2: patches and seams leave linear interpolation unchanged
    out = sr.blend_patches(hu, positions, identity_model, (4, 16, 16), 0.25)
    assert np.abs(out - sr.sample_z(hu, positions)).max() < 1e-3


@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.9])
def test_every_slice_is_covered_whatever_the_overlap(overlap):
    hu = np.random.default_rng(1).normal(size=(17, 20, 20)).astype(np.float32)
    positions = sr.output_positions(17, 3.0)
    out = sr.blend_patches(hu, positions, identity_model, (4, 8, 8), overlap)
    assert np.isfinite(out).all() and np.abs(out - sr.sample_z(hu, positions)).max() < 1e-4


def test_overlap_outside_0_1_is_refused():
    with pytest.raises(sr.UserError, match=r"infer.overlap must be in \[0, 1\)"):
        sr.blend_patches(np.zeros((6, 8, 8), np.float32), np.arange(6.0), identity_model, (4, 8, 8), 1.0)


def test_padding_is_no_data_in_training_and_inference():
    hu = np.full((6, 20, 20), 40.0, np.float32)
    hu[:, :3] = -3024.0  # outside the scan field of view
    out = sr.upsample_hu(hu, sr.output_positions(6, 2.0), identity_model, tiny_cfg())
    assert (out[:, :3] == -3024.0).all() and (out[:, 3:] == 40.0).all()  # restored, never blended
    view = sr.hr_views(nifti_io.Volume(hu, np.eye(4), {}), sr.DataConfig(), "pad.nii.gz")[0]
    assert view.min() == -1000  # training sees the padding as air, exactly as inference shows it
    ds = make_ct_dataset(np.zeros((4, 4)))  # a declared PixelPaddingValue above -1100 HU counts as well
    ds.PixelPaddingValue = 24  # stored 24 = -1000 HU with intercept -1024
    vol = nifti_io.Volume(np.array([[-1000.0, 5.0]] * 2)[None], np.eye(4), {"datasets": [ds]})
    assert sr.no_data_mask(vol).tolist() == [[[True, False], [True, False]]]


# --- models and samplers ---


def test_untrained_models_start_from_interpolation_and_ignore_the_condition():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    lr, pos = torch.randn(1, 1, 5, 20, 12), torch.from_numpy(sr.output_positions(5, 3.0))
    out = sr.SimpleUNet3D(cfg.unet)(lr, pos)[0, 0].detach().numpy()  # zero-initialised head: the spline
    cubic = make_interp_spline(np.arange(5), lr[0, 0].numpy(), k=3, axis=0)(pos.numpy())  # not-a-knot
    np.testing.assert_allclose(out, cubic, atol=1e-5)
    np.testing.assert_allclose(sr.sample_z(lr[0, 0].numpy(), pos.numpy(), cubic=True), cubic, atol=1e-5)
    net = sr.LatentDenoiser(cfg.ldm, 4).eval()
    x, t = torch.randn(2, 4, 4, 8, 8), torch.tensor([0, 14])
    torch.testing.assert_close(net(x, t, torch.randn_like(x)), net(x, t, torch.zeros_like(x)))  # zero convs
    eta = sr.ResShift(cfg.ldm, torch.device("cpu")).eta.numpy()
    assert len(eta) == 15 and np.all(np.diff(eta) > 0) and eta[-1] == pytest.approx(0.999, rel=1e-5)


def test_conventions_norm_time_embedding_and_trailing_grid():
    assert [sr.norm(c).num_groups for c in (4, 8, 48, 128, 200)] == [1, 2, 12, 32, 25]
    t = torch.tensor([0, 3, 14])
    emb = sr.timestep_embedding(t, 8)
    freqs = np.exp(-np.log(10000) * np.arange(4) / 4)  # diffusers, downscale_freq_shift=0, [sin, cos]
    expected = np.concatenate([np.sin(t.numpy()[:, None] * freqs), np.cos(t.numpy()[:, None] * freqs)], 1)
    np.testing.assert_allclose(emb.numpy(), expected, atol=1e-6)
    assert sr.trailing_timesteps(15, 15).tolist() == list(range(14, -1, -1))
    assert sr.trailing_timesteps(15, 4).tolist() == [14, 10, 7, 3]
    for steps in range(1, 16):
        grid = sr.trailing_timesteps(15, steps)
        assert len(set(grid.tolist())) == steps and grid[0] == 14 and np.all(np.diff(grid) < 0)
    with pytest.raises(sr.UserError, match="sample_steps"):
        sr.trailing_timesteps(15, 16)


@pytest.mark.parametrize("steps", [15, 4, 1])
def test_resshift_with_an_oracle_predictor_returns_x0(steps):
    schedule = sr.ResShift(tiny_cfg().ldm, torch.device("cpu"))
    x0, y0 = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 4, 2, 4, 4)
    seen = []

    def oracle(x, t):
        seen.append(int(t[0]))
        return x0

    out = schedule.sample(oracle, y0, steps, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0)
    assert seen == sr.trailing_timesteps(15, steps).tolist()


def test_classifier_free_guidance_extrapolates_from_the_unconditional_prediction():
    def net(x, t, cond):  # a stand-in denoiser that is linear in its condition
        return x + 2.0 * cond

    x, t, y0 = torch.randn(1, 4, 2, 4, 4), torch.tensor([3]), torch.randn(1, 4, 2, 4, 4)
    torch.testing.assert_close(sr.guided_x0(net, x, t, y0, 1.0), x + 2.0 * y0)
    torch.testing.assert_close(sr.guided_x0(net, x, t, y0, 1.5), x + 3.0 * y0)


def test_resume_replays_the_uninterrupted_losses(tmp_path):
    cfg = tiny_cfg("data.phantom_train=2", "train.log_every=1", "train.ckpt_every=2", "train.val_batches=1")

    def losses(run_dir):
        rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["loss"] for r in rows}

    cfg.train.max_steps = 4
    sr.train(cfg, "unet3d", tmp_path / "a", "cpu", argv=[])
    cfg.train.max_steps = 2
    sr.train(cfg, "unet3d", tmp_path / "b", "cpu", argv=[])
    cfg.train.max_steps = 4
    sr.train(cfg, "unet3d", tmp_path / "b", "cpu", resume=tmp_path / "b" / "checkpoint.pt", argv=[])
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == [1, 2, 3, 4] and b[4] == pytest.approx(a[4], rel=1e-5)
    best = torch.load(tmp_path / "b" / "best.pt", weights_only=True)
    val = [
        json.loads(r) for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if "val_loss" in r
    ]
    assert best["best_step"] == min(val, key=lambda r: r["val_loss"])["step"]  # chosen on val.txt's volumes


# --- landmarks through input and output geometry (in process, an untrained = cubic-spline checkpoint) ---


@pytest.fixture(scope="module")
def linear_checkpoint(tmp_path_factory):
    """An untrained UNet3D (lr 0) is exactly a cubic spline along z, which reproduces any value pattern
    linear in patient coordinates: each output value must be the one at its voxel centre."""
    cfg = tiny_cfg("data.phantom_train=1", "train.lr=0", "train.val_batches=1")
    cfg.train.max_steps = 1
    return sr.train(cfg, "unet3d", tmp_path_factory.mktemp("lin") / "unet", "cpu", argv=[])


def test_landmarks_land_at_the_same_patient_position_nifti(linear_checkpoint, tmp_path):
    affine = np.eye(4)  # thick axis j on disk (permuted), tilted 20 deg, 10 slices x2.5: the grid moves
    affine[:3, :3] = rotation(20) @ np.diag([0.7, 3.0, 0.8])
    affine[:3, 3] = (-30.0, 12.0, 40.0)
    i, j, k = np.meshgrid(np.arange(24), np.arange(10), np.arange(26), indexing="ij")
    coords = np.einsum("rc,cijk->rijk", affine[:3, :3], np.stack([i, j, k])) + affine[:3, 3, None, None, None]
    gradient = np.array([2.0, -3.0, 25.0])  # HU per mm along R, A, S
    hu = np.einsum("r,rijk->ijk", gradient, coords) - 900.0
    nib.save(nib.Nifti1Image(hu.astype(np.float32), affine), tmp_path / "lr.nii.gz")
    with pytest.warns(UserWarning, match="oblique"):
        sr.upsample_file(linear_checkpoint, tmp_path / "lr.nii.gz", tmp_path / "sr.nii.gz", factor=2.5)
    out = nib.load(tmp_path / "sr.nii.gz")
    assert out.shape == (24, 23, 26)
    np.testing.assert_allclose(out.affine[:3, [0, 2]], affine[:3, [0, 2]])  # only the slice axis changed
    assert np.linalg.norm(out.affine[:3, 1]) == pytest.approx(1.2)
    i, j, k = np.meshgrid(*(np.arange(n) for n in out.shape), indexing="ij")
    coords = (
        np.einsum("rc,cijk->rijk", out.affine[:3, :3], np.stack([i, j, k]))
        + out.affine[:3, 3, None, None, None]
    )
    error_mm = np.abs(out.get_fdata() - (np.einsum("r,rijk->ijk", gradient, coords) - 900.0)) / 25.0
    assert error_mm.max() < 0.01


def test_landmarks_land_at_the_same_patient_position_dicom(linear_checkpoint, tmp_path):
    orientation = rotation(12) @ np.eye(3)  # oblique rows/columns; slices along the normal, 3 mm apart
    row, col = orientation[:, 0], orientation[:, 1]
    normal = np.cross(row, col)
    origin, study, series = np.array([-40.0, -30.0, 100.0]), generate_uid(), generate_uid()
    (tmp_path / "lr").mkdir()
    for n in range(7):  # HU = 100 per mm along the normal: each output slice says where it lies
        ds = make_ct_dataset(np.full((12, 14), 100.0 * 3 * n - 900), pixel_spacing_mm=(0.8, 0.9))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in [*row, *col]]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + 3.0 * n * normal]
        dicom_io.write_dataset(ds, tmp_path / "lr" / f"{(n * 5) % 7}.dcm")
    with pytest.warns(UserWarning, match="oblique"):
        sr.upsample_file(linear_checkpoint, tmp_path / "lr", tmp_path / "sr.nii.gz", factor=2.5)
    out = dicom_io.read_dicom_series(tmp_path / "sr_dicom")
    assert out.hu.shape == (16, 12, 14)
    for ds, plane in zip(out.meta["datasets"], out.hu):
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], [*row, *col], atol=1e-6)
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([0.8, 0.9])
        assert float(ds.SpacingBetweenSlices) == pytest.approx(1.2, abs=1e-4)
        assert abs((plane.mean() + 900) / 100 - (position - origin) @ normal) < 0.01


# --- the CLI, chained on tiny volumes ---


def write_series(hu, folder, patient, spacing=(1.0, 0.9, 0.9)):
    study, series = generate_uid(), generate_uid()
    for k, plane in enumerate(hu):
        ds = make_ct_dataset(
            plane,
            pixel_spacing_mm=spacing[1:],
            position_mm=(-20.0, -15.0, 5.0 + k * spacing[0]),
            slice_thickness_mm=spacing[0],
            instance_number=k + 1,
            patient_id=patient,
            study_uid=study,
            series_uid=series,
        )
        dicom_io.write_dataset(ds, folder / f"{patient}{(k * 7) % len(hu):03d}_{k}.dcm")


def sha(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    base = tmp_path_factory.mktemp("ctsr")
    rng = np.random.default_rng(1)
    for i, patient in enumerate(["P1", "P1", "P2", "P3", "P4"]):  # P1 has two series: they must stay together
        folder = base / "dicom" / f"{patient}_s{i}"
        folder.mkdir(parents=True)
        write_series(np.rint(synthetic.ct_phantom_volume((26, 32, 32), rng)), folder, patient)
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 1), np.float32), np.eye(4)), base / "dicom" / "P9_one.nii.gz")
    with pytest.warns(UserWarning, match=r"P9_one.nii.gz: left out of the split lists: 1 slice\(s\)"):
        sr.prepare(base / "dicom", base / "prep", 0.25, 0.25, tiny_cfg())
    run_cli(
        SCRIPT,
        [
            "train",
            "--model",
            "unet3d",
            "--data",
            base / "prep",
            "--out",
            base / "unet",
            "--max-steps",
            4,
            *TINY,
        ],
    )
    run_cli(SCRIPT, ["train", "--model", "vae", "--out", base / "vae", "--max-steps", 3, *TINY])
    run_cli(
        SCRIPT,
        [
            "train",
            "--model",
            "ldm",
            "--vae",
            base / "vae" / "best.pt",
            "--out",
            base / "ldm",
            "--max-steps",
            3,
            *TINY,
        ],
    )
    hr_hu = np.rint(synthetic.ct_phantom_volume((24, 48, 48), np.random.default_rng(7)))
    lr, _ = sr.simulate_thick_slices(hr_hu, 1.0, sr.DataConfig())
    write_ct_series(np.rint(lr), base / "lr_dicom", (3.0, 0.8, 0.8), shuffle_names=True)
    write_ct_series(hr_hu[:6], base / "short_dicom", (1.0, 0.8, 0.8))  # a 6-slice series
    return base


def test_prepare_splits_by_patient_and_leaves_out_thin_volumes(chain):
    files = {s: (chain / "prep" / f"{s}.txt").read_text().split() for s in ("train", "val", "test")}
    assert sum(map(len, files.values())) == 5 and all(files.values())
    assert not any("P9" in f for names in files.values() for f in names)  # one slice: no training patch
    owners = {s: {f.split("_")[0] for f in names} for s, names in files.items()}
    assert sum(("P1" in o) for o in owners.values()) == 1  # never one patient in two sets
    vol = nifti_io.read_nifti(chain / "prep" / files["train"][0])
    assert vol.spacing_mm == pytest.approx((1.0, 0.9, 0.9)) and vol.hu.min() < -900  # HU, not stored values
    np.testing.assert_allclose(vol.affine[:3, 3], [20.0, 15.0, 5.0], atol=1e-4)  # LPS (-20,-15,5) in RAS
    assert (chain / "unet" / "best.pt").is_file() and "val_loss" in (
        chain / "unet" / "metrics.jsonl"
    ).read_text()


def test_upsample_dicom_series_writes_nifti_and_a_new_series(chain, tmp_path):
    before = sha(chain / "lr_dicom")
    out = tmp_path / "sr.nii.gz"
    run_cli(
        SCRIPT,
        [
            "upsample",
            "--checkpoint",
            chain / "ldm" / "best.pt",
            "--input",
            chain / "lr_dicom",
            "--output",
            out,
            "--spacing-mm",
            1.5,
            "--set",
            "infer.sample_steps=3",
            *TINY,
        ],
    )
    assert sha(chain / "lr_dicom") == before  # input untouched
    src = dicom_io.read_dicom_series(chain / "lr_dicom")
    res = dicom_io.read_dicom_series(tmp_path / "sr_dicom")
    assert res.hu.shape == (15, 48, 48) and res.spacing_mm == pytest.approx((1.5, 0.8, 0.8), abs=1e-4)
    np.testing.assert_allclose(res.affine[:3, 3], src.affine[:3, 3], atol=1e-3)
    np.testing.assert_allclose(nib.load(out).affine, res.affine, atol=1e-3)
    first, old = res.meta["datasets"][0], src.meta["datasets"][0]
    assert first.SeriesInstanceUID != old.SeriesInstanceUID and first.StudyInstanceUID == old.StudyInstanceUID


def test_evaluate_a_six_slice_series_reports_every_method(chain, tmp_path):
    run_cli(
        SCRIPT,
        [
            "evaluate",
            "--hr",
            chain / "short_dicom",
            "--unet",
            chain / "unet" / "best.pt",
            "--ldm",
            chain / "ldm" / "best.pt",
            "--out",
            tmp_path,
            "--set",
            "infer.sample_steps=2",
            *TINY,
        ],
    )
    report = json.loads((tmp_path / "metrics.json").read_text())
    methods = [r["method"].split(" ")[0] for r in report["rows"]]
    assert methods == ["linear", "cubic", "unet3d", "ldm", "ldm"]  # the last: the VAE ceiling
    for row in report["rows"]:
        assert all(np.isfinite(row[k]) for k in ("psnr_db", "ssim", "mae_hu", "time_s", "peak_rss_mb"))
    notes = " ".join(report["notes"])
    assert "2-D per slice" in notes and "HU > -500" in notes and "window" in notes
    assert (tmp_path / "sagittal.png").stat().st_size > 1000 and (tmp_path / "coronal.png").is_file()


@pytest.mark.slow  # the malformed-input corpus in test_robustness.py covers this too
def test_bad_input_fails_with_one_line_and_writes_nothing(chain, tmp_path):
    data = np.zeros((8, 8, 4), np.float32)
    data[2, 2, 2] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "in.nii.gz")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run_cli(
        SCRIPT,
        [
            "upsample",
            "--checkpoint",
            chain / "unet" / "best.pt",
            "--input",
            tmp_path / "in.nii.gz",
            "--output",
            out_dir / "sr.nii.gz",
            *TINY,
        ],
        ok=False,
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:")
    assert len(proc.stderr.strip().splitlines()) == 1 and "NaN" in proc.stderr
    assert list(out_dir.iterdir()) == []


def test_runs_when_copied_into_an_empty_folder(tmp_path):
    shutil.copy(ROOT / SCRIPT, tmp_path / SCRIPT)
    shutil.copytree(ROOT / "common", tmp_path / "common", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "ct_throughplane_sr.yaml", tmp_path / "configs")
    run_cli(tmp_path / SCRIPT, ["train", "--out", tmp_path / "run", "--max-steps", 1, *TINY], cwd=tmp_path)
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / SCRIPT).is_file()
