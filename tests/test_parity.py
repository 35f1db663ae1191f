"""Official RLFN weights through our model, bicubic and metrics reproduce the reference table
(../shared/data/reference_metrics.json, measured with the official code) to the decimals it
prints: PSNR to its 4 decimals, SSIM to its 5, MATLAB bicubic upscaling PSNR to its 4."""

from __future__ import annotations

import json

import pytest
import torch

from prereq import SHARED
from rlfn.evaluate import evaluate_folder
from rlfn.upscale import BicubicUpscaler, ModelUpscaler
from rlfn.weights import load_model

# The reference is rounded: a value that agrees to the printed decimals is within half a unit
# of the last one. Measured here (2-core x86-64, torch 2.13.0), every one of the 21 rows does:
# the largest |difference| is 4.75e-5 dB PSNR (rlfn_ntire_x4 Set5), 4.98e-6 SSIM
# (rlfn_s_x2 Set14) and 4.88e-5 dB for bicubic (Set14 x3) -- so some sit right at the edge.
# Model rows also allow fp32 summation-order noise (another CPU or oneDNN kernel): running the
# same weights through channels_last / ONNX Runtime / OpenVINO moved Set5/Set14 scores by up to
# 1.4e-5 dB and 2.4e-7 SSIM. Bicubic rows: float64 rounded to uint8 after each pass (it
# reproduces MATLAB's own files pixel for pixel), no noise to allow for.
ROUND_PSNR = 0.5e-4  # half a unit of the 4th decimal
ROUND_SSIM = 0.5e-5  # half a unit of the 5th decimal
PSNR_TOL = ROUND_PSNR + 2e-5
SSIM_TOL = ROUND_SSIM + 5e-7
BICUBIC_PSNR_TOL = ROUND_PSNR + 1e-9  # (+ float repr of the two decimals)


def _reference() -> dict:
    path = SHARED / "data" / "reference_metrics.json"
    return json.loads(path.read_text()) if path.exists() else {"models": {}, "bicubic_psnr_y": {}}


# x2 on BSD100 (100 images at 240x160 LR, about 100 s of the CI's 2 cores for both models) runs
# with the slow checks (`pytest -m slow`); the x2 models' parity stays in CI on Set5 and Set14,
# and BSD100's on the x4 models.
SLOW_ROWS = {("rlfn_x2.pth", "BSD100"), ("rlfn_s_x2.pth", "BSD100")}


def _model_rows():
    rows = [pytest.param(f, s, r, id=f"{f}-{s}",
                         marks=[pytest.mark.slow] if (f, s) in SLOW_ROWS else [])
            for f, sets in _reference()["models"].items() for s, r in sets.items()]
    return rows or [pytest.param(None, None, None, id="shared-missing")]


def _bicubic_rows():
    rows = [pytest.param(s, int(x[1:]), v, id=f"bicubic-{s}-{x}")
            for s, scales in _reference()["bicubic_psnr_y"].items() for x, v in scales.items()]
    return rows or [pytest.param(None, None, None, id="shared-missing")]


@pytest.fixture(scope="module")
def _models(pretrained):
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cache = {}

    def get(fname):
        if fname not in cache:
            cache[fname] = load_model(pretrained / fname)
        return cache[fname]

    return get


@pytest.mark.parametrize("fname, bench, ref", _model_rows())
def test_official_weights_reproduce_reference(benchmarks, _models, fname, bench, ref):
    loaded = _models(fname)
    scale = ref["scale"]
    root = benchmarks / bench / f"x{scale}"
    report = evaluate_folder(ModelUpscaler(loaded.model), root / "HR", root / "LR")
    assert report.errors == []
    assert len(report.images) == ref["images"]
    m = report.mean
    print(f"\nPARITY {fname} {bench}: psnr {m['psnr_y']:.7f} vs {ref['psnr_y']} "
          f"({m['psnr_y'] - ref['psnr_y']:+.2e}), ssim {m['ssim_y']:.8f} vs {ref['ssim_y']} "
          f"({m['ssim_y'] - ref['ssim_y']:+.2e})")
    assert abs(m["psnr_y"] - ref["psnr_y"]) <= PSNR_TOL, (m, ref)
    assert abs(m["ssim_y"] - ref["ssim_y"]) <= SSIM_TOL, (m, ref)


@pytest.mark.parametrize("bench, scale, ref_psnr", _bicubic_rows())
def test_matlab_bicubic_upscaling_reference(benchmarks, bench, scale, ref_psnr):
    root = benchmarks / bench / f"x{scale}"
    report = evaluate_folder(BicubicUpscaler(scale), root / "HR", root / "LR")
    assert report.errors == []
    got = report.mean["psnr_y"]
    print(f"\nPARITY bicubic {bench} x{scale}: psnr {got:.7f} vs {ref_psnr} "
          f"({got - ref_psnr:+.2e})")
    assert abs(got - ref_psnr) <= BICUBIC_PSNR_TOL, (report.mean, ref_psnr)


def test_own_bicubic_lr_gives_the_same_scores_as_matlab_lr(benchmarks, _models):
    """Without --lr, evaluate makes the LR itself; since our bicubic is exact, the score is the
    reference score."""
    loaded = _models("rlfn_x4.pth")
    hr = benchmarks / "Set5" / "x4" / "HR"
    ours = evaluate_folder(ModelUpscaler(loaded.model), hr).mean
    matlab = evaluate_folder(ModelUpscaler(loaded.model), hr, hr.parent / "LR").mean
    assert ours == matlab
