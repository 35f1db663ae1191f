"""Real local servers for tests: a free loopback port, `mlflow server` and `mlflow models serve`
on 127.0.0.1.

A server runs in its own process group (``start_new_session=True``) and is stopped as a group
(``stop_group``): its workers and helpers go with it, even when the leader died first. The
environment of every child keeps ``RLFN_TEST_SESSION`` (conftest's leak check finds any
process that outlives the session)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator


VENV_BIN = Path(sys.executable).parent


def clean_env(**extra) -> dict:
    """The environment for a subprocess that runs a project copy as a user would: this venv's
    commands first, no inherited MLflow/Prefect settings, no PYTHONPATH (cwd's code wins).
    Everything else is inherited, the leak check's ``RLFN_TEST_SESSION`` marker included."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = ""
    env.update(extra)
    return env


_RESERVED: list = []  # the lock files of this process's ports, open until it exits
PORT_LOCKS = Path(os.environ.get("RLFN_TEST_PORT_LOCKS", "/tmp/rlfn-test-ports"))


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(count: int = 1) -> int:
    """A loopback port reserved for this test process until it exits, with no check-then-use
    gap that another of our test sessions or the kernel could fall into: the port lies below
    the kernel's ephemeral range (``ip_local_port_range``: no ``bind(0)`` and no outgoing
    connection is ever given it), and an ``flock`` on ``PORT_LOCKS/<port>.lock``, held as long
    as this process lives, keeps every other test process of ours off it. It is also checked
    free (not bound by anything else) when taken. The server then binds it itself. With
    ``count``: the first of ``count`` consecutive ports, all reserved (a service whose
    helpers listen at its port + 1, + 2, ...: the stack's ``serve``)."""
    import fcntl
    import random

    PORT_LOCKS.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(PORT_LOCKS, 0o1777)  # several users' tests may share it (as /tmp)
    lo = 20000
    hi = min(32000, _ephemeral_range()[0] - 1) - (count - 1)
    rnd = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(500):
        first = rnd.randint(lo, hi)
        fds = []
        for port in range(first, first + count):
            fd = os.open(PORT_LOCKS / f"{port}.lock", os.O_CREAT | os.O_RDWR, 0o666)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                break
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:  # in use by something that is not our tests
                    break
        else:
            _RESERVED.extend(fds)
            return first
        for fd in fds:
            os.close(fd)
    raise RuntimeError(f"no {count} free loopback port(s) in {lo}-{hi} after 500 tries")


def _group_alive(pgid: int) -> bool:
    """Whether a running (not zombie) process is left in group ``pgid``. By /proc: an orphaned
    zombie that PID 1 does not reap (in some containers) still counts for ``killpg(pgid, 0)``."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def stop_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Stop the process group led by ``proc`` (started with ``start_new_session=True``):
    SIGTERM to every member, up to ``timeout`` s for all of them to exit, then SIGKILL. The
    whole group, also when the leader already exited and left children behind."""
    pgid = proc.pid  # a session leader's group id is its pid
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 15)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)  # reap the leader (its zombie would keep the group)
            if not _group_alive(pgid):
                return
    raise RuntimeError(f"process group {pgid} ({proc.args!r}) survived SIGKILL")


@contextlib.contextmanager
def mlflow_server(workdir: Path, backend_db: Path | None = None,
                  env: dict[str, str] | None = None) -> Iterator[str]:
    """Start a real ``mlflow server`` (SQLite backend in ``workdir``, artifacts beside it) on
    127.0.0.1, wait for ``/health`` (90 s at most) and yield its URL; stopped on exit.
    ``env``: more of the server's environment (``MLFLOW_SQLALCHEMYSTORE_POOLCLASS``, ...)."""
    db = backend_db or workdir / "server.db"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job runner
           **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    port = free_port()
    log_path = workdir / "server.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(port), "--backend-store-uri", f"sqlite:///{db}",
             "--artifacts-destination", str(workdir / "artifacts"), "--workers", "1"],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(proc, f"{url}/health", 90, log_path, "mlflow server")
        yield url
    finally:
        stop_group(proc)


def _wait_ready(proc: subprocess.Popen, url: str, timeout_s: float, log_path: Path,
                what: str) -> None:
    """Poll ``url`` until it answers 200; ``RuntimeError`` with the log's tail if ``proc``
    exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up:\n"
                               + log_path.read_text(errors="replace")[-3000:])
        time.sleep(0.25)


@contextlib.contextmanager
def mlflow_models_serve(model_uri: str, tracking_uri: str, workdir: Path,
                        timeout_s: float = 180) -> Iterator[str]:
    """Start the real ``mlflow models serve -m MODEL_URI --env-manager local`` on a free
    127.0.0.1 port (one worker, ``workdir`` as its working directory, this venv, no
    PYTHONPATH: the model runs the code it carries), wait for ``/ping`` (``timeout_s`` at most:
    it downloads and loads the model first) and yield its URL; stopped on exit."""
    port = free_port()
    log_path = workdir / "models-serve.log"
    url = f"http://127.0.0.1:{port}"
    env = clean_env(MLFLOW_TRACKING_URI=tracking_uri)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(proc, f"{url}/ping", timeout_s, log_path, "mlflow models serve")
        yield url
    finally:
        stop_group(proc)


def processes_with_env(var: str, value: str) -> dict[int, str]:
    """pid -> command line of every live process (but this one) whose environment carries
    ``var=value`` (children inherit it, so it finds orphans too). Zombies and processes of
    other users (unreadable) are left out."""
    needle = f"{var}={value}".encode()
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle not in (d / "environ").read_bytes().split(b"\0"):
                continue
            stat = (d / "stat").read_text()
            if stat[stat.rindex(")") + 2] == "Z":  # exited, waiting to be reaped
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):  # gone meanwhile, or not ours to read
            continue
        found[int(d.name)] = cmd.strip() or f"[pid {d.name}]"
    return found


def children(pid: int) -> list[int]:
    """The direct children of process ``pid``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def worker_under_keep(state: Path) -> tuple[int, int]:
    """The stack's worker (state directory ``state``): the pid of its ``scripts/stack/keep.py``
    (``run/worker.pid``) and of the one child of it running ``prefect worker start``
    (AssertionError when there is not exactly one)."""
    keeper = int((state / "run" / "worker.pid").read_text().split()[0])
    found = []
    for c in children(keeper):
        with contextlib.suppress(OSError):
            if b"worker\0start" in Path(f"/proc/{c}/cmdline").read_bytes():
                found.append(c)
    assert len(found) == 1, f"keep.py {keeper}: workers {found}"
    return keeper, found[0]


def restore_tracking_uri():
    """A fixture's body (``yield from restore_tracking_uri()``): ``mlflow.set_tracking_uri``
    also sets ``MLFLOW_TRACKING_URI`` in os.environ (which ``pipeline.tracking.tracking_uri``
    reads): both are put back afterwards, for the modules run later in the session."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old_uri = getattr(tracking_utils, "_tracking_uri", None)
    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(old_uri)
    if old_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old_env
