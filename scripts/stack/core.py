"""What every part of the stack shares: the state directory's layout, settings, secrets, logs,
the context a verb works from (``Ctx``) and its output, one line at a time."""

from __future__ import annotations

import json
import os
import secrets
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from rlfn.io import atomic_write

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"  # where the servers themselves listen (off loopback: behind TLS, see Ctx.host)
HOST_VAR = "RLFN_STACK_HOST"
PY = sys.executable
VENV_BIN = Path(PY).parent


class StackError(Exception):
    """One clear line about one service."""


# --------------------------------------------------------------------------- layout
STACK = Path(os.environ.get("RLFN_STACK_DIR") or ROOT / ".stack").resolve()
SECRETS = STACK / "secrets" / "stack.json"
RUN = STACK / "run"
LOGS = STACK / "logs"
STATE = RUN / "state.json"
PG_DIR = STACK / "postgres"
PG_DATA = PG_DIR / "data"
SSH = STACK / "ssh"
CLIENT_KEY = SSH / "id_ed25519"
KNOWN_HOSTS = SSH / "known_hosts"
TLS = STACK / "tls"
CA_CERT = TLS / "ca.crt"


def timeout_s() -> float:
    """Seconds a service gets to become ready (``RLFN_STACK_TIMEOUT``, default 120)."""
    return float(os.environ.get("RLFN_STACK_TIMEOUT", "120"))


def log_path(service: str) -> Path:
    """``logs/<service>.log``."""
    return LOGS / f"{service}.log"


def open_log(service: str):
    """The service's log, for appending; readable by its owner only."""
    fd = os.open(log_path(service), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


def rel(p: Path) -> str:
    """A path as a person reads it: relative to the current directory when inside it."""
    try:
        return os.path.relpath(p) if Path.cwd() in p.parents else str(p)
    except ValueError:
        return str(p)


def read_json(p: Path) -> dict:
    """The JSON object in ``p``; empty when the file is missing or not JSON."""
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def write_private(p: Path, text: str, mode: int = 0o600) -> None:
    """Write ``text`` to ``p`` atomically, the file never readable by others."""
    atomic_write(p, text, mode=mode)


_print_lock = threading.Lock()


def say(line: str, err: bool = False) -> None:
    """Print one whole line (services start in threads), to stderr with ``err``."""
    with _print_lock:
        print(line, file=sys.stderr if err else sys.stdout, flush=True)


# --------------------------------------------------------------------------- context
@dataclass(frozen=True)
class Port:
    """A service's port setting: the environment variable that sets it, and its default."""

    var: str
    default: int


@dataclass(frozen=True)
class Ctx:
    """What a verb works from: the port of each service that has one, its setting, the project
    (the clone the worker runs flows in, whose DVC remote is set) and the secrets (None where
    there are none yet: ``status`` before the first ``up``)."""

    ports: Mapping[str, int]
    port_settings: Mapping[str, Port]
    project_dir: str
    sec: dict | None
    host: str = HOST
    worker: bool = True  # whether this host runs a worker (RLFN_STACK_WORKER=0: workers join)

    @property
    def remote(self) -> bool:
        """Whether clients reach the stack off loopback (``up --host ADDR``): then every
        service speaks TLS with the stack's CA, and only its TLS ends listen on ``host``."""
        return self.host != HOST

    def recorded(self) -> dict:
        """What ``up`` records in ``run/state.json`` for the verbs after it."""
        return {"ports": dict(self.ports), "project_dir": self.project_dir, "host": self.host,
                "worker": self.worker}


def load_ctx(settings: Mapping[str, Port], sec: dict | None) -> Ctx:
    """The context with secrets ``sec``, each service's port by its setting in ``settings``:
    ports, project directory and worker the environment's (each port's variable,
    ``RLFN_PROJECT_DIR``, ``RLFN_STACK_WORKER``), else those the last ``up`` recorded, else the
    defaults."""
    st = read_json(STATE)
    ports = {s: int(os.environ.get(p.var) or st.get("ports", {}).get(s) or p.default)
             for s, p in settings.items()}
    project = os.environ.get("RLFN_PROJECT_DIR") or st.get("project_dir") or str(ROOT)
    host = os.environ.get(HOST_VAR) or st.get("host") or HOST
    flag = os.environ.get("RLFN_STACK_WORKER", "").strip()
    worker = flag not in ("0", "false", "no") if flag else bool(st.get("worker", True))
    return Ctx(ports, settings, str(Path(project).resolve()), sec, host, worker)


def check_host(addr: str, flag: str) -> str:
    """``addr`` as given to ``up`` (``flag`` names where: ``--host`` or RLFN_STACK_HOST):
    an IPv4 address of this machine; StackError (one line) otherwise."""
    import ipaddress
    import socket

    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise StackError(f"{flag} {addr!r}: not an IP address (the address of this host the "
                         "stack listens on, e.g. 10.0.0.5)") from None
    if ip.version != 4:
        raise StackError(f"{flag} {addr!r}: only IPv4 addresses are supported for now")
    if ip.is_unspecified:
        raise StackError(f"{flag} {addr!r}: give one address of this host, not all of them")
    with socket.socket() as s:
        try:
            s.bind((addr, 0))
        except OSError as e:
            raise StackError(f"{flag} {addr!r}: not an address of this host ({e.strerror})")\
                from None
    return str(ip)


def load_secrets() -> dict:
    """The secrets ``up`` generated; StackError when there are none."""
    s = read_json(SECRETS)
    if not s:
        raise StackError(f"no secrets at {SECRETS}: run `scripts/stack.sh up` first")
    return s


def ensure_secrets(want: Mapping[str, int]) -> dict:
    """The secrets, each of ``want`` (name -> bytes of randomness) generated when missing, in a
    private file. StackError when the cluster exists but its passwords are gone."""
    SECRETS.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(SECRETS.parent, 0o700)
    s = read_json(SECRETS)
    missing = [k for k in want if not s.get(k)]
    if missing and s.get("pg_superuser_password") is None and (PG_DATA / "PG_VERSION").exists():
        raise StackError(f"postgresql: {PG_DATA} exists but {SECRETS} is gone: its passwords are "
                         f"lost (remove {STACK} to start over)")
    if missing:
        for k in missing:
            s[k] = secrets.token_urlsafe(want[k])
        save_secrets(s)
    os.chmod(SECRETS, 0o600)
    return s


def save_secrets(s: dict) -> None:
    """The secrets ``s`` written, owner-only (``up``'s new ones, ``rotate``'s)."""
    write_private(SECRETS, json.dumps(s, indent=1) + "\n")


def base_env(**extra: str) -> dict[str, str]:
    """The environment of the stack's processes: ours, less any MLflow/Prefect settings of the
    caller's shell (the stack sets its own), the venv's commands first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env
