"""rlfn.threads: threads per process from the cores it has (issue 15, item 4)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest
import torch

from rlfn import threads as th

ROOT = Path(__file__).resolve().parents[1]
CLEAN = ("OMP_NUM_THREADS", "RLFN_THREADS", "RLFN_PROCESSES", "LOCAL_WORLD_SIZE",
         "PYTEST_XDIST_WORKER_COUNT")


def _env(**kw) -> dict:
    return {**{k: v for k, v in os.environ.items() if k not in CLEAN}, **kw}


def test_explicit_counts_win_in_order():
    env = _env(RLFN_THREADS="3", OMP_NUM_THREADS="5")
    assert th.choose_threads(7, environ=env).threads == 7
    assert th.choose_threads(0, environ=env) == th.ThreadChoice(3, "RLFN_THREADS=3")
    assert th.choose_threads(0, environ=_env(OMP_NUM_THREADS="5")).threads == 5
    # not a number / zero: ignored, the policy decides
    c = th.choose_threads(0, environ=_env(RLFN_THREADS="many", OMP_NUM_THREADS="0"), busy=0.0)
    assert c.threads == th.available_cores()


def test_siblings_share_the_cores(monkeypatch):
    monkeypatch.setattr(th, "available_cores", lambda: 8)
    assert th.sibling_processes(_env(LOCAL_WORLD_SIZE="2")) == (2, "LOCAL_WORLD_SIZE")
    c = th.choose_threads(0, environ=_env(LOCAL_WORLD_SIZE="2"), load_aware=False)
    assert c.threads == 4 and "shared by 2 processes (LOCAL_WORLD_SIZE)" in c.reason
    # RLFN_PROCESSES (a worker's concurrency, a pool) before torchrun's and xdist's
    c = th.choose_threads(0, environ=_env(RLFN_PROCESSES="3", PYTEST_XDIST_WORKER_COUNT="2"),
                          load_aware=False)
    assert c.threads == 2
    # more siblings than cores: one thread each
    assert th.choose_threads(0, environ=_env(RLFN_PROCESSES="16"), load_aware=False).threads == 1


def test_load_aware_leaves_busy_cores_to_others(monkeypatch):
    monkeypatch.setattr(th, "available_cores", lambda: 2)
    env = _env()
    assert th.choose_threads(0, environ=env, busy=0.0).threads == 2
    assert th.choose_threads(0, environ=env, busy=0.5).threads == 2  # under 75% of a core
    c = th.choose_threads(0, environ=env, busy=1.0)
    assert c.threads == 1 and "1.0 busy with other processes" in c.reason
    assert th.choose_threads(0, environ=env, busy=2.0).threads == 1  # never below one
    # training never looks at the load
    assert th.choose_threads(0, environ=env, busy=2.0, load_aware=False).threads == 2


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_quota(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert th._cgroup_quota(tmp_path) == quota


def test_available_cores_follows_the_affinity_mask():
    code = ("import os; from rlfn.threads import available_cores; "
            "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "print(available_cores())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "1"


def test_busy_cores_of_others_sees_a_real_busy_process():
    # two pure-Python spinners that spin until killed; measured only once both say they spin:
    # whatever else runs, at least one core is busy with them
    spin = "print('spinning', flush=True)\nwhile True: pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "spinning"
        busy = th.busy_cores_of_others(0.5)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert busy >= 0.9, busy


def test_our_own_computing_is_not_counted_as_the_others(monkeypatch):
    """Over the interval the machine's 2 cores were busy 1.5 cores' worth, and this process
    itself kept one core busy (0.5 s of CPU in 0.5 s: a spinner of its own): the others kept
    0.5 cores busy. The readings are given as /proc/stat and the process clock would give
    them, so the arithmetic is checked without racing a real clock."""
    readings = iter([(1000, 4000), (1000 + 150, 4000 + 200)])  # (busy, total) jiffies
    own = iter([10.0, 10.5])
    monkeypatch.setattr(th, "_cpu_jiffies", lambda: next(readings))
    clock = type("Clock", (), {"process_time": staticmethod(lambda: next(own)),
                               "sleep": staticmethod(lambda s: None)})
    monkeypatch.setattr(th, "time", clock)  # this module's clock only, not the process's
    monkeypatch.setattr(th.os, "cpu_count", lambda: 2)
    assert th.busy_cores_of_others(0.5) == pytest.approx(1.5 - 1.0)
    # a process that computed more than the machine's busy share (clock skew): never negative
    readings = iter([(1000, 4000), (1000 + 10, 4000 + 200)])
    own = iter([10.0, 10.5])
    assert th.busy_cores_of_others(0.5) == 0.0


def _threads_in_worker() -> tuple[int, str]:
    return torch.get_num_threads(), os.environ.get("RLFN_PROCESSES", "")


def test_degrade_pool_workers_split_the_cores(monkeypatch):
    from rlfn.data.degrade import _init_worker

    for k in CLEAN:
        monkeypatch.delenv(k, raising=False)
    with ProcessPoolExecutor(2, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(2,)) as pool:
        n, procs = pool.submit(_threads_in_worker).result()
    assert procs == "2"
    assert n == max(1, th.available_cores() // 2)


def test_entry_points_set_the_wait_policy_before_torch_loads():
    # rlfn's CLI module and the pipeline package set it unless the environment already does
    for mod in ("rlfn.cli", "pipeline"):
        code = (f"import {mod}, os, sys; print(os.environ.get('OMP_WAIT_POLICY'), "
                "'torch' in sys.modules)")
        env = _env()
        env.pop("OMP_WAIT_POLICY", None)
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True).stdout.split()
        assert out[0] == "PASSIVE", (mod, out)
        env["OMP_WAIT_POLICY"] = "ACTIVE"
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True).stdout.split()
        assert out[0] == "ACTIVE", (mod, out)


def test_cli_compute_commands_take_the_policy(tmp_path, pretrained):
    """`rlfn profile --threads 0` reports the count the policy chose (RLFN_THREADS here), and
    an explicit --threads wins."""
    from PIL import Image

    img = tmp_path / "in"
    img.mkdir()
    Image.new("RGB", (24, 16), (90, 120, 30)).save(img / "a.png")
    for flag, env_threads, want in (("0", "1", 1), ("2", "1", 2)):
        r = subprocess.run([sys.executable, "-m", "rlfn", "profile", "--model",
                            str(pretrained / "rlfn_ntire_x4.pth"),
                            "--scale", "4", "--input-dir", str(img), "--max-images", "1",
                            "--warmup", "0", "--threads", flag, "--json",
                            str(tmp_path / "p.json")],
                           cwd=ROOT, env=_env(RLFN_THREADS=env_threads), capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        import json

        assert json.loads((tmp_path / "p.json").read_text())["runtime"]["threads"] == want


def test_governor(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("RLFN_THREADS", raising=False)
    assert not th.Governor(setting=3).active
    monkeypatch.setenv("RLFN_THREADS", "2")
    assert not th.Governor().active
    monkeypatch.delenv("RLFN_THREADS")
    before = torch.get_num_threads()
    lines = []
    gov = th.Governor(interval_s=0.0, log=lines.append)
    try:
        monkeypatch.setattr(th, "choose_threads", lambda *a, **k: th.ThreadChoice(
            1 if before != 1 else 2, "test"))
        assert gov.tick() == (1 if before != 1 else 2)
        assert gov.changes == 1 and lines and lines[0].startswith("threads: now")
        assert gov.tick() is None  # unchanged
    finally:
        torch.set_num_threads(before)
