"""MATLAB-exact bicubic resizing (``imresize(I, scale, 'bicubic')``) for torch tensors.

What MATLAB does, and therefore what this module does (each point is checked against the
MATLAB-made LR files in ``../shared/data/benchmarks`` by ``tests/test_bicubic.py``):

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
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import numpy as np
import torch

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

    with torch.autocast(img.device.type, enabled=False):  # exact arithmetic: never autocast
        return _imresize(img, scales, out_hw, antialiasing, is_uint8, reference)


def _imresize(img: torch.Tensor, scales: tuple[float, float], out_hw: tuple[int, int],
              antialiasing: bool, is_uint8: bool, reference: bool) -> torch.Tensor:
    out_dtype = img.dtype
    x = img
    resize_dim = _resize_dim_reference if reference else _resize_dim
    # MATLAB resizes along the dimension with the smaller scale factor first (stable sort:
    # height first on ties).
    order = sorted(range(2), key=lambda d: scales[d])
    for d in order:
        dim = x.dim() - 2 + d
        x = resize_dim(x, dim, out_hw[d], scales[d], antialiasing, to_uint8=is_uint8)
    x = x.contiguous()
    return x if is_uint8 else x.to(out_dtype)


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
    if not img.flags.writeable or not img.flags.c_contiguous:
        img = np.array(img, order="C")  # torch wants a writable, contiguous buffer
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
