"""The ``int8`` backend: post-training static quantization of RLFN for the CPU, its engine,
and the int8 model's export and check (``rlfn export --int8``).

``int8_model(model, calibration=SOURCE)`` returns the path of an OpenVINO IR (``model.xml`` + ``model.bin``) in
which the body's 3x3 convolutions (``c1_r``, ``c2_r``, ``c3_r`` of every block: 80-85% of the
MACs) run in int8 (VNNI/AMX) and everything else in fp32: the head conv, the residual adds
and the 1x1 ``c5`` (quantizing the residual stream's adds costs 0.15-0.6 dB), ESA,
``conv_2``, the long skip and the upsampler (the tail that writes 0-255 pixels). The inputs
of the int8 convs get SmoothQuant's per-channel scales (alpha 0.5: half of each channel's
range moves into the conv's weights), which evens out the residual stream's channels before
per-tensor int8. The quantizer is NNCF (``nncf.quantize`` on the OpenVINO model of the
ONNX export), calibrated on LR crops of training data the caller names (``calibration``,
required: the library never guesses where a project keeps its data), never on the evaluation
sets:

* a patch store (``.arrow``, ``rlfn.data.patches``): LR crops of its records, or
* a folder of HR training images: each degraded with the project's MATLAB-exact bicubic
  (``rlfn.bicubic.downscale``), then cropped.

The pipeline's profile stage passes its patch store (params.yaml ``patches.out``); the
``rlfn`` command ``--calibration`` or ``$RLFN_INT8_CALIBRATION`` (``CALIBRATION_ENV``, read by
the command, not here).

Which convs run in int8 is ``INT8_LAYERS`` (module names from the export's scope metadata);
the other settings are ``SETTINGS``. Measured on Set5/B100 x4 against eager fp32 and on the
DIV2K test LR set for speed (``bench/inference.py``; the README's int8 section): without
SmoothQuant the challenge model loses 0.065 dB on Set5 (the block inputs of ``c1_r`` are
the worst-quantized tensors); keeping ``c1_r`` in fp32 instead would cost a third of the
speed-up.

The IR is cached under ``cache_dir()`` (``$RLFN_CACHE_DIR``, default ``~/.cache/rlfn``)
``/int8/<arch>_x<scale>_<key>/``, ``key`` the sha256 of the weights' sha256 (over the
state_dict's names, shapes and bytes), the settings, the calibration crops and the NNCF and
OpenVINO versions: new weights, settings or calibration data build a new model; the same
ones load it (no NNCF run). A build is written to a temporary folder and renamed into place,
so a cache entry is complete or absent.

``Int8Engine`` runs the cached IR in OpenVINO (it needs a CPU with int8 dot products:
AVX512-VNNI, AVX-VNNI or AMX, and the ``nncf`` package). ``export_int8`` copies the IR out of
the cache (``.bin`` then ``.xml``, each published atomically); ``check_int8`` runs a written
IR on a calibration crop against PyTorch fp32. openvino, nncf and the ONNX exporter are
imported when a model is quantized or run, not before.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import cache_dir
from ..engine import BackendError, BackendInfo, Engine
from ..errors import ConfigError, DataError
from . import register
from .onnx import OpenVinoEngine

__all__ = ["SETTINGS", "INT8_LAYERS", "QuantError", "weights_sha256", "cache_dir",
           "CALIBRATION_ENV", "calibration_source", "calibration_crops", "int8_model", "quantize_onnx",
           "cpu_has_int8_dot", "Int8Engine", "missing_packages", "export_int8", "check_int8"]

# The convs quantized to int8: the three 3x3 convs of each RLFB.
INT8_LAYERS = r"^block_\d+\.c[123]_r$"

SETTINGS = {
    "scheme": 1,  # bump when the recipe changes in a way the fields below do not show
    "int8_layers": INT8_LAYERS,
    "preset": "mixed",  # symmetric per-channel weights, asymmetric per-tensor activations
    # NNCF's default halves the weight range (7-bit) for CPUs without VNNI; this backend runs
    # only on VNNI/AMX CPUs (cpu_has_int8_dot), where 8-bit weights cannot overflow: full
    # 8 bits halve the weight error (challenge model, c1-c3 int8: -0.100 -> -0.065 dB Set5).
    "overflow_fix": "disable",
    # SmoothQuant on the int8 convs' inputs (NNCF applies it with model_type TRANSFORMER;
    # the ignored scope still keeps every other op fp32). Challenge model, Set5/B100 x4:
    # no SQ -0.065/-0.058 dB, alpha 0.15 -0.015/-0.017, 0.5 +0.016/-0.010, 0.8 -0.049/-0.009.
    "smooth_quant_alpha": 0.5,
    "crops": 80,  # LR calibration crops
    "crop_size": 64,  # LR pixels (HR 256, the paper's patch size); smaller images: whole
    "seed": 0,
}

# The variable the ``rlfn`` command reads when ``--calibration`` is not given (a user contract).
CALIBRATION_ENV = "RLFN_INT8_CALIBRATION"
CALIBRATION_KINDS = "a patch store .arrow or a folder of HR training images"
EVAL_SET_NAMES = {"set5", "set14", "b100", "bsd100", "urban100", "manga109", "benchmarks"}


class QuantError(DataError, RuntimeError):
    """Calibration data or a model that cannot be quantized: ``QuantError(where, reason)``."""


def cpu_has_int8_dot() -> bool:
    """AVX512-VNNI, AVX-VNNI or AMX-INT8: int8 dot products without 16-bit saturation."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_vnni|avx_vnni|amx_int8)\b", flags))


def weights_sha256(model: nn.Module) -> str:
    """sha256 of the model's weights: every state_dict entry's name, dtype, shape and bytes,
    in order (the same tensors give the same digest, whatever file they came from)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else
                 t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- calibration
def calibration_source(source: str | Path | None) -> Path:
    """The calibration source ``source`` (a patch store ``.arrow`` or a folder of HR training
    images), checked: it must be given (a ``ConfigError`` naming what is missing otherwise:
    nothing is looked up in the working directory or the environment), exist and not be an
    evaluation set."""
    if source is None or str(source) == "":
        raise ConfigError("int8 calibration", f"none given: the int8 backend is calibrated on "
                                              f"training data the caller names "
                                              f"({CALIBRATION_KINDS})")
    path = Path(source)
    if not path.exists():
        raise QuantError(path, f"int8 calibration source not found ({CALIBRATION_KINDS})")
    bad = EVAL_SET_NAMES & {p.lower() for p in path.resolve().parts}
    if bad:
        raise QuantError(path, f"is an evaluation set ({sorted(bad)[0]}); calibrate on "
                               f"training data, not on what the model is scored on")
    return path


def _crop(rng: np.random.Generator, lr: np.ndarray, size: int) -> np.ndarray:
    hs, ws = min(size, lr.shape[0]), min(size, lr.shape[1])
    y = int(rng.integers(0, lr.shape[0] - hs + 1))
    x = int(rng.integers(0, lr.shape[1] - ws + 1))
    return np.ascontiguousarray(lr[y:y + hs, x:x + ws].transpose(2, 0, 1)[None], np.float32)


def calibration_crops(scale: int, source: str | Path | None, *,
                      crops: int = SETTINGS["crops"], size: int = SETTINGS["crop_size"],
                      seed: int = SETTINGS["seed"], min_size: int = 1) -> list[np.ndarray]:
    """``crops`` LR crops, float32 ``(1, 3, h, w)`` in [0, 255], from the calibration source
    ``source`` (required; deterministic for a given source and seed)."""
    path = calibration_source(source)
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    if path.is_file():
        from ..data.patches import PatchStore

        if path.suffix != ".arrow":
            raise QuantError(path, "int8 calibration source must be a patch store (.arrow) or "
                                   "a folder of HR training images")
        store = PatchStore(path)
        try:
            if store.scale != scale:
                raise QuantError(path, f"patch store is x{store.scale}, the model x{scale}")
            if len(store) == 0:
                raise QuantError(path, "patch store has no records")
            for i in rng.permutation(np.resize(np.arange(len(store)), max(crops, 1)))[:crops]:
                lr = store.lr(int(i))
                if min(lr.shape[:2]) < min_size:
                    raise QuantError(path, f"record {store.describe(int(i))}: LR smaller than "
                                           f"the model's {min_size} pixels")
                out.append(_crop(rng, lr, size))
        finally:
            store.close()
        return out
    from ..bicubic import downscale
    from ..io import list_images, read_image

    files = sorted(list_images([path]))
    if not files:
        raise QuantError(path, "no images in the int8 calibration folder")
    per = -(-crops // len(files))
    for f in files:
        hr, _ = read_image(f)
        if hr.ndim == 2:
            hr = np.repeat(hr[..., None], 3, axis=2)
        lr = downscale(hr[..., :3], scale)
        if min(lr.shape[:2]) < min_size:
            raise QuantError(f, f"x{scale} LR {lr.shape[1]}x{lr.shape[0]} is smaller than the "
                                f"model's {min_size} pixels")
        out.extend(_crop(rng, lr, size) for _ in range(per))
    return out[:crops]


# --------------------------------------------------------------------------- quantization
def _module_of(onnx_model) -> dict[str, str]:
    """ONNX node name -> the module path it came from (the exporter's scope metadata)."""
    out = {}
    for node in onnx_model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes")
        if scopes:
            try:
                names = ast.literal_eval(scopes)
            except (ValueError, SyntaxError):
                continue
            if len(names) >= 2:
                out[node.name] = names[-2]
    return out


def quantize_onnx(onnx_path: str | Path, crops: list[np.ndarray], settings: dict = SETTINGS):
    """The OpenVINO model of ``onnx_path`` with the convs named by ``settings['int8_layers']``
    quantized (NNCF PTQ on ``crops``), everything else left in fp32."""
    import logging

    import nncf
    import onnx
    import openvino as ov
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                       AdvancedSmoothQuantParameters)

    module_of = _module_of(onnx.load(str(onnx_path)))
    pattern = re.compile(settings["int8_layers"])
    ov_model = ov.Core().read_model(str(onnx_path))
    keep, quantized = [], []
    skip_types = {"Parameter", "Result", "Constant", "ShapeOf", "Slice", "Concat", "Reshape",
                  "Broadcast", "Convert", "Gather", "Squeeze", "Unsqueeze"}
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() in skip_types:
            continue
        name = op.get_friendly_name()
        module = module_of.get(name.removesuffix("/WithoutBiases"), "")
        if op.get_type_name() == "Convolution" and pattern.search(module):
            quantized.append(name)
        else:
            keep.append(name)
    if not quantized:
        raise QuantError(str(onnx_path), f"no convolution matches the int8 layers "
                                         f"{settings['int8_layers']!r} (not an RLFN export?)")
    nncf.set_log_level(logging.ERROR)
    preset = {"mixed": nncf.QuantizationPreset.MIXED,
              "performance": nncf.QuantizationPreset.PERFORMANCE}[settings["preset"]]
    overflow = {"disable": nncf.OverflowFix.DISABLE, "enable": nncf.OverflowFix.ENABLE,
                "first_layer": nncf.OverflowFix.FIRST_LAYER}[settings["overflow_fix"]]
    alpha = float(settings.get("smooth_quant_alpha", -1))
    extra = {}
    if alpha >= 0:
        extra["model_type"] = nncf.ModelType.TRANSFORMER  # the type that runs SmoothQuant
    advanced = AdvancedQuantizationParameters(
        overflow_fix=overflow,
        smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=alpha, matmul=-1))
    with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bars
        return nncf.quantize(
            ov_model, nncf.Dataset(crops), subset_size=len(crops), preset=preset,
            ignored_scope=nncf.IgnoredScope(names=keep, validate=False),
            advanced_parameters=advanced, **extra)


def _key(model: nn.Module, crops: list[np.ndarray], settings: dict) -> str:
    import nncf
    import openvino as ov

    h = hashlib.sha256()
    for c in crops:
        h.update(str(c.shape).encode())
        h.update(c.tobytes())
    doc = {"weights_sha256": weights_sha256(model), "settings": settings,
           "calibration_sha256": h.hexdigest(), "nncf": nncf.__version__,
           "openvino": ov.__version__, "arch": type(model).__name__,
           "scale": int(model.scale)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def int8_model(model: nn.Module, *, calibration: str | Path | None,
               settings: dict = SETTINGS, cache: str | Path | None = None) -> Path:
    """The cached int8 IR of ``model`` (fp32 RLFN): its ``model.xml``, built when absent.
    ``calibration`` (required): the training data its crops come from (``calibration_crops``);
    ``None`` is a ``ConfigError`` before any work."""
    from ..models.rlfn import RLFN

    if not isinstance(model, RLFN):
        raise ConfigError("int8", f"quantizes RLFN models only, not {type(model).__name__}")
    scale = int(model.scale)
    crops = calibration_crops(scale, calibration, crops=settings["crops"],
                              size=settings["crop_size"], seed=settings["seed"],
                              min_size=int(getattr(model, "min_input_size", 1)))
    key = _key(model, crops, settings)
    root = Path(cache) if cache is not None else cache_dir() / "int8"
    final = root / f"{type(model).__name__.lower()}_x{scale}_{key[:24]}"
    xml = final / "model.xml"
    if xml.is_file() and (final / "model.bin").is_file():
        return xml
    from ..log import get_logger

    get_logger(__name__).info(f"int8: quantizing {type(model).__name__} x{scale} (NNCF, "
                              f"{len(crops)} calibration crops); cached in {final}")
    build_int8(model, final, crops, settings, key)
    return xml


def build_int8(model: nn.Module, out_dir: Path, crops: list[np.ndarray], settings: dict,
               key: str = "") -> Path:
    """Quantize ``model`` and write ``out_dir/model.xml`` (+ ``.bin``, ``int8.json``)
    atomically: into a temporary sibling folder, renamed into place."""
    import openvino as ov

    from .export import export_onnx

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", suffix=".tmp", dir=out_dir.parent))
    try:
        onnx_path = export_onnx(model, tmp / "fp32.onnx", check=False)
        qm = quantize_onnx(onnx_path, crops, settings)
        onnx_path.unlink()
        qm.set_rt_info(key, ["rlfn", "int8_key"])
        qm.set_rt_info(str(int(model.scale)), ["rlfn", "scale"])
        ov.save_model(qm, str(tmp / "model.xml"), compress_to_fp16=False)
        (tmp / "int8.json").write_text(json.dumps(
            {"key": key, "weights_sha256": weights_sha256(model), "settings": settings,
             "calibration_crops": len(crops)}, indent=2) + "\n")
        if out_dir.exists():  # a complete entry from a concurrent build: keep it
            shutil.rmtree(tmp)
        else:
            try:
                os.rename(tmp, out_dir)
            except OSError:
                if not (out_dir / "model.xml").is_file():
                    raise
                shutil.rmtree(tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / "model.xml"


# --------------------------------------------------------------------------- the backend
@register
class Int8Engine(OpenVinoEngine):
    """The cached int8 OpenVINO IR of the model (``int8_model``: built by NNCF on first use,
    then loaded by the weights' sha256); the fp32 layers run in fp32."""

    info = BackendInfo("int8", ("cpu",), ("openvino", "onnx", "onnxscript", "nncf"), False,
                       "OpenVINO, NNCF int8 body 3x3 convs (static PTQ + SmoothQuant), rest fp32")

    @classmethod
    def check_hardware(cls, device):
        if not cpu_has_int8_dot():
            raise BackendError("backend 'int8': this CPU has no int8 dot product (AVX512-VNNI, "
                               "AVX-VNNI or AMX); int8 would be slow and could saturate")

    @classmethod
    def build(cls, model, device, *, calibration=None, **options):
        return cls(model, device, calibration)

    def __init__(self, model, device, calibration=None):
        if calibration is None:
            raise BackendError("int8", f"needs calibration data (make_engine(..., "
                                       f"calibration=...): {CALIBRATION_KINDS})")
        Engine.__init__(self, model, device)
        self.threads = torch.get_num_threads()
        self.model_path = int8_model(model, calibration=calibration)
        self._load(self.model_path)


# --------------------------------------------------------------------------- export and check
def missing_packages() -> list[str]:
    """The packages the int8 model needs (the backend's) that are not installed."""
    import importlib.util

    return [m for m in Int8Engine.info.requires if importlib.util.find_spec(m) is None]


def export_int8(model: nn.Module, out: str | Path, calibration: str | Path) -> Path:
    """The int8 OpenVINO IR of ``model`` written to ``out`` (``.xml``, weights beside it in
    ``.bin``), copied from the cache (``int8_model``): the ``.bin`` first, each file published
    atomically, so a present ``.xml`` always has its weights."""
    from ..io import atomic_write

    out = Path(out)
    xml = int8_model(model.eval(), calibration=calibration)
    for src, dst in ((xml.with_suffix(".bin"), out.with_suffix(".bin")), (xml, out)):
        def copy(f, src=src):
            with open(src, "rb") as r:
                shutil.copyfileobj(r, f)
        atomic_write(dst, copy)
    return out


def check_int8(model: nn.Module, xml: str | Path, calibration: str | Path) -> float:
    """Run the written IR on a calibration crop and compare with PyTorch fp32: the mean
    absolute difference in grey levels (rounded, clipped 0-255 outputs); a ``DataError``
    above 2."""
    import openvino as ov

    x = calibration_crops(model.scale, calibration, crops=1, seed=1,
                          min_size=int(getattr(model, "min_input_size", 1)))[0]
    out = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
    with torch.inference_mode():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    if out.shape != ref.shape:
        raise DataError(xml, f"int8 output shape {out.shape}, PyTorch {ref.shape}")
    diff = float(np.abs(np.clip(out, 0, 255).round() - np.clip(ref, 0, 255).round()).mean())
    if diff > 2.0:
        raise DataError(xml, f"int8 output differs from PyTorch fp32 by {diff:.2f} grey levels "
                             "on average (> 2)")
    return diff
