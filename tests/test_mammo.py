"""mammo_vqvae.py + mammo_ldm.py: the chained CLI on the tiny preset and synthetic mammograms (subprocesses, run
once per module), quantiser unit tests, the full preset's level shapes on the meta device, and a large RLE
16-bit DICOM through `restore`."""

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
from pydicom.uid import RLELossless

import mammo_ldm
import mammo_vqvae
from common import dicom_io, synthetic
from common.config import load_config
from common.mammo import breast_mask, epoch_order, read_mammogram, to_unit

ROOT = Path(__file__).resolve().parents[1]
DATA = ["--set", "data.synthetic_train=8", "--set", "data.synthetic_test=2", "--set", "train.log_every=1"]
TINY = ["--preset", "tiny", "--device", "cpu", *DATA]


def run(script: str, args, ok=True):
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    if ok:
        assert proc.returncode == 0, f"{cmd}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    return proc


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def mammogram_dicom(path: Path, shape, bits: int, monochrome1: bool = False, rle: bool = False, seed: int = 1) -> Path:
    stored = synthetic.mammogram(shape, np.random.default_rng(seed), bits_stored=bits)
    if monochrome1:
        stored = (2**bits - 1 - stored.astype(np.int64)).astype(np.uint16)
    ds = dicom_io.make_projection_dataset(stored, bits_stored=bits, monochrome1=monochrome1)
    dicom_io.write_dataset(ds, path)
    if rle:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)  # pydicom's own RLE encoder
        ds.save_as(path, enforce_file_format=True)
    return path


def dciodvfy_errors(path: Path) -> set[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return {line.strip() for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """train VQ-VAE (straight, and stopped mid-epoch + --resume) -> evaluate -> extract-latents -> train LDM
    (straight, and stopped mid-epoch + --resume) -> restore a DICOM -> evaluate the LDM."""
    base = tmp_path_factory.mktemp("mammo")
    vq, ldm = base / "vq", base / "ldm"
    run("mammo_vqvae.py", ["train", "--out", vq, *TINY, "--set", "train.max_epochs=3"])
    run(
        "mammo_vqvae.py",
        ["train", "--out", base / "vq_resumed", *TINY, "--set", "train.max_epochs=3", "--set", "train.max_steps=3"],
    )
    run(
        "mammo_vqvae.py",
        [
            "train",
            "--out",
            base / "vq_resumed",
            *TINY,
            "--set",
            "train.max_epochs=3",
            "--resume",
            base / "vq_resumed" / "checkpoint.pt",
        ],
    )
    vq_eval = run("mammo_vqvae.py", ["evaluate", "--checkpoint", vq / "checkpoint.pt", "--device", "cpu"])
    run(
        "mammo_vqvae.py",
        ["extract-latents", "--checkpoint", vq / "checkpoint.pt", "--out", base / "latents", "--device", "cpu"],
    )
    ldm_args = ["--vqvae", vq / "checkpoint.pt", "--latents", base / "latents", *TINY, "--set", "train.max_epochs=10"]
    run("mammo_ldm.py", ["train", "--out", ldm, *ldm_args])
    run("mammo_ldm.py", ["train", "--out", base / "ldm_resumed", *ldm_args, "--set", "train.max_steps=7"])
    run(
        "mammo_ldm.py",
        ["train", "--out", base / "ldm_resumed", *ldm_args, "--resume", base / "ldm_resumed" / "checkpoint.pt"],
    )
    source = mammogram_dicom(base / "low_dose.dcm", (300, 220), bits=14)
    source_bytes = source.read_bytes()
    restore = run(
        "mammo_ldm.py",
        [
            "restore",
            "--vqvae",
            vq / "checkpoint.pt",
            "--checkpoint",
            ldm / "checkpoint.pt",
            "--input",
            source,
            "--output",
            base / "out" / "restored.dcm",
            "--device",
            "cpu",
        ],
    )
    assert source.read_bytes() == source_bytes  # inputs are never modified
    ldm_eval = run(
        "mammo_ldm.py",
        ["evaluate", "--vqvae", vq / "checkpoint.pt", "--checkpoint", ldm / "checkpoint.pt", "--device", "cpu"],
    )
    return {
        "base": base,
        "vq": vq,
        "ldm": ldm,
        "source": source,
        "vq_eval": vq_eval,
        "restore": restore,
        "ldm_eval": ldm_eval,
    }


# --- chained CLI ---


def test_vqvae_train_writes_a_run_record_and_learns(chain):
    vq = chain["vq"]
    for name in (
        "config.yaml",
        "command.txt",
        "mammo_vqvae.py",
        "metrics.jsonl",
        "train.log",
        "checkpoint.pt",
        "preview.png",
        "codebook.jsonl",
    ):
        assert (vq / name).is_file(), name
    recs = records(vq)
    assert sorted(recs) == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) for r in recs.values())
    assert recs[6]["mse"] < 0.5 * recs[1]["mse"]  # reconstruction error falls clearly in six steps
    health = [json.loads(line) for line in (vq / "codebook.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in health] == [0, 1, 2]
    for h in health:
        for level in range(3):
            assert 1 <= h[f"level{level}_used"] <= 64 and h[f"level{level}_perplexity"] >= 1.0
            assert h[f"level{level}_used"] + h[f"level{level}_restarted"] == 64  # every unused code is restarted


def test_vqvae_evaluate_reports_reconstruction_and_codebooks(chain):
    report = json.loads((chain["vq"] / "eval" / "metrics.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    recon = rows["VQ-VAE-2 reconstruction"]
    assert recon["images"] == 2 and np.isfinite(recon["psnr_db"]) and 0 < recon["ssim"] <= 1
    assert np.isfinite(rows["bicubic x4 down/up"]["psnr_db"])
    assert all(rows[f"codebook level {i}"]["used"] >= 1 for i in range(3))
    assert (chain["vq"] / "eval" / "reconstruction_00.png").is_file()


def test_extract_latents_writes_paired_latents_and_index(chain):
    index = json.loads((chain["base"] / "latents" / "index.json").read_text())
    assert index["shape"] == [32, 32, 24]  # tiny: hidden 32 channels, 128x96 canvas / 4
    assert [i["split"] for i in index["items"]] == ["train"] * 8 + ["test"] * 2
    assert index["train_std"] > 0 and "quanta" in index["degradation"]
    pair = torch.load(chain["base"] / "latents" / index["items"][0]["file"], weights_only=True)
    assert pair["clean"].shape == pair["degraded"].shape == (32, 32, 24)
    assert not torch.equal(pair["clean"], pair["degraded"])  # the low-dose image really differs


def test_ldm_train_writes_a_run_record_and_learns(chain):
    ldm = chain["ldm"]
    for name in ("config.yaml", "command.txt", "mammo_ldm.py", "metrics.jsonl", "checkpoint.pt", "preview.png"):
        assert (ldm / name).is_file(), name
    losses = [r["loss"] for _, r in sorted(records(ldm).items())]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # noise prediction improves on its ~1.0 start
    state = torch.load(ldm / "checkpoint.pt", weights_only=True)
    assert (
        state["step"] == 20
        and state["vqvae_fingerprint"]
        == json.loads((chain["base"] / "latents" / "index.json").read_text())["vqvae_fingerprint"]
    )


@pytest.mark.parametrize("name", ["vq", "ldm"])
def test_resume_mid_epoch_reproduces_the_uninterrupted_losses_and_weights(chain, name):
    straight, resumed = records(chain[name]), records(chain["base"] / f"{name}_resumed")
    assert sorted(resumed) == sorted(straight)
    for step in straight:
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-6, abs=1e-9), step
    a, b = (torch.load(chain["base"] / d / "checkpoint.pt", weights_only=True) for d in (name, f"{name}_resumed"))
    for key in ("model", "ema") if name == "ldm" else ("model",):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


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
    assert restored.max() - restored.min() > 2**12 and len(np.unique(restored)) > 256  # 14-bit data, not 8-bit
    mask = breast_mask(to_unit(read_mammogram(chain["source"])))
    assert np.array_equal(restored[~mask], original[~mask])  # outside the breast: the input's own values
    assert np.abs(restored[mask] - original[mask]).mean() > 1  # inside: really restored
    assert (chain["base"] / "out" / "restored_panel.png").is_file()
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(out_path) <= dciodvfy_errors(chain["source"])


def test_ldm_evaluate_reports_input_ceiling_and_restored(chain):
    report = json.loads((chain["ldm"] / "eval" / "metrics.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["low-dose input", "VQ-VAE-2 reconstruction of full dose (ceiling)", "LDM restored"]
    for row in rows.values():
        assert row["images"] == 2 and np.isfinite(row["psnr_db"]) and -1 <= row["ssim"] <= 1
        assert np.isfinite(row["noise_std"])
    assert (chain["ldm"] / "eval" / "restored_00.png").is_file()


def test_large_rle_16_bit_dicom_restores_to_its_own_size_and_range(chain, tmp_path):
    """~1200x900 MONOCHROME1, 16 bits stored, RLE Lossless: a CBIS-DDSM-sized (4.5k x 2.8k) file takes the same path."""
    source = mammogram_dicom(tmp_path / "large_rle.dcm", (1200, 900), bits=16, monochrome1=True, rle=True, seed=7)
    src = pydicom.dcmread(source)
    assert src.file_meta.TransferSyntaxUID == RLELossless
    out_path = tmp_path / "restored" / "large.dcm"
    run(
        "mammo_ldm.py",
        [
            "restore",
            "--vqvae",
            chain["vq"] / "checkpoint.pt",
            "--checkpoint",
            chain["ldm"] / "checkpoint.pt",
            "--input",
            source,
            "--output",
            out_path,
            "--device",
            "cpu",
        ],
    )
    out = pydicom.dcmread(out_path)
    assert (out.Rows, out.Columns) == (1200, 900) and out.BitsAllocated == 16 and out.BitsStored == 16
    assert out.PhotometricInterpretation == "MONOCHROME1"
    restored, original = out.pixel_array.astype(np.int64), src.pixel_array.astype(np.int64)
    assert restored.max() - restored.min() > 2**14 and len(np.unique(restored)) > 256
    mask = breast_mask(to_unit(read_mammogram(source)))
    assert np.array_equal(restored[~mask], original[~mask])
    inside = np.abs(restored[mask] - original[mask])
    assert inside.mean() > 1 and np.median(inside) < 2**14  # changed, yet on the input's 16-bit scale
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(out_path) <= dciodvfy_errors(source)


@pytest.mark.parametrize("script", ["mammo_vqvae.py", "mammo_ldm.py"])
def test_non_finite_loss_stops_with_one_error_line(chain, tmp_path, script):
    args = ["--vqvae", chain["vq"] / "checkpoint.pt", "--latents", chain["base"] / "latents"] if "ldm" in script else []
    proc = run(script, ["train", "--out", tmp_path / "run", *args, *TINY, "--set", "train.lr=1e30"], ok=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: non-finite loss"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# --- quantiser ---


def test_ema_update_moves_assigned_codes_towards_their_vectors():
    torch.manual_seed(0)
    q = mammo_vqvae.Quantizer(dim=2, size=3, decay=0.5).train()
    q.embed.copy_(torch.tensor([[0.0, 10.0, -10.0], [0.0, 10.0, -10.0]]))
    q.embed_avg.copy_(q.embed)
    q.cluster_size.fill_(1.0)
    target = torch.tensor([2.0, 1.0])
    x = (target + 0.01 * torch.randn(16, 2)).reshape(1, 4, 4, 2).permute(0, 3, 1, 2)  # all nearest to code 0
    before = q.embed[:, 0].clone()
    for _ in range(3):
        _, _, ids = q(x)
        assert (ids == 0).all()
    assert (q.embed[:, 0] - target).norm() < 0.3 * (before - target).norm()
    assert q.usage.tolist() == [48.0, 0.0, 0.0]
    q.eval()
    frozen = q.embed.clone()
    q(x)
    assert torch.equal(q.embed, frozen)  # no codebook updates outside training


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    q = mammo_vqvae.Quantizer(dim=4, size=8, decay=0.99)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    quant, _, _ = q(x)
    upstream = torch.randn_like(quant)
    (quant * upstream).sum().backward()
    assert torch.allclose(x.grad, upstream)  # d quant / d x = identity

    cfg = load_config(mammo_vqvae.Config, ROOT / "configs" / "mammo_vqvae.yaml", "tiny", [])
    model = mammo_vqvae.VQVAE2(cfg.model).train()
    recon, diffs, _ = model(torch.rand(2, 1, 64, 48) * 2 - 1)
    (recon.pow(2).mean()).backward()  # reconstruction only: commitment alone would reach the encoder anyway
    first_conv = model.encoders[0].layers[0].weight
    assert first_conv.grad is not None and torch.isfinite(first_conv.grad).all() and first_conv.grad.abs().sum() > 0


def test_dead_code_restart_replaces_only_unused_codes():
    torch.manual_seed(0)
    q = mammo_vqvae.Quantizer(dim=2, size=4, decay=0.99).train()
    q.embed.copy_(torch.tensor([[0.0, 100.0, 200.0, 300.0], [0.0, 100.0, 200.0, 300.0]]))
    q.embed_avg.copy_(q.embed)
    q.cluster_size.fill_(1.0)
    x = torch.full((1, 2, 2, 4), 5.0)  # (batch, dim, h, w)
    q(x)  # everything goes to code 0: codes 1-3 are dead, the reservoir holds (5, 5)
    used_before = q.embed[:, 0].clone()
    assert q.restart_dead_codes(threshold=1.0) == 3
    assert torch.equal(q.embed[:, 0], used_before)
    assert torch.allclose(q.embed[:, 1:], torch.tensor([[5.0], [5.0]]), atol=0.01)
    q.reset_usage()
    assert q.restart_dead_codes(threshold=1.0) == 4  # a fresh epoch with no data: all codes count as dead
    assert q.stats()["used"] == 0


def test_epoch_order_depends_only_on_seed_and_epoch():
    a, b = epoch_order(10, 4, 3, 0), epoch_order(10, 4, 3, 0)
    assert a == b and len(a) == 8 and len(set(a)) == 8
    assert epoch_order(10, 4, 4, 0) != a
    ranks = [epoch_order(10, 2, 0, 0, rank, 2) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4 and not set(ranks[0]) & set(ranks[1])


# --- full preset shapes ---


def test_full_preset_levels_have_the_seed_shapes_at_1024x768():
    cfg = load_config(mammo_vqvae.Config, ROOT / "configs" / "mammo_vqvae.yaml", "full", [])
    assert cfg.data.image_size == [1024, 768] and cfg.model.scaling_rates == [4, 2, 2, 2, 2]
    with torch.device("meta"):
        model = mammo_vqvae.VQVAE2(cfg.model).eval()
        x = torch.empty(1, 1, 1024, 768)
        latent = model.encode_latent(x)
        recon, diffs, ids = model.decode_latent(latent)
    assert latent.shape == (1, 128, 256, 192)  # the LDM's latent: hidden channels at 1/4 resolution
    assert [tuple(i.shape[1:]) for i in ids] == [(256, 192), (128, 96), (64, 48), (32, 24), (16, 12)]
    assert len(diffs) == 5 and recon.shape == (1, 1, 1024, 768)
    assert [q.embed.shape for q in model.quantizers()] == [(64, 512)] * 5

    ldm_cfg = load_config(mammo_ldm.Config, ROOT / "configs" / "mammo_ldm.yaml", "full", [])
    with torch.device("meta"):
        unet = mammo_ldm.UNet(ldm_cfg.model, latent_channels=128).eval()
        eps = unet(latent, torch.zeros(1, dtype=torch.long), latent)
    assert unet.input.in_channels == 256 and eps.shape == (1, 128, 256, 192)  # seed: 256 in, 128 out


def test_ddim_with_the_true_noise_recovers_the_clean_latent():
    """An oracle noise predictor (knows the clean latent) must make deterministic DDIM land on it exactly."""
    cfg = load_config(mammo_ldm.Config, ROOT / "configs" / "mammo_ldm.yaml", "full", [])
    schedule = mammo_ldm.Schedule(cfg.diffusion, torch.device("cpu"))
    clean = torch.randn(2, 4, 8, 6)

    def oracle(x, t, cond):
        a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * cond) / (1 - a).sqrt()

    for steps in (50, 7):
        out = mammo_ldm.ddim_sample(oracle, schedule, clean, steps, 0.0, torch.Generator().manual_seed(0))
        assert torch.allclose(out, clean, atol=1e-3), steps
    with pytest.raises(Exception, match="sample.steps"):
        mammo_ldm.ddim_sample(oracle, schedule, clean, 0, 0.0)


def test_restore_folder_mirrors_the_tree_and_keeps_16_bit_png(chain, tmp_path):
    import cv2

    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    mammogram_dicom(folder / "sub" / "a.dcm", (300, 220), bits=14, seed=3)
    png = synthetic.mammogram((260, 200), np.random.default_rng(4), bits_stored=16)
    cv2.imwrite(str(folder / "b.png"), png)
    common = ["--vqvae", chain["vq"] / "checkpoint.pt", "--checkpoint", chain["ldm"] / "checkpoint.pt"]
    run("mammo_ldm.py", ["restore", *common, "--input", folder, "--output", tmp_path / "out", "--device", "cpu"])
    restored_png = cv2.imread(str(tmp_path / "out" / "b.png"), cv2.IMREAD_UNCHANGED)
    assert restored_png.dtype == np.uint16 and restored_png.shape == (260, 200) and restored_png.max() > 2**12
    assert pydicom.dcmread(tmp_path / "out" / "sub" / "a.dcm").Rows == 300
    assert (tmp_path / "out" / "sub" / "a_panel.png").is_file()
    proc = run("mammo_ldm.py", ["restore", *common, "--input", folder, "--output", folder, "--device", "cpu"], ok=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: output") and "overwrite the input" in proc.stderr


# --- data layouts and the dose model (common/mammo.py) ---


def test_cbis_ddsm_tree_and_csvs_give_the_official_split(tmp_path):
    from common.mammo import MammoDataConfig, list_sources

    root = tmp_path / "CBIS"
    tree = root / "CBIS-DDSM"
    for subject in ("Mass-Training_P_00001_LEFT_CC", "Mass-Training_P_00001_LEFT_CC_1", "Calc-Test_P_00002_RIGHT_MLO"):
        leaf = tree / subject / "1.3.6.1.1" / "1.3.6.1.2"
        leaf.mkdir(parents=True)
        (leaf / "1-1.dcm").write_bytes(b"")
    header = "patient_id,breast density,image file path,cropped image file path\n"
    (root / "mass_case_description_train_set.csv").write_text(
        header + "P_00001,2,Mass-Training_P_00001_LEFT_CC/1.3.6.1.1/1.3.6.1.2/000000.dcm,x\n"
        "P_00001,2,Mass-Training_P_00001_LEFT_CC/1.3.6.1.1/1.3.6.1.2/000000.dcm,y\n"  # second abnormality
        "P_00009,3,Mass-Training_P_00009_LEFT_MLO/1.2/1.3/000000.dcm,z\n"  # not downloaded
    )
    (root / "calc_case_description_test_set.csv").write_text(
        header + "P_00002,1,Calc-Test_P_00002_RIGHT_MLO/1.3.6.1.1/1.3.6.1.2/000000.dcm,x\n"
    )
    cfg = MammoDataConfig(path=str(root))
    with pytest.warns(UserWarning, match="1 of 2 train images"):
        train = list_sources(cfg, "train")
    assert [Path(p).relative_to(tree).parts[0] for p in train] == ["Mass-Training_P_00001_LEFT_CC"]  # not the ROI
    assert [Path(p).relative_to(tree).parts[0] for p in list_sources(cfg, "test")] == ["Calc-Test_P_00002_RIGHT_MLO"]


def test_plain_folders_split_by_subfolder_or_stable_hash(tmp_path):
    from common.mammo import MammoDataConfig, list_sources

    for split in ("train", "test"):
        (tmp_path / "tt" / split).mkdir(parents=True)
        (tmp_path / "tt" / split / f"{split}.png").write_bytes(b"")
    cfg = MammoDataConfig(path=str(tmp_path / "tt"))
    assert [Path(p).name for p in list_sources(cfg, "test")] == ["test.png"]
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(60):
        (flat / f"img{i:03d}.dcm").write_bytes(b"")
    cfg = MammoDataConfig(path=str(flat), test_fraction=0.2)
    test, train = set(list_sources(cfg, "test")), set(list_sources(cfg, "train"))
    assert not test & train and len(test | train) == 60 and 3 <= len(test) <= 25
    (flat / "new.dcm").write_bytes(b"")
    assert test <= set(list_sources(cfg, "test")) and train <= set(list_sources(cfg, "train"))  # nothing moves


def test_quanta_dose_model_noise_grows_with_density_and_lower_dose():
    from common.mammo import MammoDataConfig, degrade

    def noise(unit_value: float, **kw) -> tuple[float, float]:
        image = np.full((128, 128), unit_value, np.float32)
        out = degrade(image, MammoDataConfig(**kw), np.random.default_rng(0))
        return float(out.mean()), float(out.std())

    mean_fat, std_fat = noise(0.2, dose=0.2)
    mean_dense, std_dense = noise(0.8, dose=0.2)
    assert std_dense > 1.5 * std_fat  # fewer quanta behind dense tissue
    assert abs(mean_fat - 0.2) < 0.01 and abs(mean_dense - 0.8) < 0.01  # no bias at these counts
    assert noise(0.5, dose=0.05)[1] > 1.7 * noise(0.5, dose=0.2)[1]  # ~1/sqrt(dose): factor 2
    assert noise(0.5, dose=1.0, electronic_noise=0.0)[1] < noise(0.5, dose=1.0, electronic_noise=40.0)[1]
    assert noise(0.5, dose=0.25, dose_model="gaussian")[1] == pytest.approx(0.02, rel=0.05)
