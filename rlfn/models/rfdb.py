"""RFDN and the RLFN paper's body-block ablation: RFDB, and RFDB without feature distillation.

RFDN (Liu et al., "Residual Feature Distillation Network for Lightweight Image
Super-Resolution", AIM 2020 efficient-SR winner; reference code: njulj/RFDN ``block.py`` and
``RFDN.py``)::

    conv_1 (3x3) -> block_1 .. block_N -> concat of every block's output -> conv_fuse (1x1)
    + LeakyReLU(0.05) -> conv_2 (3x3) + long skip from conv_1 -> upsampler (3x3 conv to
    out * scale^2 channels, PixelShuffle)

RFDB (``distillation=True``), with C feature channels and dc = C // 2:
three steps, each a 1x1 "distilled" conv to dc channels (+ LeakyReLU) beside a shallow
residual block (3x3 conv + identity, then LeakyReLU); a 3x3 conv to dc channels (+ LeakyReLU)
on the last step's output; the four dc-channel maps concatenated -> 1x1 ``c5`` back to C ->
RFDN's ESA.

RFDB-R (``distillation=False``), the RLFN paper's ablation: the feature-distillation
connections removed, leaving three 3x3 conv + LeakyReLU in series with the block's local
residual kept (add of the block input), then ``c5`` (1x1) and RFDN's ESA, still inside RFDN's
network (concat of all block outputs + 1x1 fusion). RLFB (``rlfn.py``) goes one step further:
no fusion across blocks, and a simpler ESA (no ``conv_max``/``conv3b`` in the pooled branch).

Module names follow ``rlfn.py`` (``conv_1``, ``block_{i}``, ``conv_2``, ``upsampler.0``) plus
``conv_fuse``; they are not the reference code's names (``fea_conv``, ``B1``.., ``c``,
``LR_conv``), so the reference's released weights (trained on [0, 1] pixels) do not load by
mistake. Pixel range is 0-255 in and out, as for RLFN.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .rlfn import _conv

__all__ = ["RFDNESA", "RFDB", "RFDBR", "RFDN", "RFDNConfig"]

_SLOPE = 0.05  # LeakyReLU negative slope, RFDN's and RLFN's


class RFDNESA(nn.Module):
    """RFDN's Enhanced Spatial Attention: RLFN's ESA plus two more 3x3 convs (``conv_max``
    and ``conv3b``, with ReLUs) on the max-pooled branch."""

    def __init__(self, esa_channels: int, n_feats: int):
        super().__init__()
        f = esa_channels
        self.conv1 = _conv(n_feats, f, 1)
        self.conv_f = _conv(f, f, 1)
        self.conv2 = _conv(f, f, 3, stride=2, padding=0)
        self.conv_max = _conv(f, f, 3)
        self.conv3 = _conv(f, f, 3)
        self.conv3b = _conv(f, f, 3)
        self.conv4 = _conv(f, n_feats, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1_ = self.conv1(x)
        c1 = self.conv2(c1_)
        v_max = F.max_pool2d(c1, kernel_size=7, stride=3)
        v_range = F.relu(self.conv_max(v_max))
        c3 = F.relu(self.conv3(v_range))
        c3 = self.conv3b(c3)
        c3 = F.interpolate(c3, (x.size(2), x.size(3)), mode="bilinear", align_corners=False)
        c4 = self.conv4(c3 + self.conv_f(c1_))
        return x * torch.sigmoid(c4)


class RFDB(nn.Module):
    """Residual Feature Distillation Block (see the module docstring)."""

    def __init__(self, channels: int, esa_channels: int):
        super().__init__()
        dc = channels // 2
        self.c1_d = _conv(channels, dc, 1)
        self.c1_r = _conv(channels, channels, 3)
        self.c2_d = _conv(channels, dc, 1)
        self.c2_r = _conv(channels, channels, 3)
        self.c3_d = _conv(channels, dc, 1)
        self.c3_r = _conv(channels, channels, 3)
        self.c4 = _conv(channels, dc, 3)
        self.c5 = _conv(4 * dc, channels, 1)
        self.esa = RFDNESA(esa_channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distilled = []
        r = x
        for conv_d, conv_r in ((self.c1_d, self.c1_r), (self.c2_d, self.c2_r),
                               (self.c3_d, self.c3_r)):
            distilled.append(F.leaky_relu(conv_d(r), _SLOPE))
            r = F.leaky_relu(conv_r(r) + r, _SLOPE)  # shallow residual block
        distilled.append(F.leaky_relu(self.c4(r), _SLOPE))
        return self.esa(self.c5(torch.cat(distilled, dim=1)))


class RFDBR(nn.Module):
    """RFDB without feature distillation: 3x (3x3 conv + LeakyReLU), + block input, 1x1, ESA."""

    def __init__(self, channels: int, esa_channels: int):
        super().__init__()
        self.c1_r = _conv(channels, channels, 3)
        self.c2_r = _conv(channels, channels, 3)
        self.c3_r = _conv(channels, channels, 3)
        self.c5 = _conv(channels, channels, 1)
        self.esa = RFDNESA(esa_channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.c1_r(x), _SLOPE)
        out = F.leaky_relu(self.c2_r(out), _SLOPE)
        out = F.leaky_relu(self.c3_r(out), _SLOPE)
        return self.esa(self.c5(out + x))


@dataclass(frozen=True)
class RFDNConfig:
    """Everything needed to rebuild an RFDN-style network; stored in our safetensors metadata.

    ``esa_channels`` 0 means RFDN's choice, ``feature_channels // 4``.
    """

    scale: int = 4
    feature_channels: int = 50
    num_blocks: int = 4
    distillation: bool = True  # RFDB blocks; False: RFDB-R blocks
    esa_channels: int = 0
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self):
        if not self.esa_channels:
            object.__setattr__(self, "esa_channels", self.feature_channels // 4)

    def to_dict(self) -> dict:
        return asdict(self)


class RFDN(nn.Module):
    """conv_1 -> N blocks -> 1x1 fusion of all block outputs -> conv_2 (+ long skip) -> 3x3
    conv to out*scale^2 -> PixelShuffle. ``x`` in [0, 255], output in ~[0, 255]."""

    # ESA's pooled branch, as in RLFN: a 3x3 stride-2 conv, then a 7x7 max-pool.
    min_input_size = 15

    def __init__(self, config: RFDNConfig | None = None, **kwargs):
        super().__init__()
        self.config = config if config is not None else RFDNConfig(**kwargs)
        c = self.config
        if c.scale not in (1, 2, 3, 4, 8):
            raise ValueError(f"unsupported scale {c.scale}; RFDN is built for x2, x3 and x4")
        if c.num_blocks < 1 or c.feature_channels < 4:
            raise ValueError(f"RFDN needs >= 1 block and >= 4 channels, got {c}")
        self.scale = c.scale
        block = RFDB if c.distillation else RFDBR
        self.conv_1 = _conv(c.in_channels, c.feature_channels, 3)
        for i in range(1, c.num_blocks + 1):
            self.add_module(f"block_{i}", block(c.feature_channels, c.esa_channels))
        self.conv_fuse = _conv(c.feature_channels * c.num_blocks, c.feature_channels, 1)
        self.conv_2 = _conv(c.feature_channels, c.feature_channels, 3)
        self.upsampler = nn.Sequential(
            _conv(c.feature_channels, c.out_channels * c.scale**2, 3), nn.PixelShuffle(c.scale)
        )

    @property
    def blocks(self) -> list[nn.Module]:
        return [getattr(self, f"block_{i}") for i in range(1, self.config.num_blocks + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_1(x)
        outs = []
        out = feat
        for block in self.blocks:
            out = block(out)
            outs.append(out)
        fused = F.leaky_relu(self.conv_fuse(torch.cat(outs, dim=1)), _SLOPE)
        return self.upsampler(self.conv_2(fused) + feat)
