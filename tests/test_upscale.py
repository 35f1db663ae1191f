"""rlfn/upscale.py: the array <-> tensor conversions every upscaler goes through."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from rlfn.models import build_model
from rlfn.upscale import to_tensor, upscale_array


def _image(h: int = 20, w: int = 24) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_a_read_only_image_converts_without_a_warning_and_unchanged():
    """``np.asarray(Image.open(...))`` gives a read-only array; torch warns when it shares
    one. The conversion copies it instead: no warning, the same tensor as a writable copy."""
    img = _image()
    ro = img.copy()
    ro.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        t = to_tensor(ro)
        torch.manual_seed(0)
        sr = upscale_array(build_model("rlfn_ntire", 4).eval(), ro)
    assert torch.equal(t, to_tensor(img)) and t.dtype == torch.float32
    assert t.shape == (1, 3, 20, 24)
    assert not ro.flags.writeable and np.array_equal(ro, img)  # the caller's array untouched
    torch.manual_seed(0)
    assert np.array_equal(sr, upscale_array(build_model("rlfn_ntire", 4).eval(), img))
