"""Metrics against values computed by hand (the parity test checks them against the official
evaluation's numbers)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlfn.metrics import psnr, psnr_y, rgb_to_y, ssim, ssim_y


def test_rgb_to_y_matches_matlab_coefficients():
    px = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [10, 20, 30]]], np.uint8)
    y = rgb_to_y(px)
    assert y[0, 0] == pytest.approx(16.0)
    assert y[0, 1] == pytest.approx(235.0)
    assert y[0, 2] == pytest.approx(16 + 65.481)
    assert y[0, 3] == pytest.approx(16 + (65.481 * 10 + 128.553 * 20 + 24.966 * 30) / 255)
    assert rgb_to_y(px, round_to_uint8=True)[0, 3] == 32.0  # 31.587 rounded


def test_psnr_known_value_and_border():
    a = np.full((20, 20, 3), 100, np.uint8)
    b = a.copy()
    b[5:15, 5:15] = 110  # Y differs by 10 * 219/255 on 100 of 400 pixels
    dy = 10 * (65.481 + 128.553 + 24.966) / 255
    assert psnr_y(b, a) == pytest.approx(10 * math.log10(255**2 / (dy**2 * 100 / 400)))
    assert psnr_y(b, a, border=5) == pytest.approx(10 * math.log10(255**2 / dy**2))
    c = a.copy()
    c[0, 0] = 0  # only in the border
    assert psnr_y(c, a, border=1) == float("inf")


def test_ssim_identity_and_independent_formula():
    g = np.random.default_rng(0)
    x = g.integers(0, 256, (32, 32)).astype(np.float64)
    assert ssim(x, x) == pytest.approx(1.0)
    # constant images: SSIM reduces to the luminance term (sigmas are zero)
    a, b = np.full((16, 16), 50.0), np.full((16, 16), 80.0)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * 50 * 80 + c1) / (50**2 + 80**2 + c1))
    y = np.clip(x + g.normal(0, 10, x.shape), 0, 255)
    assert 0 < ssim(x, y) < 1


def test_ssim_y_shape_checks():
    a = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ValueError, match="differ in size"):
        ssim_y(a, a[:10])
    with pytest.raises(ValueError, match="11x11"):
        ssim_y(a, a, border=5)
    with pytest.raises(ValueError):
        psnr(np.zeros(3), np.zeros(4))
