"""dicom_zero_shot_sr.py: patch blending (unit), then the real CLI in subprocesses on tiny synthetic and real
DICOM."""

import hashlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest import ROOT, run_cli
from fixtures import make_projection_dataset
from matplotlib.image import imread
from pydicom.data import get_testdata_file
from test_zssr_sampling import pixel_to_patient

import dicom_zero_shot_sr as zssr
from common import dicom_io, synthetic

TINY = ["--preset", "tiny", "--device", "cpu"]


def run(args, ok=True, cwd=ROOT, script="dicom_zero_shot_sr.py"):
    return run_cli(script, args, cwd=cwd, ok=ok, timeout=300)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def collect(strips) -> tuple[np.ndarray, np.ndarray]:
    """The (y0, mean rows, std rows) strips of blend_tiles/super_resolve as two whole images."""
    strips = list(strips)
    return np.concatenate([m for _, m, _ in strips]), np.concatenate([s for _, _, s in strips])


def dciodvfy_errors(path: Path) -> set[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return {line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")}


# --- patch blending: exact for an identity model, seamless for a model that disagrees between tiles ---


def test_blend_identity_reproduces_input_exactly_on_odd_sized_image():
    image = np.random.default_rng(0).normal(size=(101, 77)).astype(np.float32) * 1000
    calls = []

    def identity(tiles):
        calls.append(tiles.shape)
        return tiles, np.zeros_like(tiles)

    asked = []

    def rows(y0, y1):
        asked.append((y0, y1))
        return image[y0:y1]

    strips = list(zssr.blend_tiles(rows, image.shape, identity, tile=32, overlap=12, batch=3))
    assert len(calls) > 3 and all(c[1:] == (32, 32) for c in calls)  # really tiled, with overlapping tiles
    assert all(y1 - y0 == 32 for y0, y1 in asked)  # the image is only ever read one tile row at a time
    assert [y0 for y0, _, _ in strips] == list(np.cumsum([0] + [len(m) for _, m, _ in strips[:-1]]))
    assert max(len(m) for _, m, _ in strips) <= 32  # finished rows leave as soon as they are final
    mean, std = collect(strips)
    assert np.array_equal(mean, image)
    assert np.array_equal(std, np.zeros_like(image))


def test_blend_has_no_seams_when_tiles_disagree():
    image = np.zeros((90, 70), np.float32)
    offsets = iter(np.random.default_rng(1).uniform(0, 1, size=100))

    def shifted(tiles):  # each tile comes back shifted by its own constant: a worst case for seams
        out = np.stack([t + next(offsets) for t in tiles])
        return out, np.zeros_like(out)

    def max_jump(a):
        return max(np.abs(np.diff(a, axis=0)).max(), np.abs(np.diff(a, axis=1)).max())

    def blend(overlap):
        strips = zssr.blend_tiles(lambda a, b: image[a:b], image.shape, shifted, 40, overlap)
        return collect(strips)[0]

    blended, hard = blend(16), blend(0)  # no overlap: butt-joined tiles
    assert np.ptp(blended) > 0.3  # tiles did disagree
    assert max_jump(blended) < 0.15  # smooth cross-fade: about pi/(2*16) per pixel for a unit disagreement
    assert max_jump(hard) > 3 * max_jump(blended)


def test_tiled_inference_with_identity_model_reproduces_input_exactly():
    """The whole inference path (normalise, tile, pad to the UNet divisor, sample n times, blend, invert) with
    a model that returns its conditioning: an untrained UNet, whose last conv is zero-initialised, predicts
    x0 = conditioning. Odd sizes, a factor of 3 and tiles narrower than the image exercise every edge case."""
    cfg = zssr.load_config(zssr.Config, zssr.default_config_path(zssr.__file__), "tiny", None)
    model = zssr.UNet(cfg.model).eval()
    schedule = zssr.Schedule(cfg.diffusion.timesteps, cfg.diffusion.schedule)
    values = np.random.default_rng(2).normal(300, 200, size=(15, 41)).astype(np.float32)  # 45 x 123 output
    stored = (-1024.0, 3071.0)
    normaliser = zssr.Normaliser.fit(values, cfg.data.percentiles)
    strips = zssr.super_resolve(
        model, schedule, values, None, normaliser, 3, cfg, torch.device("cpu"), stored
    )
    sr, std = collect(strips)
    cond = zssr.upsample(torch.from_numpy(normaliser.forward(values)), 3).numpy()
    assert sr.shape == (45, 123) and cfg.sample.patch_size < 123  # several tiles across
    assert np.array_equal(sr, np.clip(normaliser.inverse(cond), *stored).astype(np.float32))
    assert np.array_equal(std, np.zeros_like(std))


def test_uncertainty_outputs_png_colour_bar_and_dicom(tmp_path):
    stored = synthetic.mammogram((40, 32), np.random.default_rng(0), bits_stored=14)
    ds = make_projection_dataset(stored, modality="MG", bits_stored=14, monochrome1=True)
    cfg = zssr.load_config(zssr.Config, zssr.default_config_path(zssr.__file__), "tiny", None)
    std = np.zeros((80, 64), np.float32)
    std[40, 30] = (
        7.0  # one uncertain pixel: a black map, so every colour in the PNG belongs to the colour bar
    )
    sr, unc_map = raw_image(np.full_like(std, 500)), raw_image(std)
    info = zssr.write_outputs(tmp_path, tmp_path / "in.dcm", ds, sr, unc_map, 7.0, 2, cfg)
    png = imread(tmp_path / "uncertainty.png")[..., :3]
    saturated = png.max(-1) - png.min(-1) > 0.3  # magma's purples, oranges and yellows
    assert len(np.unique(png.reshape(-1, 3), axis=0)) > 100 and saturated.sum() > 2000
    unc, unc_ds = dicom_io.read_dicom(info["uncertainty_dicom"])
    assert unc.shape == std.shape and unc[40, 30] == 7.0 and unc.sum() == 7.0
    assert unc_ds.PhotometricInterpretation == "MONOCHROME2" and unc_ds.PresentationLUTShape == "IDENTITY"
    assert [float(v) for v in unc_ds.ImagerPixelSpacing] == [0.035, 0.035]


def raw_image(values: np.ndarray) -> dicom_io.RawImage:
    return dicom_io.RawImage(io.BytesIO(values.astype("<f4").tobytes()), values.shape)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_upsample_is_torch_bicubic_and_any_row_strip_is_exact(factor):
    low = torch.from_numpy(np.random.default_rng(factor).normal(size=(37, 29)).astype(np.float32))
    full = zssr.upsample(low, factor)
    # torch's kernel in float64 (its float32 source coordinates are off by 1e-5 at x3 already on 111 rows)
    reference = torch.nn.functional.interpolate(
        low[None, None].double(), scale_factor=factor, mode="bicubic"
    )[0, 0]
    assert full.shape == (37 * factor, 29 * factor) and torch.allclose(
        full.double(), reference, atol=1e-6, rtol=0
    )
    for y0, y1 in [(0, 5), (3, 40), (17, 18), (37 * factor - 9, 37 * factor), (0, 37 * factor)]:
        strip = zssr.upsample_rows(lambda a, b: low[a:b], len(low), factor, y0, y1)
        assert torch.equal(strip, full[y0:y1])  # bit for bit, not close


def test_uncertainty_map_block_maximum_keeps_single_pixels(tmp_path):
    std = np.zeros((700, 300), np.float32)
    std[699, 5], std[3, 299] = 2.0, 1.0
    shown, k = zssr.display_map(raw_image(std), max_side=100)
    assert (
        k == 7
        and shown.shape == (100, 43)
        and shown[99, 0] == 2.0
        and shown[0, 42] == 1.0
        and shown.sum() == 3.0
    )


def test_normaliser_inverse():
    values = np.array([[-1024.0, 0.0], [40.0, 3071.0]], np.float32)
    norm = zssr.Normaliser.fit(values, (0.5, 99.5))
    assert np.allclose(norm.inverse(norm.forward(values)), values, atol=1e-3)


# --- the real CLI ---


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    stored = synthetic.mammogram((96, 80), np.random.default_rng(0), bits_stored=14)
    mg_ds = make_projection_dataset(stored, modality="MG", bits_stored=14, monochrome1=True)
    mg = dicom_io.write_dataset(mg_ds, folder / "mg.dcm")
    # pydicom-data: a real 512x512 head CT, signed 16-bit, JPEG 2000 lossless (decoded through common/)
    ct = Path(shutil.copy(get_testdata_file("693_J2KR.dcm"), folder / "ct_693.dcm"))
    return {"mg": mg, "ct": ct, "hashes": {mg: sha(mg), ct: sha(ct)}}


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    # 6 steps: the time estimate after the first steps (training and inference) is made and logged
    run(["full", "--input", inputs["mg"], "--upscale", 2, "--out", base / "mg", *TINY, "--max-steps", 6])
    return base


@pytest.fixture(scope="module")
def ct_run(inputs, tmp_path_factory):
    """`full` on the real CT (1024 x 1024 output: 128-pixel tiles keep the tile count small)."""
    out = tmp_path_factory.mktemp("runs") / "ct"
    run(
        [
            "full",
            "--input",
            inputs["ct"],
            "--upscale",
            2,
            "--out",
            out,
            *TINY,
            "--set",
            "sample.patch_size=128",
        ]
    )
    return out


def check_output(src: Path, out_dir: Path, factor: int, trained: bool = True):
    source = pydicom.dcmread(src)
    sr_path = out_dir / f"{src.stem}_sr_x{factor}.dcm"
    sr = pydicom.dcmread(sr_path)
    assert (sr.Rows, sr.Columns) == (source.Rows * factor, source.Columns * factor)
    spacings = [k for k in ("PixelSpacing", "ImagerPixelSpacing") if k in source]
    assert spacings
    for keyword in spacings:
        for old, new in zip(source[keyword].value, sr[keyword].value):
            assert float(new) == pytest.approx(float(old) / factor, rel=1e-5), keyword
    assert sr.SOPInstanceUID != source.SOPInstanceUID and sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.PhotometricInterpretation == source.PhotometricInterpretation and sr.BitsAllocated == 16
    assert "DERIVED" in sr.ImageType and f"x{factor}" in sr.DerivationDescription
    assert str(sr.file_meta.TransferSyntaxUID) == pydicom.uid.ExplicitVRLittleEndian
    values, _ = dicom_io.read_dicom(sr_path)
    lo, hi = dicom_io.stored_range(source)
    assert lo <= values.min() and values.max() <= hi
    # physical scale kept (no 8-bit, no normalised units): a few training steps stay close to bicubic
    source_values, _ = dicom_io.read_dicom(src)
    bicubic = np.clip(zssr.upsample(torch.from_numpy(source_values), factor).numpy(), lo, hi)
    assert np.abs(values - bicubic).mean() < 0.02 * np.ptp(source_values)
    pad = dicom_io.padding_mask(source_values, source)
    if (
        pad is not None
    ):  # PixelPaddingValue pixels (CT outside the FOV) come back unchanged, nearest-upsampled
        pad_up = np.kron(pad, np.ones((factor, factor), bool))
        assert pad.any() and np.array_equal(
            values[pad_up], np.kron(source_values, np.ones((factor, factor)))[pad_up]
        )
    unc, unc_ds = dicom_io.read_dicom(out_dir / "uncertainty.dcm")
    assert unc.shape == values.shape and unc.min() >= 0 and unc.max() > 0  # samples differ once trained
    assert unc_ds.SeriesInstanceUID not in (sr.SeriesInstanceUID, source.SeriesInstanceUID)
    assert unc_ds.PhotometricInterpretation == "MONOCHROME2"  # bright = uncertain, whatever the input
    assert all(unc_ds[k].value == sr[k].value for k in spacings)
    if "ImagePositionPatient" in source:  # the landmark test of test_zssr_sampling, on the real file
        for out in (sr, unc_ds):
            for r, c in [(0, 0), (source.Rows - 1, 17)]:
                found = pixel_to_patient(out, factor * (r + 0.5) - 0.5, factor * (c + 0.5) - 0.5)
                assert np.abs(found - pixel_to_patient(source, r, c)).max() < 0.01
    names = ["uncertainty.png", "preview.png", "metrics.json", "config.yaml", "command.txt"]
    for name in names + (["model.pt", "train.log", "metrics.jsonl"] if trained else []):
        assert (out_dir / name).is_file(), name
    return values


def test_full_on_synthetic_monochrome1_mammogram(inputs, runs):
    check_output(inputs["mg"], runs / "mg", 2)
    log = (runs / "mg" / "train.log").read_text()
    assert "estimated time left:" in log and ", inference " in log  # from the timed first steps
    assert "inference tiles step" in log and "eta " in log  # the sampler loop reports progress too
    record = json.loads((runs / "mg" / "metrics.json").read_text())
    # the tiny preset has no perceptual term: said so
    assert record["rows"][0]["perceptual"].startswith("off")
    assert sha(inputs["mg"]) == inputs["hashes"][inputs["mg"]]


@pytest.mark.slow
def test_full_on_real_compressed_ct_from_pydicom_data(inputs, ct_run):
    check_output(inputs["ct"], ct_run, 2)
    assert sha(inputs["ct"]) == inputs["hashes"][inputs["ct"]]


def check_with_dcmtk(src: Path, out_dir: Path):
    missing = [tool for tool in ("dciodvfy", "dcmdump") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install dicom3tools dcmtk)")
    for out in (out_dir / f"{src.stem}_sr_x2.dcm", out_dir / "uncertainty.dcm"):
        dump = subprocess.run(["dcmdump", str(out)], capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0, dump.stderr
        rows = f"(0028,0010) US {pydicom.dcmread(src).Rows * 2} "  # Rows as dcmtk reads them
        assert rows in dump.stdout
        new_errors = dciodvfy_errors(out) - dciodvfy_errors(src)
        assert not new_errors, f"dciodvfy: new errors in {out.name}: {sorted(new_errors)}"


def test_outputs_open_in_dcmtk_and_pass_dciodvfy_with_no_new_errors(inputs, runs):
    check_with_dcmtk(inputs["mg"], runs / "mg")


@pytest.mark.slow
def test_real_ct_outputs_pass_dciodvfy_with_no_new_errors(inputs, ct_run):
    check_with_dcmtk(inputs["ct"], ct_run)


def test_inference_from_checkpoint_with_its_factor(inputs, runs, tmp_path):
    model = runs / "mg" / "model.pt"
    args = ["inference", "--input", inputs["mg"], "--checkpoint", model, "--out", tmp_path / "inf"]
    run([*args, "--device", "cpu", "--samples", 3])
    check_output(inputs["mg"], tmp_path / "inf", 2, trained=False)
    config = (tmp_path / "inf" / "config.yaml").read_text()
    assert "n_samples: 3" in config and "base_channels: 8" in config  # the model's config, one sample change
    missing = tmp_path / "missing.pt"
    bad = [
        "inference",
        "--input",
        inputs["mg"],
        "--model-path",
        missing,
        "--out",
        tmp_path / "bad",
    ]  # old name
    proc = run(bad, ok=False)
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr and not (tmp_path / "bad").exists()


def test_evaluate_reports_gains_over_both_baselines_under_each_degradation(inputs, tmp_path):
    mr = get_testdata_file("MR_small.dcm")
    run(
        [
            "evaluate",
            "--input",
            inputs["mg"],
            "--input",
            mr,
            "--out",
            tmp_path / "ev",
            *TINY,
            "--max-steps",
            2,
        ]
    )
    record = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    rows, summary = record["rows"], record["summary"]
    assert len(rows) == 2 * 3 * 3  # images x degradations x methods
    assert [r["degradation"] for r in summary] == ["matched", "area", "gaussian+noise"]
    for image in ("mg.dcm", "MR_small.dcm"):
        for name in ("matched", "area", "gaussian+noise"):
            case = {r["method"]: r for r in rows if r["image"] == image and r["degradation"] == name}
            ours, bicubic, lanczos = case["zero-shot diffusion"], case["bicubic"], case["lanczos4"]
            assert 0 < bicubic["psnr_fov_db"] < 100 and 0 < ours["ssim_fov"] <= 1
            assert ours["gain_bicubic_db"] == pytest.approx(ours["psnr_fov_db"] - bicubic["psnr_fov_db"])
            assert ours["gain_lanczos_db"] == pytest.approx(ours["psnr_fov_db"] - lanczos["psnr_fov_db"])
            assert (ours["noise_std"] > 0) == name.endswith("+noise")
            assert (
                tmp_path
                / "ev"
                / f"0{1 + (image == 'MR_small.dcm')}_{Path(image).stem}"
                / name.replace("+", "_")
            ).is_dir()
        psnrs = {
            r["degradation"]: r["psnr_fov_db"]
            for r in rows
            if r["image"] == image and r["method"] == "bicubic"
        }
        assert len(set(psnrs.values())) == 3  # three different inputs
    gains = [r["gain_bicubic_db"] for r in rows if r["degradation"] == "area" and "gain_bicubic_db" in r]
    assert summary[1]["mean_gain_bicubic_db"] == pytest.approx(np.mean(gains))


def test_evaluate_psnr_inside_the_field_of_view_excludes_padding():
    values = np.zeros((40, 40), np.float32)
    pad = np.zeros((40, 40), bool)
    pad[:, :10] = True
    pred = values.copy()
    pred[:, :10] = 50.0  # wrong only in the padding
    pred[:, 20] = 1.0
    scores = zssr.score(pred, values, ~pad, (0.0, 100.0))
    assert scores["psnr_fov_db"] > scores["psnr_db"] + 20
    assert scores["mae_fov"] == pytest.approx(1 / 30)


@pytest.mark.parametrize("name", ["matched", "area", "gaussian", "gaussian+noise"])
def test_evaluation_degradations(name):
    cfg = _tiny_cfg()
    reference = np.random.default_rng(0).normal(0, 1, (32, 24)).astype(np.float32)
    low = zssr.degrade_for_eval(reference, 2, name, cfg, 0.5)
    assert low.shape == (16, 12) and low.dtype == np.float32
    block_mean = reference.reshape(16, 2, 12, 2).mean((1, 3))
    if name == "area":
        assert np.allclose(low, block_mean, atol=1e-6)
    elif name == "matched":
        assert np.array_equal(low, zssr.degrade(torch.from_numpy(reference), 2, "bilinear").numpy())
    else:  # blurred before the block mean: smoother than it; noise adds about its std
        residual = np.std(low - block_mean)
        assert (0.4 < residual < 0.7) if name.endswith("+noise") else (0.05 < residual < 0.4)


def test_copied_into_an_empty_folder_runs_with_a_partial_config_file(inputs, tmp_path):
    """The script, common/ and its config alone run `full`; a partial override file applies over the
    preset."""
    shutil.copy(ROOT / "dicom_zero_shot_sr.py", tmp_path)
    shutil.copytree(ROOT / "common", tmp_path / "common", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "dicom_zero_shot_sr.yaml", tmp_path / "configs")
    (tmp_path / "mine.yaml").write_text("train: {steps: 3}\nsample: {n_samples: 2}\n")
    args = [
        "full",
        "--input",
        inputs["mg"],
        "--out",
        tmp_path / "out",
        *TINY,
        "--config",
        tmp_path / "mine.yaml",
    ]
    run(args, cwd=tmp_path, script=tmp_path / "dicom_zero_shot_sr.py")
    resolved = (tmp_path / "out" / "config.yaml").read_text()
    assert "steps: 3" in resolved and "base_channels: 8" in resolved  # the file over the tiny preset
    assert (tmp_path / "out" / "mg_sr_x2.dcm").is_file()


def test_cpu_estimate_warns_and_names_the_presets_that_fit(tmp_path):
    cfg = _tiny_cfg()
    model = zssr.UNet(cfg.model)
    with pytest.warns(UserWarning, match="--preset small .* 60 min"):
        seconds = zssr.estimate_run_time(model, cfg, 2.0, 20_000, (512, 512), tmp_path)
    assert seconds > 40_000 and "estimated time left: 11h" in (tmp_path / "train.log").read_text()


def test_bad_input_one_line_nonzero_and_nothing_written(inputs, tmp_path):
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(inputs["mg"].read_bytes()[:3000])
    for bad in (get_testdata_file("SC_rgb.dcm"), truncated):
        out = tmp_path / f"out_{Path(bad).stem}"
        proc = run(["full", "--input", bad, "--upscale", 2, "--out", out, *TINY], ok=False)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, (
            proc.stderr
        )
        assert not out.exists()


def _tiny_cfg(*overrides):
    return zssr.load_config(
        zssr.Config, ROOT / "configs" / "dicom_zero_shot_sr.yaml", "tiny", list(overrides)
    )


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows}


def test_train_stopped_then_resumed_equals_the_uninterrupted_run(tmp_path, killed_at_step):
    """Killed after its step-2 training state, `--resume` continues exactly: the same losses for steps 3-4
    and the same final weights as a run that was never stopped (CPU, fixed seed; dropout, cosine lr)."""
    cfg = _tiny_cfg("train.steps=4", "train.ckpt_every=2", "train.lr_schedule=cosine", "model.dropout=0.1")
    x = np.random.default_rng(0).uniform(-1, 1, (40, 36)).astype(np.float32)
    for name in ("straight", "killed", "other"):
        (tmp_path / name).mkdir()
    straight, _, _ = zssr.train_model(x, 2, cfg, torch.device("cpu"), tmp_path / "straight")

    with killed_at_step(3):
        zssr.train_model(x, 2, cfg, torch.device("cpu"), tmp_path / "killed")
    state = tmp_path / "killed" / "train_state.pt"
    assert torch.load(state, weights_only=True)["step"] == 2
    resumed, _, _ = zssr.train_model(x, 2, cfg, torch.device("cpu"), tmp_path / "killed", resume=state)
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "killed")
    assert [b[s] for s in (3, 4)] == pytest.approx([a[s] for s in (3, 4)], rel=1e-6, abs=1e-9)
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in straight.state_dict().items())
    with pytest.raises(zssr.UserError, match="not a training state of this run"):
        zssr.train_model(
            x, 3, cfg, torch.device("cpu"), tmp_path / "other", resume=state
        )  # another --upscale


def test_non_finite_loss_stops_before_the_update(tmp_path, monkeypatch):
    cfg = _tiny_cfg("train.steps=3")
    x = np.random.default_rng(0).uniform(-1, 1, (40, 36)).astype(np.float32)
    nan = {"loss": torch.tensor(float("nan"), requires_grad=True)}
    monkeypatch.setattr(zssr, "training_losses", lambda *a, **k: nan)
    (tmp_path / "run").mkdir()
    with pytest.raises(
        zssr.UserError, match="non-finite loss .* at step 1; training stopped before the update"
    ):
        zssr.train_model(x, 2, cfg, torch.device("cpu"), tmp_path / "run")
    assert not (tmp_path / "run" / "train_state.pt").exists()
