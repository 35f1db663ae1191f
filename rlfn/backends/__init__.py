"""Inference backends behind one interface: ``make_engine(model, backend, device)``.

Every backend is an ``rlfn.engine.Engine`` subclass carrying its own ``BackendInfo`` (name,
devices, required packages, exact or not, description) and its own hardware check
(``check_hardware``), registered by ``@register`` where it is defined. The modules, one a
family: ``rlfn.engine`` (the eager baseline, registered by ``pytorch``), ``pytorch`` (PyTorch
on CPU or GPU), ``onnx`` (the ONNX export, ``export``, in ONNX Runtime or OpenVINO), ``int8``
(OpenVINO with NNCF int8 convs: the engine, the quantization and its cache, the int8 export
and its check), ``cuda`` (CUDA only). ``python -m rlfn.backends`` prints the backends
themselves (name, devices, exact, description), read from the registry: exact ones first,
then the lossy ones, each group in the modules' order above.

The backend modules import their heavy packages (onnxruntime, openvino, nncf, ``torch.onnx``
through ``backends.export``) only when an engine is built or a model exported: listing the
backends, checking one, or building a PyTorch engine loads none of them. Training imports
none of this package: its validation runs the eager engine of ``rlfn.engine``.

Errors come before any work, as one-line ``BackendError``s (``check_backend``): an unknown
backend, a GPU asked for where none exists, a backend that does not run on the device asked
for, a backend whose package is not installed, hardware without what the backend needs (bf16
on a CPU without native bf16, int8 without int8 dot products).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from ..engine import BackendError, BackendInfo, Engine

__all__ = ["BACKENDS", "register", "engine_class", "make_engine", "check_backend",
           "backend_names", "available_backends", "describe"]

BACKENDS: dict[str, BackendInfo] = {}
_ENGINES: dict[str, type[Engine]] = {}


def register(cls: type[Engine]) -> type[Engine]:
    """Class decorator: the engine class becomes the backend ``cls.info.name``."""
    info = cls.info
    if info.name in _ENGINES and _ENGINES[info.name] is not cls:
        raise ValueError(f"backend {info.name!r} registered twice")
    _ENGINES[info.name] = cls
    # exact backends first, then lossy ones, each in registration order
    ordered = sorted(_ENGINES.values(), key=lambda c: not c.info.exact)
    BACKENDS.clear()
    BACKENDS.update((c.info.name, c.info) for c in ordered)
    return cls


def engine_class(name: str) -> type[Engine]:
    return _ENGINES[name]


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
    _ENGINES[name].check_hardware(dev)
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


def make_engine(model: nn.Module, backend: str = "eager",
                device: str | torch.device | None = None, *,
                calibration: str | Path | None = None) -> Engine:
    """``model`` (fp32, as loaded) ready to run with ``backend`` on ``device`` (default: where
    the model's weights are). The model is moved/converted; pass a copy to keep the original.
    ``calibration``: the int8 backend's calibration data (``rlfn.backends.int8``; required
    there, a ``BackendError`` before any work without it), unused by the other backends."""
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    check_backend(backend, device)
    return _ENGINES[backend].build(model.to(device).float().eval(), device,
                                   calibration=calibration)


def describe() -> list[str]:
    """The backends as a table's lines: name, devices, exact, description."""
    rows = [(i.name, "/".join(i.devices), "yes" if i.exact else "no", i.description)
            for i in BACKENDS.values()]
    w = [max(len(r[k]) for r in rows + [("backend", "device", "exact", "")]) for k in range(3)]
    return [f"{'backend':{w[0]}}  {'device':{w[1]}}  {'exact':{w[2]}}  description"] + [
        f"{a:{w[0]}}  {b:{w[1]}}  {c:{w[2]}}  {d}" for a, b, c, d in rows]


# The backend modules register their engines on import, in the order of the table above.
from . import pytorch, onnx, int8, cuda  # noqa: E402

MODULES = (pytorch, onnx, int8, cuda)
