"""Real local servers for tests: a free loopback port, and `mlflow server` on 127.0.0.1."""

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
    commands first, no inherited MLflow/Prefect settings, no PYTHONPATH (cwd's code wins)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = ""
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(workdir: Path, backend_db: Path | None = None) -> Iterator[str]:
    """Start a real ``mlflow server`` (SQLite backend in ``workdir``, artifacts beside it) on
    127.0.0.1, wait for ``/health`` (90 s at most) and yield its URL; stopped on exit."""
    db = backend_db or workdir / "server.db"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner
    env.pop("MLFLOW_TRACKING_URI", None)
    port = free_port()
    log_path = workdir / "server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{db}",
         "--artifacts-destination", str(workdir / "artifacts"), "--workers", "1"],
        cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        log.close()

    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not come up:\n"
                                   + log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.25)
        yield url
    finally:
        stop()
