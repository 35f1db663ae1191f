"""The PyTorch backends on CPU or GPU (see ``rlfn.backends``): ``eager`` (``rlfn.engine``),
``channels_last``, ``compile``, ``bf16``, ``compile_bf16``.

bf16 keeps RLFN's first conv, the long skip and the upsampler in fp32: the output has values
up to 255, where bf16's 8-bit mantissa steps by 1.0, so a bf16 tail alone costs ~0.01 dB;
with it in fp32 the loss is ~0.001 dB (the body, ~93% of the MACs, still runs in bf16). It
needs native bf16 (a GPU with bf16, a CPU with AVX512-BF16/AMX): emulated bf16 would be slower
than fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from ..device import bf16_native
from ..engine import BackendError, BackendInfo, Engine
from . import register

__all__ = ["ChannelsLastEngine", "CompileEngine", "Bf16Engine", "CompileBf16Engine",
           "MixedBf16", "require_native_bf16"]

register(Engine)  # eager: the baseline, defined (and described) in rlfn.engine


def require_native_bf16(name: str, device: torch.device) -> None:
    """A ``BackendError`` unless ``device`` computes bf16 natively."""
    if not bf16_native(device):
        raise BackendError(f"backend {name!r}: " + (
            "this GPU does not support bf16" if device.type == "cuda" else
            "this CPU has no native bf16 (AVX512-BF16/AMX); emulated bf16 would be slower "
            "than fp32"))


@register
class ChannelsLastEngine(Engine):
    info = BackendInfo("channels_last", ("cpu", "cuda"), (), True,
                       "PyTorch eager, NHWC memory format")
    cudnn_benchmark = True

    def __init__(self, model, device):
        super().__init__(model.to(memory_format=torch.channels_last), device)

    def _run(self, x, grid):
        x = x.contiguous(memory_format=torch.channels_last)
        return super()._run(x, grid).contiguous()


class MixedBf16(nn.Module):
    """bf16 autocast for the body; for RLFN the first conv, the long skip and the upsampler
    stay fp32 (see the module docstring). Other architectures: bf16 throughout."""

    def __init__(self, model: nn.Module, device_type: str):
        super().__init__()
        self.net = model
        self.device_type = device_type

    def forward(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        from ..models.rlfn import RLFN

        m = self.net
        kw = {} if grid is None else {"grid": grid}
        if not isinstance(m, RLFN):
            with torch.autocast(self.device_type, dtype=torch.bfloat16):
                return m(x, **kw).float()
        feat = m.conv_1(x)
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = feat
            for block in m.blocks:
                out = block(out, grid)
            out = m.conv_2(out)
        return m.upsampler(out.float() + feat)


@register
class Bf16Engine(ChannelsLastEngine):
    info = BackendInfo("bf16", ("cpu", "cuda"), (), False,
                       "bf16 body, fp32 head/skip/upsampler, channels_last")

    @classmethod
    def check_hardware(cls, device):
        require_native_bf16(cls.name, device)

    def __init__(self, model, device):
        super().__init__(model, device)
        self.mixed = MixedBf16(self.model, device.type)

    def _run(self, x, grid):
        x = x.contiguous(memory_format=torch.channels_last)
        return self.mixed(x, grid).contiguous()


@register
class CompileEngine(Engine):
    """``torch.compile`` with dynamic height/width (one compilation serves every image size).
    On CPU Inductor freezes the weights (constant-folds and pre-packs them for oneDNN)."""

    info = BackendInfo("compile", ("cpu", "cuda"), (), True, "torch.compile (Inductor), fp32")
    supports_grid = False  # an ESAGrid per tile would recompile per tile
    per_sample_exact = False  # patching a compiled module's convs would recompile it
    cudnn_benchmark = True

    def __init__(self, model, device):
        model = model.to(memory_format=torch.channels_last)
        super().__init__(model, device)
        options = {"freezing": True} if device.type == "cpu" else {}
        self.compiled = torch.compile(model, dynamic=True, options=options)

    def _run(self, x, grid):
        x = x.contiguous(memory_format=torch.channels_last)
        return self.compiled(x).contiguous()


@register
class CompileBf16Engine(Engine):
    """``torch.compile`` (CPU: with weight freezing) of the ``bf16`` engine's mixed model:
    Inductor fuses the pointwise work (LeakyReLU, adds, sigmoid gate) into the bf16 convs."""

    info = BackendInfo("compile_bf16", ("cpu", "cuda"), (), False,
                       "torch.compile of the bf16 model")
    supports_grid = False
    per_sample_exact = False
    cudnn_benchmark = True

    @classmethod
    def check_hardware(cls, device):
        require_native_bf16(cls.name, device)

    def __init__(self, model, device):
        model = model.to(memory_format=torch.channels_last)
        super().__init__(model, device)
        options = {"freezing": True} if device.type == "cpu" else {}
        self.compiled = torch.compile(MixedBf16(model, device.type), dynamic=True,
                                      options=options)

    def _run(self, x, grid):
        return self.compiled(x.contiguous(memory_format=torch.channels_last)).contiguous()
