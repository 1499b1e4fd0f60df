"""Differentiable training losses (torch): SSIM, gradient, VGG perceptual and least-squares GAN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.metrics import SSIM_K1, SSIM_K2, SSIM_RADIUS, SSIM_SIGMA


def _gaussian_blur_valid(x: torch.Tensor) -> torch.Tensor:
    """Separable 11-tap Gaussian per channel, no padding: the 'valid' region is exactly the interior that
    metrics.ssim averages over, so ssim_loss and the reported SSIM agree."""
    offsets = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=x.dtype, device=x.device)
    taps = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    taps = taps / taps.sum()
    spatial, channels = x.ndim - 2, x.shape[1]
    conv = F.conv2d if spatial == 2 else F.conv3d
    for axis in range(spatial):
        shape = [channels, 1] + [1] * spatial
        shape[2 + axis] = taps.numel()
        x = conv(x, taps.reshape(shape), groups=channels)
    return x


def ssim_loss(pred: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """1 - mean SSIM for (B, C, H, W) or (B, C, D, H, W) tensors (Gaussian window as in metrics.ssim)."""
    if pred.shape != ref.shape or pred.ndim not in (4, 5):
        raise ValueError(
            f"ssim_loss expects equal (B,C,H,W) or (B,C,D,H,W) shapes, got {pred.shape}, {ref.shape}"
        )
    if min(pred.shape[2:]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(
            f"ssim_loss needs at least {2 * SSIM_RADIUS + 1} pixels along every axis, got {pred.shape}"
        )
    # variances are differences of near-equal blurred moments: bf16/fp16 (AMP) would cancel them to noise
    with torch.autocast(pred.device.type, enabled=False):
        if pred.dtype in (torch.float16, torch.bfloat16):
            pred, ref = pred.float(), ref.float()
        ux, uy = _gaussian_blur_valid(pred), _gaussian_blur_valid(ref)
        vx = _gaussian_blur_valid(pred * pred) - ux * ux
        vy = _gaussian_blur_valid(ref * ref) - uy * uy
        vxy = _gaussian_blur_valid(pred * ref) - ux * uy
        c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
        return 1.0 - s.mean()


def gradient_loss(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Sum over spatial axes of the L1 distance between forward differences (edges), (B, C, ...) tensors."""
    if pred.shape != ref.shape or pred.ndim not in (4, 5):
        raise ValueError(f"gradient_loss expects equal 4-D/5-D shapes, got {pred.shape}, {ref.shape}")
    return sum((torch.diff(pred, dim=d) - torch.diff(ref, dim=d)).abs().mean() for d in range(2, pred.ndim))


class PerceptualLoss(nn.Module):
    """L1 between frozen VGG16 features (relu1_2, relu2_2, relu3_3, relu4_3 by default) of grayscale images in
    [0, 1]. Needs a real pretrained `features` module (perceptual.load_vgg16_features()); when that is None
    the caller drops the term and says so, because random features would be a meaningless loss."""

    def __init__(self, vgg: nn.Module, layers: tuple[int, ...] = (3, 8, 15, 22)):
        super().__init__()
        if not isinstance(vgg, nn.Sequential):
            raise TypeError(
                f"PerceptualLoss needs the pretrained VGG16 `features` (nn.Sequential), got {type(vgg)}"
            )
        self.vgg = vgg[: max(layers) + 1].eval()
        for p in self.vgg.parameters():
            p.requires_grad_(False)
        self.layers = set(layers)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def features(self, x01: torch.Tensor) -> list[torch.Tensor]:
        if x01.ndim == 5:  # volumes: slices along depth become batch items
            x01 = x01.transpose(1, 2).reshape(-1, x01.shape[1], *x01.shape[3:])
        x = (x01.expand(-1, 3, -1, -1) - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.vgg):
            x = layer(x)
            if i in self.layers:
                out.append(x)
        return out

    def forward(self, pred01: torch.Tensor, ref01: torch.Tensor) -> torch.Tensor:
        if pred01.shape != ref01.shape or pred01.shape[1] != 1:
            raise ValueError(
                f"PerceptualLoss expects equal (B, 1, ...) shapes, got {pred01.shape}, {ref01.shape}"
            )
        with torch.no_grad():
            ref_feats = self.features(ref01)
        return sum(F.l1_loss(p, r) for p, r in zip(self.features(pred01), ref_feats)) / len(ref_feats)

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.vgg.eval()  # stays frozen even when the caller's model.train() recurses into it
        return self
