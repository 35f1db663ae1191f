"""Inference backends (rlfn/backends/) and ONNX export (rlfn/backends/export.py), against eager fp32 on
the real Set5 x4 (MATLAB LR) with the official weights.

A backend whose package (onnxruntime, openvino, onnx: the ``[infer]`` extra) is missing skips
locally and fails under ``CI=true`` (``conftest.unavailable``); one that needs hardware this
machine lacks (a CUDA GPU, native bf16) skips everywhere."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from prereq import ROOT, require_module
from rlfn import backends
from rlfn.cli import main
from rlfn.evaluate import evaluate_folder
from rlfn.backends import BACKENDS, check_backend, make_engine
from rlfn.engine import EXACT_DB, BackendError, psnr_label
from rlfn.io import list_images, read_image
from rlfn.upscale import ModelUpscaler, to_tensor, to_uint8, upscale_array
from rlfn.weights import load_model

MODELS = ("rlfn_x4.pth", "rlfn_ntire_x4.pth")
# int8's calibration data (the library takes it from the caller): the embedded training sample
CALIBRATION = ROOT / "data" / "sample" / "train"

# The largest |Set5 x4 PSNR delta| (dB) against eager fp32 on the CPU that each lossy backend
# may show: a little above its measured loss, below what a real regression costs (an all-bf16
# RLFN, tail included, loses 0.004-0.013 dB). Measured with this test (-s prints DELTA lines);
# on a given machine they are deterministic (the same to 1e-5 dB at 1 and 2 threads):
#                      CPU (2-core x86-64, AVX512-BF16,      CUDA (H200, torch 2.11.0+cu130:
#                      torch 2.13.0, openvino 2026.4)        bench/results/*cuda_h200.txt)
#                      RLFN x4     challenge model           RLFN x4     challenge model
#   bf16               -0.00077    -0.00359                  +0.0001     -0.0001
#   compile_bf16       -0.00155    -0.00151                  -0.0006     -0.0055
#   openvino_bf16      -0.00355    -0.01126                  (CPU only)
#   fp16, cuda_graphs  (CUDA only)                           +0.0006     -0.0005
#   int8 (nncf 3.4.0)  -0.0171     +0.0157                   (CPU only; VNNI/AMX)
# int8's bounds stay within issue 15's goal (0.05 dB; B100: -0.0025 / -0.0098 dB, measured by
# bench/inference.py).
# (the CUDA challenge-model figures come from bench/inference.py, re-based from CUDA eager to
# CPU eager; not re-measured by this test for lack of a GPU when the bounds were set).
# Exact (fp32) backends: the library calls a backend exact within EXACT_DB (0.01 dB) of eager,
# but their measured noise on the CPU is below 1.4e-5 dB (fp32 reassociation, at most one grey
# level on a few pixels), so the test holds them to EXACT_TEST_DB, about 7x that noise and 100x
# tighter than the label: a real regression (a wrong layout, a dropped tail) shows. On CUDA
# (TF32 convolutions may be on; not re-measured here since no GPU was lent) the label's 0.01 dB.
EXACT_TEST_DB = {"cpu": 1e-4, "cuda": EXACT_DB}
LOSSY_DB: dict[tuple[str, str, str], float] = {
    # (model, backend, device): bound
    ("rlfn_x4.pth", "bf16", "cpu"): 0.0015,
    ("rlfn_x4.pth", "compile_bf16", "cpu"): 0.003,
    ("rlfn_x4.pth", "openvino_bf16", "cpu"): 0.005,
    ("rlfn_ntire_x4.pth", "bf16", "cpu"): 0.005,
    ("rlfn_ntire_x4.pth", "compile_bf16", "cpu"): 0.003,
    ("rlfn_ntire_x4.pth", "openvino_bf16", "cpu"): 0.015,
    ("rlfn_x4.pth", "int8", "cpu"): 0.03,
    ("rlfn_ntire_x4.pth", "int8", "cpu"): 0.03,
    ("rlfn_x4.pth", "bf16", "cuda"): 0.0015,
    ("rlfn_x4.pth", "compile_bf16", "cuda"): 0.0015,
    ("rlfn_x4.pth", "fp16", "cuda"): 0.002,
    ("rlfn_x4.pth", "cuda_graphs", "cuda"): 0.002,
    ("rlfn_ntire_x4.pth", "bf16", "cuda"): 0.0015,
    ("rlfn_ntire_x4.pth", "compile_bf16", "cuda"): 0.008,
    ("rlfn_ntire_x4.pth", "fp16", "cuda"): 0.002,
    ("rlfn_ntire_x4.pth", "cuda_graphs", "cuda"): 0.002,
    # issue 15's compiled fp16 backends: not yet measured on a GPU; the bound is the goal
    # (within 0.01 dB of eager), to be tightened to just above the loss bench/gpu_checks.sh
    # measures (fp16 itself: 0.001 dB).
    ("rlfn_x4.pth", "compile_graphs", "cuda"): 0.01,
    ("rlfn_x4.pth", "compile_fp16", "cuda"): 0.01,
    ("rlfn_ntire_x4.pth", "compile_graphs", "cuda"): 0.01,
    ("rlfn_ntire_x4.pth", "compile_fp16", "cuda"): 0.01,
}


def _set5(benchmarks):
    return benchmarks / "Set5" / "x4" / "HR", benchmarks / "Set5" / "x4" / "LR"


def _psnr(engine, benchmarks) -> float:
    hr, lr = _set5(benchmarks)
    rep = evaluate_folder(ModelUpscaler(engine), hr, lr)
    assert not rep.errors and len(rep.images) == 5
    return rep.mean["psnr_y"]


def _require_packages(backend: str) -> None:
    """The backend's Python packages: missing ones skip locally, fail under CI=true."""
    for module in BACKENDS[backend].requires:
        require_module(module)


@pytest.fixture(scope="module")
def eager_psnr(pretrained, benchmarks):
    cache: dict[str, float] = {}

    def get(fname: str) -> float:
        if fname not in cache:
            model = load_model(pretrained / fname).model
            cache[fname] = _psnr(make_engine(model, "eager", "cpu"), benchmarks)
        return cache[fname]

    return get


def test_every_lossy_case_has_a_bound():
    cases = {(m, b, d) for m in MODELS for b in BACKENDS if not BACKENDS[b].exact
             for d in BACKENDS[b].devices}
    assert cases == set(LOSSY_DB), cases ^ set(LOSSY_DB)
    assert all(LOSSY_DB[m, "int8", "cpu"] <= 0.05 for m in MODELS)  # issue 15's goal


@pytest.mark.parametrize("fname", MODELS)
@pytest.mark.parametrize("name, device", [(b, d) for b in BACKENDS for d in BACKENDS[b].devices])
def test_backend_psnr_delta_on_set5(fname, name, device, pretrained, benchmarks, eager_psnr):
    """Every backend's Set5 x4 PSNR, on every device it runs on, against eager fp32 on the CPU
    (the reference numbers): exact ones within EXACT_TEST_DB (1e-4 dB on the CPU), lossy ones
    within a bound just above their measured loss (LOSSY_DB)."""
    _require_packages(name)
    try:
        check_backend(name, device)
    except BackendError as e:  # no GPU here, or no native bf16 on this CPU: hardware
        pytest.skip(str(e))
    engine = make_engine(load_model(pretrained / fname).model, name, device,
                         calibration=CALIBRATION)
    delta = _psnr(engine, benchmarks) - eager_psnr(fname)
    print(f"\nDELTA {fname} {device} {name}: {delta:+.5f} dB -> {psnr_label(delta)}")
    if BACKENDS[name].exact:
        bound = EXACT_TEST_DB[device]
        assert abs(delta) <= bound, f"{name} promised exact, measured {delta:+.6f} dB"
    else:
        bound = LOSSY_DB[fname, name, device]
        assert abs(delta) <= bound, f"{name} on {device}: {delta:+.4f} dB, bound {bound}"


@pytest.mark.parametrize("fname", MODELS)
def test_eager_matches_the_official_reference(fname, eager_psnr, reference_metrics):
    """The baseline itself is the official number (so deltas are against the right thing)."""
    ref = reference_metrics["models"][fname]["Set5"]["psnr_y"]
    assert abs(eager_psnr(fname) - ref) < 1e-4, (eager_psnr(fname), ref)


def test_psnr_label():
    assert psnr_label(0.004) == "exact" and psnr_label(-0.01) == "exact"
    assert psnr_label(-0.0312) == "lossy (-0.031 dB)"


# --------------------------------------------------------------------------- the registry
HEAVY = ("onnx", "onnxruntime", "onnxscript", "openvino", "nncf", "rlfn.backends.export")
LOADS = """
import json, sys
import rlfn.train.validation, rlfn.upscale
training = sorted(m for m in sys.modules if m.startswith(("rlfn.backends", "rlfn.infer")))
import torch
from rlfn.backends import available_backends, backend_names, make_engine
from rlfn.models import build_model
names = backend_names()
available_backends("cpu")
make_engine(build_model("rlfn", scale=2), "channels_last", "cpu")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in %r[:5] or m in %r)
print(json.dumps({"training": training, "names": names, "heavy": heavy}))
""" % (HEAVY, HEAVY)


def test_training_loads_no_backend_and_the_registry_no_heavy_module():
    """Training (its validation, rlfn.upscale) loads none of rlfn.backends; listing and
    checking the backends and building a PyTorch engine load no ONNX/OpenVINO/NNCF package
    and not the exporter: those come with an engine that needs them."""
    r = subprocess.run([sys.executable, "-c", LOADS], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    assert got["training"] == [], got["training"]
    assert got["names"] == list(BACKENDS) and len(got["names"]) == 13
    assert got["heavy"] == [], got["heavy"]


# --------------------------------------------------------------------------- bad input
def test_unknown_backend():
    with pytest.raises(BackendError, match=r"unknown backend 'tensorrt'; known: eager"):
        check_backend("tensorrt", "cpu")


def test_backend_not_installed(monkeypatch):
    real = backends.importlib.util.find_spec
    monkeypatch.setattr(backends.importlib.util, "find_spec",
                        lambda m: None if m == "openvino" else real(m))
    with pytest.raises(BackendError, match=r"needs the Python package\(s\) openvino, not "
                                           r"installed \(pip install 'rlfn-pipeline\[infer\]'\)"):
        check_backend("openvino", "cpu")
    assert "openvino" not in backends.available_backends("cpu")


def test_cuda_only_backend_on_cpu():
    with pytest.raises(BackendError, match="runs on cuda only, not cpu"):
        check_backend("cuda_graphs", "cpu")


def test_gpu_asked_where_none(pretrained):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(BackendError, match="no CUDA GPU is available"):
        check_backend("eager", "cuda")


@pytest.mark.parametrize("argv, code, msg", [
    # exit 2: an option that cannot be used; exit 1: a weights file that does not fit (data)
    (["profile", "--backend", "tensorrt"], 2, "--backend tensorrt: unknown backend 'tensorrt'"),
    (["profile", "--backend", "fp16"], 2, "runs on cuda only"),
    (["profile", "--scale", "2", "--input-dir", "."], 1, "is a x4 model, but --scale 2"),
    (["export", "--scale", "2", "-o", "m.onnx"], 1, "is a x4 model, but --scale 2"),
    (["export", "--scale", "4", "-o", "m.txt"], 2, "must end in .onnx"),
    (["evaluate", "--backend", "nope", "--hr", "."], 2, "unknown backend 'nope'"),
    (["upscale", "--backend", "onnxruntime", "--tile", "64", "x.png", "-o", "out"], 2,
     "cannot run tiled"),
])
def test_cli_refusals_before_work(argv, code, msg, pretrained, capsys, tmp_path, monkeypatch):
    if argv[0] == "export" or "onnxruntime" in argv:  # export checks ONNX Runtime first
        _require_packages("onnxruntime")
    monkeypatch.chdir(tmp_path)
    argv = list(argv)
    if "--scale" not in argv:
        argv += ["--scale", "4"]
    rc = main([argv[0], "--model", str(pretrained / "rlfn_ntire_x4.pth"), *argv[1:]])
    err = capsys.readouterr().err
    assert rc == code and msg in err, (rc, err)
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
    assert not list(tmp_path.iterdir())  # nothing written


# --------------------------------------------------------------------------- tiling
def test_tiles_through_an_engine_match_untiled(pretrained, benchmarks):
    """channels_last keeps ESA's whole-image grid, so tiles stay within a grey level."""
    engine = make_engine(load_model(pretrained / "rlfn_ntire_x4.pth").model, "channels_last")
    lr, _ = read_image(sorted(list_images([_set5(benchmarks)[1]]))[0])
    whole = upscale_array(engine, lr)
    tiled = upscale_array(engine, lr, tile=96, overlap=32)  # 128x128: 2x2 tiles
    assert np.abs(whole.astype(int) - tiled).max() <= 1


def test_engines_without_grid_refuse_tiles(pretrained):
    _require_packages("onnxruntime")
    engine = make_engine(load_model(pretrained / "rlfn_ntire_x4.pth").model, "onnxruntime")
    lr = np.zeros((100, 100, 3), np.uint8)
    with pytest.raises(ValueError, match="cannot run tiled"):
        upscale_array(engine, lr, tile=60, overlap=12)


def test_eager_wrapping_does_not_touch_a_training_model():
    """ModelUpscaler(model) must not switch modes or grads of a model that is being trained."""
    from rlfn.models import build_model

    m = build_model("rlfn_ntire", 4).train()
    ModelUpscaler(m)(np.zeros((20, 20, 3), np.uint8))
    assert m.training and all(p.requires_grad for p in m.parameters())


# --------------------------------------------------------------------------- ONNX export
@pytest.fixture(scope="module")
def exported(pretrained, tmp_path_factory):
    _require_packages("onnxruntime")  # export: onnx, onnxscript; checked in onnxruntime
    out = tmp_path_factory.mktemp("onnx") / "rlfn_x4.onnx"
    rc = main(["export", "--model", str(pretrained / "rlfn_x4.pth"), "--scale", "4",
               "-o", str(out)])
    assert rc == 0 and out.exists()
    return out


def test_onnx_file_has_dynamic_height_width_and_metadata(exported):
    m = require_module("onnx").load(str(exported))
    (inp,), (out,) = m.graph.input, m.graph.output
    assert out.name == "sr" and inp.name == "lr"
    dims = inp.type.tensor_type.shape.dim
    assert dims[1].dim_value == 3
    assert dims[2].dim_param and dims[3].dim_param and dims[2].dim_param != dims[3].dim_param
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["rlfn.scale"] == "4" and meta["rlfn.model"] == "rlfn"
    assert not list(exported.parent.glob("*.tmp"))  # written atomically, no leftovers


def test_onnx_output_equals_pytorch_on_set5(exported, pretrained, benchmarks):
    """The exported model's SR images equal PyTorch's within 1 grey level on every Set5 image
    (each a different size: one file serves them all)."""
    ort = require_module("onnxruntime")
    model = load_model(pretrained / "rlfn_x4.pth").model.eval()
    sess = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    shapes = set()
    for f in list_images([_set5(benchmarks)[1]]):
        lr, _ = read_image(f)
        x = to_tensor(lr)
        with torch.inference_mode():
            ref = to_uint8(model(x))
        out = to_uint8(torch.from_numpy(sess.run(None, {"lr": x.numpy()})[0]))
        assert out.shape == ref.shape == (lr.shape[0] * 4, lr.shape[1] * 4, 3)
        assert np.abs(out.astype(int) - ref).max() <= 1, f.name
        shapes.add(lr.shape)
    assert len(shapes) >= 3


def test_profile_json_names_backend_and_units(pretrained, shared, tmp_path):
    _require_packages("openvino")
    out = tmp_path / "p.json"
    rc = main(["profile", "--model", str(pretrained / "rlfn_ntire_x4.pth"), "--scale", "4",
               "--input-dir", str(shared / "data" / "div2k_test_lr_x4"), "--max-images", "2",
               "--warmup", "1", "--backend", "openvino", "--json", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["backend"] == "openvino" and d["exact"] is True
    assert (d["params"], round(d["flops"] / 1e9, 2), round(d["activations"] / 1e6, 2)) == (
        317_218, 19.70, 80.05)
    assert d["runtime"]["timer"] == "perf_counter" and d["runtime"]["unit"] == "ms"
    assert d["memory"]["peak_rss"] > 0 and d["memory"]["peak_rss_scope"] in (
        "timed runs", "process lifetime")
