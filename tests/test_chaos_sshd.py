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

On the multi-host layout (tests/teamhosts.py: a server host, worker host ``w1`` joined, a
client), the server host's sshd dies the same way while ``w1`` pushes a folder to the remote
and pulls it back through its pinned route (issue 23's ``RLFN_DVC_REMOTE``: DVC's SSH client
inside an OpenSSH tunnel that checks the host key): DVC's ``ERROR`` line(s) follow OpenSSH's own
one naming the server's address and port (DVC alone says only "Connection lost").

Marked ``chaos`` only: a stack of its own and three stages (minutes on 2 cores); the
multi-host test, hosts and a stack of their own (about a minute).
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
from urllib.parse import urlsplit

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


# ------------------------------------------------------------------ the multi-host layout
@pytest.fixture(scope="module")
def team():
    from teamhosts import team_on_hosts

    with team_on_hosts(("w1",), join=("w1",)) as t:
        yield t


def _established_on(host, port: int) -> bool:
    """Whether ``host``'s namespace holds an established TCP connection to its ``port``."""
    r = host.root(["ss", "-tnH", "state", "established", "(", "sport", "=", f":{port}", ")"])
    return bool(r.stdout.strip())


def _kill_server_sshd_during(t, cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    """``cmd`` (a shell line) on worker host ``w1`` while the server host's sshd is frozen,
    then killed once ``cmd``'s connection is in. Its output through a pipe of w1's own user
    (as in a shell), so the pinned route's OpenSSH words reach it."""
    port = urlsplit(t.bundle["ssh"]["remote"]).port
    pid = int((t.state / "run" / "sshd.pid").read_text().split()[0])
    os.kill(pid, signal.SIGSTOP)
    w1 = t.workers["w1"]
    try:
        proc = w1.popen(["bash", "-c", f"{cmd} 2>&1 | cat; exit ${{PIPESTATUS[0]}}"], cwd=cwd)
        deadline = time.monotonic() + 300
        while not _established_on(t.srv, port):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no connection to the sshd within 300 s"
            time.sleep(0.1)
    finally:
        os.killpg(pid, signal.SIGKILL)
    tk = time.monotonic()
    out, _ = proc.communicate(timeout=600)
    TIMES[f"multi-host {cmd.split()[1]}: sshd killed -> exited"] = time.monotonic() - tk
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _failed_cleanly(r: subprocess.CompletedProcess, where: str) -> list[str]:
    """DVC's ``ERROR`` lines of a command whose sshd died (it failed, no traceback), after
    OpenSSH's own line naming the server's address and port (``where``: "ADDR port PORT"):
    DVC alone says only "Connection lost"."""
    lines = r.stdout.splitlines()
    errors = [x for x in lines if x.startswith("ERROR")]
    print(f"\n{r.args.split()[1]} with the server's sshd killed: exit {r.returncode}:\n"
          + "\n".join(lines[-12:]))
    assert r.returncode != 0, r.stdout[-3000:]
    assert "Traceback" not in r.stdout, r.stdout[-4000:]
    assert errors, r.stdout[-3000:]
    said = [x for x in lines[:lines.index(errors[0])] if where in x]
    assert said and re.search(r"Connection (reset|refused|closed)", said[0]), r.stdout[-3000:]
    return errors


@pytest.mark.timeout(2400)
def test_server_sshd_killed_during_a_worker_hosts_push_and_pull(team):
    """Case 5 on the multi-host layout: worker host ``w1`` pushes to and pulls from the
    server host's remote through its pinned route (``RLFN_DVC_REMOTE``: asyncssh inside an
    OpenSSH tunnel, issue 23), and the server's sshd dies with the transfer's connection in.
    Exactly: each command fails with DVC's ``ERROR`` line(s), no traceback; the remote holds
    no object whose bytes differ from its name; nothing half-restored in w1's workspace; after
    the server's ``up`` a push completes, and a pull restores every file byte for byte."""
    t = team
    w1, project = t.workers["w1"], t.project("w1")
    dvc = str(t.tools["w1"] / ".venv" / "bin" / "dvc")
    probe = project / "chaos-probe"
    probe.mkdir()
    files = {f"part{i}.bin": os.urandom(2 << 20) for i in range(3)}
    for name, data in files.items():
        (probe / name).write_bytes(data)
    subprocess.run(["chown", "-R", f"{w1.uid}:{w1.uid}", str(probe)], check=True)
    ok = w1.run([dvc, "add", "-q", "chaos-probe"], cwd=project, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    remote = t.state / "dvc-remote"

    def sound() -> int:
        objs = [p for p in (remote / "files" / "md5").rglob("*") if p.is_file()]
        for p in objs:
            assert _md5(p) == p.parent.name + p.name.removesuffix(".dir"), f"corrupt: {p}"
        return len(objs)

    def up() -> None:
        r = t.srv.run(["bash", t.stack_sh, "up", "--host", t.srv.addr], timeout=600,
                      **t.srv_env)
        assert r.returncode == 0 and re.search(r"^sshd\s+started", r.stdout, re.M), \
            r.stdout + r.stderr

    where = f"{t.srv.addr} port {urlsplit(t.bundle['ssh']['remote']).port}"
    before = sound()
    err = _failed_cleanly(_kill_server_sshd_during(t, f"{dvc} push chaos-probe.dvc", project),
                          where)
    assert err == ["ERROR: unexpected error - Connection lost"], err
    after_fault = sound()
    tr = time.monotonic()
    up()
    push = w1.run([dvc, "push", "chaos-probe.dvc"], cwd=project, timeout=600)
    TIMES["multi-host recovery: up + push"] = time.monotonic() - tr
    assert push.returncode == 0 and re.search(r"\d+ files? pushed", push.stdout), \
        push.stdout + push.stderr
    n = sound()
    assert n >= before + len(files), (before, n)
    print(f"push: {err}; remote objects {before} before, {after_fault} after the fault, "
          f"{n} after the push")

    # pull: the workspace copy and the cache gone, the server's sshd killed mid-pull
    shutil.rmtree(probe)
    shutil.rmtree(project / ".dvc" / "cache")
    err = _failed_cleanly(_kill_server_sshd_during(t, f"{dvc} pull chaos-probe.dvc", project),
                          where)
    assert len(err) == 2 and err[0].startswith("ERROR: failed to connect to ssh") and \
        re.fullmatch(r"ERROR: failed to pull data from the cloud - \d+ files? failed to "
                     r"download", err[1]), err
    assert not probe.exists() or not any(probe.iterdir()), list(probe.iterdir())
    tr = time.monotonic()
    up()
    pull = w1.run([dvc, "pull", "chaos-probe.dvc"], cwd=project, timeout=600)
    TIMES["multi-host recovery: up + pull"] = time.monotonic() - tr
    assert pull.returncode == 0, pull.stdout + pull.stderr
    assert {p.name: p.read_bytes() for p in probe.iterdir()} == files
    print(f"pull: {err}\n" + "\n".join(f"{k}: {v:.1f} s" for k, v in TIMES.items()))
