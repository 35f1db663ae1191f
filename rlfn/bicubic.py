"""MATLAB-exact bicubic resizing (``imresize(I, scale, 'bicubic')``) for torch tensors.

What MATLAB does, and therefore what this module does (each point is checked against the
MATLAB-made LR files of the reference data's benchmark sets by ``tests/test_bicubic.py``):

* Keys' cubic kernel (a = -0.5), widened by ``1/scale`` when downscaling (antialiasing).
* Output size is ``ceil(in * scale)``; sample ``i`` (1-based) sits at
  ``u = i/scale + 0.5 * (1 - 1/scale)`` in input coordinates.
* Each output sample's taps are normalised to sum to 1; taps that fall outside the image
  are clamped to the edge pixel (edge replication).
* The image is resized one dimension at a time, the one with the smaller scale factor
  first (height first when both are equal), accumulating in float64.
* For uint8 input each 1-D pass rounds to uint8 (half away from zero, saturating), so the
  second pass sees the rounded result of the first.

Tensors are NCHW (or CHW / HW), on any device; uint8 in gives uint8 out, floating point in
gives the same floating dtype out (no intermediate rounding, like MATLAB on doubles).

How it is fast and still exact. On the CPU, uint8 images (any scale, height first in MATLAB's
order) go to the compiled passes of ``rlfn.bicubic_native`` where the machine has a C
compiler: MATLAB's float64 tap loop itself, vectorised (``rlfn/_bicubic.c``), 1.1-1.6x PIL.
Elsewhere (no compiler, ``RLFN_NATIVE=0``, CUDA, float input, width first) each uint8 pass is
computed in float32, and only the values
that land within a proven error bound of a rounding boundary (x.5) are recomputed in float64,
tap by tap in MATLAB's order. For integer downscale factors on CPU (``imresize_array``,
``downscale``, and uint8 tensors with up to 4 planes) the float32 passes are blocked band-matrix
GEMMs on an edge-padded channels-last buffer (see ``_downscale_band``); everything else
(other scales, upscaling, float input, CUDA, big batches) uses a sparse/dense matrix product
per pass (``_resize_first_dim``). ``reference=True`` is the plain float64 tap loop.
"""

from __future__ import annotations

import math
import threading
import warnings
from functools import lru_cache

import numpy as np
import torch

from .threads import shared_pool

__all__ = ["imresize", "imresize_array", "downscale", "modcrop", "output_size", "cubic", "contributions"]


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5, as in MATLAB's imresize."""
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1) + (
        -0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0
    ) * ((ax > 1) & (ax <= 2))


@lru_cache(maxsize=256)
def contributions(in_length: int, out_length: int, scale: float, antialiasing: bool = True):
    """Per-output-sample weights and (0-based, clamped) input indices, both ``(out, taps)``.

    A pure function of its arguments, cached: the same numbers MATLAB's ``contributions``
    computes, except that out-of-range indices are clamped rather than mirrored.
    """
    kernel_width = 4.0
    if scale < 1 and antialiasing:
        kernel_width = kernel_width / scale

        def h(x):
            return scale * cubic(scale * x)

    else:
        h = cubic
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - kernel_width / 2.0)
    taps = int(math.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    weights = h(u[:, None] - indices)
    weights = weights / weights.sum(axis=1, keepdims=True)
    indices = np.clip(indices - 1, 0, in_length - 1).astype(np.int64)  # 1-based -> 0-based, clamp
    keep = np.any(weights != 0, axis=0)
    weights = np.ascontiguousarray(weights[:, keep])
    indices = np.ascontiguousarray(indices[:, keep])
    return weights, indices


def output_size(in_size: tuple[int, int], scale: float) -> tuple[int, int]:
    """MATLAB's output size for a scale factor: ``ceil(in * scale)`` per dimension."""
    return tuple(int(math.ceil(s * scale - 1e-9)) for s in in_size)  # type: ignore[return-value]


def _round_uint8(x: torch.Tensor) -> torch.Tensor:
    # MATLAB's double -> uint8: round half away from zero, then saturate. On the negative
    # side everything rounds to <= 0 and saturates to 0, so floor(x + 0.5) is exact here.
    return torch.floor(x + 0.5).clamp_(0, 255).to(torch.uint8)


@lru_cache(maxsize=256)
def _taps(in_length: int, out_length: int, scale: float, antialiasing: bool, device: str):
    w, idx = contributions(in_length, out_length, scale, antialiasing)
    return (torch.tensor(w, dtype=torch.float64, device=device),
            torch.tensor(idx, dtype=torch.int64, device=device))


@lru_cache(maxsize=256)
def _matrix(in_length: int, out_length: int, scale: float, antialiasing: bool, device: str,
            dtype: torch.dtype) -> torch.Tensor:
    """The resize as an ``(out, in)`` matrix: sparse CSR on CPU, dense on accelerators."""
    w, idx = _taps(in_length, out_length, scale, antialiasing, "cpu")
    a = torch.zeros(out_length, in_length, dtype=torch.float64)
    a.scatter_add_(1, idx, w)  # clamped taps that hit the same pixel add up
    a = a.to(dtype)
    if device == "cpu":
        with warnings.catch_warnings():  # "sparse CSR support is in beta": used as documented
            warnings.simplefilter("ignore", UserWarning)
            return a.to_sparse_csr()
    return a.to(device)


def _exact_sum(x2d: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, w: torch.Tensor,
               idx: torch.Tensor) -> torch.Tensor:
    """MATLAB's float64 sum for selected outputs, tap by tap in MATLAB's order."""
    terms = w[rows] * x2d[idx[rows], cols[:, None]].to(torch.float64)  # (K, taps)
    acc = terms[:, 0].clone()
    for p in range(1, terms.shape[1]):
        acc += terms[:, p]
    return acc


def _resize_first_dim(x2d: torch.Tensor, out_length: int, scale: float, antialiasing: bool,
                      to_uint8: bool) -> torch.Tensor:
    """Resize an ``(in, M)`` matrix along its first dimension to ``(out, M)``.

    uint8: a float32 matrix product gives every value to within ~1e-4; only values that land
    close to a rounding boundary (x.5) are recomputed exactly in float64, tap by tap, as
    MATLAB does. So the result equals the all-float64 computation bit for bit.
    """
    in_length = x2d.shape[0]
    dev = str(x2d.device)
    if not to_uint8:
        dtype = torch.float64 if x2d.dtype == torch.float64 else torch.float32
        return _matrix(in_length, out_length, scale, antialiasing, dev, dtype) @ x2d.to(
            dtype, memory_format=torch.contiguous_format)
    a = _matrix(in_length, out_length, scale, antialiasing, dev, torch.float32)
    # row-major operand: the sparse product is ~5x slower on a transposed (column-major) one
    y = a @ x2d.to(torch.float32, memory_format=torch.contiguous_format)
    w, idx = _taps(in_length, out_length, scale, antialiasing, dev)
    # float32 error bound: taps * |partial sums| (<= ~1.3 * 255) * 2**-24, with a wide margin
    tol = max(1e-3, 4 * w.shape[1] * 512 * 2.0**-24)
    r = torch.floor(y.add_(0.5))
    near = y.sub_(r).sub_(0.5).abs_() > 0.5 - tol  # y + 0.5 within tol of an integer
    out = r.clamp_(0, 255).to(torch.uint8)  # = _round_uint8 of the float32 value
    rows, cols = near.nonzero(as_tuple=True)
    if rows.numel():
        out[rows, cols] = _round_uint8(_exact_sum(x2d, rows, cols, w, idx))
    return out


# Work in blocks of about this many input values (4 MB of float32): the temporaries stay in
# the allocator's free lists instead of being mmap'ed (page faults) on every call.
_BLOCK = 1 << 20


def _resize_dim(x: torch.Tensor, dim: int, out_length: int, scale: float, antialiasing: bool,
                to_uint8: bool) -> torch.Tensor:
    """Resize the last (``dim=-1``) or second-to-last (``dim=-2``) axis, block by block."""
    *lead, h, w = x.shape
    x3 = x.reshape(-1, h, w)
    planes = x3.shape[0]
    out_dtype = torch.uint8 if to_uint8 else (
        torch.float64 if x.dtype == torch.float64 else torch.float32)
    if dim == x.dim() - 2:  # height: columns of each (h, w) plane
        out = torch.empty(planes, out_length, w, dtype=out_dtype, device=x.device)
        if h * w <= _BLOCK:  # several whole planes side by side
            k = max(1, _BLOCK // (h * w))
            for b0 in range(0, planes, k):
                blk = x3[b0:b0 + k]
                y = _resize_first_dim(blk.transpose(0, 1).reshape(h, -1), out_length, scale,
                                      antialiasing, to_uint8)
                out[b0:b0 + k] = y.view(out_length, blk.shape[0], w).transpose(0, 1)
        else:  # column strips of one plane
            k = max(1, _BLOCK // h)
            for b in range(planes):
                for c0 in range(0, w, k):
                    out[b, :, c0:c0 + k] = _resize_first_dim(
                        x3[b, :, c0:c0 + k], out_length, scale, antialiasing, to_uint8)
        return out.reshape(*lead, out_length, w)
    # width: rows of all planes, transposed in blocks
    rows = x3.reshape(-1, w)
    out = torch.empty(rows.shape[0], out_length, dtype=out_dtype, device=x.device)
    k = max(1, _BLOCK // w)
    for r0 in range(0, rows.shape[0], k):
        out[r0:r0 + k] = _resize_first_dim(rows[r0:r0 + k].t(), out_length, scale,
                                           antialiasing, to_uint8).t()
    return out.reshape(*lead, h, out_length)


def _resize_dim_reference(x: torch.Tensor, dim: int, out_length: int, scale: float,
                          antialiasing: bool, to_uint8: bool) -> torch.Tensor:
    """Straightforward float64 tap loop: the definition the fast path is tested against."""
    w, idx = _taps(x.shape[dim], out_length, scale, antialiasing, str(x.device))
    shape = [1] * x.dim()
    shape[dim] = out_length
    acc = torch.zeros(1, dtype=torch.float64, device=x.device)
    for p in range(w.shape[1]):
        acc = acc + x.index_select(dim, idx[:, p]).to(torch.float64) * w[:, p].reshape(shape)
    return _round_uint8(acc) if to_uint8 else acc


def imresize(
    img: torch.Tensor,
    scale: float | None = None,
    size: tuple[int, int] | None = None,
    antialiasing: bool = True,
    reference: bool = False,
) -> torch.Tensor:
    """Resize like MATLAB's ``imresize(img, scale, 'bicubic')``.

    ``img``: a ``(N, C, H, W)``, ``(C, H, W)`` or ``(H, W)`` tensor, uint8 or floating point.
    Give either ``scale`` (e.g. ``1/4`` to downscale by 4, ``4`` to upscale) or the output
    ``size`` ``(H, W)``. Returns a tensor of the same layout, dtype and device.
    ``reference=True`` runs the slow, obviously-MATLAB float64 tap loop instead of the fast
    path (same result; kept as the oracle for tests and benchmarks).
    """
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"imresize expects a torch.Tensor, got {type(img).__name__}")
    if img.dim() < 2 or img.dim() > 4:
        raise ValueError(f"imresize expects an HW, CHW or NCHW tensor, got shape {tuple(img.shape)}")
    is_uint8 = img.dtype == torch.uint8
    if not is_uint8 and not img.is_floating_point():
        raise TypeError(f"imresize supports uint8 or floating point tensors, not {img.dtype}")
    in_hw = (img.shape[-2], img.shape[-1])
    if min(in_hw) < 1:
        raise ValueError(f"imresize got an empty image of size {in_hw}")
    if (scale is None) == (size is None):
        raise ValueError("imresize needs exactly one of `scale` or `size`")
    if scale is not None:
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        scales = (float(scale), float(scale))
        out_hw = output_size(in_hw, float(scale))
    else:
        out_hw = (int(size[0]), int(size[1]))  # type: ignore[index]
        if min(out_hw) < 1:
            raise ValueError(f"output size must be positive, got {out_hw}")
        scales = (out_hw[0] / in_hw[0], out_hw[1] / in_hw[1])

    if not torch.is_autocast_enabled(img.device.type):
        return _imresize(img, scales, out_hw, antialiasing, is_uint8, reference)
    with torch.autocast(img.device.type, enabled=False):  # exact arithmetic: never autocast
        return _imresize(img, scales, out_hw, antialiasing, is_uint8, reference)


def _imresize(img: torch.Tensor, scales: tuple[float, float], out_hw: tuple[int, int],
              antialiasing: bool, is_uint8: bool, reference: bool,
              contiguous: bool = True) -> torch.Tensor:
    out_dtype = img.dtype
    if is_uint8 and not reference and img.device.type == "cpu":
        *lead, h, w = img.shape
        k = img.numel() // (h * w)
        planes = img.reshape(k, h, w)
        y = _native_planes(planes.numpy(), out_hw, scales, antialiasing)
        if y is not None:
            x = torch.from_numpy(y).reshape(*lead, *out_hw)
            return x.contiguous() if contiguous else x
        plans = _fast_plans(h, w, k, out_hw, scales, antialiasing)
        if plans is not None:
            y = _downscale_periodic(img.reshape(k, h, w).permute(1, 2, 0), out_hw, *plans)
            x = torch.from_numpy(y).permute(2, 0, 1).reshape(*lead, *out_hw)
            return x.contiguous() if contiguous else x
    x = img
    resize_dim = _resize_dim_reference if reference else _resize_dim
    # MATLAB resizes along the dimension with the smaller scale factor first (stable sort:
    # height first on ties).
    order = sorted(range(2), key=lambda d: scales[d])
    for d in order:
        dim = x.dim() - 2 + d
        x = resize_dim(x, dim, out_hw[d], scales[d], antialiasing, to_uint8=is_uint8)
    if contiguous:
        x = x.contiguous()
    return x if is_uint8 else x.to(out_dtype)


def _native(hwk: np.ndarray, out_hw: tuple[int, int], scales: tuple[float, float],
            antialiasing: bool, threads: int | None = None) -> np.ndarray | None:
    """The compiled pass pair (``rlfn.bicubic_native``) on a uint8 ``(H, W, K)`` array, or
    None where it does not apply (width first in MATLAB's order) or is not available."""
    from . import bicubic_native

    if scales[0] > scales[1] or not bicubic_native.available():
        return None
    if threads is None:  # big images: bands of rows on the torch threads (rlfn.threads)
        threads = torch.get_num_threads()
    (h, w), (h2, w2) = hwk.shape[:2], out_hw
    return bicubic_native.resize_hwk(hwk, contributions(h, h2, scales[0], antialiasing),
                                     contributions(w, w2, scales[1], antialiasing),
                                     threads=threads)


def _native_planes(planes: np.ndarray, out_hw: tuple[int, int], scales: tuple[float, float],
                   antialiasing: bool) -> np.ndarray | None:
    """``_native`` of ``(K, H, W)`` planes -> ``(K, H', W')``: a few (channels) as one
    ``(H, W, K)`` image, many (a batch) plane by plane over the torch threads (the compiled
    call releases the GIL)."""
    k = planes.shape[0]
    if k <= _FAST_MAX_K:
        y = _native(planes.transpose(1, 2, 0), out_hw, scales, antialiasing)
        return None if y is None else np.ascontiguousarray(y.transpose(2, 0, 1))
    from . import bicubic_native

    if scales[0] > scales[1] or not bicubic_native.available():  # as _native decides
        return None
    out = np.empty((k, *out_hw), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = _native(planes[i][:, :, None], out_hw, scales, antialiasing, 1)[:, :, 0]

    n = min(torch.get_num_threads(), k)
    if n > 1:
        list(shared_pool(n).map(one, range(k)))
    else:
        for i in range(k):
            one(i)
    return out


def modcrop(img, scale: int):
    """Crop the bottom/right so that height and width are multiples of ``scale``.

    Works on HWC numpy arrays and on ``(..., H, W)`` tensors.
    """
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    if isinstance(img, np.ndarray):
        h, w = img.shape[:2]
        return img[: h - h % scale, : w - w % scale, ...]
    h, w = img.shape[-2], img.shape[-1]
    return img[..., : h - h % scale, : w - w % scale]


def imresize_array(img: np.ndarray, scale: float) -> np.ndarray:
    """``imresize`` for one uint8 numpy image, ``(H, W)`` or ``(H, W, C)``."""
    if img.dtype != np.uint8:
        raise TypeError(f"imresize_array expects uint8, got {img.dtype}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if img.ndim not in (2, 3) or min(img.shape[:2]) < 1:
        raise ValueError(f"imresize_array expects a non-empty HW or HWC image, got {img.shape}")
    out_hw = output_size(img.shape[:2], float(scale))
    scales = (float(scale), float(scale))
    hwk = img if img.ndim == 3 else img[:, :, None]
    out = _native(hwk, out_hw, scales, True)
    if out is not None:  # compiled, exact by construction (rlfn.bicubic_native)
        return out if img.ndim == 3 else out[:, :, 0]
    plans = _fast_plans(*hwk.shape, out_hw, scales, True)
    if plans is not None:  # straight from numpy, no tensors in between
        out = _downscale_periodic(hwk, out_hw, *plans)
        return out if img.ndim == 3 else out[:, :, 0]
    if not img.flags.c_contiguous:
        img = np.array(img, order="C")
    with warnings.catch_warnings():  # read-only arrays (np.asarray of a PIL image): only read
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(img)
    if img.ndim == 3:
        t = t.permute(2, 0, 1)
    out = imresize(t, scale=scale)
    if img.ndim == 3:
        out = out.permute(1, 2, 0)
    return np.ascontiguousarray(out.numpy())


def downscale(hr: np.ndarray, scale: int) -> np.ndarray:
    """The benchmark LR of an HR image: mod-crop to the scale, then MATLAB bicubic by 1/scale."""
    return imresize_array(modcrop(hr, scale), 1.0 / int(scale))


# ---------------------------------------------------------------------------------------------
# Fast path for integer downscale factors (CPU, uint8, few channels): the MATLAB benchmark case.
#
# For ``scale = 1/s`` with integer ``s`` every output sample ``i`` uses the same taps and
# weights at input positions ``s*i + off[p]`` (the border samples too: their taps are just
# clamped, i.e. the image is edge-replicated). So after replicate-padding, each 1-D pass is a
# blocked band matrix product: ``B`` output samples from ``s*(B-1) + span`` input samples, one
# small dense matrix for all blocks, run as a single batched float32 GEMM (numpy/BLAS) over
# overlapping strided views of the padded buffer. Rounding is as in ``_resize_first_dim``:
# float32 result, then the few values near a rounding boundary recomputed exactly in float64
# in MATLAB's order (same error bound, ``_tol``).
# Layout: one float32 buffer ``(rows, cols, K)``, K = all leading dims (channels) innermost,
# padded in both dimensions up front, so the first pass's output is already the second pass's
# padded input.
# ---------------------------------------------------------------------------------------------

_B1 = 4  # output samples per block, height pass (GEMM: (B1 x L1) @ (L1 x cols*K))
_B2 = 4  # output samples per block, width pass (GEMM: (rows x L2*K) @ (L2*K x B2*K))
# (measured with numpy/OpenBLAS on 2 cores: 4 and 4 best by a few %, 4..16 all close)
_FAST_MAX_K = 4  # channels-last width pass (kron with I_K) pays off for a few channels only


@lru_cache(maxsize=256)
def _periodic(in_length: int, out_length: int, scale: float, antialiasing: bool):
    """``(s, weights, offsets)`` when output ``i`` is ``sum_p w[p] * x[clamp(s*i + off[p])]``
    for every ``i`` (an integer downscale factor ``s``), else ``None``."""
    if not (0 < scale < 1) or out_length < 2:
        return None
    s = int(round(1.0 / scale))
    if s < 2 or abs(1.0 / scale - s) > 1e-9:
        return None
    w, idx = contributions(in_length, out_length, scale, antialiasing)
    m = out_length // 2
    off = idx[m] - s * m
    i = np.arange(out_length)[:, None]
    if (off[0] > 0 or np.any(np.diff(off) <= 0)
            or not np.array_equal(idx, np.clip(s * i + off, 0, in_length - 1))
            or np.abs(w - w[m]).max() > 1e-12):
        return None
    return s, w[m].copy(), off.copy()


@lru_cache(maxsize=64)
def _block_matrix(s: int, w: tuple, off: tuple, b: int, k: int) -> np.ndarray:
    """``(b, L)`` float32 band block (``k == 0``) or its ``(L*k, b*k)`` channel-interleaved
    transpose ``kron(block.T, I_k)`` for channels-last rows."""
    span = off[-1] - off[0] + 1
    a = torch.zeros(b, s * (b - 1) + span, dtype=torch.float32)
    for r in range(b):
        for wp, op in zip(w, off):
            a[r, s * r + op - off[0]] = wp
    if k == 0:
        return a.numpy()
    return np.ascontiguousarray(np.kron(a.numpy().T, np.eye(k, dtype=np.float32)))


@lru_cache(maxsize=256)
def _fast_pass(in_length: int, out_length: int, scale: float, antialiasing: bool, b: int,
               k: int):
    """Everything one fast 1-D pass needs, or ``None`` (not an integer downscale):
    ``(s, taps, offset0, block matrix, float64 weights (taps, out) or (taps, 1) when all
    samples' weights are equal, tap offsets in the padded buffers (taps, 1))``."""
    per = _periodic(in_length, out_length, scale, antialiasing)
    if per is None:
        return None
    s, w, off = per
    w64 = contributions(in_length, out_length, scale, antialiasing)[0].T  # (taps, out)
    if np.array_equal(w64, np.broadcast_to(w64[:, :1], w64.shape)):
        w64 = w64[:, :1]  # all samples' weights bit-identical (e.g. x2, x4): no gather
    # off - off[0]: tap p of output i sits at s*i + (off[p] - off[0]) of the padded buffers
    return (s, len(w), int(off[0]),
            _block_matrix(s, tuple(w.tolist()), tuple(off.tolist()), b, k),
            np.ascontiguousarray(w64), (off - off[0]).astype(np.int64)[:, None])


def _fast_plans(h: int, w: int, k: int, out_hw: tuple[int, int], scales: tuple[float, float],
                antialiasing: bool):
    """The two ``_fast_pass`` plans when the fast path applies (uint8 CPU input assumed):
    integer downscale factors in both dimensions, height first in MATLAB's order, few
    channels; else ``None``."""
    if k > _FAST_MAX_K or scales[0] > scales[1]:
        return None
    p1 = _fast_pass(h, out_hw[0], scales[0], antialiasing, _B1, 0)
    p2 = _fast_pass(w, out_hw[1], scales[1], antialiasing, _B2, k)
    if p1 is None or p2 is None:
        return None
    return p1, p2


_WORKSPACE_MAX = 1 << 24  # elements kept per scratch slot and thread (<= 64 MB of float32;
# images are processed in bands of ~_BAND_ELEMS, so ~10 MB in all). Bigger: allocated fresh.
_workspace = threading.local()


def _scratch(slot: int, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reused flat CPU buffer of at least ``n`` elements (contents undefined).

    Fresh large allocations are mmap'ed and page-faulted on every call, which costs as much
    as the arithmetic on small images; these stay mapped (per thread, per slot)."""
    if n > _WORKSPACE_MAX:
        return torch.empty(n, dtype=dtype)
    bufs = getattr(_workspace, "bufs", None)
    if bufs is None:
        bufs = _workspace.bufs = {}
    b = bufs.get((slot, dtype))
    if b is None or b.numel() < n:
        b = bufs[(slot, dtype)] = torch.empty(max(n, 1 << 16), dtype=dtype)
    return b[:n]


def _tol(taps: int) -> float:
    # float32 error bound: taps * |partial sums| (<= ~1.3 * 255) * 2**-24, with a wide margin
    return max(1e-3, 4 * taps * 512 * 2.0**-24)  # as in _resize_first_dim


def _round_near(y: torch.Tensor, r: torch.Tensor, taps: int, clamp: bool = True):
    """Round float32 ``y`` (contiguous, overwritten) into ``r`` as MATLAB uint8 values kept in
    float32 (saturated to 0..255 unless ``clamp`` is false); return the flat indices of the
    values too close to x.5 to trust (to recompute)."""
    yn, rn = y.numpy(), r.numpy()  # numpy here: rint, and the mask's nonzero, ~2-10x torch's
    np.rint(yn, out=rn)  # half to even differs from half-up only at ties: those are 'near'
    np.subtract(yn, rn, out=yn)
    np.abs(yn, out=yn)
    n = yn.size
    mask = _scratch(0, -(-n // 8) * 8, torch.bool).numpy()
    mask[n:] = False
    np.greater(yn.reshape(-1), 0.5 - _tol(taps), out=mask[:n])
    if clamp:
        np.clip(rn, 0, 255, out=rn)
    # nonzero of a sparse mask: find the nonzero 8-byte words first, then look inside them
    words = np.flatnonzero(mask.view(np.uint64))
    if not words.size:
        return words
    sub = np.flatnonzero(mask.reshape(-1, 8)[words])
    return words[sub >> 3] * 8 + (sub & 7)


def _exact_rows(w64: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """MATLAB's float64 sum, tap by tap in order, then uint8 rounding (as float).

    ``vals``: ``(taps, n)`` integer-valued samples; ``w64``: ``(taps, 1)`` or ``(taps, n)``."""
    terms = vals * w64  # float64 (vals are integers, exact in any float type)
    acc = terms[0].copy()
    for p in range(1, terms.shape[0]):  # left to right, as MATLAB
        acc += terms[p]
    return np.minimum(np.maximum(np.floor(acc + 0.5), 0.0), 255.0)


_BAND_ELEMS = 1 << 20  # big images go in bands of output rows (~4 MB of pass-1 output
# each): their buffers stay cache-sized, 1.2-1.3x faster on a 2040x1356 image
_BAND_MIN_ROWS = 128  # output rows per thread, at least: below that threads cost more

def _downscale_periodic(src, out_hw: tuple[int, int], p1, p2) -> np.ndarray:
    """MATLAB's two uint8 passes (height, then width) for integer factors, on CPU.

    ``src``: ``(H, W, K)`` uint8, a numpy array or CPU tensor (any strides); ``p1``, ``p2``:
    the ``_fast_pass`` plans of the two passes. Returns a new ``(Ho, Wo, K)`` uint8 array.
    With several torch threads, horizontal bands of output rows run in parallel threads
    (independent problems: each band reads its own input rows; numpy releases the GIL).
    All arithmetic is numpy: its float32 GEMM (BLAS sgemm) is plain IEEE whatever torch's
    matmul precision settings, and it uses no OpenMP team that could stall on a busy CPU."""
    ho, wo = out_hw
    out = np.empty((ho, wo, src.shape[2]), dtype=np.uint8)
    b1 = p1[3].shape[0]
    rows = max(b1, _BAND_ELEMS // (src.shape[1] * src.shape[2]) // b1 * b1)
    bands = [(i0, min(i0 + rows, ho)) for i0 in range(0, ho, rows)]
    n = min(torch.get_num_threads(), ho // _BAND_MIN_ROWS, len(bands))
    if n <= 1:
        for i0, i1 in bands:
            _downscale_band(src, out, i0, i1, p1, p2)
        return out

    def work(t: int) -> None:
        for i0, i1 in bands[t::n]:
            _downscale_band(src, out, i0, i1, p1, p2)

    for job in [shared_pool(n).submit(work, t) for t in range(n)]:
        job.result()
    return out


def _strided(a: np.ndarray, shape: tuple, strides: tuple) -> np.ndarray:
    """A read-only (overlapping) view of ``a`` with strides counted in elements."""
    return np.lib.stride_tricks.as_strided(a, shape, tuple(t * a.itemsize for t in strides),
                                           writeable=False)


def _downscale_band(src, out: np.ndarray, i0: int, i1: int, p1, p2) -> None:
    """Output rows ``i0:i1`` of ``_downscale_periodic`` into ``out`` (thread-safe)."""
    h, w, k = src.shape
    ho, wo = i1 - i0, out.shape[1]
    sh, th, oh0, a1, w64h, dh = p1
    sw, tw, ow0, a2, w64w, dw = p2
    b1, b2 = a1.shape[0], a2.shape[1] // k
    l1, l2 = a1.shape[1], a2.shape[0] // k
    nb1, nb2 = -(-ho // b1), -(-wo // b2)
    hb, wb = sh * b1 * (nb1 - 1) + l1, sw * b2 * (nb2 - 1) + l2  # padded buffer size
    left = -ow0
    ww_ = min(w, wb - left)  # input columns inside the buffer
    lo = sh * i0 + oh0  # input row of buffer row 0 (before clamping)
    r0, r1_ = max(lo, 0), min(lo + hb, h)  # input rows inside the buffer

    # uint8 -> float32 once, edge-replicated in both dimensions
    buf = _scratch(1, hb * wb * k).view(hb, wb, k)
    bn = buf.numpy()  # numpy: less per-call overhead than torch for these copies
    if isinstance(src, np.ndarray):
        np.copyto(bn[r0 - lo:r1_ - lo, left:left + ww_], src[r0:r1_, :ww_])
    else:
        buf[r0 - lo:r1_ - lo, left:left + ww_] = src[r0:r1_, :ww_]
    bn[:r0 - lo, left:left + ww_] = bn[r0 - lo:r0 - lo + 1, left:left + ww_]
    bn[r1_ - lo:, left:left + ww_] = bn[r1_ - lo - 1:r1_ - lo, left:left + ww_]
    bn[:, :left] = bn[:, left:left + 1]
    if ww_ == w and left + w < wb:
        bn[:, left + w:] = bn[:, left + w - 1:left + w]

    # height pass: (B1, L1) @ (nb1, L1, wb*K) over overlapping row blocks of buf
    m = wb * k
    y1 = _scratch(2, nb1 * b1 * m).view(nb1, b1, m)
    np.matmul(a1, _strided(bn, (nb1, l1, m), (sh * b1 * m, m, 1)), out=y1.numpy())
    y1 = y1.view(nb1 * b1, wb, k)[:ho]
    r1 = _scratch(3, ho * m).view(ho, wb, k)
    near = _round_near(y1, r1, th)
    if near.size:
        # taps of local output row i: buf rows s*i + dh (edge-padded = MATLAB's clamping),
        # same (column, channel) position in buf as in r1
        i = near // m
        wts = w64h if w64h.shape[1] == 1 else w64h[:, i0 + i]
        vals = bn.reshape(-1)[near + (sh - 1) * m * i + dh * m]  # (taps, n)
        r1.view(-1).numpy()[near] = _exact_rows(wts, vals)

    # width pass: (nb2, Ho, L2*K) @ (L2*K, B2*K) over overlapping column blocks of r1
    z = _scratch(2, nb2 * ho * b2 * k).view(nb2, ho, b2 * k)  # y1 is done with
    np.matmul(_strided(r1.numpy(), (nb2, ho, l2 * k), (sw * b2 * k, m, 1)), a2, out=z.numpy())
    r2 = _scratch(1, z.numel()).view(nb2, ho, b2 * k)  # buf is done with
    near = _round_near(z, r2, tw, clamp=False)  # saturated below, with the uint8 cast
    r2n = r2.numpy().reshape(nb2, ho, b2, k)
    if near.size:
        jb, rem = np.divmod(near, ho * b2 * k)
        i, rem = np.divmod(rem, b2 * k)
        rr, kk = np.divmod(rem, k)
        j = jb * b2 + rr
        keep = j < wo
        near, i, j, kk = near[keep], i[keep], j[keep], kk[keep]
        wts = w64w if w64w.shape[1] == 1 else w64w[:, j]
        vals = r1.view(-1).numpy()[(sw * j * k + i * m + kk) + dw * k]  # (taps, n)
        r2n.reshape(-1)[near] = _exact_rows(wts, vals)

    out = out[i0:i1]
    nf = wo // b2
    if nf:  # (block, row, ...) -> (row, block, ...), saturate, cast: one pass
        np.clip(r2n[:nf].transpose(1, 0, 2, 3), 0, 255,
                out=out[:, :nf * b2].reshape(ho, nf, b2, k), casting="unsafe")
    if nf * b2 < wo:
        np.clip(r2n[nf, :, :wo - nf * b2], 0, 255, out=out[:, nf * b2:], casting="unsafe")
