"""MATLAB-exact bicubic, judged against the MATLAB-made LR files in ../shared (not our output)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED
from rlfn.bicubic import contributions, downscale, imresize, imresize_array, modcrop, output_size

LR_FILES = sorted((SHARED / "data" / "benchmarks").glob("*/x*/LR/*.png"))


def _pairs():
    if not LR_FILES:  # keep one case so the fixture can skip (or fail under CI)
        return [pytest.param(None, id="shared-missing")]
    return [pytest.param(p, id=f"{p.parts[-4]}-{p.parts[-3]}-{p.stem}") for p in LR_FILES]


def _load(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_all_257_reference_files_are_present(benchmarks):
    assert len(LR_FILES) == 257


@pytest.mark.parametrize("lr_path", _pairs())
def test_matches_matlab_lr_bit_exactly(benchmarks, lr_path):
    hr = _load(lr_path.parent.parent / "HR" / lr_path.name)
    ref = _load(lr_path)
    scale = int(lr_path.parent.parent.name[1:])
    ours = downscale(hr, scale)
    assert ours.shape == ref.shape
    diff = int((ours.astype(int) != ref.astype(int)).sum())
    assert diff == 0, f"{lr_path}: {diff} of {ref.size} values differ from MATLAB"


def test_batched_nchw_matches_single_images(benchmarks):
    files = sorted((benchmarks / "Set5" / "x4" / "HR").glob("*.png"))
    crops = [np.asarray(Image.open(f).convert("RGB"))[:200, :200] for f in files]
    batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    out = imresize(batch, scale=1 / 4)
    assert out.shape == (5, 3, 50, 50) and out.dtype == torch.uint8
    for i, c in enumerate(crops):
        assert np.array_equal(out[i].permute(1, 2, 0).numpy(), imresize_array(c, 1 / 4))


def test_single_rounding_float_pipeline_misses_matlab(benchmarks):
    """Guard that the reference files discriminate: rounding once at the end (the float
    pipelines of bicubic-pytorch / resize-right) must NOT reproduce them."""
    lr_path = benchmarks / "Set5" / "x4" / "LR" / "img_001.png"
    hr = _load(benchmarks / "Set5" / "x4" / "HR" / "img_001.png")
    x = torch.from_numpy(hr).permute(2, 0, 1).double()
    one_rounding = imresize(x, scale=1 / 4).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    assert (one_rounding != _load(lr_path)).mean() > 0.01


@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 1 / 4, 2, 3, 4, 0.6, 1.7])
def test_fast_path_equals_float64_reference(scale):
    """The float32 + exact-fix-up path equals the plain float64 tap loop on inputs built to
    land on rounding ties (flat areas, steps, stripes) and on random noise."""
    g = torch.Generator().manual_seed(0)
    h, w = 47, 61
    noise = torch.randint(0, 256, (2, 3, h, w), generator=g, dtype=torch.uint8)
    steps = torch.zeros(1, 3, h, w, dtype=torch.uint8)
    steps[..., :, w // 2:] = 255
    steps[..., h // 3:, :] = 1
    stripes = (torch.arange(w) % 2 * 255).to(torch.uint8).expand(1, 3, h, w).contiguous()
    flat = torch.full((1, 3, h, w), 127, dtype=torch.uint8)
    x = torch.cat([noise, steps, stripes, flat])
    fast = imresize(x, scale=scale)
    ref = imresize(x, scale=scale, reference=True)
    assert fast.shape == ref.shape == (5, 3, *output_size((h, w), scale))
    assert torch.equal(fast, ref)


def test_float_input_keeps_dtype_and_matches_uint8_path_before_rounding():
    x = torch.randint(0, 256, (1, 3, 32, 40), dtype=torch.uint8)
    f = imresize(x.double(), scale=1 / 2)
    assert f.dtype == torch.float64
    # a single pass (height only): rounding the float result equals the uint8 path
    one_pass = imresize(x[..., :, :1].double(), size=(16, 1))
    assert torch.equal(one_pass.add(0.5).floor().clamp(0, 255).byte(),
                       imresize(x[..., :, :1], size=(16, 1)))
    assert imresize(x.float(), scale=2).dtype == torch.float32


def test_exact_under_autocast():
    """Training runs under bf16 autocast; the bicubic negative must stay exact float math."""
    x = torch.rand(2, 3, 12, 10) * 255
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = imresize(x, scale=4)
    assert y.dtype == torch.float32
    assert torch.equal(y, imresize(x, scale=4))


def test_upscale_shape_and_constant_image():
    x = torch.full((1, 3, 10, 12), 200, dtype=torch.uint8)
    y = imresize(x, scale=4)
    assert y.shape == (1, 3, 40, 48)
    assert (y == 200).all()  # weights sum to one: a flat image stays flat


def test_hw_and_chw_layouts():
    x = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8)
    assert torch.equal(imresize(x, scale=0.5), imresize(x[None], scale=0.5)[0])
    assert torch.equal(imresize(x[0], scale=0.5), imresize(x, scale=0.5)[0])


def test_contributions_sum_to_one_and_are_clamped():
    w, idx = contributions(20, 5, 0.25, True)
    assert np.allclose(w.sum(axis=1), 1.0)
    assert idx.min() == 0 and idx.max() == 19  # clamped, not mirrored out of range


def test_modcrop():
    a = np.zeros((103, 98, 3), np.uint8)
    assert modcrop(a, 4).shape == (100, 96, 3)
    assert modcrop(torch.zeros(1, 3, 103, 98), 3).shape == (1, 3, 102, 96)
    with pytest.raises(ValueError):
        modcrop(a, 0)


@pytest.mark.parametrize("kwargs, err", [
    (dict(), ValueError),
    (dict(scale=0.5, size=(2, 2)), ValueError),
    (dict(scale=-1), ValueError),
    (dict(size=(0, 4)), ValueError),
])
def test_bad_arguments(kwargs, err):
    with pytest.raises(err):
        imresize(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), **kwargs)


def test_bad_dtype():
    with pytest.raises(TypeError):
        imresize(torch.zeros(1, 3, 8, 8, dtype=torch.int32), scale=0.5)
    with pytest.raises(TypeError):
        imresize(np.zeros((8, 8), np.uint8), scale=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_matches_cpu(benchmarks):
    hr = _load(benchmarks / "Set5" / "x4" / "HR" / "img_002.png")
    x = torch.from_numpy(hr).permute(2, 0, 1)[None].contiguous()
    assert torch.equal(imresize(x.cuda(), scale=1 / 4).cpu(), imresize(x, scale=1 / 4))
