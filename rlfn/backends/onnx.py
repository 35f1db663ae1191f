"""The ONNX backends (see ``rlfn.backends``): the model's ONNX export (``rlfn.backends.export``,
dynamic N/H/W) run on the CPU by ONNX Runtime (``onnxruntime``) or OpenVINO (``openvino``: fp32
precision hint; ``openvino_bf16``: bf16 inference precision, native bf16 CPUs only).

onnxruntime, openvino and the exporter are imported when an engine is built, not before.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from ..engine import BackendInfo, Engine
from . import register
from .pytorch import require_native_bf16

__all__ = ["OnnxRuntimeEngine", "OpenVinoEngine", "OpenVinoBf16Engine"]


class _OnnxEngine(Engine):
    """Runs the model's ONNX export (dynamic H/W; see ``rlfn.backends.export``) on the CPU."""

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


@register
class OnnxRuntimeEngine(_OnnxEngine):
    info = BackendInfo("onnxruntime", ("cpu",), ("onnxruntime", "onnx", "onnxscript"), True,
                       "ONNX Runtime, fp32")

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


@register
class OpenVinoEngine(_OnnxEngine):
    info = BackendInfo("openvino", ("cpu",), ("openvino", "onnx", "onnxscript"), True,
                       "OpenVINO, fp32 precision hint")
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


@register
class OpenVinoBf16Engine(OpenVinoEngine):
    info = BackendInfo("openvino_bf16", ("cpu",), ("openvino", "onnx", "onnxscript"), False,
                       "OpenVINO, bf16 inference precision")
    precision = "bf16"

    @classmethod
    def check_hardware(cls, device):
        require_native_bf16(cls.name, device)
