"""Inference backends behind one interface: ``make_engine(model, backend, device)``.

An engine takes a float32 ``(N, 3, H, W)`` batch in [0, 255] on its device and returns the
float32 SR batch there; ``upscale``, ``evaluate`` and ``profile`` all run through one.

=================  ======  ========================================================  =====
backend            device  what it does                                              exact
=================  ======  ========================================================  =====
``eager``          both    the PyTorch module as it is, fp32 (the baseline)          yes
``channels_last``  both    NHWC memory format: oneDNN/cuDNN's preferred layout       yes
``compile``        both    ``torch.compile`` (Inductor; on CPU with weight freezing) yes
``onnxruntime``    cpu     exported ONNX graph in ONNX Runtime (fp32)                yes
``openvino``       cpu     exported ONNX graph in OpenVINO (fp32 precision hint)     yes
``bf16``           both    bf16 body, fp32 head/skip/upsampler (native bf16 only)    no
``compile_bf16``   both    ``torch.compile`` of the ``bf16`` model                   no
``openvino_bf16``  cpu     OpenVINO with bf16 inference precision                    no
``int8``           cpu     OpenVINO, NNCF int8 body 3x3 convs, rest fp32 (cached)    no
``fp16``           cuda    half-precision weights and activations                    no
``cuda_graphs``    cuda    fp16 + a CUDA graph captured per input shape              no
``compile_graphs`` cuda    ``torch.compile`` "reduce-overhead" of the fp16 NHWC      no
                           model: fused pointwise epilogues + CUDA graphs
``compile_fp16``   cuda    ``torch.compile`` "max-autotune" of the fp16 NHWC model:  no
                           autotuned kernels, fused epilogues, CUDA graphs
=================  ======  ========================================================  =====

"Exact" in the table is what the backend promises (fp32 arithmetic, only summation order
changes); the tests and ``bench/inference.py`` measure every backend's Set5 x4 PSNR against
eager fp32: within 0.01 dB it is called exact, anything lossier is reported with its loss
(``psnr_label``).

bf16 keeps RLFN's first conv, the long skip and the upsampler in fp32: the output has values
up to 255, where bf16's 8-bit mantissa steps by 1.0, so a bf16 tail alone costs ~0.01 dB;
with it in fp32 the loss is ~0.001 dB (the body, ~93% of the MACs, still runs in bf16).

int8 (``rlfn.quant``) quantizes only the body's 3x3 convs (80-85% of the MACs; SmoothQuant
scales on their inputs), after static calibration on training data the caller names
(``make_engine(..., calibration=SOURCE)``, required for int8: a patch store ``.arrow`` or a
folder of HR training images); the head, the residual adds, ESA and the tail stay fp32. The
quantized model is cached by the weights' sha256 (``rlfn.quant.int8_model``). It needs a CPU
with int8 dot products (AVX512-VNNI, AVX-VNNI or AMX) and the ``nncf`` package.

Errors come before any work, as one-line ``BackendError``s: an unknown backend, a backend
whose package is not installed, a GPU asked for where none exists, a backend that does not
run on the device asked for, bf16 on a CPU without native bf16.

Batches: an engine takes N > 1 images (or tiles) of one size at once (``rlfn.upscale``'s
batched mode). On the CPU, PyTorch picks a conv algorithm by input size and a single small
input (<= 20480 elements, e.g. ESA's pooled map) takes a different one than a batch, so the
engines that run the module eagerly (eager, channels_last, bf16) run such convs, and the ESA
blocks (whose vectorised sigmoid rounds its tail differently), sample by sample inside a
batch: every sample's output is then bit-identical to running it alone (``per_sample_convs``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .device import bf16_native
from .errors import ConfigError

__all__ = ["BackendError", "BackendInfo", "BACKENDS", "Engine", "make_engine", "check_backend",
           "backend_names", "available_backends", "as_engine", "psnr_label", "EXACT_DB",
           "per_sample_convs"]

# Within this PSNR difference from eager fp32 (Set5 x4) a backend is called exact.
EXACT_DB = 0.01


class BackendError(ConfigError):
    """A backend that cannot run here: unknown, not installed, wrong device, no GPU. Raised
    as ``BackendError(reason)`` (the caller knows the option or key) or with a ``where``."""


@dataclass(frozen=True)
class BackendInfo:
    name: str
    devices: tuple[str, ...]
    requires: tuple[str, ...]  # importable modules (pip packages in the [infer] extra)
    exact: bool  # fp32 arithmetic: promised within EXACT_DB of eager
    description: str


BACKENDS: dict[str, BackendInfo] = {b.name: b for b in [
    BackendInfo("eager", ("cpu", "cuda"), (), True, "PyTorch eager, fp32 (the baseline)"),
    BackendInfo("channels_last", ("cpu", "cuda"), (), True, "PyTorch eager, NHWC memory format"),
    BackendInfo("compile", ("cpu", "cuda"), (), True, "torch.compile (Inductor), fp32"),
    BackendInfo("onnxruntime", ("cpu",), ("onnxruntime", "onnx", "onnxscript"), True,
                "ONNX Runtime, fp32"),
    BackendInfo("openvino", ("cpu",), ("openvino", "onnx", "onnxscript"), True,
                "OpenVINO, fp32 precision hint"),
    BackendInfo("bf16", ("cpu", "cuda"), (), False,
                "bf16 body, fp32 head/skip/upsampler, channels_last"),
    BackendInfo("compile_bf16", ("cpu", "cuda"), (), False, "torch.compile of the bf16 model"),
    BackendInfo("openvino_bf16", ("cpu",), ("openvino", "onnx", "onnxscript"), False,
                "OpenVINO, bf16 inference precision"),
    BackendInfo("int8", ("cpu",), ("openvino", "onnx", "onnxscript", "nncf"), False,
                "OpenVINO, NNCF int8 body 3x3 convs (static PTQ + SmoothQuant), rest fp32"),
    BackendInfo("fp16", ("cuda",), (), False, "fp16 weights and activations + channels_last"),
    BackendInfo("cuda_graphs", ("cuda",), (), False, "fp16 + CUDA graph per input shape"),
    BackendInfo("compile_graphs", ("cuda",), (), False,
                "torch.compile reduce-overhead (fused epilogues + CUDA graphs), fp16 NHWC"),
    BackendInfo("compile_fp16", ("cuda",), (), False,
                "torch.compile max-autotune (autotuned kernels + CUDA graphs), fp16 NHWC"),
]}


def backend_names() -> list[str]:
    return list(BACKENDS)


def check_backend(name: str, device: str | torch.device = "cpu", *, where: str | None = None,
                  exact_for: str | None = None) -> BackendInfo:
    """The backend's description, or a one-line ``BackendError`` saying why it cannot run,
    naming ``where`` (the option or setting it came from). With ``exact_for`` (what needs an
    exact backend), a lossy backend is refused too."""
    try:
        info = _check_backend(name, device)
    except BackendError as e:
        raise BackendError(where, e.reason) from None
    if exact_for is not None and not info.exact:
        raise BackendError(where, f"{name} is not exact; {exact_for}")
    return info


def _check_backend(name: str, device: str | torch.device) -> BackendInfo:
    info = BACKENDS.get(name)
    if info is None:
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {dev}: no CUDA GPU is available on this machine")
    if dev.type not in info.devices:
        raise BackendError(f"backend {name!r} runs on {' or '.join(info.devices)} only, not "
                           f"{dev.type}")
    missing = [m for m in info.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendError(f"backend {name!r} needs the Python package(s) {', '.join(missing)}, "
                           f"not installed (pip install 'rlfn-pipeline[infer]')")
    if "bf16" in name and not bf16_native(dev):
        raise BackendError(f"backend {name!r}: " + (
            "this GPU does not support bf16" if dev.type == "cuda" else
            "this CPU has no native bf16 (AVX512-BF16/AMX); emulated bf16 would be slower "
            "than fp32"))
    if name == "int8":
        from .quant import cpu_has_int8_dot

        if not cpu_has_int8_dot():
            raise BackendError("backend 'int8': this CPU has no int8 dot product (AVX512-VNNI, "
                               "AVX-VNNI or AMX); int8 would be slow and could saturate")
    return info


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """The backends that can run on ``device`` here (installed, supported by the hardware)."""
    out = []
    for name in BACKENDS:
        try:
            check_backend(name, device)
        except BackendError:
            continue
        out.append(name)
    return out


def psnr_label(delta_db: float) -> str:
    """``exact`` within ``EXACT_DB`` of eager fp32, else the measured loss."""
    return "exact" if abs(delta_db) <= EXACT_DB else f"lossy ({delta_db:+.3f} dB)"


# --------------------------------------------------------------------------- engines
class Engine:
    """A model ready to run: ``engine(x)`` with ``x`` float32 (N, 3, H, W) in [0, 255] on
    ``engine.device``; returns float32 (N, 3, H*s, W*s) on the same device."""

    name = "eager"
    supports_grid = True  # can take ESAGrid (tiles that match the untiled output)
    # cuDNN autotuning per input shape (the first image of each size pays for the search);
    # off for the eager baseline, which runs PyTorch's defaults.
    cudnn_benchmark = False
    # Runs ``self.model`` eagerly: on the CPU a batch gets each sample's own conv algorithm
    # (see the module docstring), so batched outputs equal unbatched ones bit for bit.
    per_sample_exact = True

    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self.scale = int(model.scale)
        self.min_input_size = int(getattr(model, "min_input_size", 1))
        self.info = BACKENDS[self.name]

    def __call__(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        if grid is not None and not self.supports_grid:
            raise BackendError(f"backend {self.name!r} cannot run tiles with an ESA grid")
        with torch.inference_mode():
            if self.device.type != "cuda":
                if x.size(0) > 1 and self.per_sample_exact:
                    with per_sample_convs(self.model):
                        return self._run(x, grid)
                return self._run(x, grid)
            with torch.backends.cudnn.flags(enabled=True, benchmark=self.cudnn_benchmark,
                                            deterministic=False,
                                            allow_tf32=torch.backends.cudnn.allow_tf32):
                return self._run(x, grid)

    def _run(self, x: torch.Tensor, grid) -> torch.Tensor:
        return self.model(x) if grid is None else self.model(x, grid=grid)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __repr__(self) -> str:
        return f"<Engine {self.name} on {self.device}>"


def _conv_backend(conv: nn.Conv2d, x: torch.Tensor):
    return torch._C._select_conv_backend(  # the algorithm PyTorch will run for this input
        x, conv.weight, conv.bias, list(conv.stride), list(conv.padding), list(conv.dilation),
        False, [0, 0], conv.groups, None)


def _needs_split(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Would one sample of ``x`` alone run a different conv algorithm than the batch?"""
    try:
        return _conv_backend(conv, x) != _conv_backend(conv, x[:1])
    except Exception:  # private API changed, or padding="same": PyTorch's own rule
        return x[:1].numel() <= 20480


def _attention_modules() -> tuple[type, ...]:
    from .models.rfdb import RFDNESA
    from .models.rlfn import ESA

    return ESA, RFDNESA


@contextlib.contextmanager
def per_sample_convs(model: nn.Module):
    """While active, a batch through ``model`` (CPU) computes each sample as it would alone:

    * each ``nn.Conv2d`` whose batch would run another conv algorithm than one sample of it
      (small inputs: PyTorch's size rule, see the module docstring) runs sample by sample;
    * ESA blocks (RLFN's, RFDN's) run sample by sample: their sigmoid is vectorised over the
      whole tensor with a scalar tail (and split across threads) that differs from the
      vectorised result in the last bit, at places that move with the batch size.

    The other layers (the body's convs, LeakyReLU, adds, PixelShuffle) give each sample the
    same bits in a batch. Batched outputs then equal the unbatched ones bit for bit."""
    attention = _attention_modules()
    mods = [m for m in model.modules() if isinstance(m, (nn.Conv2d, *attention))
            and "forward" not in m.__dict__]

    def split_conv(conv: nn.Conv2d):
        run = conv.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 4 and x.size(0) > 1 and _needs_split(conv, x):
                return torch.cat([run(x[i:i + 1]) for i in range(x.size(0))])
            return run(x)
        return forward

    def split_all(mod: nn.Module):
        run = mod.forward

        def forward(x: torch.Tensor, grid=None) -> torch.Tensor:
            if x.size(0) == 1:
                return run(x) if grid is None else run(x, grid)
            grids = grid if isinstance(grid, (list, tuple)) else [grid] * x.size(0)
            return torch.cat([run(x[i:i + 1]) if g is None else run(x[i:i + 1], g)
                              for i, g in enumerate(grids)])
        return forward

    for m in mods:
        m.forward = split_all(m) if isinstance(m, attention) else split_conv(m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


class ChannelsLastEngine(Engine):
    name = "channels_last"
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
        from .models.rlfn import RLFN

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


class Bf16Engine(ChannelsLastEngine):
    name = "bf16"

    def __init__(self, model, device):
        super().__init__(model, device)
        self.mixed = MixedBf16(self.model, device.type)

    def _run(self, x, grid):
        x = x.contiguous(memory_format=torch.channels_last)
        return self.mixed(x, grid).contiguous()


class Fp16Engine(Engine):
    name = "fp16"
    cudnn_benchmark = True

    def __init__(self, model, device):
        super().__init__(model.half().to(memory_format=torch.channels_last), device)

    def _run(self, x, grid):
        x = x.half().contiguous(memory_format=torch.channels_last)
        return super()._run(x, grid).float().contiguous()


class CudaGraphsEngine(Fp16Engine):
    """fp16 forward captured once per input shape as a CUDA graph, then replayed: no Python or
    kernel-launch overhead per layer. Input and output live in static buffers."""

    name = "cuda_graphs"
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


class CompileEngine(Engine):
    """``torch.compile`` with dynamic height/width (one compilation serves every image size).
    On CPU Inductor freezes the weights (constant-folds and pre-packs them for oneDNN)."""

    name = "compile"
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


class CompileBf16Engine(Engine):
    """``torch.compile`` (CPU: with weight freezing) of the ``bf16`` engine's mixed model:
    Inductor fuses the pointwise work (LeakyReLU, adds, sigmoid gate) into the bf16 convs."""

    name = "compile_bf16"
    supports_grid = False
    per_sample_exact = False
    cudnn_benchmark = True

    def __init__(self, model, device):
        model = model.to(memory_format=torch.channels_last)
        super().__init__(model, device)
        options = {"freezing": True} if device.type == "cpu" else {}
        self.compiled = torch.compile(MixedBf16(model, device.type), dynamic=True,
                                      options=options)

    def _run(self, x, grid):
        return self.compiled(x.contiguous(memory_format=torch.channels_last)).contiguous()


class _Fp16Io(nn.Module):
    """fp32 NCHW in, fp16 NHWC inside, fp16 out: the casts and the layout change sit inside
    the compiled graph, where Inductor fuses them into the first and last kernels."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.net = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.half().contiguous(memory_format=torch.channels_last))


class CompileGraphsEngine(Engine):
    """``torch.compile(mode="reduce-overhead")`` of the fp16 channels_last model: Inductor
    fuses the pointwise work (bias, LeakyReLU, residual adds, the sigmoid gate) into the
    kernels around the convs, and CUDA graphs (one per input shape, recorded on its first
    runs) replay the whole forward with one launch. One dynamic-shape compilation serves
    every image size and batch."""

    name = "compile_graphs"
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


class CompileFp16Engine(CompileGraphsEngine):
    """As ``compile_graphs`` with ``mode="max-autotune"``: Inductor also benchmarks kernel
    choices (Triton templates against cuDNN/cuBLAS) on first use; CUDA graphs included."""

    name = "compile_fp16"
    mode = "max-autotune"


class _OnnxEngine(Engine):
    """Runs the model's ONNX export (dynamic H/W; see ``rlfn.export``) on the CPU."""

    supports_grid = False
    per_sample_exact = False

    def __init__(self, model, device):
        from .export import export_onnx

        super().__init__(model, device)
        self.threads = torch.get_num_threads()
        with tempfile.TemporaryDirectory(prefix="rlfn-onnx-") as tmp:
            path = export_onnx(model, Path(tmp) / "model.onnx", check=False)
            self._load(path)

    def _run(self, x, grid):
        out = self._infer(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32))
        return torch.from_numpy(np.asarray(out))


class OnnxRuntimeEngine(_OnnxEngine):
    name = "onnxruntime"

    def _load(self, path: Path) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def _infer(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


class OpenVinoEngine(_OnnxEngine):
    name = "openvino"
    precision = "f32"

    def _load(self, path: Path) -> None:
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_PRECISION_HINT": self.precision,
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": "LATENCY",
        })
        self.request = self.compiled.create_infer_request()

    def _infer(self, x: np.ndarray) -> np.ndarray:
        return self.request.infer({0: x})[0].copy()


class OpenVinoBf16Engine(OpenVinoEngine):
    name = "openvino_bf16"
    precision = "bf16"


class Int8Engine(OpenVinoEngine):
    """The cached int8 OpenVINO IR of the model (``rlfn.quant.int8_model``: built by NNCF on
    first use, then loaded by the weights' sha256); the fp32 layers run in fp32."""

    name = "int8"

    def __init__(self, model, device, calibration=None):
        from .quant import CALIBRATION_KINDS, int8_model

        if calibration is None:
            raise BackendError("int8", f"needs calibration data (make_engine(..., "
                                       f"calibration=...): {CALIBRATION_KINDS})")
        Engine.__init__(self, model, device)
        self.threads = torch.get_num_threads()
        self.model_path = int8_model(model, calibration=calibration)
        self._load(self.model_path)


_ENGINES: dict[str, type[Engine]] = {e.name: e for e in [
    Engine, ChannelsLastEngine, CompileEngine, OnnxRuntimeEngine, OpenVinoEngine, Bf16Engine,
    CompileBf16Engine, OpenVinoBf16Engine, Int8Engine, Fp16Engine, CudaGraphsEngine,
    CompileGraphsEngine, CompileFp16Engine]}
assert set(_ENGINES) == set(BACKENDS)


def make_engine(model: nn.Module, backend: str = "eager",
                device: str | torch.device | None = None, *,
                calibration: str | Path | None = None) -> Engine:
    """``model`` (fp32, as loaded) ready to run with ``backend`` on ``device`` (default: where
    the model's weights are). The model is moved/converted; pass a copy to keep the original.
    ``calibration``: the int8 backend's calibration data (``rlfn.quant``; required there, a
    ``BackendError`` before any work without it), unused by the other backends."""
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    check_backend(backend, device)
    if backend == Int8Engine.name:
        return Int8Engine(model.to(device).float().eval(), device, calibration)
    return _ENGINES[backend](model.to(device).float().eval(), device)


def as_engine(model, device: str | torch.device | None = None) -> Engine:
    """An ``Engine`` as it is, or a module wrapped in the eager one."""
    if isinstance(model, Engine):
        return model
    if device is None:
        device = next(model.parameters()).device
    return Engine(model, torch.device(device))  # as it is: no copy, no mode change
