"""The logged model: ``RLFNPyfunc`` (an ``mlflow.pyfunc.PythonModel``), its input checks, the
example image, the signature, the pip requirements and the code shipped with it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

__all__ = ["RLFNPyfunc", "example_image", "MIN_INPUT_SIZE"]

MIN_INPUT_SIZE = 15  # rlfn.models.rlfn.RLFN.min_input_size: ESA's stride-2 conv + 7x7 pool
PACKAGE_DIR = Path(__file__).resolve().parent  # pipeline/mlflow_registry


class RLFNPyfunc(mlflow.pyfunc.PythonModel):
    """uint8 ``(H, W, 3)`` (or ``(N, H, W, 3)``) LR image(s) -> uint8 SR image(s)."""

    def __init__(self) -> None:
        self._loaded = None

    def load_context(self, context) -> None:
        from rlfn.weights import load_model

        self._loaded = load_model(context.artifacts["weights"], device="cpu")

    @property
    def scale(self) -> int:
        return int(self._require().scale)

    def _require(self):
        if self._loaded is None:
            raise RuntimeError("RLFNPyfunc: no weights loaded (load_context was not called)")
        return self._loaded

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None
                ) -> np.ndarray:
        from rlfn.upscale import auto_tile, upscale_array

        model = self._require().model
        arr = _as_images(model_input)
        params = {k: v for k, v in (params or {}).items() if v is not None}
        tile = int(params.get("tile", -1))
        overlap = int(params.get("overlap", 64))
        if overlap < 0:
            raise ValueError(f"overlap must be >= 0, got {overlap}")
        h, w = arr.shape[-3:-1]
        tile_px = auto_tile(h, w) if tile < 0 else (tile or None)
        if arr.ndim == 3:
            return upscale_array(model, arr, tile=tile_px, overlap=overlap)
        return np.stack([upscale_array(model, im, tile=tile_px, overlap=overlap) for im in arr])


def _as_images(x: Any) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ValueError("expected a numpy uint8 array of shape (H, W, 3) or (N, H, W, 3), got "
                         f"{type(x).__name__}")
    if x.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image (pixel range 0-255), got dtype {x.dtype}")
    if x.ndim not in (3, 4) or x.shape[-1] != 3:
        raise ValueError("expected an RGB image of shape (H, W, 3) or a batch (N, H, W, 3), got "
                         f"shape {tuple(x.shape)}")
    if x.ndim == 4 and x.shape[0] == 0:
        raise ValueError("empty batch (N = 0)")
    h, w = x.shape[-3:-1]
    if h < MIN_INPUT_SIZE or w < MIN_INPUT_SIZE:
        raise ValueError(f"image of {h}x{w} pixels is too small: RLFN needs at least "
                         f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}")
    return np.ascontiguousarray(x)


def example_image(size: int = 24) -> np.ndarray:
    """A small, deterministic, photo-like uint8 RGB image (gradients, a disc, edges, noise)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / max(size - 1, 1)
    r = 40 + 170 * xx
    g = 60 + 140 * yy
    b = 120 + 60 * np.sin(6.0 * xx + 3.0 * yy)
    disc = (xx - 0.6) ** 2 + (yy - 0.4) ** 2 < 0.06
    r[disc], g[disc], b[disc] = 220, 180, 60
    stripes = (np.floor(xx * size / 3) % 2 == 0) & (yy > 0.75)
    r[stripes] *= 0.5
    noise = np.random.default_rng(0).normal(0, 4, (size, size, 3))
    img = np.stack([r, g, b], axis=-1) + noise
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    # Unnamed tensors: the model gets a plain ndarray (a named one would arrive as a dict).
    img = TensorSpec(np.dtype(np.uint8), (-1, -1, 3))
    return ModelSignature(
        inputs=Schema([img]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))]),
        params=ParamSchema([ParamSpec("tile", "long", -1), ParamSpec("overlap", "long", 64)]),
    )


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = [f"mlflow=={mlflow.__version__}"]
    for pkg in ("torch", "numpy", "safetensors", "cloudpickle"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")  # torch's "+cpu" local tag
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def _stage_code(dest: Path) -> list[str]:
    """Copy this package (as ``pipeline/mlflow_registry`` under a minimal ``pipeline``) and the
    ``rlfn`` library into ``dest`` for ``code_paths``: the pickled ``RLFNPyfunc`` refers to
    ``pipeline.mlflow_registry.pyfunc.RLFNPyfunc``, which must import wherever the model is
    loaded. Nothing else of ``pipeline`` is shipped (this package imports none of it)."""
    import rlfn

    pkg = dest / "pipeline"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Just the MLflow registry package, shipped with a logged '
                                     'RLFN pyfunc."""\n')
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(PACKAGE_DIR, pkg / PACKAGE_DIR.name, ignore=ignore)
    lib = dest / "rlfn"
    shutil.copytree(Path(rlfn.__file__).parent, lib, ignore=ignore)
    return [str(pkg), str(lib)]
