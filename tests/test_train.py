"""Training end to end on tiny settings: exact resume after SIGKILL (real subprocesses), DDP
with torchrun on CPU, warm start and the contrastive stage, refusals before work."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from imagefiles import rgb
from servers import free_port
from rlfn.cli import main
from rlfn.train.config import load_config
from rlfn.train.engine import train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model="rlfn_ntire", scale=4, patch_size=64, batch_size=4, lr=1e-3, log_every=5,
            checkpoint_every=5, val_every=1000, num_workers=0, threads=1, seed=3,
            epoch_iterations=7, amp="off")  # fp32: the DDP check compares at 1e-5


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hr")
    for i in range(5):
        Image.fromarray(rgb(96 + 8 * i, 88, seed=i)).save(d / f"img{i}.png")
    return d


def _config(tmp_path: Path, hr_dir: Path, **kw) -> Path:
    p = tmp_path / "train.yaml"
    p.write_text(yaml.safe_dump({"train": {**TINY, "hr_dir": str(hr_dir), **kw}}))
    return p


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def _cmd(cfg: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlfn", "-q", "train", "--config", str(cfg), "--out", str(out),
            *extra]


def _ckpt_iteration(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint" / "state.json").read_text())["iteration"]
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_twice_then_resume_is_bit_identical(tmp_path, hr_dir):
    cfg = _config(tmp_path, hr_dir, iterations=60, amp="auto")  # the default path (bf16 on
    # CPUs with native bf16)
    ref = tmp_path / "ref"
    subprocess.run(_cmd(cfg, ref), check=True, cwd=ROOT, capture_output=True)
    out = tmp_path / "killed"
    rnd = random.Random(os.getpid())
    kills = []
    for _ in range(2):
        before = _ckpt_iteration(out)
        proc = subprocess.Popen(_cmd(cfg, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while _ckpt_iteration(out) <= before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rnd.uniform(0.0, 0.4))  # somewhere in the middle of the following steps
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(_ckpt_iteration(out))
    assert 0 < kills[0] < kills[1] < 60, kills  # both kills landed mid-run, after progress
    r = subprocess.run(_cmd(cfg, out), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from uninterrupted"
    done = json.loads((out / "result.json").read_text())
    assert done["iterations"] == 60 and done["resumed_from"] == kills[1]
    # a complete run is not redone
    r = subprocess.run(_cmd(cfg, out), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "nothing to do" in r.stdout


def test_ddp_two_cpu_processes_match_one(tmp_path, hr_dir):
    cfg = _config(tmp_path, hr_dir, iterations=6, checkpoint_every=3)
    single = tmp_path / "single"
    assert main(["-q", "train", "--config", str(cfg), "--out", str(single)]) == 0
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                        "--nproc_per_node=2", "--master_addr=127.0.0.1",
                        f"--master_port={free_port()}", "-m", "rlfn", "-q", "train",
                        "--config", str(cfg), "--out", str(ddp)],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _weights(single), _weights(ddp)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    assert any((a[k] != b[k]).any() for k in a) or worst == 0  # ran for real, not copied


def test_warm_start_stage3_contrastive_and_outputs(tmp_path, hr_dir, benchmarks):
    val = benchmarks / "Set5" / "x4" / "HR"
    cfg = _config(tmp_path, hr_dir, iterations=6, val_every=3, val_hr_dir=str(val),
                  val_max_images=2, amp="auto")  # the default: bf16 autocast where it helps
    s2 = tmp_path / "s2"
    res2 = train(load_config(cfg, stage=2), s2, progress=False)
    s3 = tmp_path / "s3"
    res3 = train(load_config(cfg, stage=3), s3, init=res2.weights, progress=False)
    assert res3.iterations == 6 and res3.final_psnr is not None
    rows = (s3 / "curves.csv").read_text().splitlines()
    header = rows[0].split(",")
    contrastive = [float(r.split(",")[header.index("contrastive")]) for r in rows[1:]]
    assert all(c > 0 for c in contrastive)  # stage 3: contrastive loss on
    rows2 = (s2 / "curves.csv").read_text().splitlines()[1:]
    assert all(r.split(",")[header.index("contrastive")] == "" for r in rows2)
    for f in ("model.safetensors", "best.safetensors", "curves.csv", "curves.png", "result.json"):
        assert (s3 / f).exists(), f
    assert sorted(p.name for p in (s3 / "crops").iterdir()) == ["iter_0000003.png",
                                                                "iter_0000006.png"]
    result = json.loads((s3 / "result.json").read_text())
    assert result["init"] == str(res2.weights) and result["stage"] == 3
    assert result["config"]["contrastive"] is True
    # warm start: the first stage-3 step starts from stage 2's weights with a fresh schedule
    assert float(rows[1].split(",")[header.index("lr")]) == 1e-3


def test_contrastive_switched_off_for_the_ablation(tmp_path, hr_dir):
    cfg = _config(tmp_path, hr_dir, iterations=5)
    c = load_config(cfg, ["contrastive=false"], stage=3)
    assert not c.contrastive
    train(c, tmp_path / "off", progress=False)
    rows = (tmp_path / "off" / "curves.csv").read_text().splitlines()
    assert rows[1].split(",")[3] == ""


def test_refusals_name_the_file_and_the_mismatch(tmp_path, hr_dir, capsys):
    cfg = _config(tmp_path, hr_dir, iterations=5)
    # resume into the same folder with another architecture: refused, naming the checkpoint
    out2 = tmp_path / "arch"
    train(load_config(cfg, ["iterations=10"]), out2, progress=False, stop_after=5)
    rc = main(["-q", "train", "--config", str(cfg), "--out", str(out2), "--set", "model=rlfn_s",
               "--set", "iterations=10"])
    err = capsys.readouterr().err
    assert rc == 1 and "checkpoint" in err and "another architecture" in err, err
    # a corrupted checkpoint file
    f = out2 / "checkpoint" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10] + b"0123456789")
    rc = main(["-q", "train", "--config", str(cfg), "--out", str(out2), "--set", "iterations=10"])
    err = capsys.readouterr().err
    assert rc == 1 and str(f) in err and "corrupted" in err, err
    # warm start from a model of another scale
    x2 = tmp_path / "x2.safetensors"
    from rlfn.models import build_model
    from rlfn.weights import save_model

    save_model(build_model("rlfn_ntire", 2), x2)
    rc = main(["-q", "train", "--config", str(cfg), "--out", str(tmp_path / "w"), "--init",
               str(x2)])
    err = capsys.readouterr().err
    assert rc == 1 and str(x2) in err and "x2" in err, err
    # params out of range: refused before any work (no output folder made)
    for bad, msg in (("batch_size=0", "batch_size"), ("patch_size=66", "not divisible"),
                     ("model=unet", "unknown model")):
        rc = main(["-q", "train", "--config", str(cfg), "--out", str(tmp_path / "never"),
                   "--set", bad])
        assert rc == 1 and msg in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_hr_dir_with_bad_images_and_too_small(tmp_path, hr_dir, capsys):
    d = tmp_path / "mixed"
    d.mkdir()
    for f in hr_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "broken.png").write_text("not an image")
    Image.fromarray(rgb(40, 40)).save(d / "small.png")
    cfg = _config(tmp_path, d, iterations=2)
    assert main(["-q", "train", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "broken.png" in err and "small.png" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["-q", "train", "--config", str(_config(tmp_path, empty, iterations=2)), "--out",
               str(tmp_path / "o2")])
    assert rc == 1 and "no usable training images" in capsys.readouterr().err
