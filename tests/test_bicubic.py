"""MATLAB-exact bicubic, judged against the MATLAB-made LR files in ../shared (not our output)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prereq import SHARED
from rlfn.bicubic import contributions, downscale, imresize, imresize_array, modcrop, output_size

LR_FILES = sorted((SHARED / "data" / "benchmarks").glob("*/x*/LR/*.png"))


def _pairs():
    if not LR_FILES:  # keep one case so the fixture can skip (or fail under CI)
        return [pytest.param(None, id="shared-missing")]
    return [pytest.param(p, id=f"{p.parts[-4]}-{p.parts[-3]}-{p.stem}") for p in LR_FILES]


def _load(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(params=["native", "numpy"])
def path(request, monkeypatch):
    """Each exact CPU path in turn: the compiled one (rlfn.bicubic_native, where it builds) and
    the NumPy/torch one it falls back to (no compiler, RLFN_NATIVE=0)."""
    from rlfn import bicubic_native

    if request.param == "native":
        if not bicubic_native.available():
            reason = f"compiled bicubic not available: {bicubic_native.why_not()}"
            if os.environ.get("CI") == "true":
                pytest.fail(reason)
            pytest.skip(reason)
        calls = []
        real = bicubic_native.resize_hwk
        monkeypatch.setattr(bicubic_native, "resize_hwk",
                            lambda *a, **k: calls.append(1) or real(*a, **k))
        yield calls
        assert calls, "the compiled path was not taken"
    else:
        monkeypatch.setattr(bicubic_native, "available", lambda: False)
        yield []


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
    x = torch.from_numpy(hr.copy()).permute(2, 0, 1).double()
    one_rounding = imresize(x, scale=1 / 4).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    assert (one_rounding != _load(lr_path)).mean() > 0.01


@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 1 / 4, 2, 3, 4, 0.6, 1.7])
def test_fast_path_equals_float64_reference(scale, path):
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


def _tie_prone_images(g: np.random.Generator, h: int, w: int, c: int) -> list[np.ndarray]:
    noise = g.integers(0, 256, (h, w, c), dtype=np.uint8)
    binary = (g.integers(0, 2, (h, w, c)) * 255).astype(np.uint8)
    blocks = np.repeat(np.repeat(g.integers(0, 256, (h // 3 + 1, w // 3 + 1, c)), 3, 0), 3, 1)
    stripes = np.broadcast_to((np.arange(w) % 2 * 255)[None, :, None], (h, w, c))
    return [noise, binary, blocks[:h, :w].astype(np.uint8), np.ascontiguousarray(stripes, np.uint8)]


@pytest.mark.parametrize("s", [2, 3, 4])
@pytest.mark.parametrize("hw", [(37, 53), (53, 37), (64, 48), (9, 130)])
def test_integer_factor_fast_path_equals_float64_reference(s, hw, path):
    """The blocked-GEMM path for integer factors (numpy entry and tensor entry, any layout)
    equals the plain float64 tap loop, on odd sizes, both orientations, tie-prone inputs."""
    from rlfn import bicubic

    g = np.random.default_rng(s * 1000 + hw[0])
    for c in (1, 3):
        for img in _tie_prone_images(g, *hw, c):
            t = torch.from_numpy(img).permute(2, 0, 1)  # channels-last CHW view
            plans = bicubic._fast_plans(*img.shape, output_size(hw, 1 / s), (1 / s, 1 / s), True)
            assert plans is not None or min(hw) < 8 * s  # tiny: every sample clamped (numpy)
            ref = imresize(t, scale=1 / s, reference=True)
            assert torch.equal(imresize(t, scale=1 / s), ref)
            assert torch.equal(imresize(t.contiguous(), scale=1 / s), ref)  # planar CHW
            arr = imresize_array(img if c == 3 else img[:, :, 0], 1 / s)
            assert np.array_equal(arr if c == 3 else arr[:, :, None], ref.permute(1, 2, 0).numpy())
    batch = torch.from_numpy(g.integers(0, 256, (2, 2, *hw), dtype=np.uint8))  # K = 4
    assert torch.equal(imresize(batch, scale=1 / s), imresize(batch, scale=1 / s, reference=True))


def test_fast_path_row_bands_in_threads_equal_reference(monkeypatch):
    """NumPy path: big images run as horizontal bands of output rows, in parallel threads."""
    from rlfn import bicubic, bicubic_native

    monkeypatch.setattr(bicubic_native, "available", lambda: False)
    monkeypatch.setattr(bicubic, "_BAND_ELEMS", 1 << 14)  # bands of 16 output rows here
    bands = []
    real = bicubic._downscale_band
    monkeypatch.setattr(bicubic, "_downscale_band", lambda *a: bands.append(a[2:4]) or real(*a))
    g = np.random.default_rng(7)
    img = g.integers(0, 256, (1037, 301, 3), dtype=np.uint8)
    img[::7] = 255  # some flat rows: ties
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # 3 threads, 33 bands at x2 (519 output rows), 17 at x4
        for s in (2, 4):
            ref = imresize(torch.from_numpy(img).permute(2, 0, 1), scale=1 / s, reference=True)
            assert np.array_equal(imresize_array(img, 1 / s), ref.permute(1, 2, 0).numpy())
    finally:
        torch.set_num_threads(prev)
    assert len(bands) == 33 + 17 and (0, 16) in bands and (512, 519) in bands


def test_fast_path_only_for_integer_factors(monkeypatch):
    from rlfn import bicubic, bicubic_native

    monkeypatch.setattr(bicubic_native, "available", lambda: False)  # the NumPy path's own rule
    calls = []
    real = bicubic._downscale_periodic
    monkeypatch.setattr(bicubic, "_downscale_periodic", lambda *a: calls.append(1) or real(*a))
    x = torch.randint(0, 256, (1, 3, 40, 30), dtype=torch.uint8)
    for kwargs in (dict(scale=0.6), dict(scale=2), dict(size=(20, 10)), dict(size=(13, 15))):
        assert torch.equal(imresize(x, **kwargs), imresize(x, **kwargs, reference=True))
    assert not calls  # non-integer, upscale, width-first (MATLAB order), non-divisible sizes
    imresize(x, scale=1 / 2)
    assert calls == [1]
    prev = torch.get_float32_matmul_precision()
    try:  # training code may allow reduced-precision float32 matmuls: the fast path's GEMMs
        torch.set_float32_matmul_precision("medium")  # are numpy's, unaffected, still exact
        assert torch.equal(imresize(x, scale=1 / 2), imresize(x, scale=1 / 2, reference=True))
    finally:
        torch.set_float32_matmul_precision(prev)
    assert calls == [1, 1]


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


@pytest.mark.parametrize("s", [2, 4])
def test_native_matches_matlab_on_a_many_plane_batch(benchmarks, s, path):
    """An NCHW batch of more planes than the few-channel case: plane by plane over threads."""
    hrs = [_load(p) for p in sorted((benchmarks / "Set14" / f"x{s}" / "HR").glob("*.png"))[:4]]
    crops = np.stack([modcrop(h, s)[:96, :128] for h in hrs if h.ndim == 3])
    batch = torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()  # (n, 3, 96, 128)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = imresize(batch, scale=1 / s)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(got, imresize(batch, scale=1 / s, reference=True))


def test_native_row_bands_run_on_the_one_imresize_pool(monkeypatch):
    """Compiled path: a big image's passes run in bands of output rows over threads, on the
    same pool as the NumPy path's bands and the batch's planes (one pool per process)."""
    import threading

    from rlfn import bicubic_native

    if not bicubic_native.available():
        pytest.skip(f"compiled bicubic not available: {bicubic_native.why_not()}")
    monkeypatch.setattr(bicubic_native, "BAND_MIN_VALUES", 1 << 12)
    names = []
    real = bicubic_native._lib.rlfn_bicubic_pass

    class Spy:  # records which thread ran each band
        def __call__(self, *a):
            names.append(threading.current_thread().name)
            return real(*a)

    monkeypatch.setattr(bicubic_native, "_lib", type("L", (), {"rlfn_bicubic_pass": Spy()})())
    img = np.random.default_rng(3).integers(0, 256, (517, 203, 3), dtype=np.uint8)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        for s in (2, 4):
            ref = imresize(torch.from_numpy(img).permute(2, 0, 1), scale=1 / s, reference=True)
            assert np.array_equal(imresize_array(img, 1 / s), ref.permute(1, 2, 0).numpy())
    finally:
        torch.set_num_threads(prev)
    assert len(names) == 4 * 3 and all(n.startswith("imresize") for n in names), names


def _native_in_subprocess(tmp_path, **env) -> list[str]:
    code = ("import numpy as np\n"
            "from rlfn import bicubic_native as n\n"
            "from rlfn.bicubic import imresize_array\n"
            "import torch\n"
            "img = np.random.default_rng(0).integers(0, 256, (41, 37, 3), dtype=np.uint8)\n"
            "ref = torch.from_numpy(img).permute(2, 0, 1)\n"
            "from rlfn.bicubic import imresize\n"
            "ref = imresize(ref, scale=0.5, reference=True).permute(1, 2, 0).numpy()\n"
            "print(n.available(), np.array_equal(imresize_array(img, 0.5), ref))\n"
            "print(n.why_not())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1],
                       env={**os.environ, "RLFN_CACHE_DIR": str(tmp_path), **env}, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_native_build_is_atomic_and_falls_back_cleanly(tmp_path):
    """Two processes building the library at once into an empty cache both load a whole one;
    a broken compiler or RLFN_NATIVE=0 leaves the NumPy path, with the same exact result."""
    from rlfn import bicubic_native

    if bicubic_native._compiler() is None:
        pytest.skip("no C compiler here")
    code = "from rlfn import bicubic_native as n; print(n.available(), n.why_not())"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1],
                              env={**os.environ, "RLFN_CACHE_DIR": str(tmp_path / "a")})
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert outs == ["True None", "True None"], outs
    built = list((tmp_path / "a" / "native").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so", built  # no temporary left behind
    assert _native_in_subprocess(tmp_path / "a") == ["True True", "None"]
    out = _native_in_subprocess(tmp_path / "b", CC="false")  # a compiler that always fails
    assert out[0] == "False True" and "false failed on" in out[1], out
    assert not list((tmp_path / "b" / "native").glob("*.so"))
    out = _native_in_subprocess(tmp_path / "c", RLFN_NATIVE="0")
    assert out == ["False True", "turned off by RLFN_NATIVE"], out
