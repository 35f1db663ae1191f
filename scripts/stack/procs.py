"""The stack's processes: daemons of ours (each a process group, its leader in
``run/<service>.pid``) started, waited for and stopped; short commands run into a log; ports."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

from rlfn.io import atomic_write
from stack.core import HOST, RUN, Ctx, StackError, log_path, open_log, rel, timeout_s


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of a live process, None when gone."""
    try:
        s = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid, pgrp = s[s.rindex(")") + 2:].split()[:3]
    return state, int(ppid), int(pgrp)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def _tree(leader: int) -> set[int]:
    """Live processes of ``leader``'s group and all their descendants (a flow run that a
    worker started in a session of its own included)."""
    procs = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat(int(d.name))
            if st is not None and st[0] != "Z":
                procs[int(d.name)] = st
    found = {p for p, (_, _, pg) in procs.items() if pg == leader}
    if alive(leader):
        found.add(leader)
    grew = True
    while grew:
        kids = {p for p, (_, pp, _) in procs.items() if pp in found} - found
        grew = bool(kids)
        found |= kids
    return found


def children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (an nginx master's workers)."""
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat(int(d.name))
            if st is not None and st[0] != "Z" and st[1] == pid:
                out.add(int(d.name))
    return out


def kill_tree(leader: int, grace: float = 10) -> None:
    """Stop ``leader``'s tree: SIGTERM, ``grace`` seconds, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        pids = _tree(leader)
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:  # reap the leader when it is our child (it is not, in a fresh `down`)
                os.waitpid(leader, os.WNOHANG)
            except ChildProcessError:
                pass
            if not any(alive(p) for p in pids):
                break
            time.sleep(0.1)


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of its stat), None when gone."""
    try:
        s = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return s[s.rindex(")") + 2:].split()[19]


def _pid_file(service: str) -> Path:
    """``run/<service>.pid``: "<pid> <start time>" of the daemon's group leader."""
    return RUN / f"{service}.pid"


def _read_pid(service: str) -> int | None:
    """The group leader recorded for ``service``: its pid, also when it has exited (members of
    its group may be left); None when there is none, or when the pid now belongs to another
    process (reused: its start time differs)."""
    try:
        pid, started = _pid_file(service).read_text().split()[:2]
        pid = int(pid)
    except (OSError, ValueError):
        return None
    now = _start_time(pid)
    return None if now is not None and now != started and alive(pid) else pid


def pid_of(service: str) -> int | None:
    """The pid of ``service``'s running leader, else None."""
    pid = _read_pid(service)
    return pid if pid is not None and alive(pid) else None


KEEP = Path(__file__).with_name("keep.py")


def kept(service: str, cmd: list[str]) -> list[str]:
    """``cmd`` run under ``keep.py``: started again when it exits on its own (the Prefect
    workers: see keep.py); ``down`` stops both (``stop_daemon``: the whole tree)."""
    import sys

    return [sys.executable, str(KEEP), service, "--", *cmd]


def spawn(service: str, cmd: list[str], env: dict, cwd: Path | str) -> subprocess.Popen:
    """Start daemon ``service`` in a session of its own, output appended to its log, its pid
    in ``run/<service>.pid``. A dead previous one's leftovers are stopped first."""
    old = _read_pid(service)
    if old is not None:
        kill_tree(old, grace=3)
    with open_log(service) as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} stack up: starting {service}\n"
                  .encode())
        log.flush()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             env=env, cwd=cwd, start_new_session=True)
    atomic_write(_pid_file(service), f"{p.pid} {_start_time(p.pid)}\n")
    return p


def stop_daemon(service: str) -> str:
    """``down`` of daemon ``service``: its whole tree stopped, its pid file removed."""
    pid = _read_pid(service)
    stopped = pid is not None and bool(_tree(pid))
    if stopped:
        kill_tree(pid)
    _pid_file(service).unlink(missing_ok=True)
    return "stopped" if stopped else "not running"


def wait_until(service: str, probe: Callable[[], bool], proc: subprocess.Popen,
               what: str) -> None:
    """Wait for ``probe()``; StackError naming ``service`` and ``what`` did not answer when
    ``proc`` exits first or the timeout passes."""
    deadline = time.monotonic() + timeout_s()
    while not probe():
        if proc.poll() is not None:
            why = f"exited with code {proc.returncode} before {what} answered"
        elif time.monotonic() > deadline:
            why = f"{what} did not answer within {timeout_s():.0f} s"
        else:
            time.sleep(0.3)
            continue
        raise StackError(f"{service}: {why}; read {rel(log_path(service))}")


def port_free(port: int, host: str = HOST) -> bool:
    """Whether nothing listens on ``host:port``."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def require_free(ctx: Ctx, service: str, host: str = HOST, port_of: str = "") -> None:
    """StackError naming ``service``, its port on ``host`` and the setting to change when it is
    taken (``port_of``: the service whose port it is, default ``service``)."""
    port_of = port_of or service
    port = ctx.ports[port_of]
    if not port_free(port, host):
        raise StackError(f"{service}: port {host}:{port} is taken by another program (set "
                         f"{ctx.port_settings[port_of].var} to a free port{_ephemeral(port)})")


def _ephemeral(port: int) -> str:
    """A hint when ``port`` lies in the kernel's ephemeral range, where any outgoing connection
    of this host may hold it for a while; else ''."""
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return ""
    if not lo <= port <= hi:
        return ""
    return (f"; {port} lies in the kernel's ephemeral range {lo}-{hi}, where an outgoing "
            f"connection may hold it: a port below {lo} cannot be taken that way")


def run_logged(service: str, cmd: list[str], env: dict | None = None, cwd=None,
               timeout: float | None = None, **kw) -> subprocess.CompletedProcess:
    """Run a short command, its output appended to the service's log."""
    with open_log(service) as log:
        log.write(f"--- {time.strftime('%H:%M:%S')} $ {shlex.join(cmd)}\n".encode())
        log.flush()
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log,
                              stderr=subprocess.STDOUT, env=env, cwd=cwd,
                              timeout=timeout or max(timeout_s(), 120), **kw)
