"""Official RLFN weights through our model, bicubic and metrics reproduce the reference table
(../shared/data/reference_metrics.json, measured with the official code): every row within
0.01 dB PSNR and 0.0005 SSIM. MATLAB bicubic upscaling rows within 0.01 dB."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SHARED
from rlfn.evaluate import evaluate_folder
from rlfn.upscale import BicubicUpscaler, ModelUpscaler
from rlfn.weights import load_model

PSNR_TOL = 0.01
SSIM_TOL = 0.0005


def _reference() -> dict:
    path = SHARED / "data" / "reference_metrics.json"
    return json.loads(path.read_text()) if path.exists() else {"models": {}, "bicubic_psnr_y": {}}


def _model_rows():
    rows = [pytest.param(f, s, r, id=f"{f}-{s}")
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
    assert abs(m["psnr_y"] - ref["psnr_y"]) <= PSNR_TOL, (m, ref)
    assert abs(m["ssim_y"] - ref["ssim_y"]) <= SSIM_TOL, (m, ref)


@pytest.mark.parametrize("bench, scale, ref_psnr", _bicubic_rows())
def test_matlab_bicubic_upscaling_reference(benchmarks, bench, scale, ref_psnr):
    root = benchmarks / bench / f"x{scale}"
    report = evaluate_folder(BicubicUpscaler(scale), root / "HR", root / "LR")
    assert report.errors == []
    assert abs(report.mean["psnr_y"] - ref_psnr) <= PSNR_TOL, (report.mean, ref_psnr)


def test_own_bicubic_lr_gives_the_same_scores_as_matlab_lr(benchmarks, _models):
    """Without --lr, evaluate makes the LR itself; since our bicubic is exact, the score is the
    reference score."""
    loaded = _models("rlfn_x4.pth")
    hr = benchmarks / "Set5" / "x4" / "HR"
    ours = evaluate_folder(ModelUpscaler(loaded.model), hr).mean
    matlab = evaluate_folder(ModelUpscaler(loaded.model), hr, hr.parent / "LR").mean
    assert ours == matlab
