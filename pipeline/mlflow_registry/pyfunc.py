"""The logged model: ``RLFNPyfunc`` (an ``mlflow.pyfunc.PythonModel``), its input checks, the
example image, the signature, the pip requirements and the code shipped with it."""

from __future__ import annotations

import base64
import binascii
import shutil
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

__all__ = ["RLFNPyfunc", "InvalidInput", "example_image", "MIN_INPUT_SIZE", "IMAGE_COLUMN",
           "MODEL_CODE"]

IMAGE_COLUMN = "image"
MIN_INPUT_SIZE = 15  # rlfn.models.rlfn.RLFN.min_input_size: ESA's stride-2 conv + 7x7 pool
# zlib level of the PNG answers: 1, not write_png's 6. Encoding a 2040x1356 answer at 6 took
# 1.0 s on these cores (a third of a request's time beside the model's 2.3 s), at 1 0.2 s for
# ~20% more bytes, which loopback or a LAN carries in milliseconds. Same pixels.
RESPONSE_PNG_LEVEL = 1
PACKAGE_DIR = Path(__file__).resolve().parent  # pipeline/mlflow_registry
# The model's code (MLflow's "models from code"): a file that builds the model and hands it to
# mlflow.models.set_model; logged as the pyfunc's python_model, so nothing is pickled.
MODEL_CODE = PACKAGE_DIR / "model_code.py"


class InvalidInput(MlflowException, ValueError):
    """A request the model cannot use (a bad image, a missing column, ...): a ``ValueError``
    for Python callers, and for ``mlflow models serve`` an ``INVALID_PARAMETER_VALUE``, which
    it answers with HTTP 400 and this message."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class RLFNPyfunc(mlflow.pyfunc.PythonModel):
    """LR image(s) -> SR image(s), ``scale`` times larger. Two kinds of input:

    * a uint8 ``(H, W, 3)`` array (or an ``(N, H, W, 3)`` batch) -> the uint8 SR array(s);
      integer arrays holding 0-255 (JSON's ``{"inputs": [[[...]]]}`` arrives as int64) are
      taken as uint8;
    * a DataFrame with a column ``image`` of base64-encoded PNG/JPEG/... bytes, one image a
      row -> a DataFrame with ``image`` (base64 PNG of the SR image, zlib level
      ``RESPONSE_PNG_LEVEL``) and ``notes`` (the conversions applied to the input,
      ``rlfn upscale``'s warnings, ``; ``-separated). The
      images are read by ``rlfn.io.decode_image``: the CLI's rules (grayscale, palette, RGBA,
      16-bit converted; decompression-bomb limit) and its messages.
    """

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

    # The hint says ndarray (MLflow infers no schema from that, and validates nothing); a
    # DataFrame of encoded images is just as welcome.
    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None):
        params = {k: v for k, v in (params or {}).items() if v is not None}
        tile = int(params.get("tile", -1))
        overlap = int(params.get("overlap", 64))
        if overlap < 0:
            raise InvalidInput(f"overlap must be >= 0, got {overlap}")
        if isinstance(model_input, dict) and IMAGE_COLUMN in model_input:
            import pandas as pd  # {"inputs": {"image": [...]}} over HTTP arrives as a dict

            model_input = pd.DataFrame({IMAGE_COLUMN: list(np.ravel(model_input[IMAGE_COLUMN]))})
        if _is_dataframe(model_input):
            return self._predict_encoded(model_input, tile, overlap)
        arr = _as_images(model_input)
        if arr.ndim == 3:
            return self._upscale(arr, tile, overlap)
        return np.stack([self._upscale(im, tile, overlap) for im in arr])

    def _upscale(self, img: np.ndarray, tile: int, overlap: int) -> np.ndarray:
        from rlfn.upscale import auto_tile, upscale_array

        h, w = img.shape[:2]
        tile_px = auto_tile(h, w) if tile < 0 else (tile or None)
        try:
            return upscale_array(self._require().model, img, tile=tile_px, overlap=overlap)
        except ValueError as e:  # a tile too small for the overlap, ...
            raise InvalidInput(str(e)) from None

    def _predict_encoded(self, df, tile: int, overlap: int):
        import pandas as pd

        from rlfn.io import ImageError, decode_image, encode_png

        if IMAGE_COLUMN not in df.columns:
            raise InvalidInput(f"expected a column {IMAGE_COLUMN!r} of base64-encoded PNG or "
                               f"JPEG bytes (one image a row), got columns {list(df.columns)}")
        if len(df) == 0:
            raise InvalidInput("no rows: send one image a row in the column 'image'")
        images, notes = [], []
        for i, value in enumerate(df[IMAGE_COLUMN].tolist()):
            where = f"row {i}"
            data = _b64decode(value, where)
            try:
                lr, info = decode_image(data, name=where, min_size=MIN_INPUT_SIZE)
            except ImageError as e:
                raise InvalidInput(str(e)) from None
            sr = self._upscale(lr, tile, overlap)
            images.append(base64.b64encode(encode_png(sr, RESPONSE_PNG_LEVEL)).decode("ascii"))
            notes.append("; ".join(info.notes))
        return pd.DataFrame({IMAGE_COLUMN: images, "notes": notes})


def _is_dataframe(x: Any) -> bool:
    return type(x).__name__ == "DataFrame" and hasattr(x, "columns")


def _b64decode(value: Any, where: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", errors="replace")
    if not isinstance(value, str):
        raise InvalidInput(f"{where}: expected a base64 string, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(f"{where}: not valid base64 ({e})") from None


def _as_images(x: Any) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise InvalidInput("expected a uint8 array of shape (H, W, 3) or (N, H, W, 3), or a "
                           f"DataFrame with a column {IMAGE_COLUMN!r} of base64 PNG/JPEG bytes; "
                           f"got {type(x).__name__}")
    if x.dtype != np.uint8:
        # JSON numbers arrive as int64: accept integers that are pixel values
        if not (np.issubdtype(x.dtype, np.integer) and x.size
                and int(x.min()) >= 0 and int(x.max()) <= 255):
            raise InvalidInput(f"expected a uint8 image (pixel range 0-255), got dtype {x.dtype}")
        x = x.astype(np.uint8)
    if x.ndim not in (3, 4) or x.shape[-1] != 3:
        raise InvalidInput("expected an RGB image of shape (H, W, 3) or a batch (N, H, W, 3), "
                           f"got shape {tuple(x.shape)}")
    if x.ndim == 4 and x.shape[0] == 0:
        raise InvalidInput("empty batch (N = 0)")
    h, w = x.shape[-3:-1]
    if h < MIN_INPUT_SIZE or w < MIN_INPUT_SIZE:
        raise InvalidInput(f"image of {h}x{w} pixels is too small: RLFN needs at least "
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
    from mlflow.types.schema import ParamSchema, ParamSpec

    # Params only. MLflow's input schemas are either tensors or columns, never both, and it
    # enforces them before the model sees the input; this model takes both (a uint8 tensor
    # for Python callers, a column of encoded images over HTTP) and checks them itself
    # (``InvalidInput``).
    return ModelSignature(
        params=ParamSchema([ParamSpec("tile", "long", -1), ParamSpec("overlap", "long", 64)]),
    )


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = [f"mlflow=={mlflow.__version__}"]
    for pkg in ("torch", "numpy", "safetensors", "pillow", "pandas"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")  # torch's "+cpu" local tag
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def _stage_code(dest: Path) -> list[str]:
    """Copy this package (as ``pipeline/mlflow_registry`` under a minimal ``pipeline``) and the
    ``rlfn`` library into ``dest`` for ``code_paths``: the model's code (``model_code.py``)
    imports ``pipeline.mlflow_registry.pyfunc.RLFNPyfunc``, which must import wherever the
    model is loaded. Of the rest of ``pipeline`` only the tag vocabulary ``pipeline/tags.py``
    (a module that imports nothing) is shipped: this package imports nothing else of it."""
    import rlfn

    pkg = dest / "pipeline"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Just the MLflow registry package, shipped with a logged '
                                     'RLFN pyfunc."""\n')
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(PACKAGE_DIR, pkg / PACKAGE_DIR.name, ignore=ignore)
    shutil.copy2(PACKAGE_DIR.parent / "tags.py", pkg / "tags.py")
    lib = dest / "rlfn"
    shutil.copytree(Path(rlfn.__file__).parent, lib, ignore=ignore)
    return [str(pkg), str(lib)]
