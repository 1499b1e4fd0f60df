"""Issue 7: the benchmark's quick mode runs and writes the documented schema; our DDIM sampler is diffusers'
DDIMScheduler (same betas, model output, eta 0), so the sampling comparison is apples to apples."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ldct_denoise as ld  # noqa: E402

diffusers = pytest.importorskip("diffusers", reason="pip install -r requirements-bench.txt")


class FakeNet(torch.nn.Module):
    """A fixed, non-trivial function of (x_t, t) standing in for a trained eps-network."""

    def forward(self, x_t, t, low_dose, edges=None):
        return 0.3 * torch.tanh(x_t) + 0.1 * torch.sin(t.float()[:, None, None, None] / 50 + low_dose)


@pytest.mark.parametrize(("schedule", "steps"), [("linear", 50), ("cosine", 20), ("linear", 10)])
def test_ddim_matches_diffusers_ddim_scheduler(schedule, steps):
    cfg = ld.DiffusionConfig(timesteps=1000, schedule=schedule, parameterization="eps")
    ours = ld.Schedule(cfg, torch.device("cpu"))
    betas = 1 - ours.alphas_cumprod / torch.cat([torch.ones(1), ours.alphas_cumprod[:-1]])
    theirs = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        trained_betas=betas.numpy(),
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        prediction_type="epsilon",
    )
    # steps divide T: diffusers' prev = t - T // steps is then the next grid point
    theirs.set_timesteps(steps)
    low = torch.rand(2, 1, 16, 16) * 2 - 1
    gen = torch.Generator().manual_seed(3)
    x_ours, nfe = ld.sample(FakeNet(), ours, low, "ddim", steps, 0.0, gen)
    x = torch.randn(low.shape, generator=torch.Generator().manual_seed(3))
    our_timesteps = np.round(np.arange(1000, 0, -1000 / steps)).astype(int) - 1
    assert np.array_equal(theirs.timesteps.numpy(), our_timesteps)  # the same grid of timesteps
    for t in theirs.timesteps:
        eps = FakeNet()(x, torch.full((2,), int(t)), low)
        x = theirs.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    assert nfe == steps
    assert torch.allclose(x_ours, x, atol=1e-5), (x_ours - x).abs().max()


@pytest.mark.slow  # ~2.5 min: a product-level run of bench/run.py (`make test-all`)
def test_quick_bench_writes_the_documented_schema(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--quick",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert {
        "date",
        "command",
        "machine",
        "torch",
        "train",
        "sampling",
        "scaling",
        "distributed",
        "utilisation",
    } <= set(r)
    peers = [row for row in r["train"] if row["impl"].startswith("diffusers")]
    assert {row["script"] for row in peers} == {"ldct_denoise", "dicom_zero_shot_sr", "mammo_ldm"}
    for row in r["train"]:
        assert row["samples_per_s"] > 0 and row["peak_rss_mb"] > 0 and row["params_m"] > 0
    for ours in (
        row
        for row in r["train"]
        if row["impl"] == "ours" and row["script"] in {"ldct_denoise", "dicom_zero_shot_sr", "mammo_ldm"}
    ):
        peer = next(p for p in peers if p["script"] == ours["script"] and p["preset"] == ours["preset"])
        assert abs(peer["params_m"] - ours["params_m"]) / ours["params_m"] < 0.15  # a like-for-like peer
        assert ours["ratio_ours_over_peer"] == pytest.approx(
            ours["samples_per_s"] / peer["samples_per_s"], rel=1e-2
        )
    samplers = {row["sampler"].split(" ")[0] for row in r["sampling"]}
    assert {"DDPM-1000", "DDIM-50", "ResShift-15", "bridge-10"} <= samplers
    assert all(row["nfe"] > 0 and row["seconds"] > 0 for row in r["sampling"])
    for job in ("zero_shot_sr", "through_plane"):
        assert len(r["scaling"][job]["rows"]) >= 2 and np.isfinite(r["scaling"][job]["time_exponent"])
    assert [row["processes"] for row in r["distributed"]["rows"]] == [1, 2]
    assert r["distributed"]["backend"] == "gloo" and r["distributed"]["scaling_efficiency"] > 0
    assert 0 < r["utilisation"]["fraction_of_matmul"] and r["utilisation"]["model_gflop_per_step"] > 0
    assert r["attention"][0]["mha_s"] > 0 and r["attention"][0]["sdpa_s"] > 0
    sim = r["dose_simulator"]
    assert [row["geometry"].split(" ")[0] for row in sim[:2]] == ["fan", "parallel"]
    assert all(row["dose_draw_s"] > 0 and row["projection_s"] > 0 for row in sim[:2])
    loader = r["data_loader"]
    assert [row["data"] for row in loader] == ["in-memory phantoms", "simulated pairs on disk"]
    assert all(row["steps_per_s"] > 0 for row in loader) and loader[1]["ratio_to_memory"] > 0
