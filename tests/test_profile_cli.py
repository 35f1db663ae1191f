"""`rlfn profile`: counts, runtime and memory in its JSON; clear errors before any work."""

from __future__ import annotations

import json

import pytest
import torch

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
    (["--input-dir", "/nonexistent"], "not a directory", 2),
])
def test_profile_refusals_before_work(pretrained, capsys, argv, msg, code):
    base = {"--model": str(pretrained / "rlfn_ntire_x4.pth"), "--scale": "4"}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    rc = main(["profile", *[x for kv in base.items() for x in kv]])
    assert rc == code and msg in capsys.readouterr().err


def test_profile_cuda_without_gpu(pretrained, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc = main(["profile", "--model", str(pretrained / "rlfn_ntire_x4.pth"), "--scale", "4",
               "--device", "cuda"])
    assert rc == 2 and "no CUDA GPU" in capsys.readouterr().err
