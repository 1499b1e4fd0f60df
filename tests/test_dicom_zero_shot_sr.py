"""dicom_zero_shot_sr.py: patch blending (unit), then the real CLI in subprocesses on tiny synthetic and real DICOM."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from matplotlib.image import imread
from pydicom.data import get_testdata_file

import dicom_zero_shot_sr as zssr
from common import dicom_io, synthetic

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--device", "cpu"]


def run(args, ok=True):
    cmd = [sys.executable, str(ROOT / "dicom_zero_shot_sr.py"), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    if ok:
        assert proc.returncode == 0, f"{cmd}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    return proc


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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
    mean, std = zssr.collect(strips, image.shape)
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
        return zssr.collect(strips, image.shape)[0]

    blended, hard = blend(16), blend(0)  # no overlap: butt-joined tiles
    assert np.ptp(blended) > 0.3  # tiles did disagree
    assert max_jump(blended) < 0.15  # smooth cross-fade: about pi/(2*16) per pixel for a unit disagreement
    assert max_jump(hard) > 3 * max_jump(blended)


def test_tiled_inference_with_identity_model_reproduces_input_exactly():
    """The whole inference path (normalise, tile, pad to the UNet divisor, sample n times, blend, invert) with a
    model that returns its conditioning: an untrained UNet, whose last conv is zero-initialised, predicts
    x0 = conditioning. Odd sizes, a factor of 3 and tiles narrower than the image exercise every edge case."""
    cfg = zssr.load_config(zssr.Config, zssr.default_config_path(zssr.__file__), "tiny", None)
    model = zssr.UNet(cfg.model).eval()
    schedule = zssr.Schedule(cfg.diffusion.timesteps, cfg.diffusion.schedule)
    values = np.random.default_rng(2).normal(300, 200, size=(15, 41)).astype(np.float32)  # 45 x 123 output
    stored = (-1024.0, 3071.0)
    normaliser = zssr.Normaliser.fit(values, cfg.data.percentiles)
    strips = zssr.super_resolve(model, schedule, values, None, normaliser, 3, cfg, torch.device("cpu"), stored)
    sr, std = zssr.collect(strips, (45, 123))
    cond = zssr.upsample(torch.from_numpy(normaliser.forward(values)), 3).numpy()
    assert sr.shape == (45, 123) and cfg.sample.patch_size < 123  # several tiles across
    assert np.array_equal(sr, np.clip(normaliser.inverse(cond), *stored).astype(np.float32))
    assert np.array_equal(std, np.zeros_like(std))


def test_uncertainty_outputs_png_colour_bar_and_dicom(tmp_path):
    stored = synthetic.mammogram((40, 32), np.random.default_rng(0), bits_stored=14)
    ds = dicom_io.make_projection_dataset(stored, modality="MG", bits_stored=14, monochrome1=True)
    cfg = zssr.load_config(zssr.Config, zssr.default_config_path(zssr.__file__), "tiny", None)
    std = np.zeros((80, 64), np.float32)
    std[40, 30] = 7.0  # one uncertain pixel: a black map, so every colour in the PNG belongs to the colour bar
    sr, unc_map = raw_image(np.full_like(std, 500)), raw_image(std)
    info = zssr.write_outputs(tmp_path, tmp_path / "in.dcm", ds, sr, unc_map, 7.0, 2, cfg, "in")
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
    reference = torch.nn.functional.interpolate(low[None, None].double(), scale_factor=factor, mode="bicubic")[0, 0]
    assert full.shape == (37 * factor, 29 * factor) and torch.allclose(full.double(), reference, atol=1e-6, rtol=0)
    for y0, y1 in [(0, 5), (3, 40), (17, 18), (37 * factor - 9, 37 * factor), (0, 37 * factor)]:
        strip = zssr.upsample_rows(lambda a, b: low[a:b], len(low), factor, y0, y1)
        assert torch.equal(strip, full[y0:y1])  # bit for bit, not close


def test_uncertainty_map_block_maximum_keeps_single_pixels(tmp_path):
    std = np.zeros((700, 300), np.float32)
    std[699, 5], std[3, 299] = 2.0, 1.0
    shown, k = zssr.display_map(raw_image(std), max_side=100)
    assert k == 7 and shown.shape == (100, 43) and shown[99, 0] == 2.0 and shown[0, 42] == 1.0 and shown.sum() == 3.0


def test_normaliser_inverse_and_sampler_shapes():
    values = np.array([[-1024.0, 0.0], [40.0, 3071.0]], np.float32)
    norm = zssr.Normaliser.fit(values, (0.5, 99.5))
    assert np.allclose(norm.inverse(norm.forward(values)), values, atol=1e-3)
    cfg = zssr.load_config(zssr.Config, zssr.default_config_path(zssr.__file__), "tiny", None)
    model = zssr.UNet(cfg.model).eval()
    schedule = zssr.Schedule(cfg.diffusion.timesteps, cfg.diffusion.schedule)
    cond = torch.zeros(2, 1, 24, 16)
    a = zssr.sample(model, schedule, cond, cfg.sample, torch.Generator().manual_seed(3))
    b = zssr.sample(model, schedule, cond, cfg.sample, torch.Generator().manual_seed(3))
    assert a.shape == cond.shape and torch.equal(a, b)  # DDIM: deterministic given the seed


# --- the real CLI ---


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    stored = synthetic.mammogram((96, 80), np.random.default_rng(0), bits_stored=14)
    mg_ds = dicom_io.make_projection_dataset(stored, modality="MG", bits_stored=14, monochrome1=True)
    mg = dicom_io.write_dataset(mg_ds, folder / "mg.dcm")
    # pydicom-data: a real 512x512 head CT, signed 16-bit, JPEG 2000 lossless (decoded through common/)
    ct = Path(shutil.copy(get_testdata_file("693_J2KR.dcm"), folder / "ct_693.dcm"))
    return {"mg": mg, "ct": ct, "hashes": {mg: sha(mg), ct: sha(ct)}}


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    run(["full", "--input", inputs["mg"], "--upscale", 2, "--out", base / "mg", *TINY])
    # 1024x1024 output: 128-pixel tiles keep the tile count (and the test) small
    run(
        ["full", "--input", inputs["ct"], "--upscale", 2, "--out", base / "ct", *TINY, "--set", "sample.patch_size=128"]
    )
    return base


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
    if pad is not None:  # PixelPaddingValue pixels (CT outside the FOV) come back unchanged, nearest-upsampled
        pad_up = np.kron(pad, np.ones((factor, factor), bool))
        assert pad.any() and np.array_equal(values[pad_up], np.kron(source_values, np.ones((factor, factor)))[pad_up])
    unc, unc_ds = dicom_io.read_dicom(out_dir / "uncertainty.dcm")
    assert unc.shape == values.shape and unc.min() >= 0 and unc.max() > 0  # samples differ once trained
    assert unc_ds.SeriesInstanceUID not in (sr.SeriesInstanceUID, source.SeriesInstanceUID)
    assert unc_ds.PhotometricInterpretation == "MONOCHROME2"  # bright = uncertain, whatever the input
    assert all(unc_ds[k].value == sr[k].value for k in spacings)
    names = ["uncertainty.png", "preview.png", "metrics.json", "config.yaml", "command.txt"]
    for name in names + (["model.pt", "train.log", "metrics.jsonl"] if trained else []):
        assert (out_dir / name).is_file(), name
    return values


def test_full_on_synthetic_monochrome1_mammogram(inputs, runs):
    check_output(inputs["mg"], runs / "mg", 2)
    record = json.loads((runs / "mg" / "metrics.json").read_text())
    assert record["rows"][0]["perceptual"].startswith("off")  # the tiny preset has no perceptual term: said so
    assert sha(inputs["mg"]) == inputs["hashes"][inputs["mg"]]


def test_full_on_real_compressed_ct_from_pydicom_data(inputs, runs):
    check_output(inputs["ct"], runs / "ct", 2)
    assert sha(inputs["ct"]) == inputs["hashes"][inputs["ct"]]


def test_outputs_open_in_dcmtk_and_pass_dciodvfy_with_no_new_errors(inputs, runs):
    missing = [tool for tool in ("dciodvfy", "dcmdump") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install dicom3tools dcmtk)")
    for key in ("mg", "ct"):
        src = inputs[key]
        for out in (runs / key / f"{src.stem}_sr_x2.dcm", runs / key / "uncertainty.dcm"):
            dump = subprocess.run(["dcmdump", str(out)], capture_output=True, text=True, timeout=60)
            assert dump.returncode == 0, dump.stderr
            assert f"(0028,0010) US {pydicom.dcmread(src).Rows * 2} " in dump.stdout  # Rows as dcmtk reads them
            new_errors = dciodvfy_errors(out) - dciodvfy_errors(src)
            assert not new_errors, f"dciodvfy: new errors in {out.name}: {sorted(new_errors)}"


def test_inference_from_checkpoint_and_factor_mismatch(inputs, runs, tmp_path):
    run(
        [
            "inference",
            "--input",
            inputs["mg"],
            "--model-path",
            runs / "mg" / "model.pt",
            "--out",
            tmp_path / "inf",
            "--device",
            "cpu",
            "--samples",
            3,
        ]
    )
    check_output(inputs["mg"], tmp_path / "inf", 2, trained=False)
    proc = run(
        [
            "inference",
            "--input",
            inputs["mg"],
            "--model-path",
            runs / "mg" / "model.pt",
            "--upscale",
            3,
            "--out",
            tmp_path / "bad",
        ],
        ok=False,
    )
    assert proc.returncode == 2 and "trained for x2" in proc.stderr and not (tmp_path / "bad").exists()


def test_evaluate_reports_method_and_baselines(inputs, tmp_path):
    run(["evaluate", "--input", inputs["mg"], "--upscale", 2, "--out", tmp_path / "ev", *TINY])
    rows = {r["method"]: r for r in json.loads((tmp_path / "ev" / "metrics.json").read_text())["rows"]}
    assert set(rows) == {"bicubic", "lanczos4", "zero-shot diffusion"}
    for row in rows.values():
        assert 0 < row["psnr_db"] < 100 and 0 < row["ssim"] <= 1 and row["wall_s"] >= 0
    assert rows["zero-shot diffusion"]["peak_rss_mb"] > 0
    assert rows["bicubic"]["psnr_db"] != rows["lanczos4"]["psnr_db"]


def test_bad_input_one_line_nonzero_and_nothing_written(inputs, tmp_path):
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(inputs["mg"].read_bytes()[:3000])
    for bad in (get_testdata_file("SC_rgb.dcm"), truncated):
        out = tmp_path / f"out_{Path(bad).stem}"
        proc = run(["full", "--input", bad, "--upscale", 2, "--out", out, *TINY], ok=False)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
        assert not out.exists()


def _tiny_cfg(*overrides):
    from common.config import load_config

    return load_config(zssr.Config, ROOT / "configs" / "dicom_zero_shot_sr.yaml", "tiny", list(overrides))


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows}


def test_train_stopped_then_resumed_equals_the_uninterrupted_run(tmp_path, killed_at_step):
    """Killed after its step-2 training state, `--resume` continues exactly: the same losses for steps 3-4 and
    the same final weights as a run that was never stopped (CPU, fixed seed; dropout and cosine lr included)."""
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
        zssr.train_model(x, 3, cfg, torch.device("cpu"), tmp_path / "other", resume=state)  # another --upscale


def test_non_finite_loss_stops_before_the_update(tmp_path, monkeypatch):
    cfg = _tiny_cfg("train.steps=3")
    x = np.random.default_rng(0).uniform(-1, 1, (40, 36)).astype(np.float32)
    nan = {"loss": torch.tensor(float("nan"), requires_grad=True)}
    monkeypatch.setattr(zssr, "training_losses", lambda *a, **k: nan)
    (tmp_path / "run").mkdir()
    with pytest.raises(zssr.UserError, match="non-finite loss .* at step 1; stopped; last state: none written"):
        zssr.train_model(x, 2, cfg, torch.device("cpu"), tmp_path / "run")
    assert not (tmp_path / "run" / "train_state.pt").exists()
