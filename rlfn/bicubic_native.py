"""The compiled MATLAB-exact bicubic for uint8 images on the CPU (``rlfn/_bicubic.c``).

The C pass accumulates each output value in double in MATLAB's tap order and rounds as
MATLAB does, so it is exact by construction (no float32 + fix-up scheme), and its inner loop
is vectorised by the compiler: the x2 and x4 downscales run ~1.5-3x PIL's (inexact) bicubic
on one thread (``bench/bicubic.py``).

Built on first use with the machine's C compiler (``$CC``, else ``cc``/``gcc``) into
``$RLFN_CACHE_DIR/native`` (default ``~/.cache/rlfn/native``), keyed by the source, the flags
and the CPU's instruction set (``-march=native``), written to a temporary name and renamed:
concurrent first uses (test workers, pool processes) never load a half-written library.
Where no compiler works, ``available()`` is False and ``rlfn.bicubic`` takes its NumPy/torch
path (the same results); ``RLFN_NATIVE=0`` turns the compiled path off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np

from .io import atomic_target
from .threads import shared_pool

__all__ = ["available", "resize_hwk", "library_path", "NativeError"]

SOURCE = Path(__file__).with_name("_bicubic.c")
# -ffp-contract=off: no fused multiply-add (it would round differently from MATLAB's double
# arithmetic); no -ffast-math (it would reorder the sums).
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared",
         "-std=c99"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None


class NativeError(RuntimeError):
    """The compiled bicubic could not be built or refused its input."""


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {flags}"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def library_path() -> Path:
    from . import cache_dir

    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()
                         + _cpu_key().encode()).hexdigest()[:16]
    return cache_dir() / "native" / f"bicubic-{key}.so"


def _build(path: Path) -> None:
    cc = _compiler()
    if cc is None:
        raise NativeError("no C compiler (cc, gcc, clang or $CC) on this machine")
    with atomic_target(path, mode=0o777) as tmp:
        r = subprocess.run([cc, *FLAGS, "-o", str(tmp), str(SOURCE), "-lm"],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise NativeError(f"{cc} failed on {SOURCE}: {r.stderr.strip()[-500:]}")


def _load() -> ctypes.CDLL | None:
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is not None or _failed is not None:
            return _lib
        if os.environ.get("RLFN_NATIVE", "1").strip() in ("0", "false", "no", "off"):
            _failed = "turned off by RLFN_NATIVE"
            return None
        try:
            path = library_path()
            if not path.is_file():
                _build(path)
            lib = ctypes.CDLL(str(path))
            fn = lib.rlfn_bicubic_pass
            p = ctypes.c_void_p
            i64 = ctypes.c_int64
            fn.argtypes = [p, i64, i64, i64, p, i64, p, p, i64, i64, i64]
            fn.restype = ctypes.c_int
            _lib = lib
        except (OSError, NativeError, subprocess.SubprocessError) as e:
            _failed = str(e)
        return _lib


def available() -> bool:
    """Whether the compiled path runs here (built on first call)."""
    return _load() is not None


def why_not() -> str | None:
    """Why the compiled path is not available (None when it is)."""
    _load()
    return _failed


# a pass's output rows are split into bands over threads (the call releases the GIL) from
# this many output values on: below it, thread hand-off costs more than it saves
BAND_MIN_VALUES = 1 << 20
def _pass(src: np.ndarray, n_in: int, m: int, k: int, n_out: int, w: np.ndarray,
          idx: np.ndarray, threads: int) -> np.ndarray:
    out = np.empty(n_out * m, dtype=np.uint8)

    def band(i0: int, i1: int) -> int:
        return _lib.rlfn_bicubic_pass(src.ctypes.data, n_in, m, k, out.ctypes.data, n_out,
                                      w.ctypes.data, idx.ctypes.data, w.shape[1], i0, i1)

    n = min(threads, n_out, max(1, n_out * m // BAND_MIN_VALUES))
    if n <= 1:
        codes = [band(0, n_out)]
    else:
        cuts = [n_out * b // n for b in range(n + 1)]
        # the one imresize pool (rlfn.threads, shared with rlfn.bicubic's NumPy path); bands
        # are submitted only with threads > 1, never from a plane worker (those pass
        # threads=1), so it cannot deadlock
        codes = list(shared_pool(n).map(band, cuts[:-1], cuts[1:]))
    bad = [c for c in codes if c != 0]
    if bad:
        raise NativeError(f"rlfn_bicubic_pass refused its input (code {bad[0]})")
    return out


def resize_hwk(src: np.ndarray, taps_h: tuple[np.ndarray, np.ndarray],
               taps_w: tuple[np.ndarray, np.ndarray], threads: int = 1) -> np.ndarray:
    """A uint8 ``(H, W, K)`` image resized height first, then width (MATLAB's order when the
    height's scale is not the larger one), each pass with its ``(weights, indices)`` from
    ``rlfn.bicubic.contributions``. Returns ``(H', W', K)`` uint8. Big images run in bands
    of rows on up to ``threads`` threads. ``available()`` first."""
    if _load() is None:
        raise NativeError(f"compiled bicubic not available: {_failed}")
    if src.dtype != np.uint8 or src.ndim != 3:
        raise ValueError(f"resize_hwk expects a uint8 (H, W, K) array, got {src.dtype} "
                         f"{src.shape}")
    h, w, k = src.shape
    wh, ih = (np.ascontiguousarray(a) for a in taps_h)
    ww, iw = (np.ascontiguousarray(a) for a in taps_w)
    if wh.dtype != np.float64 or ih.dtype != np.int64 or ww.dtype != np.float64 \
            or iw.dtype != np.int64 or wh.shape != ih.shape or ww.shape != iw.shape:
        raise ValueError("taps must be (float64 weights, int64 indices) of equal shape")
    src = np.ascontiguousarray(src)
    h2, w2 = wh.shape[0], ww.shape[0]
    t = _pass(src, h, w * k, k, h2, wh, ih, threads)         # (W, H', K)
    out = _pass(t, w, h2 * k, k, w2, ww, iw, threads)        # (H', W', K)
    return out.reshape(h2, w2, k)
