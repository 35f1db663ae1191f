"""Chaos (issue 24), case 5: the DVC remote's sshd stopped during ``dvc push``, and again during
``dvc pull``, against team mode's stack (scripts/stack.sh), no mocks.

The data stages (``prepare``, ``degrade``, ``patches``) are reproduced in the stack's tiny
clone and dvc.lock committed. The fault lands by construction: the sshd is frozen (SIGSTOP)
before ``dvc push`` starts, the test waits until the kernel has accepted the push's connection
(ESTABLISHED to the sshd's port: the push is in flight and cannot progress), then SIGKILLs the
sshd. Exactly: the push fails with one ``ERROR:`` line and no traceback; the remote holds no
object whose bytes differ from its name (md5); after ``stack.sh up`` a push completes. Then
the same during ``dvc pull`` into a fresh ``git clone``; after ``up`` a pull restores every
output of dvc.lock, each file's md5 as dvc.lock (and its ``.dir`` listings) says, and no other.

Marked ``chaos`` only: a stack of its own and three stages (minutes on 2 cores).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from chaosstack import restarted
from tinyproject import tiny_clone
from servers import _group_alive
from teamstack import Stack, dvc, run, stack_up

pytestmark = pytest.mark.chaos

TIMES: dict[str, float] = {}
STAGES = ("prepare", "degrade", "patches")


@pytest.fixture(scope="module")
def stack():
    with stack_up("rlfn-chaos-sshd-", prepare=tiny_clone, times=TIMES) as st:
        yield st


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


def _established(port: int) -> bool:
    """Whether a TCP connection to 127.0.0.1:``port`` is established (accepted by the kernel)."""
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = row.split()
        if f[3] == "01" and f[2].endswith(f":{port:04X}"):
            return True
    return False


def _kill_sshd_during(stack: Stack, cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``cmd`` run while the sshd is frozen, then killed once ``cmd``'s connection is in."""
    pid = int((stack.state / "run" / "sshd.pid").read_text().split()[0])
    os.kill(pid, signal.SIGSTOP)
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=stack.client_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not _established(stack.ports["ssh"]):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no connection to the sshd within 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(pid, signal.SIGKILL)  # the frozen daemon (its session, its children)
    t = time.monotonic()
    out, err = proc.communicate(timeout=600)
    TIMES[f"{cmd[1]}: sshd killed -> exited"] = time.monotonic() - t
    deadline = time.monotonic() + 30
    while _group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _errors(r: subprocess.CompletedProcess, port: int) -> list[str]:
    """The ``ERROR`` lines of a command that lost the sshd: it failed, no traceback, and its
    first line names the refused address."""
    text = r.stdout + r.stderr
    errors = [x for x in text.splitlines() if x.startswith("ERROR")]
    print(f"\n{r.args[1]} with the sshd killed: exit {r.returncode}: {errors}")
    assert r.returncode != 0, text[-3000:]
    assert "Traceback" not in text, text[-4000:]
    assert errors and f"Connect call failed ('127.0.0.1', {port})" in errors[0], text[-4000:]
    return errors


def _remote_sound(stack: Stack) -> int:
    """Every object of the remote: its bytes' md5 is its name. Their number."""
    objs = [p for p in (stack.state / "dvc-remote" / "files" / "md5").rglob("*") if p.is_file()]
    for p in objs:
        name = p.parent.name + p.name.removesuffix(".dir")
        assert _md5(p) == name, f"corrupt object on the remote: {p}"
    return len(objs)


def _lock_outs(clone: Path) -> dict[str, str]:
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for s in STAGES for o in lock["stages"][s]["outs"]}


def _check_against_lock(clone: Path) -> int:
    """Every output of the data stages as dvc.lock says (a .dir: exactly its listed files,
    each of its md5). The number of files checked."""
    n = 0
    for path, md5 in _lock_outs(clone).items():
        p = clone / path
        if md5.endswith(".dir"):
            listing = json.loads((clone / ".dvc" / "cache" / "files" / "md5" / md5[:2] /
                                  md5[2:]).read_text())
            want = {e["relpath"]: e["md5"] for e in listing}
            have = {str(f.relative_to(p)): _md5(f) for f in p.rglob("*") if f.is_file()}
            assert have == want, (path, sorted(set(have.items()) ^ set(want.items()))[:5])
            n += len(have)
        else:
            assert _md5(p) == md5, path
            n += 1
    return n


@pytest.mark.timeout(2400)
def test_sshd_killed_during_push_and_pull(stack):
    dvc(stack, "repro", "patches", timeout=1200)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run(stack, [*git, "add", "dvc.lock"])
    run(stack, [*git, "commit", "-qm", "the data stages"])
    outs = _lock_outs(stack.clone)
    assert set(outs) >= {"data/manifest.parquet", "data/lr", "data/patches"}, outs

    # push: the sshd killed while the push waits on it
    port = stack.ports["ssh"]
    err = _errors(_kill_sshd_during(stack, ["dvc", "push"], stack.clone), port)
    assert len(err) == 1, err  # DVC 3: "ERROR: unexpected error - [Errno 111] Connect call ..."
    objs = _remote_sound(stack)
    t = time.monotonic()
    restarted(stack, "sshd")
    push = dvc(stack, "push")
    TIMES["recovery: up + push"] = time.monotonic() - t
    assert re.search(r"\d+ files? pushed", push.stdout + push.stderr), push.stdout + push.stderr
    n_remote = _remote_sound(stack)
    print(f"push error: {err}\nremote objects: {objs} after the fault, {n_remote} after the push")

    # pull into a fresh clone: the sshd killed while the pull waits on it
    fresh = stack.state.parent / "fresh"
    run(stack, ["git", "clone", "-q", str(stack.clone), str(fresh)])
    shutil.copy(stack.clone / ".dvc" / "config.local", fresh / ".dvc" / "config.local")
    err = _errors(_kill_sshd_during(stack, ["dvc", "pull", *STAGES], fresh), port)
    # DVC 3 says it in two lines: the connection refused, then its count of files not fetched
    assert len(err) == 2 and err[0].startswith("ERROR: failed to connect to ssh"), err
    assert re.fullmatch(r"ERROR: failed to pull data from the cloud - \d+ files? failed to "
                        r"download", err[1]), err
    left = [o for o in outs if (fresh / o).exists()]
    assert not left, left  # nothing half-restored
    t = time.monotonic()
    restarted(stack, "sshd")
    pull = dvc(stack, "pull", *STAGES, cwd=fresh)  # dvc.lock's training stages: not pushed
    TIMES["recovery: up + pull"] = time.monotonic() - t
    n = _check_against_lock(fresh)
    print(f"pull error: {err}\nfresh clone: {n} files as dvc.lock says")
    assert n >= 3, n
    st = dvc(stack, "status", "--json", *STAGES, cwd=fresh)
    assert json.loads(st.stdout) == {}, st.stdout + pull.stdout
    print("\n".join(f"{k}: {v:.1f} s" for k, v in TIMES.items()))
