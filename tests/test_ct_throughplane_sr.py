"""ct_throughplane_sr.py: slice-profile simulation, affines, patch blending (in process) and the real CLI chained
in subprocesses on tiny synthetic volumes (prepare -> train -> train-vae -> train ldm -> upsample -> evaluate)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from pydicom.uid import generate_uid

import ct_throughplane_sr as sr
from common import dicom_io, nifti_io, synthetic
from common.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--device", "cpu", "--set", "data.phantom_train=2", "--set", "train.log_every=1"]


def run(args, ok=True):
    cmd = [sys.executable, str(ROOT / "ct_throughplane_sr.py"), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if ok:
        assert proc.returncode == 0, f"{cmd}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    return proc


def oblique_affine(spacing_zyx, angle_deg=10.0, origin=(12.0, -20.0, 35.0)) -> np.ndarray:
    """A tilted, x-flipped affine: the geometry tests must not pass by accident of an identity matrix."""
    th = np.deg2rad(angle_deg)
    rot = np.array([[-1, 0, 0], [0, np.cos(th), -np.sin(th)], [0, np.sin(th), np.cos(th)]])
    affine = np.eye(4)
    affine[:3, :3] = rot * np.array([spacing_zyx[2], spacing_zyx[1], spacing_zyx[0]])
    affine[:3, 3] = origin
    return affine


def world(affine, k):
    return (affine @ [2.0, 3.0, k, 1.0])[:3]


# --- slice-profile simulation ---


@pytest.mark.parametrize("profile", ["gaussian", "rect"])
@pytest.mark.parametrize("spacing,target", [(1.0, 3.0), (1.0, 2.0), (0.8, 3.0)])
def test_constant_volume_stays_constant(profile, spacing, target):
    hu = np.full((40, 6, 5), 37.0, np.float32)
    lr, _ = sr.simulate_thick_slices(hu, spacing, target, target, profile)
    assert np.abs(lr - 37.0).max() < 1e-4


@pytest.mark.parametrize("spacing,target", [(1.0, 3.0), (1.0, 4.0), (0.8, 3.0)])
def test_lr_volume_spacing_and_affine(spacing, target):
    affine = oblique_affine((spacing, 0.7, 0.7))
    hr = nifti_io.Volume(np.zeros((41, 4, 4), np.float32), affine, {})
    cfg = sr.DataConfig(target_spacing_mm=target, target_thickness_mm=target)
    lr = sr.simulate_lr_volume(hr, cfg)
    ratio = target / spacing
    assert lr.hu.shape == (int(np.floor(40 / ratio + 1e-6)) + 1, 4, 4)
    assert lr.spacing_mm == pytest.approx((target, 0.7, 0.7))
    np.testing.assert_allclose(lr.affine[:3, :2], affine[:3, :2])  # in-plane axes untouched
    for j in range(lr.hu.shape[0]):  # LR slice j lies where HR slice j * ratio lies
        np.testing.assert_allclose(world(lr.affine, j), world(affine, j * ratio), atol=1e-9)


def test_thin_sheet_spreads_over_the_slice_thickness():
    sheet = np.zeros((41, 3, 3), np.float32)
    sheet[20] = 300.0
    # rect profile 3 mm on a 1 mm grid, kept at 1 mm: exactly 3 slices of a third each
    lr, _ = sr.simulate_thick_slices(sheet, 1.0, 1.0, 3.0, "rect")
    assert np.flatnonzero(lr[:, 1, 1] > 1e-6).tolist() == [19, 20, 21]
    np.testing.assert_allclose(lr[19:22, 1, 1], 100.0, rtol=1e-6)
    # Gaussian profile: the slices above half maximum are the FWHM (3 and 5 mm)
    for fwhm in (3.0, 5.0):
        lr, _ = sr.simulate_thick_slices(sheet, 1.0, 1.0, fwhm, "gaussian")
        assert int((lr[:, 1, 1] > lr[:, 1, 1].max() / 2).sum()) == int(fwhm)
    # 4 mm rect resampled to 2 mm: 3 LR slices, and the sheet's integral (HU x mm) is conserved
    lr, positions = sr.simulate_thick_slices(sheet, 1.0, 2.0, 4.0, "rect")
    assert np.flatnonzero(lr[:, 1, 1] > 1e-6).tolist() == [9, 10, 11]
    assert lr[:, 1, 1].sum() * 2.0 == pytest.approx(300.0, rel=1e-5)
    assert positions[10] == 20.0
    # the default x3 case (1 mm -> 3 mm spacing, 3 mm thick): a sheet inside one LR slab lands in that slice only
    for z in (20, 21, 22):  # LR slice 7 sits at HR slice 21 and integrates HR slices 20-22
        sheet = np.zeros((41, 3, 3), np.float32)
        sheet[z] = 300.0
        lr, positions = sr.simulate_thick_slices(sheet, 1.0, 3.0, 3.0, "rect")
        assert np.flatnonzero(lr[:, 1, 1] > 1e-6).tolist() == [7] and positions[7] == 21.0
        assert lr[7, 1, 1] * 3.0 == pytest.approx(300.0, rel=1e-5)
    sheet = np.zeros((41, 3, 3), np.float32)
    sheet[21] = 300.0
    lr, _ = sr.simulate_thick_slices(sheet, 1.0, 3.0, 3.0, "gaussian")  # Gaussian tails reach the neighbours
    assert np.flatnonzero(lr[:, 1, 1] > lr[:, 1, 1].max() / 2).tolist() == [7]
    assert lr[6, 1, 1] == pytest.approx(lr[8, 1, 1]) and 1.0 < lr[6, 1, 1] < 0.1 * lr[7, 1, 1]


def test_non_integer_ratio_resamples_between_slices():
    ramp = (np.arange(60, dtype=np.float32) * 5.0)[:, None, None] * np.ones((1, 2, 2), np.float32)
    lr, positions = sr.simulate_thick_slices(ramp, 1.0, 2.5, 2.5, "gaussian")
    assert positions[:3].tolist() == [0.0, 2.5, 5.0]  # half-slice positions: resampling, not striding
    inner = (positions > 6) & (positions < 50)  # a symmetric blur keeps a ramp away from the ends
    np.testing.assert_allclose(lr[inner, 0, 0], 5.0 * positions[inner], atol=1e-3)


# --- upsampling geometry and patch blending ---


@pytest.mark.parametrize("factor", [2.0, 3.0, 2.5])
def test_upsampling_affine_keeps_origin_and_orientation(factor):
    affine = oblique_affine((3.0, 0.6, 0.6))
    new = nifti_io.scale_z_affine(affine, 1.0 / factor)
    positions = sr.output_positions(9, factor)
    assert len(positions) == int(np.floor(8 * factor + 1e-6)) + 1
    np.testing.assert_allclose(new[:3, 3], affine[:3, 3])
    np.testing.assert_allclose(new[:3, :2], affine[:3, :2])
    assert nifti_io.Volume(np.zeros((2, 2, 2)), new).spacing_mm[0] == pytest.approx(3.0 / factor)
    for m, p in enumerate(positions):  # output slice m lies at input slice index m / factor
        np.testing.assert_allclose(world(new, m), world(affine, p), atol=1e-9)


def identity_model(lr, rel):
    return sr.lerp_z(lr, rel)[0, 0].numpy()


def test_blending_an_identity_model_reproduces_the_input():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 2000, size=(13, 40, 37)).astype(np.float32)
    seen = []

    def recording_model(lr, rel):
        seen.append(tuple(lr.shape[2:]))
        return identity_model(lr, rel)

    out = sr.blend_patches(hu, sr.output_positions(13, 1.0), recording_model, (4, 16, 16), 0.25)
    assert out.shape == hu.shape and np.abs(out - hu).max() < 1e-3
    assert set(seen) == {(4, 16, 16)} and len(seen) == 4 * 3 * 3  # z starts 0,3,6,9; y 0,12,24; x 0,12,21
    cfg = load_config(sr.Config, ROOT / "configs" / "ct_throughplane_sr.yaml", "tiny", ["infer.patch_lr=[4,16,16]"])
    np.testing.assert_array_equal(sr.upsample_hu(hu, 1.0, identity_model, cfg), hu)  # integer HU: exact
    # x2 with a z-linear "model": patches and seams leave plain linear interpolation unchanged
    positions = sr.output_positions(13, 2.0)
    out = sr.blend_patches(hu, positions, identity_model, (4, 16, 16), 0.25)
    assert np.abs(out - sr.sample_z(hu, positions)).max() < 1e-3


def test_padding_below_air_is_restored():
    hu = np.full((6, 20, 20), 40.0, np.float32)
    hu[:, :3] = -3024.0  # outside the scan field of view
    cfg = load_config(sr.Config, ROOT / "configs" / "ct_throughplane_sr.yaml", "tiny", [])
    out = sr.upsample_hu(hu, 2.0, identity_model, cfg)
    assert (out[:, :3] == -3024.0).all() and (out[:, 3:] == 40.0).all()


def test_untrained_models_start_from_interpolation_and_ignore_the_condition():
    torch.manual_seed(0)
    cfg = load_config(sr.Config, ROOT / "configs" / "ct_throughplane_sr.yaml", "tiny", [])
    lr, pos = torch.randn(1, 1, 5, 20, 12), torch.from_numpy(sr.output_positions(5, 3.0))
    torch.testing.assert_close(sr.SimpleUNet3D(cfg.unet)(lr, pos), sr.lerp_z(lr, pos))  # zero-initialised head
    net = sr.LatentDenoiser(cfg.ldm, 4).eval()
    x, t = torch.randn(2, 4, 4, 8, 8), torch.tensor([0, 14])
    torch.testing.assert_close(net(x, t, torch.randn_like(x)), net(x, t, torch.zeros_like(x)))  # zero convs
    schedule = sr.ResShift(cfg.ldm, torch.device("cpu"))
    eta = schedule.eta.numpy()
    assert len(eta) == 15 and np.all(np.diff(eta) > 0) and eta[-1] == pytest.approx(0.999, rel=1e-5)


def test_classifier_free_guidance_extrapolates_from_the_unconditional_prediction():
    def net(x, t, cond):  # a stand-in denoiser that is linear in its condition
        return x + 2.0 * cond

    x, t, y0 = torch.randn(1, 4, 2, 4, 4), torch.tensor([3]), torch.randn(1, 4, 2, 4, 4)
    torch.testing.assert_close(sr.guided_x0(net, x, t, y0, 1.0), x + 2.0 * y0)  # scale 1: plain conditional
    torch.testing.assert_close(sr.guided_x0(net, x, t, y0, 1.5), x + 3.0 * y0)  # uncond + 1.5 (cond - uncond)


def test_resume_replays_the_uninterrupted_losses(tmp_path):
    cfg = load_config(
        sr.Config,
        ROOT / "configs" / "ct_throughplane_sr.yaml",
        "tiny",
        ["data.phantom_train=2", "train.log_every=1", "train.ckpt_every=2"],
    )

    def losses(run_dir):
        return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}

    cfg.train.max_steps = 4
    sr.train(cfg, "unet3d", tmp_path / "a", "cpu", argv=[])
    cfg.train.max_steps = 2
    ckpt = sr.train(cfg, "unet3d", tmp_path / "b", "cpu", argv=[])
    cfg.train.max_steps = 4
    sr.train(cfg, "unet3d", tmp_path / "b", "cpu", resume=ckpt, argv=[])
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == [1, 2, 3, 4] and b[4] == pytest.approx(a[4], rel=1e-5)


# --- the CLI, chained on tiny volumes ---


def write_series(hu, folder, patient, spacing=(1.0, 0.9, 0.9)):
    study, series = generate_uid(), generate_uid()
    for k, plane in enumerate(hu):
        ds = dicom_io.make_ct_dataset(
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
    run(
        [
            "prepare",
            "--input",
            base / "dicom",
            "--out",
            base / "prep",
            "--val-fraction",
            0.25,
            "--test-fraction",
            0.25,
            "--preset",
            "tiny",
        ]
    )
    run(["train", "--model", "unet3d", "--data", base / "prep", "--out", base / "unet", "--max-steps", 4, *TINY])
    run(["train-vae", "--out", base / "vae", "--max-steps", 3, *TINY])
    run(
        [
            "train",
            "--model",
            "ldm",
            "--vae",
            base / "vae" / "checkpoint.pt",
            "--out",
            base / "ldm",
            "--max-steps",
            3,
            *TINY,
        ]
    )
    hr_hu = np.rint(synthetic.ct_phantom_volume((24, 48, 48), np.random.default_rng(7)))
    hr = nifti_io.Volume(hr_hu.astype(np.float32), oblique_affine((1.0, 0.8, 0.8)), {})
    nifti_io.write_nifti(base / "hr.nii.gz", hr)
    lr = sr.simulate_lr_volume(hr, sr.DataConfig())
    lr.hu = np.rint(lr.hu)
    nifti_io.write_nifti(base / "lr.nii.gz", lr)
    dicom_io.write_ct_series(lr.hu, base / "lr_dicom", (3.0, 0.8, 0.8), shuffle_names=True)
    return base


def test_prepare_splits_by_patient(chain):
    files = {s: (chain / "prep" / f"{s}.txt").read_text().split() for s in ("train", "val", "test")}
    assert sum(map(len, files.values())) == 5 and all(files.values())
    owners = {s: {f.split("_")[0] for f in names} for s, names in files.items()}
    assert sum(("P1" in o) for o in owners.values()) == 1  # never one patient in two sets
    vol = nifti_io.read_nifti(chain / "prep" / files["train"][0])
    assert vol.spacing_mm == pytest.approx((1.0, 0.9, 0.9)) and vol.hu.min() < -900  # HU, not stored values
    # the scanner geometry survives: first slice at ImagePositionPatient (-20, -15, 5) LPS = (20, 15, 5) RAS
    np.testing.assert_allclose(vol.affine[:3, 3], [20.0, 15.0, 5.0], atol=1e-4)
    np.testing.assert_allclose(vol.affine[:3, 2], [0.0, 0.0, 1.0], atol=1e-6)


def test_train_writes_run_records(chain):
    for name in ("unet", "vae", "ldm"):
        for item in ("config.yaml", "command.txt", "ct_throughplane_sr.py", "metrics.jsonl", "checkpoint.pt"):
            assert (chain / name / item).is_file(), (name, item)
    state = torch.load(chain / "ldm" / "checkpoint.pt", weights_only=True)
    assert state["kind"] == "ldm" and state["step"] == 3 and "vae" in state and state["latent_scale"] > 0


def test_upsample_nifti_overlays_the_input(chain, tmp_path):
    out = tmp_path / "sr.nii.gz"
    run(
        [
            "upsample",
            "--checkpoint",
            chain / "unet" / "checkpoint.pt",
            "--input",
            chain / "lr.nii.gz",
            "--output",
            out,
            "--preset",
            "tiny",
            "--device",
            "cpu",
        ]
    )
    lr_img, sr_img = nib.load(chain / "lr.nii.gz"), nib.load(out)
    assert sr_img.shape == (48, 48, 22) and np.isfinite(sr_img.get_fdata()).all()
    np.testing.assert_allclose(sr_img.affine, nifti_io.scale_z_affine(lr_img.affine, 1 / 3), atol=1e-5)
    a, b = sitk.ReadImage(str(chain / "lr.nii.gz")), sitk.ReadImage(str(out))
    assert b.GetSpacing() == pytest.approx((0.8, 0.8, 1.0), abs=1e-5)
    np.testing.assert_allclose(b.GetOrigin(), a.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(b.GetDirection(), a.GetDirection(), atol=1e-6)
    for k in range(a.GetSize()[2]):
        np.testing.assert_allclose(
            b.TransformIndexToPhysicalPoint((5, 7, 3 * k)), a.TransformIndexToPhysicalPoint((5, 7, k)), atol=1e-4
        )


def test_upsample_dicom_series_writes_nifti_and_a_new_series(chain, tmp_path):
    before = sha(chain / "lr_dicom")
    out = tmp_path / "sr.nii.gz"
    run(
        [
            "upsample",
            "--checkpoint",
            chain / "ldm" / "checkpoint.pt",
            "--input",
            chain / "lr_dicom",
            "--output",
            out,
            "--factor",
            2,
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--out",
            tmp_path / "log",
        ]
    )
    assert sha(chain / "lr_dicom") == before  # input untouched
    src = dicom_io.read_dicom_series(chain / "lr_dicom")
    res = dicom_io.read_dicom_series(tmp_path / "sr_dicom")
    assert res.hu.shape == (15, 48, 48) and res.spacing_mm == pytest.approx((1.5, 0.8, 0.8), abs=1e-4)
    np.testing.assert_allclose(res.affine[:3, 3], src.affine[:3, 3], atol=1e-3)
    np.testing.assert_allclose(nib.load(out).affine, res.affine, atol=1e-3)
    first, old = res.meta["datasets"][0], src.meta["datasets"][0]
    assert first.SeriesInstanceUID != old.SeriesInstanceUID and first.StudyInstanceUID == old.StudyInstanceUID
    assert float(first.SliceThickness) == pytest.approx(1.5) and float(first.SpacingBetweenSlices) == pytest.approx(1.5)
    assert json.loads((tmp_path / "log" / "upsample.json").read_text())["shape_out"] == [15, 48, 48]


def test_evaluate_reports_every_method_with_reformats(chain, tmp_path):
    run(
        [
            "evaluate",
            "--hr",
            chain / "hr.nii.gz",
            "--unet",
            chain / "unet" / "checkpoint.pt",
            "--ldm",
            chain / "ldm" / "checkpoint.pt",
            "--out",
            tmp_path,
            "--preset",
            "tiny",
            "--device",
            "cpu",
        ]
    )
    report = json.loads((tmp_path / "metrics.json").read_text())
    methods = [r["method"].split(" ")[0] for r in report["rows"]]
    assert methods == ["trilinear", "cubic", "unet3d", "ldm"]
    for row in report["rows"]:
        assert all(np.isfinite(row[k]) for k in ("psnr_db", "ssim", "mae_hu", "time_s", "peak_rss_mb"))
    assert report["rows"][1]["mae_hu"] < report["rows"][0]["mae_hu"] * 1.5  # sanity: cubic ~ linear, not garbage
    assert any("HU > -500" in n for n in report["notes"]) and any("window" in n for n in report["notes"])
    assert (tmp_path / "sagittal.png").stat().st_size > 1000 and (tmp_path / "coronal.png").is_file()


def bad_nifti_4d(path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), np.float32), np.eye(4)), path)


def bad_nifti_nan(path):
    data = np.zeros((8, 8, 4), np.float32)
    data[2, 2, 2] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def bad_two_series(path):
    path.mkdir()
    for patient in ("A", "B"):
        write_series(np.full((3, 8, 8), 10.0), path, patient)


@pytest.mark.parametrize(
    "make,name", [(bad_nifti_4d, "in.nii.gz"), (bad_nifti_nan, "in.nii.gz"), (bad_two_series, "series")]
)
def test_bad_input_fails_with_one_line_and_writes_nothing(chain, tmp_path, make, name):
    make(tmp_path / name)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run(
        [
            "upsample",
            "--checkpoint",
            chain / "unet" / "checkpoint.pt",
            "--input",
            tmp_path / name,
            "--output",
            out_dir / "sr.nii.gz",
            "--preset",
            "tiny",
            "--device",
            "cpu",
        ],
        ok=False,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert list(out_dir.iterdir()) == []
    if name == "series":
        assert "2 series" in proc.stderr
