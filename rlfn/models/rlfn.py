"""RLFN: Residual Local Feature Network (Kong et al., NTIRE 2022 Efficient SR runtime winner).

Module and parameter names follow the official release (bytedance/RLFN) so that its
``state_dict``s load unchanged: ``conv_1``, ``block_{1..N}.{c1_r,c2_r,c3_r,c5,esa.*}``,
``conv_2``, ``upsampler.0``. Pixel range is 0-255 in and out, as in the official code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ESA", "ESAGrid", "RLFB", "RLFN", "RLFNConfig"]

# ESA's low-resolution branch advances 6 input pixels per cell (3x3 stride-2 conv, then
# 7x7 max-pool with stride 3): tiles that start on multiples of it see the same cells.
ESA_STRIDE = 6


@dataclass(frozen=True)
class ESAGrid:
    """Where a tile lies in the whole image, so ESA can sample its low-resolution mask on the
    whole image's grid instead of the tile's (see ``ESA.forward``).

    ``origin`` (y, x) must be multiples of ``ESA_STRIDE``; ``full_size`` is the whole image's
    (H, W) in the same (LR) pixels.
    """

    origin: tuple[int, int]
    full_size: tuple[int, int]


def _pooled_length(n: int) -> int:
    return ((n - 3) // 2 + 1 - 7) // 3 + 1


def _grid_axis(full: int, origin: int, length: int, pooled: int, device) -> tuple:
    """Bilinear (align_corners=False) taps of the whole image's grid, as tile-local indices."""
    full_pooled = _pooled_length(full)
    y = torch.arange(origin, origin + length, device=device, dtype=torch.float32)
    src = ((y + 0.5) * (full_pooled / full) - 0.5).clamp_(min=0)
    i0 = src.floor()
    lam = src - i0
    i0 = i0.long()
    i1 = (i0 + 1).clamp_(max=full_pooled - 1)
    shift = origin // ESA_STRIDE
    return ((i0 - shift).clamp_(0, pooled - 1), (i1 - shift).clamp_(0, pooled - 1), lam)


def _conv(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int | None = None):
    if padding is None:
        padding = (kernel_size - 1) // 2
    return nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=True)


class ESA(nn.Module):
    """Enhanced Spatial Attention: a cheap, wide-field mask multiplied onto the features."""

    def __init__(self, esa_channels: int, n_feats: int):
        super().__init__()
        f = esa_channels
        self.conv1 = _conv(n_feats, f, 1)
        self.conv_f = _conv(f, f, 1)
        self.conv2 = _conv(f, f, 3, stride=2, padding=0)
        self.conv3 = _conv(f, f, 3, padding=1)
        self.conv4 = _conv(f, n_feats, 1)

    def forward(self, x: torch.Tensor, grid: ESAGrid | Sequence[ESAGrid] | None = None
                ) -> torch.Tensor:
        c1_ = self.conv1(x)
        c1 = self.conv2(c1_)
        v_max = F.max_pool2d(c1, kernel_size=7, stride=3)
        c3 = self.conv3(v_max)
        if grid is None:
            c3 = F.interpolate(c3, (x.size(2), x.size(3)), mode="bilinear", align_corners=False)
        elif isinstance(grid, ESAGrid):
            c3 = self._upsample_on_grid(c3, x.shape[2:], grid)
        else:  # one grid per sample: a batch of same-size tiles from different places
            if len(grid) != c3.size(0):
                raise ValueError(f"{len(grid)} ESA grids for a batch of {c3.size(0)}")
            c3 = torch.cat([self._upsample_on_grid(c3[i:i + 1], x.shape[2:], g)
                            for i, g in enumerate(grid)])
        cf = self.conv_f(c1_)
        c4 = self.conv4(c3 + cf)
        return x * torch.sigmoid(c4)

    @staticmethod
    def _upsample_on_grid(c3: torch.Tensor, size, grid: ESAGrid) -> torch.Tensor:
        # The official ESA stretches its coarse map over the input it is given, so a tile's
        # mask depends on the tile's size. Sampling at the whole image's coordinates instead
        # makes a tile's mask equal the whole image's, away from the tile's edges.
        (h0, h1, lh), (w0, w1, lw) = (
            _grid_axis(grid.full_size[d], grid.origin[d], size[d], c3.shape[2 + d], c3.device)
            for d in range(2))
        lh = lh.to(c3.dtype).view(-1, 1)
        lw = lw.to(c3.dtype)
        rows = c3[:, :, h0] * (1 - lh) + c3[:, :, h1] * lh
        return rows[..., w0] * (1 - lw) + rows[..., w1] * lw


class RLFB(nn.Module):
    """Residual Local Feature Block: 3x (3x3 conv + LeakyReLU(0.05)), residual add, 1x1, ESA."""

    def __init__(self, in_channels: int, mid_channels: int | None = None, esa_channels: int = 16):
        super().__init__()
        mid = mid_channels or in_channels
        self.c1_r = _conv(in_channels, mid, 3)
        self.c2_r = _conv(mid, mid, 3)
        self.c3_r = _conv(mid, in_channels, 3)
        self.c5 = _conv(in_channels, in_channels, 1)
        self.esa = ESA(esa_channels, in_channels)

    def forward(self, x: torch.Tensor, grid: ESAGrid | Sequence[ESAGrid] | None = None
                ) -> torch.Tensor:
        out = F.leaky_relu(self.c1_r(x), 0.05)
        out = F.leaky_relu(self.c2_r(out), 0.05)
        out = F.leaky_relu(self.c3_r(out), 0.05)
        return self.esa(self.c5(out + x), grid)


@dataclass(frozen=True)
class RLFNConfig:
    """Everything needed to rebuild an RLFN; stored in our safetensors metadata."""

    scale: int = 4
    feature_channels: int = 52
    mid_channels: int = 52
    esa_channels: int = 16
    num_blocks: int = 6
    in_channels: int = 3
    out_channels: int = 3

    def to_dict(self) -> dict:
        return asdict(self)


class RLFN(nn.Module):
    """conv_1 -> N x RLFB -> conv_2 (+ long skip) -> 3x3 conv to out*scale^2 -> PixelShuffle."""

    # The smallest LR height/width the ESA tail can take (3x3 stride-2 conv, then 7x7 pooling).
    min_input_size = 15

    def __init__(self, config: RLFNConfig | None = None, **kwargs):
        super().__init__()
        self.config = config if config is not None else RLFNConfig(**kwargs)
        c = self.config
        if c.scale not in (1, 2, 3, 4, 8):
            raise ValueError(f"unsupported scale {c.scale}; RLFN is built for x2, x3 and x4")
        self.scale = c.scale
        self.conv_1 = _conv(c.in_channels, c.feature_channels, 3)
        for i in range(1, c.num_blocks + 1):
            self.add_module(f"block_{i}", RLFB(c.feature_channels, c.mid_channels, c.esa_channels))
        self.conv_2 = _conv(c.feature_channels, c.feature_channels, 3)
        self.upsampler = nn.Sequential(
            _conv(c.feature_channels, c.out_channels * c.scale**2, 3), nn.PixelShuffle(c.scale)
        )

    @property
    def blocks(self) -> list[nn.Module]:
        return [getattr(self, f"block_{i}") for i in range(1, self.config.num_blocks + 1)]

    def forward(self, x: torch.Tensor, grid: ESAGrid | Sequence[ESAGrid] | None = None
                ) -> torch.Tensor:
        """``x``: (N, 3, H, W) in [0, 255]; returns (N, 3, H*scale, W*scale) in ~[0, 255].

        ``grid``: set when ``x`` is a tile of a larger image (see ``ESAGrid``); a sequence of
        N grids when ``x`` is a batch of same-size tiles from different places (or images).
        """
        feat = self.conv_1(x)
        out = feat
        for block in self.blocks:
            out = block(out, grid)
        return self.upsampler(self.conv_2(out) + feat)
