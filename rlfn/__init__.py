"""rlfn: the RLFN super-resolution library (models, MATLAB-exact bicubic, metrics, IO).

Pure PyTorch / numpy; it never imports Prefect, DVC or MLflow. ``import rlfn`` loads nothing
else: the names below are imported from their modules on first use, so a process that needs
one module (and a DVC stage that depends on it) does not drag in the rest.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "downscale": "bicubic", "imresize": "bicubic", "imresize_array": "bicubic",
    "modcrop": "bicubic", "psnr_y": "metrics", "ssim_y": "metrics", "RLFN": "models",
    "RLFNConfig": "models", "build_model": "models", "load_model": "weights",
    "save_model": "weights", "RLFNError": "errors", "ConfigError": "errors",
    "DataError": "errors",
}

__all__ = sorted(_LAZY) + ["__version__", "cache_dir"]


def cache_dir() -> Path:
    """Where built artefacts are kept between runs (the int8 models, the compiled bicubic):
    ``$RLFN_CACHE_DIR``, default ``~/.cache/rlfn``."""
    return Path(os.environ.get("RLFN_CACHE_DIR") or Path.home() / ".cache" / "rlfn")


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rlfn' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
