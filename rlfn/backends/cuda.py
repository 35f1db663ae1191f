"""The CUDA-only backends (see ``rlfn.backends``): ``fp16``, ``cuda_graphs``,
``compile_graphs``, ``compile_fp16``, all fp16 with channels_last (NHWC) activations."""

from __future__ import annotations

import torch
from torch import nn

from ..engine import BackendInfo, Engine
from . import register

__all__ = ["Fp16Engine", "CudaGraphsEngine", "CompileGraphsEngine", "CompileFp16Engine"]


@register
class Fp16Engine(Engine):
    info = BackendInfo("fp16", ("cuda",), (), False,
                       "fp16 weights and activations + channels_last")
    cudnn_benchmark = True

    def __init__(self, model, device):
        super().__init__(model.half().to(memory_format=torch.channels_last), device)

    def _run(self, x, grid):
        x = x.half().contiguous(memory_format=torch.channels_last)
        return super()._run(x, grid).float().contiguous()


@register
class CudaGraphsEngine(Fp16Engine):
    """fp16 forward captured once per input shape as a CUDA graph, then replayed: no Python or
    kernel-launch overhead per layer. Input and output live in static buffers."""

    info = BackendInfo("cuda_graphs", ("cuda",), (), False,
                       "fp16 + CUDA graph per input shape")
    supports_grid = False
    per_sample_exact = False

    def __init__(self, model, device):
        super().__init__(model, device)
        self._graphs: dict[tuple, tuple] = {}

    def _run(self, x, grid):
        key = tuple(x.shape)
        if key not in self._graphs:
            static_in = x.half().contiguous(memory_format=torch.channels_last).clone()
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up cuDNN's algorithm choice outside the graph
                    self.model(static_in)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.model(static_in)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.float().contiguous()


class _Fp16Io(nn.Module):
    """fp32 NCHW in, fp16 NHWC inside, fp16 out: the casts and the layout change sit inside
    the compiled graph, where Inductor fuses them into the first and last kernels."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.net = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.half().contiguous(memory_format=torch.channels_last))


@register
class CompileGraphsEngine(Engine):
    """``torch.compile(mode="reduce-overhead")`` of the fp16 channels_last model: Inductor
    fuses the pointwise work (bias, LeakyReLU, residual adds, the sigmoid gate) into the
    kernels around the convs, and CUDA graphs (one per input shape, recorded on its first
    runs) replay the whole forward with one launch. One dynamic-shape compilation serves
    every image size and batch."""

    info = BackendInfo("compile_graphs", ("cuda",), (), False,
                       "torch.compile reduce-overhead (fused epilogues + CUDA graphs), fp16 NHWC")
    mode = "reduce-overhead"
    supports_grid = False
    per_sample_exact = False
    cudnn_benchmark = True

    def __init__(self, model, device):
        model = model.half().to(memory_format=torch.channels_last)
        super().__init__(model, device)
        self.compiled = torch.compile(_Fp16Io(model), mode=self.mode, dynamic=True)

    def _run(self, x, grid):
        # The graph's output buffer is reused by the next replay: copy it out (fp16 -> fp32
        # NCHW, one kernel) before anyone can run the graph again.
        torch.compiler.cudagraph_mark_step_begin()
        out = self.compiled(x)
        return out.to(torch.float32, memory_format=torch.contiguous_format)


@register
class CompileFp16Engine(CompileGraphsEngine):
    """As ``compile_graphs`` with ``mode="max-autotune"``: Inductor also benchmarks kernel
    choices (Triton templates against cuDNN/cuBLAS) on first use; CUDA graphs included."""

    info = BackendInfo("compile_fp16", ("cuda",), (), False,
                       "torch.compile max-autotune (autotuned kernels + CUDA graphs), fp16 NHWC")
    mode = "max-autotune"
