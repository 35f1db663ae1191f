"""`rlfn profile`: counts, runtime and memory in its JSON; clear errors before any work."""

from __future__ import annotations

import json

import pytest
import torch

from prereq import ROOT
from rlfn.cli import main


def test_profile_json_for_the_challenge_model(pretrained, shared, tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = main(["profile", "--model", str(pretrained / "rlfn_ntire_x4.pth"), "--scale", "4",
               "--input-dir", str(shared / "data" / "div2k_test_lr_x4"), "--max-images", "2",
               "--warmup", "1", "--json", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert (d["params"], round(d["flops"] / 1e9, 2), round(d["activations"] / 1e6, 2)) == (
        317_218, 19.70, 80.05)
    assert d["runtime"]["unit"] == "ms" and d["runtime"]["images"] == 2
    assert d["runtime"]["median"] > 0 and d["runtime"]["threads"] >= 1
    assert d["memory"]["unit"] == "MB" and d["memory"]["peak_rss"] > 0
    assert "19.70 G" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg, code", [
    (["--backend", "tensorrt"], "--backend tensorrt: unknown backend 'tensorrt'", 2),
    (["--scale", "2"], "is a x4 model, but --scale 2", 1),
    (["--input-dir", "/nonexistent"], "--input-dir /nonexistent: not a directory", 2),
])
def test_profile_refusals_before_work(pretrained, capsys, argv, msg, code, tmp_path):
    base = {"--model": str(pretrained / "rlfn_ntire_x4.pth"), "--scale": "4",
            "--input-dir": str(tmp_path)}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    rc = main(["profile", *[x for kv in base.items() for x in kv]])
    assert rc == code and msg in capsys.readouterr().err


def test_profile_input_dir_is_required_unless_the_variable_names_it(pretrained, capsys,
                                                                    tmp_path, monkeypatch):
    """No default folder: --input-dir, else RLFN_PROFILE_INPUT_DIR, else one error line (exit
    2) before the weights are read, wherever the command runs (a project's folders are not
    looked for)."""
    from PIL import Image

    monkeypatch.delenv("RLFN_PROFILE_INPUT_DIR", raising=False)
    monkeypatch.chdir(ROOT)  # where the old defaults were: ../shared/..., data/sample/train
    argv = ["profile", "--model", str(pretrained / "rlfn_ntire_x4.pth"), "--scale", "4",
            "--max-images", "1", "--warmup", "0"]
    assert main([*argv[:2], str(tmp_path / "none.pth"), *argv[3:]]) == 2  # weights unread
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == ("error: --input-dir: not given, and RLFN_PROFILE_INPUT_DIR is not set: "
                    "name the folder of LR images to time"), line
    monkeypatch.setenv("RLFN_PROFILE_INPUT_DIR", str(tmp_path / "nope"))
    assert main(argv) == 2
    assert f"error: RLFN_PROFILE_INPUT_DIR={tmp_path / 'nope'}: not a directory" in \
        capsys.readouterr().err
    lr = tmp_path / "lr"
    lr.mkdir()
    Image.new("RGB", (24, 16), (90, 120, 30)).save(lr / "a.png")
    monkeypatch.setenv("RLFN_PROFILE_INPUT_DIR", str(lr))
    out = tmp_path / "p.json"
    assert main([*argv, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["runtime"]["images"] == 1


def test_profile_cuda_without_gpu(pretrained, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc = main(["profile", "--model", str(pretrained / "rlfn_ntire_x4.pth"), "--scale", "4",
               "--device", "cuda"])
    assert rc == 2 and "no CUDA GPU" in capsys.readouterr().err
