"""The `rlfn` command: the contract's names, and for every command the bad inputs of one run
each get a one-line error naming the file, while the good files are still written."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from imagefiles import make, rgb
from rlfn.bicubic import downscale
from rlfn.cli import main
from rlfn.io import read_image, write_png
from rlfn.models import build_model
from rlfn.weights import save_model

ROOT = Path(__file__).resolve().parents[1]
BAD = ["truncated", "text", "empty", "bomb"]
CONVERTED = ["gray", "palette", "rgba", "png16", "cmyk"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_model(build_model("rlfn_s", scale=2), tmp_path_factory.mktemp("m") / "s2.safetensors")


def _folder(root: Path, kinds, h=48, w=40) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for k in kinds:
        make(k, root / f"{k}.{'jpg' if k == 'cmyk' else 'png'}", h, w)
    return root


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _check_bad_reported(err: str, folder: Path, kinds) -> None:
    lines = _errors(err)
    for k in kinds:
        hits = [line for line in lines if str(folder / f"{k}.png") in line]
        assert len(hits) == 1, (k, lines)


def test_downscale_good_bad_and_converted(tmp_path, capsys):
    src = _folder(tmp_path / "hr", ["good", *BAD, *CONVERTED, "tiny"], h=50, w=42)
    out = tmp_path / "lr"
    rc = main(["-q", "downscale", "--scale", "4", str(src), str(out)])
    cap = capsys.readouterr()
    assert rc == 1
    _check_bad_reported(cap.err, src, BAD)
    good_lr, _ = read_image(out / "good.png")
    assert np.array_equal(good_lr, downscale(rgb(50, 42), 4))  # mod-cropped, then bicubic
    assert good_lr.shape == (12, 10, 3)
    for k in CONVERTED:
        assert (out / f"{k}.png").exists(), k
        assert any(k in line and line.startswith("note:") for line in cap.err.splitlines()), k
    assert not any((out / f"{k}.png").exists() for k in BAD)


def test_downscale_all_good_exits_zero(tmp_path, capsys):
    src = _folder(tmp_path / "hr", ["good"])
    assert main(["-q", "downscale", "--scale", "2", str(src), str(tmp_path / "o")]) == 0
    assert main(["-q", "downscale", "--scale", "2", str(tmp_path / "none"), str(tmp_path / "o")]) == 1
    assert "none: not a directory" in capsys.readouterr().err


def test_evaluate_good_bad_and_json(tmp_path, capsys, model_file):
    hr = _folder(tmp_path / "hr", ["good", *BAD, "gray"], h=64, w=60)
    out_json = tmp_path / "e.json"
    rc = main(["-q", "evaluate", "--model", str(model_file), "--scale", "2", "--hr", str(hr),
               "--json", str(out_json)])
    cap = capsys.readouterr()
    assert rc == 1
    _check_bad_reported(cap.err, hr, BAD)
    data = json.loads(out_json.read_text())
    assert data["scale"] == 2 and data["model_name"] == "rlfn_s"
    assert sorted(i["name"] for i in data["images"]) == ["good.png", "gray.png"]
    assert set(data["mean"]) == {"psnr_y", "ssim_y"}
    assert all(set(i) >= {"name", "psnr_y", "ssim_y"} for i in data["images"])
    assert "mean" in cap.out and "good.png" in cap.out


def test_evaluate_with_lr_dir_size_mismatch_and_missing_lr(tmp_path, capsys):
    hr = _folder(tmp_path / "hr", ["good"], h=64, w=60)
    make("good", tmp_path / "hr" / "other.png", 64, 60)
    lr = tmp_path / "lr"
    write_png(lr / "good.png", rgb(10, 10))  # wrong size
    rc = main(["-q", "evaluate", "--model", "bicubic", "--scale", "2", "--hr", str(hr),
               "--lr", str(lr)])
    err = _errors(capsys.readouterr().err)
    assert rc == 1
    assert any(str(lr / "good.png") in e and "10x10" in e for e in err), err
    assert any(str(lr / "other.png") in e and "no such file" in e for e in err), err


def test_evaluate_tiny_image_for_model(tmp_path, capsys, model_file):
    hr = _folder(tmp_path / "hr", ["good"], h=64, w=60)
    make("good", hr / "small.png", 24, 24)  # LR 12x12 < 15
    rc = main(["-q", "evaluate", "--model", str(model_file), "--scale", "2", "--hr", str(hr)])
    err = _errors(capsys.readouterr().err)
    assert rc == 1 and len(err) == 1 and "small.png" in err[0] and "at least 15x15" in err[0]


@pytest.mark.parametrize("bad", ["not_state_dict", "pickled_code", "scale", "missing"])
def test_bad_model_files_stop_before_work(tmp_path, capsys, model_file, bad):
    hr = _folder(tmp_path / "hr", ["good"])
    if bad == "not_state_dict":
        m = tmp_path / "lin.pth"
        torch.save(torch.nn.Linear(2, 2).state_dict(), m)
    elif bad == "pickled_code":
        m = tmp_path / "evil.pth"
        m.write_bytes(pickle.dumps(_Evil()))
    elif bad == "missing":
        m = tmp_path / "nope.pth"
    else:
        m = model_file
    scale = "4" if bad == "scale" else "2"
    out = tmp_path / "out"
    for argv in (["evaluate", "--model", str(m), "--scale", scale, "--hr", str(hr)],
                 ["upscale", "--model", str(m), "--scale", scale, str(hr), "-o", str(out)]):
        assert main(["-q", *argv]) == 1
        err = _errors(capsys.readouterr().err)
        assert len(err) == 1 and str(m) in err[0], err
    assert not out.exists()
    assert not Path("/tmp/rlfn_cli_pwned").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/rlfn_cli_pwned",))


def test_upscale_files_and_folders_bad_and_converted(tmp_path, capsys, model_file):
    src = _folder(tmp_path / "in", ["good", *BAD, *CONVERTED, "tiny"], h=32, w=30)
    extra = make("good", tmp_path / "single.png", 20, 18)
    out = tmp_path / "out"
    rc = main(["-q", "upscale", "--model", str(model_file), "--scale", "2", str(src), str(extra),
               str(tmp_path / "missing.png"), "-o", str(out)])
    cap = capsys.readouterr()
    assert rc == 1
    _check_bad_reported(cap.err, src, [*BAD, "tiny"])
    assert any("missing.png" in e for e in _errors(cap.err))
    assert read_image(out / "good.png")[0].shape == (64, 60, 3)
    assert read_image(out / "single.png")[0].shape == (40, 36, 3)
    for k in CONVERTED:
        assert (out / f"{k}.png").exists(), k


@pytest.mark.parametrize("fname", ["rlfn_x4.pth", "rlfn_ntire_x4.pth"])
def test_upscale_tiled_equals_untiled_within_one_grey_level(shared, pretrained, fname):
    """Real weights, a real 510x339 photograph, 6 tiles with the default overlap."""
    from rlfn.upscale import upscale_array
    from rlfn.weights import load_model

    model = load_model(pretrained / fname).model
    lr, _ = read_image(shared / "data" / "div2k_test_lr_x4" / "0902.png")
    whole = upscale_array(model, lr)
    tiled = upscale_array(model, lr, tile=192)
    diff = np.abs(whole.astype(int) - tiled.astype(int))
    assert diff.max() <= 1, (diff.max(), (diff > 1).sum())


def test_tiling_without_the_whole_image_grid_would_fail(shared, pretrained):
    """Guard for the test above: ESA's mask depends on the input size, so naive tiles (no
    ESAGrid) miss by far more than a grey level on the same image."""
    from rlfn.upscale import to_tensor, to_uint8
    from rlfn.weights import load_model

    model = load_model(pretrained / "rlfn_x4.pth").model
    lr, _ = read_image(shared / "data" / "div2k_test_lr_x4" / "0902.png")
    with torch.inference_mode():
        whole = to_uint8(model(to_tensor(lr))).astype(int)
        half = to_uint8(model(to_tensor(lr[:, :300]))).astype(int)
    # columns 0..149 (LR) are 150 px away from the cut: still not equal
    assert np.abs(whole[:, :600] - half[:, :600]).max() > 1


def test_upscale_cli_tiling_option(tmp_path, model_file):
    src = _folder(tmp_path / "in", ["good"], h=80, w=70)
    assert main(["-q", "upscale", "--model", str(model_file), "--scale", "2", str(src),
                 "--tile", "40", "--overlap", "8", "-o", str(tmp_path / "a")]) == 0
    assert main(["-q", "upscale", "--model", str(model_file), "--scale", "2", str(src),
                 "--tile", "0", "-o", str(tmp_path / "b")]) == 0
    a = read_image(tmp_path / "a" / "good.png")[0].astype(int)
    b = read_image(tmp_path / "b" / "good.png")[0].astype(int)
    assert np.abs(a - b).max() <= 1


def test_bad_usage_exit_code_2(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["downscale", "--scale", "5", "a", "b"])
    assert ei.value.code == 2
    assert "scale must be 2, 3 or 4" in capsys.readouterr().err


def test_cuda_requested_without_gpu(tmp_path, capsys, model_file):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    hr = _folder(tmp_path / "hr", ["good"])
    assert main(["-q", "evaluate", "--model", str(model_file), "--scale", "2", "--hr", str(hr),
                 "--device", "cuda"]) == 2  # configuration: exit 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_python_dash_m_and_console_script(tmp_path):
    src = _folder(tmp_path / "hr", ["good"])
    r = subprocess.run([sys.executable, "-m", "rlfn", "-q", "downscale", "--scale", "2", str(src),
                        str(tmp_path / "lr")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "lr" / "good.png").exists()
    exe = shutil.which("rlfn", path=str(Path(sys.executable).parent))
    assert exe, "console script `rlfn` not installed next to the interpreter"
    r = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "downscale" in r.stdout and "evaluate" in r.stdout
