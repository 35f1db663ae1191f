"""EDSR (Lim et al., "Enhanced Deep Residual Networks for Single Image Super-Resolution",
CVPRW 2017), the baseline size: 16 residual blocks, 64 channels, no batch norm, residual
scaling 1.0. Reference code: sanghyun-son/EDSR-PyTorch ``src/model/edsr.py``/``common.py``::

    sub_mean -> head (3x3) -> body: N x [3x3, ReLU, 3x3, * res_scale, + input], 3x3
    (+ long skip from head) -> tail: upsampler (x2, x3: one 3x3 conv to C*s^2 + PixelShuffle;
    x4, x8: x2 steps) then a 3x3 conv to RGB -> add_mean

Pixel range 0-255 in and out (the reference's ``rgb_range`` 255): the mean shift subtracts
255 x DIV2K's RGB mean. Module and tensor names are the reference's (``sub_mean``, ``head.0``,
``body.{i}.body.{0,2}``, ``body.N``, ``tail.0.{0,2,..}``, ``tail.1``, ``add_mean``), so its
released baseline ``state_dict``s load unchanged. The mean shifts are fixed buffers here (the
reference makes them frozen parameters), so they are not counted among the parameters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .rlfn import _conv

__all__ = ["DIV2K_RGB_MEAN", "EDSR", "EDSRConfig", "MeanShift", "ResBlock"]

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)  # of the DIV2K training set, in [0, 1]


class MeanShift(nn.Module):
    """Adds ``sign * 255 * mean`` per channel, as a fixed 1x1 conv (the reference's layout)."""

    def __init__(self, sign: int, mean=DIV2K_RGB_MEAN, rgb_range: float = 255.0):
        super().__init__()
        self.register_buffer("weight", torch.eye(3).view(3, 3, 1, 1))
        self.register_buffer("bias", sign * rgb_range * torch.tensor(mean, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class ResBlock(nn.Module):
    """3x3 conv, ReLU, 3x3 conv, scaled by ``res_scale``, plus the input (no batch norm)."""

    def __init__(self, channels: int, res_scale: float = 1.0):
        super().__init__()
        self.body = nn.Sequential(_conv(channels, channels, 3), nn.ReLU(inplace=True),
                                  _conv(channels, channels, 3))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.body(x)
        if self.res_scale != 1:
            res = res * self.res_scale
        return res + x


def _upsampler(channels: int, scale: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    if scale == 3:
        layers += [_conv(channels, 9 * channels, 3), nn.PixelShuffle(3)]
    else:  # a power of two: x2 steps
        for _ in range(int(math.log2(scale))):
            layers += [_conv(channels, 4 * channels, 3), nn.PixelShuffle(2)]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class EDSRConfig:
    """Everything needed to rebuild an EDSR; stored in our safetensors metadata.

    ``res_scale`` cannot be read from tensor shapes: a file without our metadata is taken to
    have the baseline's 1.0.
    """

    scale: int = 4
    feature_channels: int = 64
    num_blocks: int = 16
    res_scale: float = 1.0
    in_channels: int = 3
    out_channels: int = 3

    def to_dict(self) -> dict:
        return asdict(self)


class EDSR(nn.Module):
    """``x``: (N, 3, H, W) in [0, 255]; returns (N, 3, H*scale, W*scale) in ~[0, 255]."""

    min_input_size = 1

    def __init__(self, config: EDSRConfig | None = None, **kwargs):
        super().__init__()
        self.config = config if config is not None else EDSRConfig(**kwargs)
        c = self.config
        if c.scale not in (2, 3, 4, 8):
            raise ValueError(f"unsupported scale {c.scale}; EDSR is built for x2, x3 and x4")
        if c.in_channels != 3 or c.out_channels != 3:
            raise ValueError("EDSR's mean shift is for RGB: in/out channels must be 3")
        self.scale = c.scale
        f = c.feature_channels
        self.sub_mean = MeanShift(-1)
        self.add_mean = MeanShift(+1)
        self.head = nn.Sequential(_conv(c.in_channels, f, 3))
        self.body = nn.Sequential(*[ResBlock(f, c.res_scale) for _ in range(c.num_blocks)],
                                  _conv(f, f, 3))
        self.tail = nn.Sequential(_upsampler(f, c.scale), _conv(f, c.out_channels, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(x))
        x = self.body(x) + x
        return self.add_mean(self.tail(x))
