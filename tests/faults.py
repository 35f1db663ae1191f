"""Driving ``rlfn.failpoints`` from a test: arm points in a child's environment, wait for the
child to reach one (its marker file), release it. The fault then lands at a known point of the
child's work by construction, never by winning a race with a clock."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

from rlfn import failpoints


def armed_env(folder: Path, *points: str, **extra) -> dict[str, str]:
    """The variables that arm ``points`` (``NAME`` or ``NAME@VALUE``) with markers in
    ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return {failpoints.ENV: ",".join(points), failpoints.DIR_ENV: str(folder), **extra}


def wait_reached(folder: Path, name: str, proc: subprocess.Popen | None = None,
                 limit_s: float = 600, what: str | Callable[[], str] = "") -> int:
    """Wait until the child paused at failpoint ``name``; its pid. Fails (AssertionError with
    ``what``, or what it returns then: the child's output so far) if ``proc`` exits first or
    nothing is reached within ``limit_s`` (a bound on waiting, not a check of speed)."""
    marker = folder / f"{name}.reached"
    deadline = time.monotonic() + limit_s
    while not marker.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before failpoint "
                                 f"{name}: {what() if callable(what) else what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"failpoint {name} not reached within {limit_s:g} s: "
                                 f"{what() if callable(what) else what}")
        time.sleep(0.05)
    return int(marker.read_text().split()[0])


def release(folder: Path, name: str) -> None:
    """Let the child paused at ``name`` go on."""
    (folder / f"{name}.release").touch()


def pump_lines(proc: subprocess.Popen, into: list[str]) -> threading.Thread:
    """Append each line of ``proc``'s stdout (text mode) to ``into`` as it comes, on a daemon
    thread (returned: join it after the process exits), so a test can wait on the process and
    still print or check what it said so far."""
    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            into.append(line.rstrip("\n"))
    th = threading.Thread(target=pump, daemon=True)
    th.start()
    return th
