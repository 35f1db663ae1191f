"""The int8 backend's model (rlfn/backends/int8.py): calibration data (always the caller's: none given
is an error, never a guess), the cache keyed by the weights' sha256, atomic writes,
``rlfn export --int8``, and one-line errors for bad or missing calibration input.
Its Set5 PSNR delta against eager fp32 is asserted in tests/test_infer.py
(``test_backend_psnr_delta_on_set5``, bound ``LOSSY_DB[..., "int8", "cpu"]`` <= 0.05 dB)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prereq import ROOT, require_module
from rlfn.backends import int8 as quant
from rlfn.cli import main
from rlfn.errors import ConfigError
from rlfn.backends import make_engine
from rlfn.engine import BackendError
from rlfn.models.rlfn import RLFN, RLFNConfig
from rlfn.backends.int8 import QuantError, calibration_crops, calibration_source, int8_model

TRAIN = ROOT / "data" / "sample" / "train"


def _tiny(seed: int = 0) -> RLFN:
    torch.manual_seed(seed)
    return RLFN(RLFNConfig(feature_channels=8, mid_channels=8, esa_channels=4, num_blocks=2)).eval()


@pytest.fixture
def int8_ready():
    for m in ("openvino", "nncf", "onnx", "onnxscript"):
        require_module(m)


def test_calibration_crops_are_training_lr_crops():
    crops = calibration_crops(4, TRAIN, crops=6, size=32, seed=0)
    assert len(crops) == 6 and all(c.shape == (1, 3, 32, 32) and c.dtype == np.float32
                                   for c in crops)
    assert 0 <= min(c.min() for c in crops) and max(c.max() for c in crops) <= 255
    again = calibration_crops(4, TRAIN, crops=6, size=32, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(crops, again))  # deterministic


def test_calibration_from_a_patch_store(tmp_path):
    from rlfn.data.patches import build_patch_store

    files = sorted(TRAIN.glob("*.png"))[:2]
    store = tmp_path / "x4.arrow"
    build_patch_store([(f.stem, f, None) for f in files], 4, store, progress=False)
    crops = calibration_crops(4, store, crops=3, size=16)
    assert len(crops) == 3 and crops[0].shape == (1, 3, 16, 16)
    with pytest.raises(QuantError, match=r"x4\.arrow: patch store is x4, the model x2"):
        calibration_crops(2, store, crops=3)


@pytest.mark.parametrize("make, msg", [
    (lambda p: p / "missing", "missing: int8 calibration source not found"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "empty: no images in the int8 calibration"),
    (lambda p: (p / "Set5").mkdir() or p / "Set5", "is an evaluation set (set5)"),
    (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt",
     "must be a patch store (.arrow) or a folder"),
])
def test_bad_calibration_source_is_one_line(make, msg, tmp_path):
    with pytest.raises(QuantError) as e:
        calibration_crops(4, make(tmp_path), crops=2)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_calibration_is_required_and_never_guessed(tmp_path, monkeypatch):
    """No source: a ConfigError naming what is missing, even where a project's folders or the
    command's variable would offer one (the library reads neither)."""
    monkeypatch.chdir(ROOT)  # data/sample/train is right here
    monkeypatch.setenv(quant.CALIBRATION_ENV, str(TRAIN))
    for call in (lambda: calibration_source(None), lambda: calibration_crops(4, None),
                 lambda: int8_model(_tiny(), calibration=None, cache=tmp_path)):
        with pytest.raises(ConfigError, match=r"^int8 calibration: none given") as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(TypeError):
        int8_model(_tiny(), cache=tmp_path)  # a required argument
    assert calibration_source(TRAIN) == TRAIN
    assert not list(tmp_path.iterdir())


def test_int8_engine_without_calibration_is_refused_before_work(monkeypatch):
    if not quant.cpu_has_int8_dot():
        pytest.skip("this CPU has no int8 dot product: the backend is refused before that")
    require_module("nncf")
    monkeypatch.setenv(quant.CALIBRATION_ENV, str(TRAIN))  # the command's, not the library's
    monkeypatch.setattr(quant, "build_int8", lambda *a, **k: pytest.fail("quantized"))
    with pytest.raises(BackendError, match=r"int8: needs calibration data"):
        make_engine(_tiny(), "int8", "cpu")


def test_int8_model_cached_by_weights_sha256(int8_ready, tmp_path, monkeypatch):
    """Built once (atomically, no temporary left), loaded by key the second time without
    NNCF, rebuilt under a new key when a weight changes."""
    model = _tiny()
    xml = int8_model(model, calibration=TRAIN, cache=tmp_path)
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    meta = json.loads((xml.parent / "int8.json").read_text())
    assert meta["weights_sha256"] == quant.weights_sha256(model)
    assert [p.name for p in tmp_path.iterdir()] == [xml.parent.name]  # no *.tmp leftovers

    built = []
    monkeypatch.setattr(quant, "build_int8", lambda m, out, *a, **k: built.append(out))
    assert int8_model(_tiny(), calibration=TRAIN, cache=tmp_path) == xml  # same weights: hit
    assert built == []
    changed = _tiny()
    with torch.no_grad():
        changed.block_1.c2_r.weight[0, 0, 0, 0] += 1e-3
    int8_model(changed, calibration=TRAIN, cache=tmp_path)
    assert len(built) == 1 and built[0] != xml.parent and built[0].parent == tmp_path


def test_int8_quantizes_only_the_body_convs(int8_ready, tmp_path):
    ov = require_module("openvino")
    xml = int8_model(_tiny(), calibration=TRAIN, cache=tmp_path)
    m = ov.Core().read_model(str(xml))
    fq = [op for op in m.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    fed = {t.get_node().get_type_name() for op in fq for t in op.output(0).get_target_inputs()}
    assert fq and fed == {"Convolution"}
    n_conv = sum(op.get_type_name() == "Convolution" for op in m.get_ordered_ops())
    assert len(fq) == 3 * 2 < n_conv  # c1_r, c2_r, c3_r of each of the 2 blocks; no tail


def test_int8_refuses_other_architectures(int8_ready):
    if not quant.cpu_has_int8_dot():
        pytest.skip("this CPU has no int8 dot product: the backend is refused before the model")
    from rlfn.models import build_model

    with pytest.raises(Exception, match="int8: quantizes RLFN models only"):
        make_engine(build_model("rfdb", 4), "int8", "cpu", calibration=TRAIN)


@pytest.mark.parametrize("how", ["option", "env"])
def test_cli_export_int8(how, int8_ready, pretrained, tmp_path, capsys, monkeypatch):
    """The calibration source from --calibration, or from RLFN_INT8_CALIBRATION."""
    out = tmp_path / "deploy" / "ntire_int8.xml"
    if how == "env":
        monkeypatch.setenv(quant.CALIBRATION_ENV, str(TRAIN))
        given = []
    else:
        monkeypatch.delenv(quant.CALIBRATION_ENV, raising=False)
        given = ["--calibration", str(TRAIN)]
    rc = main(["export", "--int8", "--model", str(pretrained / "rlfn_ntire_x4.pth"),
               "--scale", "4", "-o", str(out), *given])
    assert rc == 0, capsys.readouterr().err
    assert out.is_file() and out.with_suffix(".bin").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["ntire_int8.bin", "ntire_int8.xml"]
    printed = capsys.readouterr().out
    assert "checked: mean |int8 - fp32|" in printed and f"calibrated on {TRAIN}" in printed


@pytest.mark.parametrize("argv, msg, code", [
    (["-o", "m.onnx", "--int8"], "must end in .xml", 2),
    (["-o", "m.onnx", "--calibration", "x"], "--calibration: is an --int8 option", 2),
    (["-o", "m.xml", "--int8", "--calibration", "nope"],
     "nope: int8 calibration source not found", 1),
    (["-o", "m.xml", "--int8"], "error: --calibration: not given, and RLFN_INT8_CALIBRATION "
                                "is not set", 2),
])
def test_cli_export_int8_refusals(argv, msg, code, int8_ready, pretrained, tmp_path, capsys,
                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(quant.CALIBRATION_ENV, raising=False)
    rc = main(["export", "--model", str(pretrained / "rlfn_ntire_x4.pth"), "--scale", "4",
               *argv])
    err = capsys.readouterr().err
    assert rc == code and msg in err, err
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", [
    ["evaluate", "--hr", "HR"],
    ["upscale", "in.png", "-o", "out"],
    ["profile", "--input-dir", "."],
])
def test_cli_int8_backend_needs_calibration(command, pretrained, tmp_path, capsys,
                                            monkeypatch):
    """Every command that can run the int8 backend: no --calibration and no
    RLFN_INT8_CALIBRATION is one `error: --calibration: ...` line, exit 2, before any work
    (the weights are not even read); --calibration with another backend is refused too."""
    if not quant.cpu_has_int8_dot():
        pytest.skip("this CPU has no int8 dot product: the backend is refused before that")
    for m in ("openvino", "nncf", "onnx", "onnxscript"):
        require_module(m)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(quant.CALIBRATION_ENV, raising=False)
    missing = tmp_path / "no-weights.pth"  # refused before the weights would be read
    base = [command[0], "--model", str(missing), "--scale", "4", *command[1:]]
    assert main([*base, "--backend", "int8"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --calibration: not given, and RLFN_INT8_CALIBRATION is "
                           "not set"), line
    assert main([*base, "--calibration", str(TRAIN)]) == 2  # eager: nothing to calibrate
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "error: --calibration: is an --backend int8 option", line
    monkeypatch.setenv(quant.CALIBRATION_ENV, str(tmp_path / "nope"))  # the variable counts
    assert main([*base, "--backend", "int8"]) == 1
    assert "nope: int8 calibration source not found" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
