"""mammo_vqvae.py + mammo_ldm.py in-process units: the dose model, the CBIS-DDSM patient split, modality
checks, the quantiser, the DDIM grid and time embedding, and restoration through the real sampler and decoder
with an
oracle predictor (fails when restoration is broken)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import make_projection_dataset

import mammo_ldm
import mammo_vqvae
from common import UserError, dicom_io, metrics, synthetic
from common.config import load_config
from common.mammo import (
    MammoDataConfig,
    MammoDataset,
    degrade,
    detector_counts,
    epoch_order,
    expected_counts,
    list_sources,
    noise_variance,
    read_mammogram,
)

ROOT = Path(__file__).resolve().parents[1]


def config(script, preset: str, overrides=()):
    module = mammo_vqvae if script == "vqvae" else mammo_ldm
    return load_config(module.Config, ROOT / "configs" / f"mammo_{script}.yaml", preset, list(overrides))


# --- dose model ---


def test_pure_poisson_counts_have_variance_equal_to_their_mean_at_every_signal():
    cfg = MammoDataConfig(electronic_noise=0.0, dose=0.2)
    rng = np.random.default_rng(0)
    ratios = []
    for unit_value in (0.1, 0.4, 0.7, 0.95):
        image = np.full((200, 200), unit_value, np.float32)
        counts = detector_counts(image, cfg, rng)
        expected = float(expected_counts(image, cfg)[0, 0])
        assert counts.mean() == pytest.approx(expected, rel=0.01)  # mean preserved: E[counts] = dose x N
        ratios.append(counts.var() / expected)
    assert np.allclose(ratios, 1.0, atol=0.05)  # variance proportional to the signal, factor 1 (Poisson)


def test_degraded_unit_image_keeps_the_mean_and_matches_the_predicted_variance():
    cfg = MammoDataConfig()
    for unit_value in (0.2, 0.6):
        image = np.full((256, 256), unit_value, np.float32)
        low = degrade(image, cfg, np.random.default_rng(1))
        assert low.mean() == pytest.approx(unit_value, abs=0.002)
        assert low.var() == pytest.approx(float(noise_variance(image, cfg)[0, 0]), rel=0.05)
    assert noise_variance(np.float32(0.8), cfg) > 2 * noise_variance(np.float32(0.3), cfg)  # dense = noisier
    low_dose = MammoDataConfig(dose=0.05)
    assert noise_variance(np.float32(0.5), low_dose) > 3.5 * noise_variance(np.float32(0.5), cfg)  # ~1/dose
    gaussian = MammoDataConfig(dose_model="gaussian", dose=0.25)
    assert degrade(
        np.full((128, 128), 0.5, np.float32), gaussian, np.random.default_rng(0)
    ).std() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_dose_leaves_visible_noise_on_the_canvas_of_every_preset(preset):
    """Simulated on the canvas, so the noise the model sees does not vanish in the resize (the old model gave
    57 dB at 128x96). Synthetic 14-bit mammogram, breast mask, data range 1."""
    cfg = config("vqvae", preset, ["data.synthetic_test=1", "data.synthetic_shape=[640,480]"]).data
    item = MammoDataset(list_sources(cfg, "test"), cfg, paired=True, fixed_noise=True)[0]
    clean, low = ((item[k][0].numpy() + 1) / 2 for k in ("clean", "degraded"))
    mask = item["mask"][0].numpy() > 0
    assert 26.0 < metrics.psnr(low, clean, 1.0, mask) < 36.0
    assert np.array_equal(low[~mask], clean[~mask])  # background untouched


# --- data ---


def cbis_tree(root: Path, rows: dict[str, list[str]]) -> None:
    header = "patient_id,breast density,image file path,cropped image file path\n"
    for csv_name, subjects in rows.items():
        lines = []
        for subject in subjects:
            leaf = root / "CBIS-DDSM" / subject / "1.3.6.1.1" / "1.3.6.1.2"
            leaf.mkdir(parents=True, exist_ok=True)
            (leaf / "1-1.dcm").write_bytes(b"")
            lines.append(
                f"{subject.split('_')[1]}_{subject.split('_')[2]},2,{subject}/1.3.6.1.1/1.3.6.1.2/000.dcm,x"
            )
        (root / csv_name).write_text(header + "\n".join(lines) + "\n")


def test_cbis_ddsm_split_is_by_patient_across_mass_and_calc_csvs(tmp_path):
    cbis_tree(
        tmp_path,
        {
            "mass_case_description_train_set.csv": [
                "Mass-Training_P_00001_LEFT_CC",
                "Mass-Training_P_00007_LEFT_CC",
            ],
            "calc_case_description_train_set.csv": ["Calc-Training_P_00002_RIGHT_MLO"],
            "mass_case_description_test_set.csv": ["Mass-Test_P_00003_LEFT_MLO"],
            "calc_case_description_test_set.csv": [
                "Calc-Test_P_00001_RIGHT_CC"
            ],  # P_00001 also in Mass-Training
        },
    )
    cfg = MammoDataConfig(path=str(tmp_path))
    with pytest.warns(UserWarning, match="1 patients are in both a training and a test CSV"):
        train = {Path(p).relative_to(tmp_path / "CBIS-DDSM").parts[0] for p in list_sources(cfg, "train")}
    test = {Path(p).relative_to(tmp_path / "CBIS-DDSM").parts[0] for p in list_sources(cfg, "test")}
    assert train == {"Mass-Training_P_00007_LEFT_CC", "Calc-Training_P_00002_RIGHT_MLO"}
    assert test == {
        "Mass-Test_P_00003_LEFT_MLO",
        "Calc-Test_P_00001_RIGHT_CC",
        "Mass-Training_P_00001_LEFT_CC",
    }
    patients = [{name.split("_")[2] for name in split} for split in (train, test)]
    assert not patients[0] & patients[1]


def test_plain_folders_split_by_subfolder_or_stable_hash(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "tt" / split).mkdir(parents=True)
        (tmp_path / "tt" / split / f"{split}.png").write_bytes(b"")
    assert [Path(p).name for p in list_sources(MammoDataConfig(path=str(tmp_path / "tt")), "test")] == [
        "test.png"
    ]
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(60):
        (flat / f"img{i:03d}.dcm").write_bytes(b"")
    cfg = MammoDataConfig(path=str(flat), test_fraction=0.2)
    test, train = set(list_sources(cfg, "test")), set(list_sources(cfg, "train"))
    assert not test & train and len(test | train) == 60 and 3 <= len(test) <= 25
    (flat / "new.dcm").write_bytes(b"")
    assert test <= set(list_sources(cfg, "test")) and train <= set(
        list_sources(cfg, "train")
    )  # nothing moves


def write_mammogram(path: Path, modality: str | None) -> Path:
    stored = synthetic.mammogram((200, 160), np.random.default_rng(0), bits_stored=14)
    ds = make_projection_dataset(stored, bits_stored=14)
    if modality is None:
        del ds.Modality
    else:
        ds.Modality = modality
    return dicom_io.write_dataset(ds, path)


def test_non_mammography_modalities_are_refused_and_a_missing_tag_warns(tmp_path):
    for modality in ("CT", "MR", "US"):
        with pytest.raises(
            UserError, match=f"modality {modality}, but the mammography scripts need mammograms"
        ):
            read_mammogram(write_mammogram(tmp_path / f"{modality}.dcm", modality))
    with pytest.warns(UserWarning, match="no Modality tag"):
        read_mammogram(write_mammogram(tmp_path / "none.dcm", None))
    assert read_mammogram(write_mammogram(tmp_path / "mg.dcm", "MG")).values.shape == (200, 160)


def test_epoch_order_depends_only_on_seed_and_epoch():
    a, b = epoch_order(10, 4, 3, 0), epoch_order(10, 4, 3, 0)
    assert a == b and len(a) == 8 and len(set(a)) == 8
    assert epoch_order(10, 4, 4, 0) != a
    ranks = [epoch_order(10, 2, 0, 0, rank, 2) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4 and not set(ranks[0]) & set(ranks[1])


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
    model = mammo_vqvae.VQVAE2(config("vqvae", "tiny").model).train()
    recon, _, _ = model(torch.rand(2, 1, 64, 48) * 2 - 1)
    recon.pow(2).mean().backward()  # reconstruction only: commitment alone would reach the encoder anyway
    first_conv = model.encoders[0].layers[0].weight
    assert (
        first_conv.grad is not None
        and torch.isfinite(first_conv.grad).all()
        and first_conv.grad.abs().sum() > 0
    )


def test_dead_code_restart_replaces_only_unused_codes():
    torch.manual_seed(0)
    q = mammo_vqvae.Quantizer(dim=2, size=4, decay=0.99).train()
    q.embed.copy_(torch.tensor([[0.0, 100.0, 200.0, 300.0], [0.0, 100.0, 200.0, 300.0]]))
    q.embed_avg.copy_(q.embed)
    q.cluster_size.fill_(1.0)
    q(
        torch.full((1, 2, 2, 4), 5.0)
    )  # everything goes to code 0: codes 1-3 are dead, the reservoir holds (5, 5)
    used_before = q.embed[:, 0].clone()
    assert q.restart_dead_codes(threshold=1.0) == 3
    assert torch.equal(q.embed[:, 0], used_before)
    assert torch.allclose(q.embed[:, 1:], torch.tensor([[5.0], [5.0]]), atol=0.01)
    q.reset_usage()
    assert q.restart_dead_codes(threshold=1.0) == 4  # a fresh epoch with no data: all codes count as dead
    assert q.stats()["used"] == 0


# --- shapes, DDIM grid, time embedding ---


def test_full_preset_levels_have_the_seed_shapes_at_1024x768():
    cfg = config("vqvae", "full")
    assert cfg.data.image_size == [1024, 768] and cfg.model.scaling_rates == [4, 2, 2, 2, 2]
    with torch.device("meta"):
        model = mammo_vqvae.VQVAE2(cfg.model).eval()
        latent = model.encode_latent(torch.empty(1, 1, 1024, 768))
        recon, diffs, ids = model.decode_latent(latent)
        unet = mammo_ldm.UNet(config("ldm", "full").model, latent_channels=128).eval()
        out = unet(latent, torch.zeros(1, dtype=torch.long), latent)
    assert latent.shape == (1, 128, 256, 192)  # the LDM's latent: hidden channels at 1/4 resolution
    assert [tuple(i.shape[1:]) for i in ids] == [(256, 192), (128, 96), (64, 48), (32, 24), (16, 12)]
    assert len(diffs) == 5 and recon.shape == (1, 1, 1024, 768)
    assert [q.embed.shape for q in model.quantizers()] == [(64, 512)] * 5
    assert unet.input.in_channels == 256 and out.shape == (1, 128, 256, 192)  # seed: 256 in, 128 out


def test_ddim_grid_is_diffusers_trailing_spacing():
    assert (
        mammo_ldm.ddim_timesteps(1000, 50)[:3] == [999, 979, 959]
        and mammo_ldm.ddim_timesteps(1000, 50)[-1] == 19
    )
    for steps in range(1, 1001):
        grid = mammo_ldm.ddim_timesteps(1000, steps)
        assert len(set(grid)) == steps and grid[0] == 999 and min(grid) >= 0, steps
        assert grid == sorted(grid, reverse=True), steps
    assert mammo_ldm.ddim_timesteps(1000, 1000)[-1] == 0
    with pytest.raises(UserError, match="sample.steps"):
        mammo_ldm.ddim_timesteps(1000, 0)


def test_time_embedding_is_sin_then_cos():
    emb = mammo_ldm.timestep_embedding(torch.tensor([0, 7]), 8)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    freqs = torch.exp(-np.log(10000.0) * torch.arange(4) / 4)
    assert torch.allclose(emb[1], torch.cat([torch.sin(7 * freqs), torch.cos(7 * freqs)]))


# --- restoration through the real sampler and decoder ---


class Oracle(torch.nn.Module):
    """Knows the clean target; outputs what a perfect UNet of the given parameterisation would."""

    def __init__(self, schedule, target, broken=False):
        super().__init__()
        self.schedule, self.target, self.broken = schedule, target, broken

    def forward(self, x, t, cond):
        a = self.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.target) / (1 - a).sqrt()
        out = self.schedule.target(self.target, t, eps)
        return out + 1.0 if self.broken else out  # broken: a constant error, as an untrained model makes


def oracle_restorer(prediction: str, residual: bool, start: float, broken=False):
    torch.manual_seed(0)
    vq_cfg = config("vqvae", "tiny")
    vqvae = mammo_vqvae.VQVAE2(vq_cfg.model).eval().requires_grad_(False)
    cfg = config("ldm", "tiny", [f"diffusion.prediction={prediction}", f"diffusion.residual={residual}"])
    cfg.sample.start, cfg.sample.steps = start, 10
    stats = {"latent_mean": 0.1, "latent_std": 0.5, "residual_std": 0.3}
    schedule = mammo_ldm.Schedule(cfg.diffusion, torch.device("cpu"))
    restorer = mammo_ldm.Restorer(vqvae, None, schedule, stats, cfg, torch.device("cpu"))
    stored = synthetic.mammogram((128, 96), np.random.default_rng(0), bits_stored=14)
    clean = (stored / (2**14 - 1)).astype(np.float32)
    low = degrade(clean, cfg.data, np.random.default_rng(1))
    z_clean, z_low = restorer.encode(clean), restorer.encode(low)
    target = (z_clean - z_low) / stats["residual_std"] if residual else z_clean
    restorer.unet = Oracle(schedule, target, broken)
    return restorer, low, z_clean


@pytest.mark.parametrize(
    "prediction,residual,start",
    [("eps", False, 1.0), ("x0", False, 0.3), ("v", True, 0.5), ("eps", True, 1.0)],
)
def test_oracle_predictor_through_sampler_and_decoder_returns_the_clean_reconstruction(
    prediction, residual, start
):
    restorer, low, z_clean = oracle_restorer(prediction, residual, start)
    assert torch.allclose(restorer.restore_latent(low), z_clean, atol=1e-3)  # sampler + (un)standardisation
    restored, ceiling = restorer(low), restorer.decode(z_clean)  # the real decoder, quantisation included
    assert np.abs(restored - ceiling).max() < 1e-3


def test_a_broken_predictor_fails_the_same_check():
    restorer, low, z_clean = oracle_restorer("x0", False, 0.3, broken=True)
    assert not torch.allclose(restorer.restore_latent(low), z_clean, atol=1e-3)


def test_data_consistency_pulls_a_biased_restoration_back_towards_the_input():
    rng = np.random.default_rng(0)
    clean = np.full((64, 64), 0.5, np.float32)
    low = (clean + rng.normal(0, 0.03, clean.shape)).astype(np.float32)
    mask = np.ones_like(clean, bool)
    biased = clean + 0.05  # a first stage that shifts intensities
    out = mammo_ldm.data_consistency(biased, low, mask, sigma=4.0)
    assert np.abs(out - clean).mean() < 0.2 * np.abs(biased - clean).mean()
    assert (out - clean).std() < 0.3 * (low - clean).std()  # the input's noise is averaged out


class Pointwise(torch.nn.Module):
    """A UNet stand-in without spatial context: tiling must not change its output at all."""

    def __init__(self, channels: int):
        super().__init__()
        torch.manual_seed(0)
        self.mix = torch.nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x, t, cond):
        return self.mix(torch.cat([x, cond], 1)) * (1 + t.view(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("shape,tile", [((36, 28), 16), ((32, 24), 32), ((20, 44), 8)])
def test_tiled_unet_blends_back_exactly_what_a_context_free_model_outputs(shape, tile):
    model = Pointwise(4)
    x, cond = torch.randn(2, 4, *shape), torch.randn(2, 4, *shape)
    t = torch.tensor([10, 700])
    tiled = mammo_ldm.unet_on_tiles(model, tile)
    assert torch.allclose(tiled(x, t, cond), model(x, t, cond), atol=1e-5)
    starts = mammo_ldm.tile_starts(shape[0], tile)
    covered = np.zeros(shape[0], bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all() and starts[-1] + min(tile, shape[0]) == shape[0]


def test_tiles_keep_a_crop_trained_unet_away_from_whole_canvas_statistics():
    """A model that normalises by its input's own mean (as GroupNorm does) sees tile statistics, not the
    canvas's: on a latent half background, half tissue the tiled output differs from the whole-latent one."""

    def self_normalising(x, t, cond):
        return x - x.mean(dim=(-2, -1), keepdim=True)

    x = torch.zeros(1, 1, 32, 64)
    x[..., 32:] = 1.0  # right half "tissue"
    whole = self_normalising(x, None, x)
    tiled = mammo_ldm.unet_on_tiles(self_normalising, 16)(x, torch.zeros(1, dtype=torch.long), x)
    assert whole[..., 40:].mean() == pytest.approx(0.5)  # the canvas mean shifts the tissue
    assert tiled[..., 40:].abs().max() < 1e-6  # tiles inside the tissue see only tissue


def test_vqvae_lr_schedule_is_a_function_of_the_step():
    train_cfg = config("vqvae", "small").train
    assert train_cfg.lr_schedule == "cosine"
    assert mammo_vqvae.learning_rate(train_cfg, 0, 100) == pytest.approx(train_cfg.lr)
    assert mammo_vqvae.learning_rate(train_cfg, 50, 100) == pytest.approx(train_cfg.lr / 2)
    assert mammo_vqvae.learning_rate(train_cfg, 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert mammo_vqvae.learning_rate(config("vqvae", "full").train, 70, 100) == 1e-4  # the seed's constant
    train_cfg.lr_schedule = "linear"
    with pytest.raises(UserError, match="lr_schedule"):
        mammo_vqvae.learning_rate(train_cfg, 0, 100)


def test_frozen_batch_norm_keeps_its_statistics_while_codebooks_still_learn():
    torch.manual_seed(0)
    model = mammo_vqvae.VQVAE2(config("vqvae", "tiny").model).train()
    x = torch.rand(2, 1, 128, 96) * 2 - 1
    model(x)  # one batch in plain training mode: statistics move
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    stats = [m.running_mean.clone() for m in bns]
    codes = model.quantizers()[0].embed.clone()
    mammo_vqvae.freeze_batch_norm(model)
    model(x * 0.5 + 0.3)
    assert all(torch.equal(s, m.running_mean) for s, m in zip(stats, bns))
    assert not torch.equal(codes, model.quantizers()[0].embed)  # EMA codebook updates go on
    assert config("vqvae", "small").train.freeze_batch_norm_at == 0.75
    assert config("vqvae", "full").train.freeze_batch_norm_at == 0.0  # the seed trains plain BatchNorm
