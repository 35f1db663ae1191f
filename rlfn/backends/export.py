"""ONNX export: ``export_onnx(model, "model.onnx")``, dynamic height and width.

The graph takes ``lr`` float32 ``(N, 3, H, W)`` in [0, 255] and returns ``sr`` float32
``(N, 3, H*scale, W*scale)`` (not clamped or rounded, like the PyTorch module). N, H and W
are dynamic: one file serves every image size. The file is self-contained (no external
data) and carries metadata: ``rlfn.scale``, ``rlfn.model``, ``rlfn.pixel_range``,
``rlfn.min_input_size``. It is written atomically. ``check=True`` runs the file in ONNX
Runtime on a test input and compares with PyTorch before returning.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import RLFNError
from ..io import atomic_target

__all__ = ["export_onnx", "ExportError", "OPSET"]

OPSET = 18


class ExportError(RLFNError, RuntimeError):
    pass


def export_onnx(model: nn.Module, path: str | Path, opset: int = OPSET,
                model_name: str | None = None, check: bool = True,
                sample_hw: tuple[int, int] = (48, 40)) -> Path:
    """Export ``model`` (any module with ``.scale``) to ONNX at ``path``; returns the path."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().float().eval()
    scale = int(model.scale)
    min_size = int(getattr(model, "min_input_size", 1))
    h, w = (max(s, min_size + 7) for s in sample_hw)  # unequal sides: keep H and W apart
    x = torch.rand(1, 3, h, w) * 255
    dim = torch.export.Dim.DYNAMIC
    with atomic_target(path) as tmp:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                _quiet("torch.onnx"):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (x,), input_names=["lr"], output_names=["sr"], opset_version=opset,
                dynamic_shapes={"x": {0: dim, 2: dim, 3: dim}}, dynamo=True, verbose=False,
                external_data=False)
        proto = program.model_proto
        meta = {"rlfn.scale": str(scale), "rlfn.model": model_name or type(model).__name__,
                "rlfn.pixel_range": "0-255 float32 in and out",
                "rlfn.min_input_size": str(min_size)}
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        onnx.checker.check_model(proto)
        onnx.save_model(proto, str(tmp))
        if check:
            _check(model, tmp, scale)
    return path


@contextlib.contextmanager
def _quiet(logger: str):
    """The exporter logs a warning per optional op library it cannot find (torchvision)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _check(model: nn.Module, onnx_path: str | Path, scale: int) -> None:
    """Run the file in ONNX Runtime at a size other than the export's; compare with PyTorch."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 61, 53, generator=torch.Generator().manual_seed(0)) * 255
    with torch.inference_mode():
        ref = model(x).numpy()
    out = sess.run(None, {"lr": x.numpy()})[0]
    if out.shape != ref.shape or out.shape[2] != 61 * scale:
        raise ExportError(f"{onnx_path}: ONNX output shape {out.shape}, PyTorch {ref.shape}")
    err = float(np.abs(out - ref).max())
    if err > 0.5:
        raise ExportError(f"{onnx_path}: ONNX output differs from PyTorch by up to {err:.3f} "
                          "grey levels")
