"""mammo_vqvae.py + mammo_ldm.py through their CLIs (subprocesses, tiny preset, synthetic mammograms): the
chain train -> evaluate -> extract-latents -> train LDM -> restore -> evaluate, run once per module; refusals
(latents of another canvas/dose/VQ-VAE, non-mammography input), no empty run folder on failure, the scripts
copied into an
empty folder, mid-epoch resume and the large RLE DICOM (slow)."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest import run_cli
from fixtures import make_projection_dataset
from pydicom.uid import RLELossless

from common import dicom_io, synthetic
from common.mammo import breast_mask, read_mammogram, to_unit

ROOT = Path(__file__).resolve().parents[1]
DATA = ["--set", "data.synthetic_train=8", "--set", "data.synthetic_test=2", "--set", "train.log_every=1"]
TINY = ["--preset", "tiny", "--device", "cpu", *DATA]


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def mammogram_dicom(
    path: Path, shape, bits: int, monochrome1=False, rle=False, seed=1, modality="MG"
) -> Path:
    stored = synthetic.mammogram(shape, np.random.default_rng(seed), bits_stored=bits)
    if monochrome1:
        stored = (2**bits - 1 - stored.astype(np.int64)).astype(np.uint16)
    ds = make_projection_dataset(stored, bits_stored=bits, monochrome1=monochrome1)
    ds.Modality = modality
    dicom_io.write_dataset(ds, path)
    if rle:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)  # pydicom's own RLE encoder
        ds.save_as(path, enforce_file_format=True)
    return path


def dciodvfy_errors(path: Path) -> set[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return {line.strip() for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")}


def one_error_line(proc, starts: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith(starts), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """train VQ-VAE -> evaluate -> extract-latents -> train LDM on them -> restore a DICOM -> evaluate the
    LDM."""
    base = tmp_path_factory.mktemp("mammo")
    vq, ldm = base / "vq", base / "ldm"
    run_cli("mammo_vqvae.py", ["train", "--out", vq, *TINY, "--set", "train.max_epochs=3"])
    run_cli("mammo_vqvae.py", ["evaluate", "--checkpoint", vq / "checkpoint.pt", "--device", "cpu"])
    run_cli(
        "mammo_vqvae.py", ["extract-latents", "--checkpoint", vq / "checkpoint.pt", "--out", base / "latents"]
    )
    ldm_args = ["--vqvae", vq / "checkpoint.pt", "--latents", base / "latents", *TINY, "--max-steps", "10"]
    run_cli("mammo_ldm.py", ["train", "--out", ldm, *ldm_args])
    source = mammogram_dicom(base / "low_dose.dcm", (300, 220), bits=14)
    source_bytes = source.read_bytes()
    models = ["--vqvae", vq / "checkpoint.pt", "--checkpoint", ldm / "checkpoint.pt", "--device", "cpu"]
    run_cli(
        "mammo_ldm.py", ["restore", *models, "--input", source, "--output", base / "out" / "restored.dcm"]
    )
    assert source.read_bytes() == source_bytes  # inputs are never modified
    run_cli("mammo_ldm.py", ["evaluate", *models, "--latents", base / "latents"])
    return {"base": base, "vq": vq, "ldm": ldm, "source": source, "models": models}


def test_vqvae_train_writes_a_run_record_and_learns(chain):
    vq = chain["vq"]
    for name in (
        "config.yaml",
        "command.txt",
        "mammo_vqvae.py",
        "metrics.jsonl",
        "checkpoint.pt",
        "codebook.jsonl",
    ):
        assert (vq / name).is_file(), name
    recs = records(vq)
    assert sorted(recs) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(r["loss"]) for r in recs.values())
    assert recs[6]["mse"] < 0.5 * recs[1]["mse"]  # reconstruction error falls clearly in six steps
    health = [json.loads(line) for line in (vq / "codebook.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in health] == [0, 1, 2]
    for h in health:
        for level in range(3):
            assert 1 <= h[f"level{level}_used"] <= 64 and h[f"level{level}_perplexity"] >= 1.0
            assert (
                h[f"level{level}_used"] + h[f"level{level}_restarted"] == 64
            )  # every unused code is restarted


def test_vqvae_evaluate_reports_input_reconstruction_and_codebooks(chain):
    rows = {r["method"]: r for r in json.loads((chain["vq"] / "eval" / "metrics.json").read_text())["rows"]}
    low = rows["low-dose input"]
    assert low["images"] == 2 and 26 < low["psnr_db"] < 36 and low["noise_std"] > 0.01  # visible dose noise
    recon = rows["VQ-VAE-2 reconstruction"]
    assert np.isfinite(recon["psnr_db"]) and 0 < recon["ssim"] <= 1
    assert np.isfinite(rows["bicubic x4 down/up"]["psnr_db"])
    assert all(rows[f"codebook level {i}"]["used"] >= 1 for i in range(3))


def test_extract_latents_writes_paired_latents_and_index(chain):
    index = json.loads((chain["base"] / "latents" / "index.json").read_text())
    assert index["shape"] == [32, 32, 24]  # tiny: hidden 32 channels, 128x96 canvas / 4
    assert [i["split"] for i in index["items"]] == ["train"] * 8 + ["test"] * 2
    assert index["data"]["image_size"] == [128, 96] and index["data"]["dose"] == 0.2
    pair = torch.load(chain["base"] / "latents" / index["items"][0]["file"], weights_only=True)
    assert pair["clean"].shape == pair["degraded"].shape == (32, 32, 24)
    assert not torch.equal(pair["clean"], pair["degraded"])  # the low-dose image really differs


def test_ldm_train_writes_a_run_record(chain):
    ldm = chain["ldm"]
    for name in (
        "config.yaml",
        "command.txt",
        "mammo_ldm.py",
        "metrics.jsonl",
        "checkpoint.pt",
        "preview.png",
    ):
        assert (ldm / name).is_file(), name
    losses = [r["loss"] for _, r in sorted(records(ldm).items())]
    assert len(losses) == 10 and all(np.isfinite(losses))
    state = torch.load(ldm / "checkpoint.pt", weights_only=True)
    index = json.loads((chain["base"] / "latents" / "index.json").read_text())
    assert state["step"] == 10 and state["vqvae_fingerprint"] == index["vqvae_fingerprint"]


def test_ldm_evaluate_reports_every_row(chain):
    rows = {r["method"]: r for r in json.loads((chain["ldm"] / "eval" / "metrics.json").read_text())["rows"]}
    assert list(rows) == [
        "low-dose input",
        "VQ-VAE-2 of the full-dose image (ceiling)",
        "VQ-VAE-2 of the low-dose image (no diffusion)",
        "LDM restored",
    ]  # tiny: eval.baselines false (NLM/BM3D rows are tested in-process)
    for row in rows.values():
        assert row["images"] == 2 and np.isfinite(row["psnr_db"]) and -1 <= row["ssim"] <= 1
    assert (chain["ldm"] / "eval" / "restored_00.png").is_file()


def test_restore_writes_a_16_bit_dicom_of_the_original_geometry_with_new_uids(chain):
    src = pydicom.dcmread(chain["source"])
    out_path = chain["base"] / "out" / "restored.dcm"
    out = pydicom.dcmread(out_path)
    assert (out.Rows, out.Columns) == (src.Rows, src.Columns) == (300, 220)
    assert out.SOPInstanceUID != src.SOPInstanceUID and out.SeriesInstanceUID != src.SeriesInstanceUID
    assert out.StudyInstanceUID == src.StudyInstanceUID and out.SOPClassUID == src.SOPClassUID
    assert out.BitsAllocated == 16 and out.PhotometricInterpretation == src.PhotometricInterpretation
    assert "DERIVED" in out.ImageType and out.ImagerPixelSpacing == src.ImagerPixelSpacing
    restored, original = out.pixel_array.astype(np.int64), src.pixel_array.astype(np.int64)
    assert (
        restored.max() - restored.min() > 2**12 and len(np.unique(restored)) > 256
    )  # 14-bit data, not 8-bit
    mask = breast_mask(to_unit(read_mammogram(chain["source"])))
    assert np.array_equal(restored[~mask], original[~mask])  # outside the breast: the input's own values
    assert np.abs(restored[mask] - original[mask]).mean() > 1  # inside: really restored
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(out_path) <= dciodvfy_errors(chain["source"])


def eval_rows(eval_dir: Path) -> dict[str, dict]:
    return {r["method"]: r for r in json.loads((eval_dir / "metrics.json").read_text())["rows"]}


def test_refiner_alone_learns_to_denoise_the_low_dose_input(chain, tmp_path):
    """refine.source=input is the plain-CNN baseline: it must beat its input clearly (a broken refiner,
    crop sampler or loss mask would not)."""
    out = tmp_path / "cnn"
    source = ["--set", "refine.source=input", "--set", "refine.steps=150"]
    run_cli("mammo_ldm.py", ["refine", *chain["models"], "--out", out, *source])
    rmse = [r["rmse"] for _, r in sorted(records(out).items())]  # one record per step
    assert len(rmse) == 150 and np.mean(rmse[-10:]) < 0.8 * np.mean(rmse[:5])
    run_cli("mammo_ldm.py", ["evaluate", *chain["models"][:2], "--checkpoint", out / "checkpoint.pt"])
    rows = eval_rows(out / "eval")
    refined = rows["refiner on the low-dose input alone (a plain CNN)"]
    assert refined["psnr_db"] > rows["low-dose input"]["psnr_db"] + 3
    assert rows["LDM restored"] == eval_rows(chain["ldm"] / "eval")["LDM restored"]  # the LDM untouched


def test_refiner_on_the_ldm_is_what_restore_writes(chain, tmp_path):
    out = tmp_path / "refined"
    run_cli("mammo_ldm.py", ["refine", *chain["models"], "--out", out])
    ldm_state = torch.load(chain["ldm"] / "checkpoint.pt", weights_only=True)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(state) == set(ldm_state) | {"refiner"} and state["config"]["refine"]["source"] == "ldm"
    models = [*chain["models"][:2], "--checkpoint", out / "checkpoint.pt", "--device", "cpu"]
    run_cli("mammo_ldm.py", ["restore", *models, "--input", chain["source"], "--output", tmp_path / "r.dcm"])
    refined = pydicom.dcmread(tmp_path / "r.dcm").pixel_array
    assert not np.array_equal(refined, pydicom.dcmread(chain["base"] / "out" / "restored.dcm").pixel_array)
    run_cli("mammo_ldm.py", ["evaluate", *models])
    assert list(eval_rows(out / "eval"))[-2:] == ["LDM restored", "LDM restored + refiner"]
    bad = ["refine", *chain["models"], "--out", tmp_path / "bad", "--set", "refine.source=noise"]
    assert "refine.source must be ldm, first_stage or input" in one_error_line(
        run_cli("mammo_ldm.py", bad, ok=False), "error:"
    )
    assert not (tmp_path / "bad").exists()


def test_latents_of_another_dose_canvas_or_vqvae_are_refused(chain, tmp_path):
    base, vq = chain["base"], chain["vq"] / "checkpoint.pt"
    other = tmp_path / "dose05"
    run_cli(
        "mammo_vqvae.py", ["extract-latents", "--checkpoint", vq, "--out", other, "--set", "data.dose=0.5"]
    )
    evaluate = ["evaluate", *chain["models"], "--out", tmp_path / "eval"]
    line = one_error_line(run_cli("mammo_ldm.py", [*evaluate, "--latents", other], ok=False), "error:")
    assert "another canvas or dose: data.dose 0.5 (latents) vs 0.2 (model)" in line
    index = json.loads((base / "latents" / "index.json").read_text())
    moved = tmp_path / "other_vq"
    shutil.copytree(base / "latents", moved)
    (moved / "index.json").write_text(json.dumps({**index, "vqvae_fingerprint": "0" * 16}))
    restore = ["restore", *chain["models"], "--input", chain["source"], "--output", tmp_path / "r.dcm"]
    line = one_error_line(run_cli("mammo_ldm.py", [*restore, "--latents", moved], ok=False), "error:")
    assert "latents come from another VQ-VAE" in line and not (tmp_path / "r.dcm").exists()


def test_non_mammography_input_is_refused_with_one_line(chain, tmp_path):
    ct = mammogram_dicom(tmp_path / "ct.dcm", (300, 220), bits=14, modality="CT")
    restore = ["restore", *chain["models"], "--input", ct, "--output", tmp_path / "out.dcm"]
    line = one_error_line(run_cli("mammo_ldm.py", restore, ok=False), "error:")
    assert "modality CT, but the mammography scripts need mammograms (MG)" in line
    assert not (tmp_path / "out.dcm").exists()


def test_failed_extract_latents_leaves_no_folder(chain, tmp_path):
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    mammogram_dicom(data / "train" / "a.dcm", (300, 220), bits=14)
    (data / "test" / "broken.dcm").write_bytes(b"DICM but not really")  # fails after the train latents
    out = tmp_path / "latents"
    args = ["extract-latents", "--checkpoint", chain["vq"] / "checkpoint.pt", "--out", out, "--data", data]
    one_error_line(run_cli("mammo_vqvae.py", args, ok=False), "error:")
    assert not out.exists()


def copy_scripts(folder: Path, scripts: list[str]) -> Path:
    folder.mkdir()
    for script in scripts:
        shutil.copy(ROOT / script, folder / script)
        shutil.copy(
            ROOT / "configs" / script.replace(".py", ".yaml"), folder / script.replace(".py", ".yaml")
        )
    (folder / "configs").mkdir()
    for script in scripts:
        shutil.move(folder / script.replace(".py", ".yaml"), folder / "configs")
    shutil.copytree(ROOT / "common", folder / "common", ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def test_vqvae_alone_runs_copied_into_an_empty_folder(tmp_path):
    folder = copy_scripts(tmp_path / "copy", ["mammo_vqvae.py"])
    small_schedule = ["--set", "train.lr_schedule=cosine", "--set", "train.freeze_batch_norm_at=0.5"]
    run_cli(
        folder / "mammo_vqvae.py",
        ["train", "--out", "run", *TINY, "--max-steps", "4", *small_schedule],
        cwd=folder,
    )
    assert (folder / "run" / "checkpoint.pt").is_file()
    assert "freeze_batch_norm_at: 0.5" in (folder / "run" / "config.yaml").read_text()
    assert len((folder / "run" / "metrics.jsonl").read_text().splitlines()) == 4


def test_ldm_with_vqvae_runs_copied_into_an_empty_folder(chain, tmp_path):
    folder = copy_scripts(tmp_path / "copy", ["mammo_vqvae.py", "mammo_ldm.py"])
    args = ["train", "--vqvae", chain["vq"] / "checkpoint.pt", "--out", "run", *TINY, "--max-steps", "2"]
    run_cli(folder / "mammo_ldm.py", args, cwd=folder)  # latents encoded on the fly: the data path too
    assert (folder / "run" / "checkpoint.pt").is_file()


def test_mammo_ldm_imports_no_training_helpers_from_mammo_vqvae():
    source = (ROOT / "mammo_ldm.py").read_text()
    assert "from mammo_vqvae import VQVAE2, config_with_sets, fingerprint, load_vqvae" in source
    assert "mammo_vqvae." not in source.replace("mammo_vqvae.py", "")


@pytest.mark.parametrize("script", ["mammo_vqvae.py", "mammo_ldm.py"])
def test_non_finite_loss_stops_with_one_error_line(chain, tmp_path, script):
    args = (
        ["--vqvae", chain["vq"] / "checkpoint.pt", "--latents", chain["base"] / "latents"]
        if "ldm" in script
        else []
    )
    proc = run_cli(
        script, ["train", "--out", tmp_path / "run", *args, *TINY, "--set", "train.lr=1e30"], ok=False
    )
    one_error_line(proc, "error: non-finite loss")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# --- slow: resume, large files, folders ---


@pytest.mark.slow
@pytest.mark.parametrize("script", ["mammo_vqvae.py", "mammo_ldm.py"])
def test_resume_mid_epoch_reproduces_the_uninterrupted_losses_and_weights(chain, tmp_path, script):
    name = "vq" if "vqvae" in script else "ldm"
    extra = (
        []
        if name == "vq"
        else ["--vqvae", chain["vq"] / "checkpoint.pt", "--latents", chain["base"] / "latents"]
    )
    total = ["--set", "train.max_epochs=3"] if name == "vq" else ["--max-steps", "10"]  # as in the chain
    run_cli(
        script,
        ["train", "--out", tmp_path / "r", *extra, *TINY, "--set", "train.max_epochs=3", "--max-steps", "3"],
    )
    resume = ["--resume", tmp_path / "r" / "checkpoint.pt"]
    run_cli(script, ["train", "--out", tmp_path / "r", *extra, *TINY, *total, *resume])
    straight, resumed = records(chain[name]), records(tmp_path / "r")
    assert sorted(resumed) == sorted(straight)
    for step in straight:
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-6, abs=1e-9), step
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (chain[name], tmp_path / "r"))
    for key in ("model", "ema") if name == "ldm" else ("model",):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


@pytest.mark.slow
def test_large_rle_16_bit_dicom_restores_to_its_own_size_and_range(chain, tmp_path):
    """~1200x900 MONOCHROME1, 16 bits stored, RLE Lossless: a CBIS-DDSM-sized file takes the same path."""
    source = mammogram_dicom(
        tmp_path / "large_rle.dcm", (1200, 900), bits=16, monochrome1=True, rle=True, seed=7
    )
    src = pydicom.dcmread(source)
    assert src.file_meta.TransferSyntaxUID == RLELossless
    out_path = tmp_path / "restored" / "large.dcm"
    run_cli("mammo_ldm.py", ["restore", *chain["models"], "--input", source, "--output", out_path])
    out = pydicom.dcmread(out_path)
    assert (out.Rows, out.Columns) == (1200, 900) and out.BitsAllocated == 16 and out.BitsStored == 16
    assert out.PhotometricInterpretation == "MONOCHROME1"
    restored, original = out.pixel_array.astype(np.int64), src.pixel_array.astype(np.int64)
    assert restored.max() - restored.min() > 2**14 and len(np.unique(restored)) > 256
    mask = breast_mask(to_unit(read_mammogram(source)))
    assert np.array_equal(restored[~mask], original[~mask])
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(out_path) <= dciodvfy_errors(source)


@pytest.mark.slow
def test_restore_folder_mirrors_the_tree_and_keeps_16_bit_png(chain, tmp_path):
    import cv2

    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    mammogram_dicom(folder / "sub" / "a.dcm", (300, 220), bits=14, seed=3)
    cv2.imwrite(
        str(folder / "b.png"), synthetic.mammogram((260, 200), np.random.default_rng(4), bits_stored=16)
    )
    run_cli("mammo_ldm.py", ["restore", *chain["models"], "--input", folder, "--output", tmp_path / "out"])
    restored_png = cv2.imread(str(tmp_path / "out" / "b.png"), cv2.IMREAD_UNCHANGED)
    assert restored_png.dtype == np.uint16 and restored_png.shape == (260, 200) and restored_png.max() > 2**12
    assert pydicom.dcmread(tmp_path / "out" / "sub" / "a.dcm").Rows == 300
    proc = run_cli(
        "mammo_ldm.py", ["restore", *chain["models"], "--input", folder, "--output", folder], ok=False
    )
    assert one_error_line(proc, "error: output") and "overwrite the input" in proc.stderr
