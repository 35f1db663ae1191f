"""PSNR and SSIM on the Y channel, as SR papers (and the official RLFN evaluation) report them.

* Y is MATLAB's ``rgb2ycbcr`` luma: ``16 + (65.481 R + 128.553 G + 24.966 B)/255`` of the uint8
  RGB values, kept in float64 (not rounded back to uint8). This is what the official RLFN /
  BasicSR evaluation does, and it reproduces the reference data's metrics to 1e-4 dB;
  rounding Y to uint8 (MATLAB on uint8 arrays) reads 0.01-0.09 dB lower.
* ``border`` pixels (the scale, by convention) are cropped from every side.
* PSNR: ``10 log10(255^2 / MSE)``. SSIM: Wang et al. with an 11x11 Gaussian window
  (sigma 1.5), 'valid' filtering, K1 = 0.01, K2 = 0.03, L = 255, in float64.

Inputs are uint8 RGB arrays ``(H, W, 3)`` (the SR output rounded to uint8, and the HR).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["rgb_to_y", "psnr_y", "ssim_y", "psnr", "ssim", "crop_border"]


def rgb_to_y(img: np.ndarray, round_to_uint8: bool = False) -> np.ndarray:
    """MATLAB ``rgb2ycbcr`` Y channel of a uint8 RGB ``(H, W, 3)`` image, as float64.

    ``round_to_uint8=True`` rounds it as MATLAB does when given a uint8 array (not the
    convention of the published numbers; kept for comparisons).
    """
    if img.dtype != np.uint8:
        raise TypeError(f"rgb_to_y expects a uint8 image, got {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    x = img.astype(np.float64)
    y = (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255.0 + 16.0
    return np.round(y) if round_to_uint8 else y


def crop_border(img: np.ndarray, border: int) -> np.ndarray:
    if border <= 0:
        return img
    return img[border:-border, border:-border, ...]


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {a.shape} vs {b.shape}")


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR of two float arrays of equal shape."""
    _check_pair(a, b)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def _gaussian_1d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def _gaussian_filter_valid(x: np.ndarray) -> np.ndarray:
    """11x11 Gaussian (sigma 1.5) 'valid' filtering of ``(..., H, W)``, done separably."""
    g = _gaussian_1d()
    k = len(g)
    h, w = x.shape[-2] - k + 1, x.shape[-1] - k + 1
    rows = sum(g[i] * x[..., i:i + h, :] for i in range(k))
    return sum(g[i] * rows[..., :, i:i + w] for i in range(k))


def ssim(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """SSIM (Wang et al. 2004) of two single-channel float arrays: Gaussian 11x11, sigma 1.5."""
    _check_pair(a, b)
    if a.ndim != 2:
        raise ValueError(f"ssim expects single-channel 2-D arrays, got shape {a.shape}")
    if min(a.shape) < 11:
        raise ValueError(f"ssim needs at least 11x11 pixels, got {a.shape}")
    c1 = (0.01 * peak) ** 2
    c2 = (0.03 * peak) ** 2
    x = a.astype(np.float64)
    y = b.astype(np.float64)
    mu_x, mu_y, xx, yy, xy = _gaussian_filter_valid(np.stack([x, y, x * x, y * y, x * y]))
    sigma_x = xx - mu_x * mu_x
    sigma_y = yy - mu_y * mu_y
    sigma_xy = xy - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (sigma_x + sigma_y + c2)
    return float((num / den).mean())


def psnr_y(sr: np.ndarray, hr: np.ndarray, border: int = 0) -> float:
    """Y-channel PSNR of two uint8 RGB images, ``border`` pixels cropped on every side."""
    _check_pair(sr, hr)
    return psnr(crop_border(rgb_to_y(sr), border), crop_border(rgb_to_y(hr), border))


def ssim_y(sr: np.ndarray, hr: np.ndarray, border: int = 0) -> float:
    """Y-channel SSIM of two uint8 RGB images, ``border`` pixels cropped on every side."""
    _check_pair(sr, hr)
    return ssim(crop_border(rgb_to_y(sr), border), crop_border(rgb_to_y(hr), border))
