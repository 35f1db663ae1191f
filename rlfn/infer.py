"""Compatibility: the inference backends' public names, where scripts first found them.

The engine protocol is ``rlfn.engine``; the backends, their registry and ``make_engine`` are
``rlfn.backends`` (``python -m rlfn.backends`` lists them). New code imports from there.
"""

from __future__ import annotations

from .backends import (BACKENDS, available_backends, backend_names, check_backend,
                       make_engine)
from .engine import (EXACT_DB, BackendError, BackendInfo, Engine, as_engine,
                     per_sample_convs, psnr_label)

__all__ = ["BackendError", "BackendInfo", "BACKENDS", "Engine", "make_engine", "check_backend",
           "backend_names", "available_backends", "as_engine", "psnr_label", "EXACT_DB",
           "per_sample_convs"]
