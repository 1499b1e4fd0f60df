"""One benchmark run, every figure beside its comparison measured in the same run (these machines are
shared and noisy: ratios measured together are what can be trusted, absolute numbers are a snapshot).

Usage:
  make bench                          # = python bench/run.py: full run, writes BENCHMARKS.md + results.json
  python bench/run.py --quick         # CI: small sizes, < 2 minutes, writes bench/results.json only
  python bench/run.py --quick --out /tmp/b    # results somewhere else
  python bench/run.py --device cuda   # on a GPU box (nccl for the distributed part)
  python bench/run.py --dose-simulator 512    # section 7 only, rows printed
  python bench/run.py --data-loader 200       # section 8 only (200 training steps each), rows printed

Sections (issue 7):
  1. train     training throughput (samples/s, peak memory) of each script's model at the tiny and a
               medium size, and diffusers' UNet2DModel with the same parameter count and input for the
               2-D diffusion UNets
  2. sampling  network evaluations and seconds per 512x512 CT slice for DDPM-1000, DDIM-50 and the bridge
               sampler (ldct), DDIM-50 in the mammo latent, ResShift-15 vs DDIM-50 (through-plane)
  3. scaling   zero-shot SR inference and through-plane upsampling at growing sizes: time, peak RSS,
               fitted exponent
  4. distributed  ldct training with 1 and 2 torchrun processes (gloo on CPU, nccl on GPU), scaling efficiency
  5. utilisation  model FLOPs per training step / step time against a large matmul's FLOP/s, same run
  7. dose simulator  common/ct_sim seconds per 512x512 slice: projection once, then one FBP per dose draw
  8. data loader  ldct training steps/s on a `simulate`d dataset on disk against in-memory phantoms

Every measurement of time and memory runs in its own spawned process, so a peak RSS belongs to one
measurement.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Medium = between tiny (CPU tests) and full (the seeds): what a CPU can still train, what shows scaling.
MEDIUM = {
    "ldct_denoise": [
        "model.base_channels=32",
        "model.channel_mults=[1,2,4,4]",
        "model.attention_levels=[3]",
        "model.attention_head_channels=32",
        "model.num_res_blocks=2",
        "data.crop_size=128",
    ],
    "dicom_zero_shot_sr": ["model.base_channels=32", "model.channel_mults=[1,2,2,4]", "data.patch_size=96"],
    "mammo_ldm": [
        "model.base_channels=64",
        "model.channel_mults=[1,2,4]",
        "model.attention_levels=[1,2]",
        "model.attention_head_channels=32",
    ],
    "ct_throughplane_sr": ["unet.channels=[8,16,32,64]", "data.patch_size=[16,64,64]"],
}


# --- helpers (run inside the spawned child) ---


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def setup_child(device_name: str, threads: int):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return torch.device(device_name)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(device) -> dict:
    import torch

    out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def load_cfg(script: str, preset: str, extra: list[str]):
    import importlib

    from common.config import load_config

    module = importlib.import_module(script)
    overrides = (MEDIUM[script] if preset == "medium" else []) + extra
    return module, load_config(
        module.Config,
        ROOT / "configs" / f"{script}.yaml",
        "tiny" if preset in ("tiny", "medium") else preset,
        overrides,
    )


def build_job(script: str, preset: str, batch: int, device):
    """(model, inputs(), target shape) of one training step of `script`'s main network at `preset`."""
    import torch

    module, cfg = load_cfg(script, preset, [])
    if script == "ldct_denoise":
        model, size = module.build_model(cfg, device), cfg.data.crop_size
        t = torch.randint(0, 1000, (batch,), device=device)
        x = torch.randn(batch, 1, size, size, device=device)
        return model, lambda: (x, t, x, None), x
    if script == "dicom_zero_shot_sr":
        model, size = module.UNet(cfg.model).to(device), cfg.data.patch_size
        x = torch.randn(batch, 1, size, size, device=device)
        return model, lambda: (x, x, torch.randint(0, 200, (batch,), device=device)), x
    if script == "mammo_ldm":
        vq_module, vq_cfg = load_cfg("mammo_vqvae", "tiny" if preset in ("tiny", "medium") else preset, [])
        c = vq_cfg.model.hidden_channels
        h, w = (s // vq_cfg.model.scaling_rates[0] for s in vq_cfg.data.image_size)
        model = module.UNet(cfg.model, c).to(device)
        x = torch.randn(batch, c, h, w, device=device)
        return model, lambda: (x, torch.randint(0, 1000, (batch,), device=device), x), x
    if script == "ct_throughplane_sr":
        model = module.SimpleUNet3D(cfg.unet).to(device)
        d, h, w = cfg.data.patch_size
        factor = cfg.data.target_spacing_mm / cfg.data.hr_spacing_mm
        n_lr = max(2, int(d / factor))
        positions = torch.from_numpy(module.output_positions(n_lr, factor)).to(device)
        lr = torch.randn(batch, 1, n_lr, h, w, device=device)
        target = torch.randn(batch, 1, len(positions), h, w, device=device)
        return model, lambda: (lr, positions), target
    if script == "mammo_vqvae":
        model = module.VQVAE2(cfg.model).to(device)
        x = torch.randn(batch, 1, *cfg.data.image_size, device=device)
        return model, lambda: (x,), x
    raise KeyError(script)


def diffusers_peer(ours, script: str, preset: str, device):
    """diffusers' UNet2DModel with our block layout (attention where ours has it) and the width that matches
    our parameter count best."""
    from diffusers import UNet2DModel

    _, cfg = load_cfg(script, preset, [])
    m = cfg.model
    in_ch = ours.input.in_channels if script == "mammo_ldm" else 2
    out_ch = in_ch // 2 if script == "mammo_ldm" else 1
    levels = len(m.channel_mults)
    attention = set(getattr(m, "attention_levels", []))
    target = sum(p.numel() for p in ours.parameters())
    best = None
    for width in range(8, 8 * 64, 8):
        peer = UNet2DModel(
            in_channels=in_ch,
            out_channels=out_ch,
            layers_per_block=m.num_res_blocks,
            norm_num_groups=8,
            block_out_channels=[width * k for k in m.channel_mults],
            attention_head_dim=8,
            down_block_types=["AttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(levels)],
            up_block_types=[
                "AttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(range(levels))
            ],
        )
        n = sum(p.numel() for p in peer.parameters())
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (peer, n)
        if n > target:
            break
    return best[0].to(device)


def train_throughput(
    script: str, preset: str, batch: int, steps: int, device_name: str, threads: int, peer: bool
) -> dict:
    import torch

    device = setup_child(device_name, threads)
    model, inputs, target = build_job(script, preset, batch, device)
    name = "ours"
    if peer:
        ours_params = sum(p.numel() for p in model.parameters())
        model = diffusers_peer(model, script, preset, device)
        name = f"diffusers UNet2DModel ({ours_params / 1e6:.2f} M-param match)"
        x, *_ = inputs()
        t = torch.randint(0, 1000, (batch,), device=device)
        cond = x
        inputs = lambda: (torch.cat([x, cond], 1), t)  # noqa: E731 - same concat conditioning as ours
        target = x
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    model.train()

    def step():
        out = model(*inputs())
        out = out.sample if hasattr(out, "sample") else out
        if isinstance(out, tuple):  # the VQ-VAE returns (reconstruction, commitment loss, ...)
            out = out[0]
        loss = torch.nn.functional.mse_loss(out.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    seconds = mean_seconds(step, steps, device, warmup=2)
    return {
        "script": script,
        "preset": preset,
        "impl": name,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "batch": batch,
        "input": list(target.shape[1:]),
        "samples_per_s": round(batch / seconds, 3),
        "s_per_step": round(seconds, 4),
        **peak_memory(device),
    }


def mean_seconds(fn, n: int, device, warmup: int = 1) -> float:
    """Mean wall seconds of fn() over n calls after `warmup` untimed calls, synchronised with the device."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def seconds_per_nfe(make, n: int, device) -> float:
    """One network evaluation (inference mode), mean of n after one warm-up."""
    import torch

    with torch.inference_mode():
        return mean_seconds(make, n, device)


def sampling_cost(size: int, preset: str, device_name: str, threads: int, real_steps: int) -> list[dict]:
    """ldct: the real sampler end to end for DDIM-`real_steps` and the preset's bridge sampler; DDPM-1000 and
    DDIM-50 as measured seconds per network evaluation x evaluations (stated). Latent samplers the same
    way."""
    import torch

    import ldct_denoise as ld

    device = setup_child(device_name, threads)
    _, cfg = load_cfg("ldct_denoise", preset, [])
    model = ld.build_model(cfg, device).eval()
    schedule = ld.Schedule(cfg.diffusion, device)
    low = torch.zeros(1, 1, size, size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    repeats = 3 if preset == "tiny" else 1  # the full models take seconds to a minute per evaluation on a CPU
    per_nfe = seconds_per_nfe(lambda: model(low, t, low, None), repeats, device)
    rows = []
    bridge = (
        "bridge",
        "ddim",
        cfg.upgrade.bridge_steps,
        cfg.upgrade.bridge_start,
    )  # the preset's bridge sampler
    for name, sampler, steps, start in (("DDIM", "ddim", real_steps, None), bridge):
        sync(device)
        t0 = time.perf_counter()
        _, nfe = ld.sample(
            model, schedule, low, sampler, steps, 0.0, torch.Generator().manual_seed(0), None, start
        )
        sync(device)
        rows.append(
            {
                "job": f"ldct {size}x{size} ({preset})",
                "sampler": f"{name}-{nfe}" + (f" from low dose at {start}" if start else ""),
                "nfe": nfe,
                "seconds": round(time.perf_counter() - t0, 3),
                "how": "measured end to end",
            }
        )
    for name, nfe in (("DDPM-1000", 1000), ("DDIM-50", 50)):
        rows.append(
            {
                "job": f"ldct {size}x{size} ({preset})",
                "sampler": name,
                "nfe": nfe,
                "seconds": round(per_nfe * nfe, 3),
                "how": f"{per_nfe:.4f} s/NFE measured x NFE",
            }
        )
    # mammo: the latent UNet at the latent of one canvas
    import mammo_ldm

    vq_module, vq_cfg = load_cfg("mammo_vqvae", preset, [])
    _, ldm_cfg = load_cfg("mammo_ldm", preset, [])
    c = vq_cfg.model.hidden_channels
    h, w = (s // vq_cfg.model.scaling_rates[0] for s in vq_cfg.data.image_size)
    unet = mammo_ldm.UNet(ldm_cfg.model, c).to(device).eval()
    z = torch.zeros(1, c, h, w, device=device)
    s = seconds_per_nfe(lambda: unet(z, t, z), repeats, device)
    rows.append(
        {
            "job": f"mammo latent {c}x{h}x{w} ({preset})",
            "sampler": "DDIM-50",
            "nfe": 50,
            "seconds": round(50 * s, 3),
            "how": f"{s:.4f} s/NFE measured x NFE",
        }
    )
    import ct_throughplane_sr as ct

    _, ct_cfg = load_cfg("ct_throughplane_sr", preset, [])
    net = ct.LatentDenoiser(ct_cfg.ldm, ct_cfg.vae.latent_channels).to(device).eval()
    d, hh, ww = (max(net.multiple, k // 8) for k in ct_cfg.data.patch_size)
    zl = torch.zeros(1, ct_cfg.vae.latent_channels, d, hh, ww, device=device)
    s = seconds_per_nfe(lambda: net(zl, t, zl), repeats, device)
    for name, nfe in (("ResShift-15", 15), ("DDIM-50", 50)):
        rows.append(
            {
                "job": f"through-plane latent patch {tuple(zl.shape[1:])} ({preset})",
                "sampler": name,
                "nfe": nfe,
                "seconds": round(nfe * s, 4),
                "how": f"{s:.5f} s/NFE measured x NFE",
            }
        )
    return rows


def zssr_inference(h: int, w: int, device_name: str, threads: int) -> dict:
    """Zero-shot SR `inference` path on an in-memory 12-bit DICOM, x2, writing both output DICOMs and the PNGs
    (tiny network, DDIM 1 step, 1 sample: the tiling, streaming and writing machinery, not the sampler)."""
    import numpy as np

    import dicom_zero_shot_sr as zs
    from tests.fixtures import make_projection_dataset

    device = setup_child(device_name, threads)
    base = peak_rss_mb()
    _, cfg = load_cfg(
        "dicom_zero_shot_sr",
        "tiny",
        ["sample.ddim_steps=1", "sample.n_samples=1", "sample.patch_size=256", "sample.overlap=32"],
    )
    model = zs.UNet(cfg.model).to(device).eval()
    schedule = zs.Schedule(cfg.diffusion.timesteps, cfg.diffusion.schedule)
    stored = np.random.default_rng(0).integers(0, 4096, (h, w), dtype=np.uint16)
    ds = make_projection_dataset(stored, bits_stored=12)  # MG: slope 1, intercept 0
    values = stored.astype(np.float32)
    del stored, ds.PixelData  # as load_input: the header is the template, the values are in `values`
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        info = zs.infer_file(
            model, schedule, cfg, 2, Path(out) / "input.dcm", values, ds, None, Path(out), device
        )
        sync(device)
        seconds = time.perf_counter() - t0
        assert (
            info["output_shape"] == [2 * h, 2 * w]
            and (Path(out) / "input_sr_x2.dcm").stat().st_size > 8 * h * w
        )
    return {
        "job": "zero-shot SR x2",
        "input": [h, w],
        "pixels": h * w,
        "seconds": round(seconds, 3),
        "rss_before_mb": round(base, 1),
        **peak_memory(device),
    }


def ct_upsample(slices: int, size: int, device_name: str, threads: int) -> dict:
    """Through-plane x3 upsampling of a volume (UNet3D, tiny network, full-preset inference patches)."""
    import numpy as np
    import torch

    import ct_throughplane_sr as ct

    device = setup_child(device_name, threads)
    base = peak_rss_mb()
    _, cfg = load_cfg("ct_throughplane_sr", "tiny", [])
    cfg.infer.patch_lr = [16, 192, 192]
    model = ct.SimpleUNet3D(cfg.unet).to(device).eval()

    def predict(lr, rel):
        with torch.inference_mode():
            return model(lr.to(device), rel.to(device))[0, 0].float().cpu().numpy()

    hu = np.random.default_rng(0).integers(-1000, 1500, (slices, size, size)).astype(np.float32)
    t0 = time.perf_counter()
    out = ct.upsample_hu(hu, ct.output_positions(len(hu), 3.0), predict, cfg)
    sync(device)
    return {
        "job": "through-plane x3",
        "input": [slices, size, size],
        "voxels": hu.size,
        "output": list(out.shape),
        "seconds": round(time.perf_counter() - t0, 3),
        "rss_before_mb": round(base, 1),
        **peak_memory(device),
    }


def utilisation(device_name: str, threads: int, preset: str, batch: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device = setup_child(device_name, threads)
    model, inputs, target = build_job("ldct_denoise", preset, batch, device)
    opt = torch.optim.Adam(model.parameters(), 1e-4)

    def step():
        loss = torch.nn.functional.mse_loss(model(*inputs()), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    step_s = mean_seconds(step, 5, device, warmup=0)  # already warm: the counted step ran just before
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    matmul_flops = 2 * n**3 / mean_seconds(lambda: a @ b, 5, device)
    return {
        "job": f"ldct train step ({preset}, batch {batch})",
        "model_gflop_per_step": round(flops / 1e9, 3),
        "step_s": round(step_s, 4),
        "model_gflop_per_s": round(flops / step_s / 1e9, 2),
        "matmul_gflop_per_s": round(matmul_flops / 1e9, 2),
        "fraction_of_matmul": round(flops / step_s / matmul_flops, 3),
    }


def attention_before_after(device_name: str, threads: int, tokens: list[int]) -> list[dict]:
    """The fix the benchmark pointed to: ldct's self-attention through nn.MultiheadAttention's own path
    (before) and
    through F.scaled_dot_product_attention with the same weights (after, `ldct_denoise.attend`)."""
    import torch

    import ldct_denoise as ld

    device = setup_child(device_name, threads)
    mha = torch.nn.MultiheadAttention(32, 2, batch_first=True).to(device).eval()
    rows = []
    for n in tokens:
        x = torch.randn(1, n, 32, device=device)
        before = seconds_per_nfe(lambda x=x: mha(x, x, x, need_weights=False), 2, device)
        after = seconds_per_nfe(lambda x=x: ld.attend(mha, x, x), 2, device)
        rows.append(
            {
                "tokens": n,
                "side_px_at_1/4_scale": 4 * int(n**0.5),
                "mha_s": round(before, 4),
                "sdpa_s": round(after, 4),
                "speedup": round(before / after, 2),
            }
        )
    return rows


# --- orchestration (parent) ---


SEPARATE_PROCESSES = True  # --quick turns it off: start-up of ~20 processes would be most of CI's two minutes


def dose_simulator(size: int, device_name: str, threads: int) -> list[dict]:
    """common/ct_sim on one size x size phantom slice (0.7 mm pixels): the projection (once per slice, cached)
    and each dose draw (Poisson + electronic noise + FBP), per slice; batched draws of 4 slices too."""
    import numpy as np
    import torch

    from common import ct_sim, synthetic

    device = setup_child(device_name, threads)
    hu = torch.from_numpy(synthetic.ct_phantom(size, np.random.default_rng(0)))[None].to(device)
    rows = []
    for name, geometry in (
        ("fan (Definition-like, 1152 views)", ct_sim.Geometry()),
        ("parallel (pi/2 N views)", ct_sim.parallel_geometry()),
    ):
        sim = ct_sim.Simulator((size, size), (0.7, 0.7), geometry, device)
        project = mean_seconds(functools.partial(sim.project, hu, coarse=4), 1, device, warmup=0)
        integrals = sim.project(hu, coarse=4)
        # a dataset draws many times from one simulator: steady state, after one warm-up draw
        draw = mean_seconds(functools.partial(sim.noise_hu, integrals, 5e4, 10.0), 3, device)
        batch = integrals.expand(4, -1, -1)
        batch = mean_seconds(functools.partial(sim.noise_hu, batch, 5e4, 10.0), 1, device)
        rows.append(
            {
                "geometry": name,
                "slice": f"{size}x{size}",
                "device": device_name,
                "threads": threads,
                "projection_s": round(project, 3),
                "dose_draw_s": round(draw, 3),
                "dose_draw_s_per_slice_batch4": round(batch / 4, 3),
            }
        )
    if device_name == "cpu":
        rows.append(
            {
                "geometry": "fan",
                "slice": f"{size}x{size}",
                "device": "cuda",
                "projection_s": "not measured here: no GPU",
                "dose_draw_s": "not measured here: no GPU",
            }
        )
    return rows


def in_child(fn, *args):
    """Run fn(*args) in a fresh spawned process: its peak RSS is this measurement's alone."""
    if not SEPARATE_PROCESSES:
        return fn(*args)
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def distributed(device_name: str, steps: int, out: Path) -> dict:
    """samples/s of `ldct_denoise.py train` (tiny) with 1 and 2 torchrun processes, from metrics.jsonl timings
    (start-up and the first steps excluded)."""
    rows = []
    for nproc in (1, 2):
        run_dir = out / f"ddp{nproc}"
        threads = max(1, (os.cpu_count() or 2) // nproc)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(ROOT / "ldct_denoise.py"),
            "train",
            "--out",
            str(run_dir),
            "--preset",
            "tiny",
            "--device",
            device_name,
            "--max-steps",
            str(steps),
            "--set",
            "train.log_every=1",
            "--set",
            f"train.ckpt_every={steps}",
            "--set",
            "data.phantom_train=16",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun x{nproc} failed:\n{proc.stderr[-2000:]}")
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        timed = [r for r in lines if "time_s" in r]
        first, last = timed[min(2, len(timed) - 2)], timed[-1]
        # the tiny preset's global batch: each of the n processes takes batch / n (ldct_denoise.batches)
        batch = 8
        sps = batch * (last["step"] - first["step"]) / (last["time_s"] - first["time_s"])
        rows.append({"processes": nproc, "threads_per_process": threads, "samples_per_s": round(sps, 2)})
    efficiency = rows[1]["samples_per_s"] / (2 * rows[0]["samples_per_s"])
    backend = "nccl" if device_name == "cuda" else "gloo"
    return {"backend": backend, "rows": rows, "scaling_efficiency": round(efficiency, 3)}


def steps_per_s(run_dir: Path) -> float:
    """Training steps/s over the second half of a run's metrics.jsonl (start-up and first epoch excluded)."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    timed = [r for r in lines if "time_s" in r]
    first, last = timed[len(timed) // 2], timed[-1]
    return (last["step"] - first["step"]) / (last["time_s"] - first["time_s"])


def data_loader(device_name: str, steps: int, out: Path) -> list[dict]:
    """Issue 13: is the cached dataset of `simulate` read at disk speed? `ldct_denoise.py train` (tiny) on
    pairs simulated from a 128 x 128 x 24 phantom volume (NIfTI) against in-memory phantoms of the same size;
    same model, crop and batch, so a difference is the data path. Runs alternate twice, best of each kept:
    load from other processes on a shared machine only ever slows a run down."""
    import numpy as np

    from common import nifti_io, synthetic

    volume = np.stack([synthetic.ct_phantom(128, np.random.default_rng(z)) for z in range(24)])
    (out / "ct").mkdir(parents=True)
    affine = np.diag([2.8, 2.8, 2.5, 1.0])
    nifti_io.write_nifti(out / "ct" / "phantom.nii.gz", nifti_io.Volume(volume, affine, {}))
    script = [sys.executable, str(ROOT / "ldct_denoise.py")]
    subprocess.run(
        [*script, "simulate", "--input", str(out / "ct"), "--output", str(out / "pairs"), "--preset", "tiny"],
        check=True,
        capture_output=True,
    )
    common = ["train", "--preset", "tiny", "--device", device_name, "--max-steps", str(steps)]
    common += [
        "--set",
        f"train.log_every={max(1, steps // 20)}",
        "--set",
        f"train.ckpt_every={steps}",
        "--set",
        "sample.steps=2",
    ]
    data = {"in-memory phantoms": [], "simulated pairs on disk": ["--data", str(out / "pairs")]}
    best = dict.fromkeys(data, 0.0)
    for repeat in range(2):
        for name, extra in data.items():
            run_dir = out / f"{len(extra)}_{repeat}"
            proc = subprocess.run(
                [*script, *common, "--out", str(run_dir), *extra],
                capture_output=True,
                text=True,
                timeout=3600,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"ldct train ({name}) failed:\n{proc.stderr[-2000:]}")
            best[name] = max(best[name], steps_per_s(run_dir))
    rows = [{"data": name, "steps": steps, "steps_per_s": round(sps, 3)} for name, sps in best.items()]
    rows[1]["ratio_to_memory"] = round(rows[1]["steps_per_s"] / rows[0]["steps_per_s"], 3)
    return rows


def fit_exponent(sizes: list[float], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(size): 1 = linear."""
    xs, ys = [math.log(s) for s in sizes], [math.log(max(v, 1e-9)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def run(quick: bool, device_name: str, out: Path) -> dict:
    import torch

    global SEPARATE_PROCESSES
    SEPARATE_PROCESSES = (
        not quick
    )  # quick: one process, so peak RSS figures are cumulative (schema check only)
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
        "quick": quick,
        "separate_processes": not quick,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": threads,
            "device": device_name,
            "gpu": torch.cuda.get_device_name(0) if device_name == "cuda" else None,
        },
        "torch": torch.__version__,
    }
    print(f"bench: {'quick' if quick else 'full'} run on {device_name}, {threads} threads", flush=True)
    # 1. training throughput, ours vs diffusers where a peer exists
    jobs = [
        ("ldct_denoise", True),
        ("dicom_zero_shot_sr", True),
        ("mammo_ldm", True),
        ("ct_throughplane_sr", False),
        ("mammo_vqvae", False),
    ]
    presets = ["tiny"] if quick else ["tiny", "medium"]
    steps, batch = (3, 2) if quick else (10, 4)
    train_rows = []
    for script, has_peer in jobs:
        for preset in presets:
            if preset == "medium" and script not in MEDIUM:
                continue
            ours = in_child(train_throughput, script, preset, batch, steps, device_name, threads, False)
            train_rows.append(ours)
            if has_peer:
                peer = in_child(train_throughput, script, preset, batch, steps, device_name, threads, True)
                peer["ratio_ours_over_peer"] = round(ours["samples_per_s"] / peer["samples_per_s"], 3)
                ours["ratio_ours_over_peer"] = peer["ratio_ours_over_peer"]
                train_rows.append(peer)
            print(
                f"  train {script} {preset}: {ours['samples_per_s']} samples/s"
                + (f", ours/diffusers {ours['ratio_ours_over_peer']}" if has_peer else ""),
                flush=True,
            )
    results["train"] = train_rows
    # 2. sampling cost
    size = 128 if quick else 512
    results["sampling"] = in_child(sampling_cost, size, "tiny", device_name, threads, 5 if quick else 50)
    if not quick:  # the seeds' full architectures: seconds per network evaluation x evaluations
        results["sampling"] += in_child(sampling_cost, size, "full", device_name, threads, 2)
    print(f"  sampling: {len(results['sampling'])} rows", flush=True)
    # 3. scaling with size
    zs_sizes = [(128, 128), (256, 256)] if quick else [(512, 512), (1024, 1024), (2048, 2048), (4500, 2800)]
    # 256 px in-plane, not 512: a 256-slice 512^2 volume takes ~10 CPU minutes with 2 threads on its own (the
    # 512x512x100 peak memory is measured in docs/ct_throughplane_sr.md); the exponents do not depend on it
    ct_sizes = [(8, 64), (16, 64)] if quick else [(64, 256), (128, 256), (256, 256)]
    zs_rows = [in_child(zssr_inference, h, w, device_name, threads) for h, w in zs_sizes]
    ct_rows = [in_child(ct_upsample, n, s, device_name, threads) for n, s in ct_sizes]
    results["scaling"] = {
        "zero_shot_sr": {
            "rows": zs_rows,
            "time_exponent": round(
                fit_exponent([r["pixels"] for r in zs_rows], [r["seconds"] for r in zs_rows]), 3
            ),
            "peak_rss_exponent": round(
                fit_exponent([r["pixels"] for r in zs_rows], [r["peak_rss_mb"] for r in zs_rows]), 3
            ),
        },
        "through_plane": {
            "rows": ct_rows,
            "time_exponent": round(
                fit_exponent([r["voxels"] for r in ct_rows], [r["seconds"] for r in ct_rows]), 3
            ),
            "peak_rss_exponent": round(
                fit_exponent([r["voxels"] for r in ct_rows], [r["peak_rss_mb"] for r in ct_rows]), 3
            ),
        },
    }
    print(
        f"  scaling: zero-shot SR time exponent {results['scaling']['zero_shot_sr']['time_exponent']}",
        flush=True,
    )
    # 4. distributed
    with tempfile.TemporaryDirectory() as tmp:
        results["distributed"] = distributed(device_name, 5 if quick else 30, Path(tmp))
    print(f"  distributed: efficiency {results['distributed']['scaling_efficiency']}", flush=True)
    # 6. before/after of the fix it pointed to (attention at 1/4 scale of a 256 / 512 px slice, tiny UNet)
    results["attention"] = in_child(
        attention_before_after, device_name, threads, [1024] if quick else [4096, 16384]
    )
    # 5. utilisation
    results["utilisation"] = in_child(utilisation, device_name, threads, "tiny" if quick else "medium", batch)
    print(f"  utilisation: {results['utilisation']['fraction_of_matmul']} of matmul FLOP/s", flush=True)
    # 7. the ldct dose simulator (issue 13): seconds per slice, projection once, then one FBP per dose draw
    results["dose_simulator"] = in_child(dose_simulator, 128 if quick else 512, device_name, threads)
    print(f"  dose simulator: {results['dose_simulator'][0]['dose_draw_s']} s per dose draw", flush=True)
    # 8. the ldct data path (issue 13): training on `simulate`d pairs on disk vs in-memory phantoms
    with tempfile.TemporaryDirectory() as tmp:
        results["data_loader"] = data_loader(device_name, 20 if quick else 200, Path(tmp))
    print(f"  data loader: disk / memory {results['data_loader'][1]['ratio_to_memory']}", flush=True)
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)
    return results


def table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_markdown(results: dict, path: Path) -> None:
    m = results["machine"]
    s = results["scaling"]
    ratios = [r["ratio_ours_over_peer"] for r in results["train"] if "ratio_ours_over_peer" in r]
    zs = s["zero_shot_sr"]["rows"]
    per_px = (
        (zs[-1]["peak_rss_mb"] - zs[1]["peak_rss_mb"]) * 2**20 / (4 * (zs[-1]["pixels"] - zs[1]["pixels"]))
    )
    text = f"""# Benchmarks

Generated by `{results["command"]}` on {results["date"]} (torch {results["torch"]}, {m["platform"]},
{m["cpus"]} CPUs, {m["threads"]} threads, device {m["device"]}{", " + m["gpu"] if m["gpu"] else ""}).
Every figure below is in `bench/results.json` and is reproduced by re-running the command: these machines are
shared, so compare the ratios measured in one run, not absolute numbers across runs.

## 1. Training throughput (forward + backward + Adam step; peak RSS of a fresh process)

`medium` = the tiny preset widened as `MEDIUM` in `bench/run.py` says. The peer is diffusers' `UNet2DModel`
with our
block layout and the width that matches our parameter count, on the same input and concat conditioning.

{
        table(
            results["train"],
            [
                "script",
                "preset",
                "impl",
                "params_m",
                "batch",
                "input",
                "samples_per_s",
                "ratio_ours_over_peer",
                "peak_rss_mb",
            ],
        )
    }

## 2. Sampling cost

{table(results["sampling"], ["job", "sampler", "nfe", "seconds", "how"])}

## 3. Scaling with size (time and peak RSS; exponents fitted on log-log, 1 = linear)

Zero-shot SR x2, the `inference` path from an in-memory 12-bit MG DICOM to both output DICOMs and the PNGs
(tiny network, 1 DDIM step, 1 sample, 256 px tiles: the tiling, streaming and writing machinery):
time exponent {s["zero_shot_sr"]["time_exponent"]}, peak-RSS exponent {
        s["zero_shot_sr"]["peak_rss_exponent"]
    }.

{table(s["zero_shot_sr"]["rows"], ["input", "pixels", "seconds", "rss_before_mb", "peak_rss_mb"])}

Through-plane x3 (tiny UNet3D, full-preset 16x192x192 patches):
time exponent {s["through_plane"]["time_exponent"]}, peak-RSS exponent {
        s["through_plane"]["peak_rss_exponent"]
    }.

{table(s["through_plane"]["rows"], ["input", "voxels", "output", "seconds", "rss_before_mb", "peak_rss_mb"])}

## 4. Distributed ({results["distributed"]["backend"]}): `torchrun` 1 vs 2 processes, ldct tiny

{table(results["distributed"]["rows"], ["processes", "threads_per_process", "samples_per_s"])}

Scaling efficiency (2-process samples/s / twice the 1-process): {
        results["distributed"]["scaling_efficiency"]
    }.

## 5. Utilisation

{table([results["utilisation"]], list(results["utilisation"]))}

`torch.utils.flop_counter` counts nominal FLOPs (2 x multiply-adds of each convolution); oneDNN's convolutions
can do fewer multiplications than that (Winograd), so a fraction above 1 reads "at least as fast as sgemm",
not more than the machine can do.

## 6. Before / after: the fix this benchmark pointed to

Sampling a 512 px slice with the tiny ldct UNet spent most of its time in self-attention at 1/4 scale (16k
tokens): `nn.MultiheadAttention`'s own path builds the N x N matrix with bmm + softmax. `ldct_denoise.attend`
runs the same weights through `F.scaled_dot_product_attention` (flash kernels on CPU and GPU); checkpoints are
unchanged (tested equal in `tests/test_ldct_stages.py`).

{table(results["attention"], list(results["attention"][0]))}

## 7. Dose simulator (`common/ct_sim.py`, ldct's low-dose data): seconds per slice

The projection sets each ray's photon count and is made once per slice (cached); each further dose draw costs
Poisson + electronic noise and one filtered back-projection.

{
        table(
            results.get("dose_simulator", []),
            [
                "geometry",
                "slice",
                "device",
                "threads",
                "projection_s",
                "dose_draw_s",
                "dose_draw_s_per_slice_batch4",
            ],
        )
    }

## 8. ldct data path: training on `simulate`d pairs on disk vs in-memory phantoms (tiny, same crops)

Issue 13 asks for real-data training within 10 % of in-memory synthetic training (`ratio_to_memory` >= 0.9).

{table(results.get("data_loader", []), ["data", "steps", "steps_per_s", "ratio_to_memory"])}

## Reading these numbers

- Training throughput, ours / diffusers at equal parameter count and input: {min(ratios):.2f} to {
        max(ratios):.2f}.
- Sampling on CPU: the full seed architectures are GPU models (the full mammo LDM spends ~{
        max(
            r["seconds"] / r["nfe"] for r in results["sampling"]
        ):.0f} s per network evaluation here); DDPM-1000 rows are
  seconds per evaluation x 1000, measured, not run end to end.
- Scaling: time grows about linearly with pixels/voxels (exponents {s["zero_shot_sr"]["time_exponent"]} and
  {s["through_plane"]["time_exponent"]}). Network memory is bounded by the patch. Zero-shot SR streams: the
  normalised input and its bicubic upsampling are made per row of tiles, rows are blended as they finish and
  the SR and std rows go to temporary files from which the DICOMs are encoded. From {zs[1]["input"]} to
  {zs[-1]["input"]} its peak RSS grows {zs[-1]["peak_rss_mb"] - zs[1]["peak_rss_mb"]:.0f} MB
  ({100 * (zs[-1]["peak_rss_mb"] / zs[1]["peak_rss_mb"] - 1):.0f}%) while the output grows
  {zs[-1]["pixels"] / zs[1]["pixels"]:.0f}x: {per_px:.2f} bytes per extra output pixel, where holding the SR
  image and its std map in float32 would take 8 and the input's own float32 values take 1 (x2: four output
  pixels per input pixel). What is left grows with the input and the image width (one row of tiles).
  Through-plane holds its output volume.
- Distributed on this 2-core machine: two 1-thread processes against one 2-thread process measure gloo's
  all-reduce overhead, not a speed-up; run it on a multi-GPU box for nccl scaling.
"""
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI: small sizes, under 2 minutes")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument(
        "--markdown-only", action="store_true", help="rewrite BENCHMARKS.md from OUT/results.json"
    )
    parser.add_argument(
        "--dose-simulator", type=int, metavar="SIZE", help="only section 7 at SIZE px; print rows"
    )
    parser.add_argument(
        "--data-loader",
        type=int,
        metavar="STEPS",
        help="only section 8 with STEPS training steps; print rows",
    )
    args = parser.parse_args()
    if args.data_loader:
        with tempfile.TemporaryDirectory() as tmp:
            rows = data_loader("cpu" if args.device == "auto" else args.device, args.data_loader, Path(tmp))
        return print(json.dumps({"rows": rows, "loadavg": os.getloadavg()}, indent=1))
    if args.dose_simulator:
        threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
        rows = dose_simulator(args.dose_simulator, "cpu" if args.device == "auto" else args.device, threads)
        return print(json.dumps({"rows": rows, "loadavg": os.getloadavg()}, indent=1))
    if args.markdown_only:
        return write_markdown(json.loads((args.out / "results.json").read_text()), ROOT / "BENCHMARKS.md")
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    t0 = time.perf_counter()
    results = run(args.quick, device, args.out)
    if not args.quick:
        write_markdown(results, ROOT / "BENCHMARKS.md")
    print(f"bench: done in {time.perf_counter() - t0:.0f} s; results in {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
