"""Chaos (issue 24), case 7: the disk fills during a checkpoint write.

A training run's output folder lies on a small file system the test makes (a size-limited
tmpfs, mounted as root and unmounted at teardown). The run stops itself after its checkpoint
of iteration 5 (failpoint ``train.step@7``); the test fills the file system to 64 KiB of a
checkpoint's ~4 MB, and lets the run go on: its checkpoint of iteration 10 cannot be written.
Then, exactly: one ``error:`` line naming the checkpoint and "no space left on device", no
traceback, exit 1; the checkpoint of iteration 5 byte for byte as it was, no partial
``checkpoint.tmp/`` left taking space; once the space is freed, the same command resumes from
iteration 5 and ends with weights bit-identical to an undisturbed run's.

Cheap (three training runs of 15 tiny iterations): marked ``stack`` too, so CI's serial
background phase runs it (it needs root to mount, as the team-mode tests need root for sshd).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load

from faults import armed_env, release, wait_reached
from imagefiles import rgb
from prereq import ROOT, unavailable

pytestmark = [pytest.mark.chaos, pytest.mark.stack]

TINY = dict(model="rlfn_ntire", scale=4, patch_size=64, batch_size=4, lr=1e-3, log_every=5,
            checkpoint_every=5, val_every=1000, num_workers=0, threads=1, seed=3,
            epoch_iterations=7, amp="off", iterations=15)
LEFT_FREE = 64 * 1024


@pytest.fixture
def small_fs():
    """A 32 MiB tmpfs, mounted for the test and unmounted after it."""
    if os.geteuid() != 0:
        unavailable("mounting a small file system (tmpfs) needs root")
    d = Path(tempfile.mkdtemp(prefix="rlfn-chaos-disk-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0755", "tmpfs", str(d)],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        d.rmdir()
        unavailable(f"cannot mount a tmpfs at {d}: {r.stderr.strip()}")
    try:
        yield d
    finally:
        u = subprocess.run(["umount", str(d)], capture_output=True, text=True, timeout=60)
        if u.returncode != 0:  # still busy (a child left): detach it, it goes when free
            subprocess.run(["umount", "-l", str(d)], capture_output=True, timeout=60)
        d.rmdir()
        assert u.returncode == 0, u.stderr


def _cmd(cfg: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "rlfn", "-q", "train", "--config", str(cfg), "--out", str(out)]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _free(d: Path) -> int:
    st = os.statvfs(d)
    return st.f_bavail * st.f_frsize


@pytest.mark.timeout(900)
def test_disk_full_during_a_checkpoint_write(tmp_path, small_fs):
    hr = tmp_path / "hr"
    hr.mkdir()
    for i in range(5):
        Image.fromarray(rgb(96 + 8 * i, 88, seed=i)).save(hr / f"img{i}.png")
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "hr_dir": str(hr)}))

    ref = tmp_path / "ref"  # the undisturbed run, on an ordinary disk
    r = subprocess.run(_cmd(cfg, ref), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    out = small_fs / "run"
    fp = tmp_path / "failpoints"
    proc = subprocess.Popen(_cmd(cfg, out), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **armed_env(fp, "train.step@7")})
    try:
        wait_reached(fp, "train.step", proc, limit_s=600, what="step 7")
        ckpt = out / "checkpoint"
        kept = _files(ckpt)
        assert '"iteration": 5' in kept["state.json"].decode()
        # the fault: the file system filled up to LEFT_FREE, less than one checkpoint file
        with open(small_fs / "filler", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, _free(small_fs) - LEFT_FREE)
        assert _free(small_fs) < len(kept["model.safetensors"]), _free(small_fs)
        release(fp, "train.step")
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    print(f"\nthe run on a full disk: exit {proc.returncode}\n{stderr[-2000:]}")
    errors = [x for x in stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode == 1, stdout + stderr
    assert len(errors) == 1, stderr[-4000:]
    assert errors[0].startswith(f"error: {ckpt}: no space left on device"), errors[0]
    assert "iteration 10" in errors[0] and "iteration 5" in errors[0], errors[0]
    assert "Traceback" not in stderr, stderr[-4000:]
    # the last good checkpoint, exactly as it was; no partial one left taking space
    assert _files(ckpt) == kept
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == \
        ["checkpoint"]

    # space freed: the same command resumes from iteration 5, bit-exactly
    (small_fs / "filler").unlink()
    t = time.monotonic()
    r = subprocess.run(_cmd(cfg, out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    print(f"recovery: the rerun resumed and finished in {time.monotonic() - t:.1f} s")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "result.json").read_text())["resumed_from"] == 5
    # read, not mapped (load_file): a failure's traceback keeps no file of the tmpfs open
    a, b = (load((d / "model.safetensors").read_bytes()) for d in (ref, out))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from undisturbed"
