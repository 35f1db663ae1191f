"""Batched mode (issue 15): ``rlfn upscale --batch N``, ``rlfn.upscale.upscale_batch`` /
``upscale_files``; the traffic count behind the roofline fraction (``rlfn.profile``); the
profile script (``bench/gpu_profile.py``); the CUDA-only compiled backends.

On the CPU, batched outputs are the unbatched ones byte for byte (eager and channels_last);
the CUDA cases (``-k cuda``, run by bench/gpu_checks.sh) allow a grey level."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rlfn.cli import main
from rlfn.backends import BACKENDS, check_backend, make_engine
from rlfn.engine import BackendError, Engine
from rlfn.io import read_image, write_png
from rlfn.profile import traffic_bytes
from rlfn.upscale import ModelUpscaler, upscale_array, upscale_batch, upscale_files
from rlfn.weights import load_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = "rlfn_ntire_x4.pth"
NEW_CUDA = ("compile_graphs", "compile_fp16")


@pytest.fixture(scope="module")
def crops(shared) -> list[np.ndarray]:
    """Real LR content: same-size crops (several), other sizes, one too big for a 48 tile."""
    d = shared / "data" / "div2k_test_lr_x4"
    a, b = (read_image(d / f"09{i:02d}.png")[0] for i in (1, 2))
    return [a[:40, :52], b[:40, :52], a[60:100, 100:152], b[:33, :45], a[:70, :90],
            b[50:120, 10:100]]


@pytest.fixture(scope="module")
def ntire(pretrained) -> nn.Module:
    return load_model(pretrained / MODEL).model


@pytest.fixture
def threads(monkeypatch):
    """One thread count for both runs (the CLI's is load-aware: rlfn.threads)."""
    monkeypatch.setenv("RLFN_THREADS", str(torch.get_num_threads()))


# --------------------------------------------------------------------------- library
@pytest.mark.parametrize("backend", ["eager", "channels_last"])
def test_batched_equals_unbatched_bit_for_bit(backend, ntire, crops):
    """Whole images grouped by size and tiles (their own ESA grid each) grouped by tile
    size across images: every output equals upscale_array's, image by image."""
    engine = make_engine(copy.deepcopy(ntire), backend, "cpu")
    tiles = [None, None, None, None, 30, 30]  # the last two in tiles of a few sizes
    ref = [upscale_array(engine, im, tile=t, overlap=6) for im, t in zip(crops, tiles)]
    got = upscale_batch(engine, crops, tile=tiles, overlap=6, batch=3)
    for i, (r, g) in enumerate(zip(ref, got)):
        assert r.shape == g.shape and np.array_equal(r, g), (i, int((r != g).sum()))


def test_batch_one_is_upscale_array_and_bad_batch_refused(ntire, crops):
    engine = make_engine(copy.deepcopy(ntire), "eager", "cpu")
    got = upscale_batch(engine, crops[:2], batch=1)
    assert all(np.array_equal(g, upscale_array(engine, im)) for g, im in zip(got, crops))
    with pytest.raises(ValueError, match="batch must be >= 1"):
        upscale_batch(engine, crops, batch=0)


class Recorder(nn.Module):
    """x2 nearest 'model' that records the batch shapes it is given."""

    scale = 2

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.shapes: list[tuple] = []

    def forward(self, x, grid=None):
        self.shapes.append(tuple(x.shape))
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest") * self.w


def test_files_grouped_by_size_in_order_with_a_bad_file(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [(8, 10), (6, 6), (8, 10), (8, 10), (6, 6), (5, 7)]
    files = []
    for i, (h, w) in enumerate(sizes):
        files.append(write_png(tmp_path / f"{i}.png", rng.integers(0, 256, (h, w, 3), np.uint8)))
    bad = tmp_path / "3b.png"
    bad.write_bytes(b"not a png")
    files.insert(4, bad)
    net = Recorder()
    results = list(upscale_files(ModelUpscaler(Engine(net, torch.device("cpu"))), files,
                                 batch=2))
    assert [r.path for r in results] == files  # one result per file, in order
    assert results[4].error is not None and results[4].sr is None and "3b.png" in str(
        results[4].error)
    for f, r in zip(files, results):
        if r.error is None:
            lr = read_image(f)[0]
            assert np.array_equal(r.sr, lr.repeat(2, 0).repeat(2, 1))
    assert sorted(net.shapes) == sorted([(2, 3, 8, 10), (1, 3, 8, 10), (2, 3, 6, 6),
                                         (1, 3, 5, 7)])


# --------------------------------------------------------------------------- CLI
def _upscale_dir(tmp_path: Path, crops) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    for i, im in enumerate(crops):
        write_png(src / f"{i}.png", im)
    (src / "2x.png").write_bytes(b"\x89PNG broken")  # a bad file among same-size ones
    return src


@pytest.mark.parametrize("backend", ["eager", "channels_last"])
def test_cli_batch_writes_the_same_bytes(backend, pretrained, crops, tmp_path, capsys, threads):
    src = _upscale_dir(tmp_path, crops)
    outs = {}
    for batch in (1, 4):
        out = tmp_path / f"out{batch}"
        rc = main(["upscale", "--model", str(pretrained / MODEL), "--scale", "4", str(src),
                   "-o", str(out), "--tile", "48", "--overlap", "6", "--backend", backend,
                   "--batch", str(batch)])
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert rc == 1 and len(errors) == 1 and "2x.png" in errors[0], err
        outs[batch] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert sorted(outs[1]) == [f"{i}.png" for i in range(len(crops))]
    assert outs[1] == outs[4]


@pytest.mark.parametrize("value", ["0", "-2"])
def test_cli_bad_batch_is_one_line(value, tmp_path, capsys):
    rc = main(["upscale", "--model", str(tmp_path / "none.pth"), "--scale", "4",
               str(tmp_path), "-o", str(tmp_path / "out"), "--batch", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"--batch {value}" in err[0], err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- roofline
def test_traffic_bytes_of_a_known_net():
    """conv(3->8) -> ReLU -> conv(8->3) at 5x7, fp32: input 3*35, weights 8*27+8 + 3*72+3,
    the first conv's output written and read (2 * 8*35), the last's written (3*35)."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
    t = traffic_bytes(net, 5, 7)
    hw = 35
    assert t["input"] == 4 * 3 * hw
    assert t["weights"] == 4 * (8 * 27 + 8 + 3 * 72 + 3)
    assert t["activations"] == 4 * 2 * 8 * hw
    assert t["output"] == 4 * 3 * hw and t["layers"] == 2
    assert t["total"] == 4 * (3 * hw + 443 + 16 * hw + 3 * hw)
    t2 = traffic_bytes(net, 5, 7, dtype_bytes=2, batch=4)  # weights once per batch
    assert t2["total"] == 2 * (4 * 3 * hw + 443 + 4 * 16 * hw + 4 * 3 * hw)
    assert next(net.parameters()).device.type == "cpu"  # counted on a meta copy


def test_gpu_profile_runs_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_profile.py"), "--model",
                        "tiny", "--size", "20x24", "--forwards", "2", "--warmup", "1",
                        "--out", str(tmp_path), "--peak-gbs", "10"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "profile_eager_b1.json").read_text())
    assert s["ops_per_forward"] > 10 and s["wall_ms"] > 0 and s["busy_ms"] > 0
    assert 0 < s["busy_fraction"] <= 1 and s["gap_ms"] >= 0 and s["peak_gbs"] == 10
    assert any("conv" in t["name"] for t in s["top_ops"])
    assert s["traffic_mb"] > 0 and s["achieved_gbs_wall"] > 0
    assert (tmp_path / "trace_eager_b1.json").stat().st_size > 0


# --------------------------------------------------------------------------- backends
@pytest.mark.parametrize("name", NEW_CUDA)
def test_new_backends_refused_on_cpu(name, pretrained, tmp_path, capsys):
    assert BACKENDS[name].devices == ("cuda",)
    with pytest.raises(BackendError, match="runs on cuda only, not cpu"):
        check_backend(name, "cpu")
    rc = main(["upscale", "--model", str(pretrained / MODEL), "--scale", "4", str(tmp_path),
               "-o", str(tmp_path / "out"), "--backend", name])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "runs on cuda only" in err[0], err


@pytest.mark.parametrize("backend", ["eager", "fp16", "cuda_graphs", "compile_graphs"])
def test_batched_on_cuda(backend, pretrained, crops):
    """On the GPU a batch may take other kernels than one image: within a grey level."""
    try:
        check_backend(backend, "cuda")
    except BackendError as e:
        pytest.skip(str(e))
    engine = make_engine(load_model(pretrained / MODEL).model, backend, "cuda")
    same = crops[:3]  # one size: every backend batches whole images
    ref = [upscale_array(engine, im) for im in same]
    got = upscale_batch(engine, same, batch=3)
    for r, g in zip(ref, got):
        assert np.abs(r.astype(int) - g).max() <= 1

