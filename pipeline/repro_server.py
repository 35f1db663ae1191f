"""One Prefect server for all the stages of one ``dvc repro`` (the default, single-machine mode).

Without ``PREFECT_API_URL`` each stage process would start Prefect's temporary server of its
own: about 5 s of every stage's start-up on a 2-core machine, nine times per ``dvc repro``.
Instead the first stage of a ``dvc repro`` starts ``prefect server start --no-services`` on
127.0.0.1 (on the same database under ``PREFECT_HOME``, so flow runs land where they always
did) under a small watchdog, and the later stages of the same ``dvc repro`` use it. The
watchdog stops the server as soon as that ``dvc`` process has ended (or after
``IDLE_LIMIT_S`` in all), so nothing outlives the ``dvc repro``. A stage run by hand, or when
anything here fails, falls back to Prefect's own temporary server: this is only a speed-up.

``RLFN_SHARED_PREFECT=0`` turns it off."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

__all__ = ["server_url", "serve"]

STARTUP_LIMIT_S = 90
IDLE_LIMIT_S = 6 * 3600  # a dvc repro longer than this falls back to temporary servers


def _home() -> Path:
    return Path(os.environ.get("PREFECT_HOME", ".prefect"))


def _state_file() -> Path:
    return _home() / "repro-server.json"


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_url(repro: str, dvc_pid: int) -> str | None:
    """The API URL of the shared server of the ``dvc repro`` ``repro`` (started now if this is
    its first stage), or None (use Prefect's temporary server)."""
    if os.environ.get("RLFN_SHARED_PREFECT", "1") == "0":
        return None
    state = _state_file()
    try:
        st = json.loads(state.read_text())
        if st.get("repro") == repro and _alive(int(st["pid"])) and _healthy(st["url"]):
            return st["url"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    state.parent.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = open(_home() / "repro-server.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.repro_server", str(dvc_pid),
                             str(port)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True, close_fds=True)
    log.close()
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        if _healthy(url):
            tmp = state.with_suffix(".tmp")
            tmp.write_text(json.dumps({"repro": repro, "pid": proc.pid, "url": url}))
            tmp.replace(state)
            return url
        time.sleep(0.2)
    proc.kill()
    return None


def serve(dvc_pid: int, port: int) -> int:
    """The watchdog: run the server while ``dvc_pid`` lives."""
    prefect = Path(sys.executable).with_name("prefect")
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    srv = subprocess.Popen([str(prefect) if prefect.exists() else "prefect", "server", "start",
                            "--host", "127.0.0.1", "--port", str(port), "--no-services",
                            "--no-ui", "--log-level", "WARNING"], env=env,
                           stdin=subprocess.DEVNULL, start_new_session=True)
    t0 = time.monotonic()
    try:
        while srv.poll() is None and _alive(dvc_pid) and time.monotonic() - t0 < IDLE_LIMIT_S:
            time.sleep(0.5)
    finally:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):  # the server's group
            try:
                os.killpg(srv.pid, sig)
            except ProcessLookupError:
                break
            try:
                srv.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    return 0


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1]), int(sys.argv[2])))
