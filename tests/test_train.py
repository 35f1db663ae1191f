"""Training end to end on tiny settings: exact resume after SIGKILL (real subprocesses), DDP
with torchrun on CPU, warm start and the contrastive stage, refusals before work.

The slow ones (subprocesses, torchrun) carry their own ``pytest.mark.timeout``, sized for a
busy 2-core machine; nothing here asserts on wall-clock time."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from imagefiles import rgb
from faults import armed_env, wait_reached
import rlfn.train.engine as engine
from rlfn.cli import main
from rlfn.train.config import load_config
from rlfn.train.engine import train
from rlfn.train.setup import initial_model

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
    """A stage config file (its top level holds the keys; the params.yaml layout, ``train:`` +
    ``train_stages``, is tested in test_train_units)."""
    p = tmp_path / "train.yaml"
    p.write_text(yaml.safe_dump({**TINY, "hr_dir": str(hr_dir), **kw}))
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


def _result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


@pytest.mark.timeout(900)  # four training subprocesses of 60 iterations (~30 s on 2 idle cores)
def test_sigkill_twice_then_resume_is_bit_identical(tmp_path, hr_dir):
    cfg = _config(tmp_path, hr_dir, iterations=60, amp="auto")  # the default path (bf16 on
    # CPUs with native bf16)
    ref = tmp_path / "ref"
    subprocess.run(_cmd(cfg, ref), check=True, cwd=ROOT, capture_output=True)
    out = tmp_path / "killed"
    # two kills at steps drawn between checkpoints (every 5): each run pauses at its step
    # (failpoint train.step@I, I iterations done) and is SIGKILLed there, whatever the speed
    rnd = random.Random(os.getpid())
    steps = [rnd.choice([i for i in range(6, 30) if i % 5]),
             rnd.choice([i for i in range(36, 58) if i % 5])]
    kills = []
    for i, step in enumerate(steps):
        fp = tmp_path / f"failpoints{i}"
        env = {**os.environ, **armed_env(fp, f"train.step@{step}")}
        proc = subprocess.Popen(_cmd(cfg, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
        try:
            assert wait_reached(fp, "train.step", proc, what=f"step {step}") == proc.pid
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        kills.append(_ckpt_iteration(out))
    # each kill lost the steps since the last checkpoint, not more
    assert kills == [s // 5 * 5 for s in steps], (steps, kills)
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


@pytest.mark.timeout(900)  # two processes with their own imports, one run (~16 s), 3 reruns
def test_ddp_two_cpu_processes_match_one(tmp_path, hr_dir):
    cfg = _config(tmp_path, hr_dir, iterations=6, checkpoint_every=3)
    single = tmp_path / "single"
    assert main(["-q", "train", "--config", str(cfg), "--out", str(single)]) == 0
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # rlfn.train.launch (the pipeline's way too): torch's elastic launch, whose c10d
    # rendezvous binds a port of its own choosing, no port picked here and released before use
    r = subprocess.run([sys.executable, "-m", "rlfn", "-q", "train", "--nproc-per-node", "2",
                        "--config", str(cfg), "--out", str(ddp)],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=480)
    assert r.returncode == 0, r.stderr[-3000:]
    # it really ran distributed: two ranks, each with half of every batch
    batch = TINY["batch_size"]
    assert (_result(single)["world_size"], _result(single)["per_rank_batch"]) == (1, batch)
    done = _result(ddp)
    assert (done["world_size"], done["per_rank_batch"]) == (2, batch // 2), done
    assert done["iterations"] == 6 and done["config"]["batch_size"] == batch
    # and trained the same model as one process (the same global batches)
    a, b = _weights(single), _weights(ddp)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    # ... and both really trained: each moved away from the seeded start they share
    start = initial_model(load_config(cfg)).state_dict()
    for w in (a, b):
        moved = max((w[k] - start[k]).abs().max().item() for k in start)
        assert moved > 100 * max(worst, 1e-7), (moved, worst)
    # rerun under torchrun (the ranks are `rlfn train` processes that exit as programs do):
    # complete, nothing redone, every rank leaves cleanly. Without the process group ended at
    # exit, gloo's threads aborted a rank at interpreter exit (SIGABRT: torchrun failed) in 6
    # of 15 such two-rank runs; four reruns show it 7 times in 8
    before = _result(ddp)
    for _ in range(4):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", "2", "-m", "rlfn", "train",
                            "--config", str(cfg), "--out", str(ddp)],
                           cwd=ROOT, capture_output=True, text=True, env=env, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "nothing to do" in r.stdout, r.stdout
    assert _result(ddp) == before


@pytest.mark.timeout(600)  # two launches of two processes (~10 s each on idle cores)
def test_launch_relays_rank0_rows_live_and_reports_a_failed_rank(tmp_path, hr_dir):
    """rlfn.train.launch: rank 0's rows reach ``on_log`` in the launching process as in a
    one-process run (the pipeline logs them to MLflow live either way), and a failing rank is
    its own error: one ``error:`` line from ``rlfn train``, with the CLI's exit code."""
    from rlfn.train.launch import launch

    cfg = load_config(_config(tmp_path, hr_dir, iterations=6, checkpoint_every=3))
    one, two = [], []
    launch(cfg, tmp_path / "one", nproc=1, progress=False,
           on_log=lambda it, m: one.append((it, sorted(m))))
    res = launch(cfg, tmp_path / "two", nproc=2, progress=False,
                 on_log=lambda it, m: two.append((it, sorted(m))))
    assert (res.world_size, res.iterations) == (2, 6)
    assert one and two == one  # the same rows (iterations and figures), each once
    rows = (tmp_path / "two" / "curves.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [it for it, _ in two]
    # a rank that fails: every rank reads --init, a file that is no weights file (exit 1)
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not weights")
    r = subprocess.run(_cmd(_config(tmp_path, hr_dir, iterations=6), tmp_path / "bad",
                            "--nproc-per-node", "2", "--init", str(bad)),
                       cwd=ROOT, capture_output=True, text=True, timeout=480,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(f"error: {bad}: "), lines


def _spy_on_setup(monkeypatch) -> list[dict]:
    """Record what each ``train`` call's first step starts from: the model weights and the
    optimizer state that ``engine.prepare_run`` hands to the loop."""
    seen = []
    real = engine.prepare_run

    def spy(ctx):
        run = real(ctx)
        seen.append({"start": run.start, "optimizer_state": len(run.optimizer.state),
                     "weights": {k: v.detach().to("cpu").clone()
                                 for k, v in run.model.state_dict().items()}})
        return run

    monkeypatch.setattr(engine, "prepare_run", spy)
    return seen


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def test_warm_start_stage3_contrastive_and_outputs(tmp_path, hr_dir, benchmarks, monkeypatch):
    val = benchmarks / "Set5" / "x4" / "HR"
    cfg = _config(tmp_path, hr_dir, iterations=6, val_every=3, val_hr_dir=str(val),
                  val_max_images=2, amp="auto")  # the default: bf16 autocast where it helps
    s2 = tmp_path / "s2"
    res2 = train(load_config(cfg, stage=2), s2, progress=False)
    seen = _spy_on_setup(monkeypatch)
    s3 = tmp_path / "s3"
    res3 = train(load_config(cfg, ["contrastive=true"], stage=3), s3, init=res2.weights, progress=False)
    # warm start: stage 3's first step starts from stage 2's final weights, exactly, with a
    # fresh optimizer (no Adam moments) and a fresh schedule
    stage2 = _weights(s2)
    assert len(seen) == 1 and seen[0]["start"] == 0 and seen[0]["optimizer_state"] == 0
    assert _same(seen[0]["weights"], stage2)
    assert res3.iterations == 6 and res3.final_psnr is not None
    rows = (s3 / "curves.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert float(rows[1].split(",")[header.index("lr")]) == 1e-3
    assert not _same(_weights(s3), stage2)  # and then trained
    # the same stage from scratch starts from the seeded weights and ends elsewhere
    scratch = tmp_path / "s3_scratch"
    train(load_config(cfg, ["contrastive=true"], stage=3), scratch, progress=False)
    assert len(seen) == 2 and not _same(seen[1]["weights"], stage2)
    assert not _same(_weights(scratch), _weights(s3))
    contrastive = [float(r.split(",")[header.index("contrastive")]) for r in rows[1:]]
    assert all(c > 0 for c in contrastive)  # stage 3: contrastive loss on
    rows2 = (s2 / "curves.csv").read_text().splitlines()[1:]
    assert all(r.split(",")[header.index("contrastive")] == "" for r in rows2)
    for f in ("model.safetensors", "best.safetensors", "curves.csv", "curves.png", "result.json"):
        assert (s3 / f).exists(), f
    assert sorted(p.name for p in (s3 / "crops").iterdir()) == ["iter_0000003.png",
                                                                "iter_0000006.png"]
    result = _result(s3)
    assert result["init"] == str(res2.weights) and result["stage"] == 3
    assert result["config"]["contrastive"] is True
    assert (result["world_size"], result["per_rank_batch"]) == (1, TINY["batch_size"])
    assert (res3.world_size, res3.per_rank_batch) == (1, TINY["batch_size"])
    # a finished stage is not redone (and says what it recorded)
    again = train(load_config(cfg, ["contrastive=true"], stage=3), s3, init=res2.weights, progress=False)
    assert again.already_complete and len(seen) == 2
    assert (again.iterations, again.world_size, again.per_rank_batch) == (6, 1, 4)


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
    # params out of range: refused before any work (no output folder made), naming the key
    # and the value (a ConfigError: exit 2)
    for bad, msg in (("batch_size=0", "--set batch_size: must be a positive integer, got 0"),
                     ("patch_size=66", "--set patch_size: 66 is not divisible by the scale 4"),
                     ("model=unet", "--set model: unknown model name 'unet'")):
        rc = main(["-q", "train", "--config", str(cfg), "--out", str(tmp_path / "never"),
                   "--set", bad])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err, err
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
    err = capsys.readouterr().err
    assert rc == 1 and f"{empty}: no usable training images" in err, err
    # a folder that is not there, and validation images that cannot be used: data errors
    # naming the folder (exit 1)
    nowhere = _config(tmp_path, tmp_path / "nowhere", iterations=2)
    rc = main(["-q", "train", "--config", str(nowhere), "--out", str(tmp_path / "o3")])
    err = capsys.readouterr().err
    assert rc == 1 and f"{tmp_path / 'nowhere'}: not a directory" in err, err
    bad_val = tmp_path / "bad_val"
    bad_val.mkdir()
    (bad_val / "broken.png").write_text("not an image")
    rc = main(["-q", "train", "--config", str(_config(tmp_path, hr_dir, iterations=2,
                                                      val_hr_dir=str(bad_val))),
               "--out", str(tmp_path / "o4")])
    err = capsys.readouterr().err
    assert rc == 1 and f"{bad_val}: no usable validation images" in err, err
