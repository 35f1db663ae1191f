"""Losses: L1 and the contrastive loss of RLFN's stage 3.

Contrastive loss (Kong et al., 2022): features come from a *randomly initialised, frozen*
two-layer network, Conv3x3 -> Tanh -> Conv3x3 (seeded; the seed is recorded). With
anchor = SR output, positive = HR and negative = the bicubic-upsampled LR,

    loss = d(phi(anchor), phi(positive)) / d(phi(anchor), phi(negative)),   d = mean L1,

pulling the SR towards the HR and pushing it away from the blurry bicubic image. Images are
fed to the extractor divided by 255 (the network's inputs are 0-255).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..bicubic import imresize

__all__ = ["FrozenFeatures", "ContrastiveLoss", "bicubic_upsample"]


class FrozenFeatures(nn.Module):
    """Conv3x3 -> Tanh -> Conv3x3 with seeded random weights; never trained."""

    def __init__(self, channels: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        self.seed = int(seed)
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):  # PyTorch's default init, from our generator
                bound = 1.0 / (conv.in_channels * 9) ** 0.5
                conv.weight.uniform_(-bound, bound, generator=g)
                conv.bias.uniform_(-bound, bound, generator=g)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # stays frozen in eval mode
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(x / 255.0)))


def bicubic_upsample(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """The negative sample: MATLAB bicubic upscaling of a float LR batch (no gradient)."""
    with torch.no_grad():
        return imresize(lr.float(), scale=float(scale))


class ContrastiveLoss(nn.Module):
    def __init__(self, channels: int = 16, seed: int = 0, eps: float = 1e-7):
        super().__init__()
        self.features = FrozenFeatures(channels, seed)
        self.eps = eps

    def forward(self, sr: torch.Tensor, hr: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        f_sr = self.features(sr)
        with torch.no_grad():
            f_hr = self.features(hr)
            f_neg = self.features(negative)
        d_pos = F.l1_loss(f_sr, f_hr)
        d_neg = F.l1_loss(f_sr, f_neg)
        return d_pos / (d_neg + self.eps)
