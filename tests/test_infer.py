"""Inference backends (rlfn/infer.py) and ONNX export (rlfn/export.py), against eager fp32 on
the real Set5 x4 (MATLAB LR) with the official weights."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rlfn import infer
from rlfn.cli import main
from rlfn.evaluate import evaluate_folder
from rlfn.infer import BACKENDS, EXACT_DB, BackendError, check_backend, make_engine, psnr_label
from rlfn.io import list_images, read_image
from rlfn.upscale import ModelUpscaler, to_tensor, to_uint8, upscale_array
from rlfn.weights import load_model


def _set5(benchmarks):
    return benchmarks / "Set5" / "x4" / "HR", benchmarks / "Set5" / "x4" / "LR"


def _psnr(engine, benchmarks) -> float:
    hr, lr = _set5(benchmarks)
    rep = evaluate_folder(ModelUpscaler(engine), hr, lr)
    assert not rep.errors and len(rep.images) == 5
    return rep.mean["psnr_y"]


@pytest.fixture(scope="module")
def eager_psnr(pretrained, benchmarks, reference_metrics) -> float:
    model = load_model(pretrained / "rlfn_x4.pth").model
    return _psnr(make_engine(model, "eager", "cpu"), benchmarks)


@pytest.mark.parametrize("name, device", [(b, d) for b in BACKENDS for d in BACKENDS[b].devices])
def test_backend_psnr_delta_on_set5(name, device, pretrained, benchmarks, eager_psnr):
    """Every backend's Set5 x4 PSNR, on every device it runs on, against eager fp32 on the CPU
    (the reference numbers): exact ones within 0.01 dB, lossy ones reported with their loss
    (and not absurd)."""
    try:
        check_backend(name, device)
    except BackendError as e:  # no GPU here, or no native bf16 on this CPU
        pytest.skip(str(e))
    engine = make_engine(load_model(pretrained / "rlfn_x4.pth").model, name, device)
    delta = _psnr(engine, benchmarks) - eager_psnr
    print(f"{device} {name}: {delta:+.4f} dB -> {psnr_label(delta)}")
    if BACKENDS[name].exact:
        assert abs(delta) <= EXACT_DB, f"{name} promised exact, measured {delta:+.4f} dB"
    else:
        assert -1.0 < delta < EXACT_DB + 0.05, f"{name}: {delta:+.4f} dB"


def test_eager_matches_the_official_reference(eager_psnr, reference_metrics):
    """The baseline itself is the official number (so deltas are against the right thing)."""
    ref = reference_metrics["models"]["rlfn_x4.pth"]["Set5"]["psnr_y"]
    assert abs(eager_psnr - ref) < 1e-4, (eager_psnr, ref)


def test_psnr_label():
    assert psnr_label(0.004) == "exact" and psnr_label(-0.01) == "exact"
    assert psnr_label(-0.0312) == "lossy (-0.031 dB)"


# --------------------------------------------------------------------------- bad input
def test_unknown_backend():
    with pytest.raises(BackendError, match=r"unknown backend 'tensorrt'; known: eager"):
        check_backend("tensorrt", "cpu")


def test_backend_not_installed(monkeypatch):
    real = infer.importlib.util.find_spec
    monkeypatch.setattr(infer.importlib.util, "find_spec",
                        lambda m: None if m == "openvino" else real(m))
    with pytest.raises(BackendError, match=r"needs the Python package\(s\) openvino, not "
                                           r"installed \(pip install 'rlfn-pipeline\[infer\]'\)"):
        check_backend("openvino", "cpu")
    assert "openvino" not in infer.available_backends("cpu")


def test_cuda_only_backend_on_cpu():
    with pytest.raises(BackendError, match="runs on cuda only, not cpu"):
        check_backend("cuda_graphs", "cpu")


def test_gpu_asked_where_none(pretrained):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(BackendError, match="no CUDA GPU is available"):
        check_backend("eager", "cuda")


@pytest.mark.parametrize("argv, msg", [
    (["profile", "--backend", "tensorrt"], "--backend tensorrt: unknown backend 'tensorrt'"),
    (["profile", "--backend", "fp16"], "runs on cuda only"),
    (["profile", "--scale", "2"], "is a x4 model, but --scale 2"),
    (["export", "--scale", "2", "-o", "m.onnx"], "is a x4 model, but --scale 2"),
    (["export", "--scale", "4", "-o", "m.txt"], "must end in .onnx"),
    (["evaluate", "--backend", "nope", "--hr", "."], "unknown backend 'nope'"),
    (["upscale", "--backend", "onnxruntime", "--tile", "64", "x.png", "-o", "out"],
     "cannot run tiled"),
])
def test_cli_refusals_before_work(argv, msg, pretrained, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = list(argv)
    if "--scale" not in argv:
        argv += ["--scale", "4"]
    rc = main([argv[0], "--model", str(pretrained / "rlfn_ntire_x4.pth"), *argv[1:]])
    err = capsys.readouterr().err
    assert rc == 1 and msg in err, err
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
    out = tmp_path_factory.mktemp("onnx") / "rlfn_x4.onnx"
    rc = main(["export", "--model", str(pretrained / "rlfn_x4.pth"), "--scale", "4",
               "-o", str(out)])
    assert rc == 0 and out.exists()
    return out


def test_onnx_file_has_dynamic_height_width_and_metadata(exported):
    m = onnx.load(str(exported))
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
