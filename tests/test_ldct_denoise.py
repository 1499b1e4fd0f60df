"""Stage-0 smoke tests of ldct_denoise.py through its real CLI (subprocesses), on tiny synthetic data."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import run_cli
from fixtures import make_ct_dataset, write_ct_series
from pydicom.data import get_testdata_file

from common import dicom_io, synthetic

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "ldct_denoise.py"
# A 64x64-phantom, 32x32-crop configuration of the tiny preset: seconds per run on 2 CPU cores.
FAST = [
    "--preset",
    "tiny",
    "--device",
    "cpu",
    "--set",
    "data.phantom_size=64",
    "--set",
    "data.crop_size=32",
    "--set",
    "data.phantom_train=8",
    "--set",
    "data.phantom_val=4",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.log_every=1",
    "--set",
    "train.ckpt_every=3",
]


def losses(run_dir: Path) -> dict[int, float]:
    return {
        r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    }


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Six steps straight, and three steps + --resume to six: resumed losses must equal the straight run."""
    base = tmp_path_factory.mktemp("ldct")
    run_cli(SCRIPT, ["train", "--out", base / "straight", "--max-steps", 6, *FAST])
    run_cli(SCRIPT, ["train", "--out", base / "resumed", "--max-steps", 3, *FAST])
    run_cli(
        SCRIPT,
        [
            "train",
            "--out",
            base / "resumed",
            "--max-steps",
            6,
            "--resume",
            base / "resumed" / "checkpoint.pt",
            *FAST,
        ],
    )
    unet = ["baseline", "--kind", "unet", "--out", base / "unet", "--max-steps", 3, "--max-slices", 2]
    run_cli(SCRIPT, [*unet, *FAST])
    return base


def test_train_writes_a_complete_run_record(trained):
    run_dir = trained / "straight"
    for name in (
        "config.yaml",
        "command.txt",
        "ldct_denoise.py",
        "metrics.jsonl",
        "train.log",
        "checkpoint.pt",
        "preview.png",
    ):
        assert (run_dir / name).is_file(), name
    assert all(np.isfinite(v) for v in losses(run_dir).values())
    import torch

    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6 and state["script"] == "ldct_denoise"


def test_resume_reproduces_the_uninterrupted_losses_and_weights(trained):
    straight, resumed = losses(trained / "straight"), losses(trained / "resumed")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (1, 2, 3, 4, 5, 6):  # 1-3: same seed, same losses; 4-6: after --resume
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-9), step
    import torch

    a, b = (torch.load(trained / d / "checkpoint.pt", weights_only=True) for d in ("straight", "resumed"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_denoise_dicom_series_keeps_study_and_geometry(trained, tmp_path):
    rng = np.random.default_rng(0)
    volume = np.stack([synthetic.ct_phantom(48, rng) for _ in range(3)])
    series = tmp_path / "series"
    write_ct_series(volume, series, (2.0, 0.8, 0.8), shuffle_names=True)
    before = {p.name: sha(p) for p in series.iterdir()}
    out = tmp_path / "out"
    run_cli(
        SCRIPT,
        [
            "denoise",
            "--checkpoint",
            trained / "straight" / "checkpoint.pt",
            "--input",
            series,
            "--output",
            out,
            "--steps",
            3,
            "--device",
            "cpu",
        ],
    )
    assert {p.name: sha(p) for p in series.iterdir()} == before  # input untouched
    written = sorted(out.glob("*.dcm"))
    assert len(written) == 3
    sources = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in series.iterdir()}
    series_uids = set()
    for path in written:
        ds = pydicom.dcmread(path)
        hu, _ = dicom_io.read_dicom(path)
        assert hu.shape == (48, 48) and np.isfinite(hu).all()
        assert ds.SOPInstanceUID not in sources
        src = next(iter(sources.values()))
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        assert "DERIVED" in ds.ImageType
        series_uids.add(ds.SeriesInstanceUID)
    assert len(series_uids) == 1  # one new series for the whole output
    run_cli(
        SCRIPT,
        [
            "denoise",
            "--checkpoint",
            trained / "straight" / "checkpoint.pt",
            "--input",
            series,
            "--output",
            tmp_path / "again",
            "--steps",
            3,
            "--device",
            "cpu",
        ],
    )
    for path in written:  # same seed, same command -> identical HU
        assert np.array_equal(
            dicom_io.read_dicom(path)[0], dicom_io.read_dicom(tmp_path / "again" / path.name)[0]
        )


def test_denoise_real_ct_slice_passes_validator(trained, tmp_path):
    src = Path(get_testdata_file("693_UNCR.dcm"))
    inp = tmp_path / "ct.dcm"
    shutil.copy(src, inp)
    out = tmp_path / "ct_denoised.dcm"
    run_cli(
        SCRIPT,
        [
            "denoise",
            "--checkpoint",
            trained / "straight" / "checkpoint.pt",
            "--input",
            inp,
            "--output",
            out,
            "--steps",
            2,
            "--device",
            "cpu",
        ],
    )
    ds_in, ds_out = pydicom.dcmread(inp), pydicom.dcmread(out)
    assert (ds_out.PatientID, ds_out.StudyInstanceUID) == (ds_in.PatientID, ds_in.StudyInstanceUID)
    assert (ds_out.Rows, ds_out.Columns) == (512, 512) and ds_out.PixelSpacing == ds_in.PixelSpacing
    hu, _ = dicom_io.read_dicom(out)
    hu_in, ds_read = dicom_io.read_dicom(inp)
    pad = dicom_io.padding_mask(hu_in, ds_read)
    assert pad is not None and pad.mean() > 0.1  # this slice has a circular FOV padded with -3024 HU
    assert np.array_equal(hu[pad], hu_in[pad])  # padding is "no data": restored unchanged
    assert (
        np.isfinite(hu).all() and hu[~pad].min() >= -1024 and hu[~pad].max() <= 3072
    )  # the config's HU range
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")

    def errors(path):
        proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        lines = (proc.stdout + proc.stderr).splitlines()
        return {line.split(" - ", 1)[-1] for line in lines if line.startswith("Error")}

    assert errors(out) - errors(inp) == set()


def test_eval_reports_input_nlm_and_model(trained, tmp_path):
    out = tmp_path / "eval"
    run_cli(
        SCRIPT,
        [
            "evaluate",
            "--checkpoint",
            trained / "straight" / "checkpoint.pt",
            "--out",
            out,
            "--steps",
            3,
            "--max-slices",
            3,
            "--samples",
            2,
            "--unet",
            trained / "unet" / "unet.pt",
            "--device",
            "cpu",
        ],
    )
    report = json.loads((out / "metrics.json").read_text())
    methods = [r["method"] for r in report["rows"]]
    assert methods[0] == "low-dose input" and methods[1].startswith("NLM") and methods[2].startswith("BM3D")
    assert methods[3].startswith("diffusion") and methods[4] == f"mean of 2 samples: {methods[3]}"
    assert methods[5:] == ["U-Net regression (RED-CNN-like)", "ensemble: mean of the diffusion and the U-Net"]
    assert [r["nfe"] for r in report["rows"][3:]] == [3, 6, 1, 4]
    for row in report["rows"]:
        assert np.isfinite([row["psnr_db"], row["ssim"], row["mae_hu"]]).all()
    assert any("window" in note for note in report["notes"])
    assert (out / "eval_panel.png").is_file()


def test_script_runs_from_a_copy_in_an_empty_folder(tmp_path):
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "ldct_denoise.py", tmp_path)
    shutil.copytree(ROOT / "common", tmp_path / "common")
    shutil.copy(ROOT / "configs" / "ldct_denoise.yaml", tmp_path / "configs")
    run_cli(tmp_path / "ldct_denoise.py", ["train", "--out", "run", "--max-steps", 2, *FAST], cwd=tmp_path)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun not available",
)
def test_torchrun_two_process_ddp(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "ldct_denoise.py"),
        "train",
        "--out",
        str(tmp_path / "ddp"),
        "--max-steps",
        "2",
        *FAST,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import torch

    state = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 2


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    good = make_ct_dataset(synthetic.ct_phantom(32, rng))
    dicom_io.write_dataset(good, tmp_path / "good.dcm")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes((tmp_path / "good.dcm").read_bytes()[:900])
    no_pixels = tmp_path / "no_pixels.dcm"
    ds = pydicom.dcmread(tmp_path / "good.dcm")
    del ds.PixelData
    ds.save_as(no_pixels)
    rgb = tmp_path / "rgb.dcm"
    shutil.copy(get_testdata_file("SC_rgb_16bit.dcm"), rgb)
    two_series = tmp_path / "two_series"
    write_ct_series(np.stack([synthetic.ct_phantom(32, rng)] * 2), two_series / "a", (1.0, 0.7, 0.7))
    write_ct_series(np.stack([synthetic.ct_phantom(32, rng)] * 2), two_series / "b", (1.0, 0.7, 0.7))
    for f in (two_series / "b").iterdir():
        f.rename(two_series / f"b_{f.name}")
    for f in (two_series / "a").iterdir():
        f.rename(two_series / f"a_{f.name}")
    (two_series / "a").rmdir()
    (two_series / "b").rmdir()
    return {"truncated": truncated, "no_pixels": no_pixels, "rgb": rgb, "two_series": two_series}


def test_bad_inputs_fail_with_one_line_and_write_nothing(trained, tmp_path):
    for name, bad in _bad_inputs(tmp_path).items():
        out = tmp_path / f"out_{name}"
        files = [bad] if bad.is_file() else sorted(bad.iterdir())
        before = [sha(f) for f in files]
        proc = run_cli(
            SCRIPT,
            [
                "denoise",
                "--checkpoint",
                trained / "straight" / "checkpoint.pt",
                "--input",
                bad,
                "--output",
                out / "x.dcm" if bad.is_file() else out,
                "--steps",
                2,
                "--device",
                "cpu",
            ],
            ok=False,
        )
        assert proc.returncode != 0, name
        lines = [line for line in proc.stderr.strip().splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith("error:"), (name, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
        assert not out.exists() or not any(out.rglob("*")), name
        assert [sha(f) for f in files] == before


def test_bad_config_and_checkpoint_fail_cleanly(tmp_path):
    proc = run_cli(SCRIPT, ["train", "--out", tmp_path / "r", "--set", "train.nope=1", *FAST], ok=False)
    assert (
        proc.returncode == 2 and "unknown key 'train.nope'" in proc.stderr and "Traceback" not in proc.stderr
    )
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"nope")
    proc = run_cli(SCRIPT, ["eval", "--checkpoint", junk, "--device", "cpu"], ok=False)  # the hidden old name
    assert proc.returncode == 2 and "not a loadable checkpoint" in proc.stderr


# --- simulate: real single-dose CT -> cached pairs on disk ---


def write_volume(path: Path, hu: np.ndarray, spacing=(2.0, 2.5, 2.5)) -> Path:
    from common.nifti_io import Volume, write_nifti

    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    return write_nifti(path, Volume(np.rint(hu).astype(np.float32), affine, {}))


def test_simulate_writes_a_resumable_split_dataset_that_train_reads(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "ct"
    for patient in ("p1", "p2", "p3"):
        write_volume(src / f"{patient}.nii.gz", np.stack([synthetic.ct_phantom(40, rng) for _ in range(3)]))
    before = {f: sha(f) for f in src.iterdir()}
    out = tmp_path / "pairs"
    simulate = ["simulate", "--input", src, "--output", out, "--doses", "0.25,0.5", *FAST[:2]]
    simulate += ["--set", "data.draws=2", "--set", "data.val_fraction=0.34"]
    proc = run_cli(SCRIPT, simulate)
    split = json.loads((out / "split.json").read_text())
    assert sorted(split["train"]) == ["000_p1", "001_p2"] and sorted(split["val"]) == ["002_p3"]
    low, full = np.load(out / "000_p1" / "low.npy"), np.load(out / "000_p1" / "full.npy")
    assert low.shape == (3, 4, 40, 40) and full.shape == (3, 40, 40)  # 2 doses x 2 draws per slice
    assert json.loads((out / "000_p1" / "meta.json").read_text())["doses"] == [0.25, 0.25, 0.5, 0.5]
    body = full[0] > -500
    noise = low[0] - full[0]
    assert noise[0][body].std() > noise[2][body].std() > 1  # quarter dose noisier than half dose
    assert not np.array_equal(noise[0], noise[1])  # two independent draws
    assert {f: sha(f) for f in src.iterdir()} == before  # inputs untouched
    # resumable: an unfinished volume is redone, finished ones are kept
    (out / "002_p3" / "meta.json").unlink()
    proc = run_cli(SCRIPT, simulate)
    assert proc.stdout.count("done earlier, kept") == 2 and (out / "002_p3" / "meta.json").is_file()
    proc = run_cli(SCRIPT, ["train", "--data", out, "--out", tmp_path / "run", "--max-steps", 2, *FAST])
    assert (
        "simulated from 3 patient(s)" in proc.stdout and "24 slices" in proc.stdout
    )  # 2 volumes x 3 x 4 draws


def test_one_volume_splits_into_train_and_validation_blocks_with_a_gap():
    import ldct_denoise as ld

    (spans,) = ld.split_volumes(["only"], [40], 0.2)
    train, val = range(*spans["train"]), range(*spans["val"])
    assert (
        len(val) == 8 and set(train).isdisjoint(val) and val[0] - train[-1] >= 2
    )  # at least one slice between
    two = ld.split_volumes(["same", "same"], [10, 10], 0.2)  # one patient, two series: blocks over both
    assert "val" not in two[0] and two[1]["val"] == (6, 10) and two[1]["train"] == (0, 5)
    with pytest.raises(ld.UserError, match="at least 3"):
        ld.split_volumes(["one"], [2], 0.2)


def test_denoise_warns_once_about_a_sheared_nifti_and_keeps_its_affine(trained, tmp_path):
    import nibabel as nib

    from common.nifti_io import Volume, write_nifti

    affine = np.array(
        [[0.8, 0, 0, 0], [0, 0.8, 0, 0], [0, 0.35, 2.0, 0], [0, 0, 0, 1.0]]
    )  # gantry-tilt shear
    hu = np.stack([synthetic.ct_phantom(48, np.random.default_rng(k)) for k in range(2)])
    src = write_nifti(tmp_path / "tilted.nii.gz", Volume(np.rint(hu), affine, {}))
    out = tmp_path / "out.nii.gz"
    proc = run_cli(
        SCRIPT,
        [
            "denoise",
            "--checkpoint",
            trained / "straight" / "checkpoint.pt",
            "--input",
            src,
            "--output",
            out,
            "--steps",
            2,
            "--device",
            "cpu",
        ],
    )
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "tilted.nii.gz" in warnings[0] and "sheared" in warnings[0], proc.stderr
    assert np.allclose(nib.load(out).affine, nib.load(src).affine)


def test_denoise_with_unet_writes_the_mean_of_the_two_models(trained, tmp_path):
    """`denoise --unet`: each output voxel is the mean of the diffusion's output and the U-Net's."""
    import nibabel as nib
    import torch

    import ldct_denoise as ld
    from common.nifti_io import Volume, write_nifti

    hu = np.stack([synthetic.ct_phantom(48, np.random.default_rng(k)) for k in range(2)]).astype(np.float32)
    src = write_nifti(tmp_path / "low.nii.gz", Volume(hu + 0.5, np.diag([0.8, 0.8, 2.0, 1.0]), {}))
    outputs = {}
    for name, extra in (("diffusion", []), ("ensemble", ["--unet", trained / "unet" / "unet.pt"])):
        out = tmp_path / f"{name}.nii.gz"
        args = ["--checkpoint", trained / "straight" / "checkpoint.pt", "--input", src, "--output", out]
        run_cli(SCRIPT, ["denoise", *args, "--steps", 2, "--device", "cpu", *extra])
        outputs[name] = nib.load(out).get_fdata().transpose(2, 1, 0)
    unet = ld.unet_denoiser(trained / "unet" / "unet.pt", torch.device("cpu"))
    unet_hu = np.stack([unet(s) for s in nib.load(src).get_fdata().transpose(2, 1, 0).astype(np.float32)])
    assert np.abs(outputs["diffusion"] - unet_hu).max() > 1.0  # the two models differ, so the mean is a test
    np.testing.assert_allclose(outputs["ensemble"], (outputs["diffusion"] + unet_hu) / 2, atol=1e-2)
