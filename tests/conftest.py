"""Shared fixtures and the suite's two rules.

1. **Missing prerequisites: skip locally, fail under ``CI=true``.** ``../shared`` (reference
   images and official weights), the optional packages of the ``[infer]`` extra and the
   command-line tools of the ``[dev]`` extra may be missing on a developer's machine: the tests
   that need them skip, saying why. Under ``CI=true`` every one of them must be there, so the
   same tests fail instead (``prereq.py``: ``unavailable``, ``require_module``,
   ``require_tool``, ``require_shared``). Hardware a
   CI runner cannot have (a CUDA GPU, native bf16) is not covered by this rule: tests that need
   it skip everywhere.

2. **No leaked processes.** Every process a test starts carries ``RLFN_TEST_SESSION=<uuid>`` in
   its environment (set in ``os.environ`` at session start: children inherit it, and
   ``servers.clean_env`` keeps it). At session end any such process still alive, other than
   pytest itself, is a leak: it is killed (its process group when it has its own) and the
   session fails with the leaked command lines.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from prereq import SHARED, require_shared

SESSION_VAR = "RLFN_TEST_SESSION"
_OWN_PREFECT_HOME = "RLFN_TEST_PREFECT_HOME"  # the PREFECT_HOME a session made for itself
LEAK_GRACE_S = 5.0  # how long stragglers get to exit on their own at session end


@pytest.fixture(scope="session")
def shared() -> Path:
    return require_shared(SHARED)


@pytest.fixture(scope="session")
def benchmarks(shared) -> Path:
    return require_shared(shared / "data" / "benchmarks")


@pytest.fixture(scope="session")
def pretrained(shared) -> Path:
    return require_shared(shared / "pretrained")


@pytest.fixture(scope="session")
def reference_metrics(shared) -> dict:
    import json

    return json.loads(require_shared(shared / "data" / "reference_metrics.json").read_text())


# --------------------------------------------------------------------------- rule 2
def pytest_configure(config):
    # A fresh marker per session (a pytest run inside a test gets its own), set before any
    # fixture or test can start a process.
    os.environ[SESSION_VAR] = uuid.uuid4().hex
    # Prefect's state for this session alone (not ~/.prefect): sessions and xdist workers
    # running side by side (.ci/run) never share a temporary server's database. Set before
    # any test module imports prefect; a test's subprocesses may still give their own.
    inherited = os.environ.get("PREFECT_HOME")
    if inherited is None or inherited == os.environ.get(_OWN_PREFECT_HOME):  # ours: renew
        import tempfile

        home = tempfile.mkdtemp(prefix="rlfn-test-prefect-")
        os.environ["PREFECT_HOME"] = os.environ[_OWN_PREFECT_HOME] = home
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        config._rlfn_prefect_home = home


def pytest_unconfigure(config):
    home = getattr(config, "_rlfn_prefect_home", None)
    if home:
        shutil.rmtree(home, ignore_errors=True)


def _marked_processes(marker: str) -> dict[int, str]:
    from servers import processes_with_env

    return processes_with_env(SESSION_VAR, marker)


def _stop_workers_owned_by_this_process() -> None:
    """Helpers that libraries keep for the life of *this* process and stop at its exit (not
    leaks): stop them now so the scan does not count them. One that fails to stop is then
    reported like any other leftover."""

    def inductor():  # torch.compile's compile-worker pool
        sys.modules["torch._inductor.async_compile"].shutdown_compile_workers()

    def prefect():  # a temporary Prefect server started in this process
        for s in list(sys.modules["prefect.server.api.server"].SubprocessASGIServer
                      ._instances.values()):
            s.stop()

    def resource_tracker():  # multiprocessing's resource tracker
        tracker = sys.modules["multiprocessing.resource_tracker"]._resource_tracker
        if getattr(tracker, "_pid", None):
            tracker._stop()

    for module, stop in (("torch._inductor.async_compile", inductor),
                         ("prefect.server.api.server", prefect),
                         ("multiprocessing.resource_tracker", resource_tracker)):
        if module in sys.modules:
            try:
                stop()
            except Exception as e:  # noqa: BLE001 - reported as a leak instead
                print(f"conftest: could not stop {module}'s workers: {e!r}", file=sys.stderr)


def _kill(pids: dict[int, str], marker: str) -> None:
    own_group = os.getpgrp()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                pgid = os.getpgid(pid)
                if pgid != own_group:  # started with start_new_session: the whole group
                    os.killpg(pgid, sig)
                else:
                    os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(p in _marked_processes(marker)
                                                  for p in pids):
            time.sleep(0.1)


@pytest.hookimpl(trylast=True)  # after the runner's own sessionfinish has torn fixtures down
def pytest_sessionfinish(session, exitstatus):
    marker = os.environ.get(SESSION_VAR, "")
    if not marker:
        return
    _stop_workers_owned_by_this_process()
    deadline = time.monotonic() + LEAK_GRACE_S
    leaked = _marked_processes(marker)
    while leaked and time.monotonic() < deadline:
        time.sleep(0.2)
        leaked = _marked_processes(marker)
    if not leaked:
        return
    _kill(leaked, marker)
    lines = [f"  pid {pid}: {cmd[:300]}" for pid, cmd in sorted(leaked.items())]
    msg = (f"{len(leaked)} process(es) started by the tests were still running "
           f"{LEAK_GRACE_S:.0f} s after the session ended (now killed):\n" + "\n".join(lines))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write("\n")
        reporter.write_sep("!", "leaked processes: the session fails", red=True, bold=True)
        reporter.write_line(msg)
    else:
        print(msg, file=sys.stderr)
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
