"""The team stack in tests: ``scripts/stack.sh`` brought up for a test module on reserved
ports in a temporary state directory, serving a temporary clone of this repository, and what
its tests share (the ``Stack`` handle, its prerequisites, a plain HTTP client). Used by
test_stack.py and test_stack_repro.py; a developer's own stack and working tree are left
alone."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pprint
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from prereq import ROOT, require_module, unavailable
from servers import clean_env, free_port, processes_with_env

STACK_SH = ROOT / "scripts" / "stack.sh"
SERVICES = ("postgresql", "mlflow", "prefect", "worker", "rollout-worker", "webhooks", "serve",
            "sshd")

TLS_EXPORTS = ("MLFLOW_TRACKING_SERVER_CERT_PATH", "PREFECT_API_SSL_CERT_FILE")  # off loopback
EXPORTS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
           "PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY",
           "RLFN_OPTUNA_STORAGE", "RLFN_PROJECT_DIR")


@dataclass
class Stack:
    env: dict          # the environment `scripts/stack.sh` runs with (state dir, ports)
    state: Path        # RLFN_STACK_DIR
    clone: Path        # RLFN_PROJECT_DIR
    ports: dict
    up_output: str     # what the first `up` printed
    up_seconds: float
    _exports: dict | None = field(default=None, repr=False)

    def sh(self, cmd: str, *args: str, timeout: float = 300,
           **env) -> subprocess.CompletedProcess:
        """``scripts/stack.sh CMD ARGS...`` with this stack's environment (and ``env``)."""
        return subprocess.run(["bash", str(STACK_SH), cmd, *args], capture_output=True, text=True,
                              env={**self.env, **env}, timeout=timeout, cwd=ROOT)

    def exports(self) -> dict[str, str]:
        r = self.sh("env")
        assert r.returncode == 0, r.stderr
        assert all(x.startswith("export ") for x in r.stdout.splitlines()), r.stdout
        return eval_env(r.stdout)

    def client_env(self, **extra) -> dict:
        """A client process's environment: the exports of `stack.sh env` (read once), its
        own PREFECT_HOME (fresh: none of the developer's profiles), no inherited settings;
        ``extra`` overrides any of them."""
        if self._exports is None:
            self._exports = self.exports()
        home = self.state.parent / "client-prefect-home"
        return clean_env(**{**self._exports, "PREFECT_HOME": str(home),
                            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra})

    def secrets(self) -> dict:
        return json.loads((self.state / "secrets" / "stack.json").read_text())


def eval_env(script: str, names: tuple[str, ...] = EXPORTS) -> dict[str, str]:
    """The variables ``names`` a bash shell has after ``eval "$script"``."""
    r = subprocess.run(["bash", "-c", 'eval "$1" && env -0', "_", script], capture_output=True,
                       env={"PATH": os.environ["PATH"]}, timeout=30)
    assert r.returncode == 0, r.stderr
    pairs = (item.split(b"=", 1) for item in r.stdout.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode() for k, v in pairs if k.decode() in names}


def prerequisites(off_loopback: bool = False) -> None:
    """What ``scripts/stack.sh`` needs here, or ``unavailable`` naming it; ``off_loopback``:
    also what ``up --host`` adds (nginx, openssl, ss)."""
    for name in ("psycopg", "asyncpg", "dvc_ssh", "flask_wtf", "optuna", "mlflow", "prefect"):
        require_module(name, extra="pipeline")
    for tool in ("initdb", "pg_ctl", "ssh", "ssh-keygen", "git"):
        if shutil.which(tool) is None:
            unavailable(f"command {tool!r} is not installed (PostgreSQL's server programs, "
                        "openssh-client and git are needed for scripts/stack.sh)")
    if os.geteuid() != 0 and not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()):
        unavailable("sshd is not installed and only root can install it (apt-get install "
                    "openssh-server)")
    for tool in ("nginx", "openssl", "ss") if off_loopback else ():
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            unavailable(f"command {tool!r} is not installed (apt-get install nginx openssl "
                        "iproute2)")


def http(method: str, url: str, body=None, auth: str | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()



# The stack's port settings (scripts/stack/services.py) and how many consecutive ports each takes.
PORT_SETTINGS = {"pg": ("RLFN_STACK_PG_PORT", 1), "mlflow": ("RLFN_STACK_MLFLOW_PORT", 1),
                 "prefect": ("RLFN_STACK_PREFECT_PORT", 1), "ssh": ("RLFN_STACK_SSH_PORT", 1),
                 "hook": ("RLFN_STACK_HOOK_PORT", 1),
                 "serve": ("RLFN_STACK_SERVE_PORT", 3)}  # serve: its instances at +1, +2


def stack_ports() -> tuple[dict[str, int], dict[str, str]]:
    """Every port of a stack reserved (``free_port``: below the kernel's ephemeral range, held
    by this test process): ``({"pg": port, ...}, {"RLFN_STACK_PG_PORT": "port", ...})``. Every
    one, not only those a test talks to: a default left in place (55070, 55080) lies in the
    ephemeral range, where an outgoing connection of the same host can hold it (CI run of
    cbb0c51: ``webhooks: port 127.0.0.1:55070 is taken``)."""
    ports = {k: free_port(n) for k, (_, n) in PORT_SETTINGS.items()}
    return ports, {var: str(ports[k]) for k, (var, _) in PORT_SETTINGS.items()}


@contextlib.contextmanager
def stack_up(prefix: str, prepare: Callable[[Path], None] | None = None,
             times: dict[str, float] | None = None, **extra_env: str) -> Iterator[Stack]:
    """A whole stack for a test module: a temporary state directory (``RLFN_STACK_DIR``) and
    a ``git clone`` of this repository (``RLFN_PROJECT_DIR``, passed to ``prepare`` before
    ``up``), on reserved loopback ports; ``down`` on exit, then a check that none of its
    processes survived (any that did are killed and named). ``extra_env`` goes to stack.sh."""
    prerequisites()
    # Not pytest's tmp_path: its base is 0700, and as root the postgres OS user must pass.
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, 0o711)
    state, clone = base / "state", base / "clone"
    ports, port_env = stack_ports()
    env = clean_env(RLFN_STACK_DIR=str(state), RLFN_PROJECT_DIR=str(clone), **port_env,
                    RLFN_STACK_WORKER_POLL_S="1", **extra_env)
    env.pop("RLFN_OPTUNA_STORAGE", None)
    try:
        subprocess.run(["git", "clone", "-q", "--local", str(ROOT), str(clone)], check=True,
                       timeout=120)
        if prepare is not None:
            prepare(clone)
        t0 = time.monotonic()
        r = subprocess.run(["bash", str(STACK_SH), "up"], capture_output=True, text=True,
                           env=env, timeout=600, cwd=ROOT)
        took = time.monotonic() - t0
        if times is not None:
            times["stack up (cold)"] = took
        print(f"\nstack up (cold): {took:.1f} s\n{r.stdout}{r.stderr}")
        assert r.returncode == 0, f"stack up failed:\n{r.stdout}\n{r.stderr}"
        yield Stack(env, state, clone, ports, r.stdout + r.stderr, took)
    finally:
        d = subprocess.run(["bash", str(STACK_SH), "down"], capture_output=True, text=True,
                           env=env, timeout=300, cwd=ROOT)
        left = processes_with_env("RLFN_STACK_DIR", str(state))
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(base, ignore_errors=True)
        if times:
            print("\n" + "\n".join(f"{k}: {v:.1f} s" for k, v in times.items()))
        assert d.returncode == 0, d.stdout + d.stderr
        assert not left, f"processes survived `stack.sh down`: {left}"


def why(*parts: object) -> str:
    """A failing assertion's message, whole: pytest cuts a message that is not a string to 240
    characters (a flow run's error and the logs after it were lost that way in CI); strings
    as they are, anything else pretty-printed, one part a paragraph."""
    return "\n".join(x if isinstance(x, str) else pprint.pformat(x, width=100) for x in parts)


def log_tails(state: Path, n: int = 15) -> str:
    """The last ``n`` lines of each of a stack's logs (``state``/logs: what a failed ``up``
    points to), for a failing assertion's message."""
    out = []
    for log in sorted((state / "logs").glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-n:]
        out.append(f"\n--- {log.name}\n" + "\n".join(lines))
    return "".join(out)


# ------------------------------------------------------------ commands as a client of a stack
BIN = Path(sys.executable).parent  # this environment's console scripts (dvc, prefect)


def run(stack: Stack, cmd: list[str], timeout: float = 900, check: bool = True,
        env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``cmd`` in the stack's clone with its client environment (``env``: another one); with
    ``check`` an AssertionError holding the output's tails when it fails. ``timeout`` is a
    hang guard."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env=env or stack.client_env(), cwd=cwd or stack.clone,
                       stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-4000:]}\n"
                             f"{r.stderr[-6000:]}")
    return r


def py(stack: Stack, code: str, *args: str, timeout: float = 300, env: dict | None = None,
       cwd: Path | None = None):
    """``code`` in a fresh interpreter (a client of the stack); its last line, as JSON."""
    r = run(stack, [sys.executable, "-c", code, *args], timeout=timeout, env=env, cwd=cwd)
    return json.loads(r.stdout.strip().splitlines()[-1])


def dvc(stack: Stack, *args: str, **kw) -> subprocess.CompletedProcess:
    return run(stack, [str(BIN / "dvc"), *args], **kw)


# A client's scripts against the stack (python -c): the champion loaded from the registry
# upscales an image; the tune stage's runs on the tracking server.
PYFUNC = r"""
import json
import numpy as np
import mlflow

model = mlflow.pyfunc.load_model("models:/rlfn-x4@champion")
img = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
out = np.asarray(model.predict(img))
print(json.dumps({"shape": list(out.shape), "dtype": str(out.dtype)}))
"""


TUNE_RUNS = r"""
import json, sys
from mlflow import MlflowClient
c = MlflowClient()
exp = c.get_experiment_by_name("rlfn")
runs = c.search_runs([exp.experiment_id], "tags.dvc_stage = 'tune'", max_results=1000)
print(json.dumps([{"id": r.info.run_id, "status": r.info.status,
                   "kind": r.data.tags.get("rlfn.kind"), "study": r.data.tags.get("optuna.study"),
                   "parent": r.data.tags.get("mlflow.parentRunId"),
                   "state": r.data.tags.get("optuna.state")} for r in runs]))
"""
