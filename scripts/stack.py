"""Team mode's service stack: ``scripts/stack.sh up | env | status | down``.

On 127.0.0.1 only, with all state under ``.stack/`` in the repository root (``RLFN_STACK_DIR``
moves it):

=============  ===================================================  ====================
service        what                                                 default port (env)
=============  ===================================================  ====================
postgresql     a cluster of the project's own (scram-sha-256),      55432
               databases ``mlflow``, ``prefect``, ``optuna``, role  (RLFN_STACK_PG_PORT)
               ``rlfn``
mlflow         ``mlflow server`` on PostgreSQL, artifacts served    55000
               by the server, basic-auth app                        (RLFN_STACK_MLFLOW_PORT)
prefect        ``prefect server start`` on PostgreSQL, API auth     54200
               string; work pool ``rlfn-pool`` with prefect.yaml's  (RLFN_STACK_PREFECT_PORT)
               deployments
worker         ``prefect worker start --pool rlfn-pool``            -
sshd           a private sshd (key only) for the DVC remote         52222
               ``stack`` (this clone's default, .dvc/config.local)  (RLFN_STACK_SSH_PORT)
=============  ===================================================  ====================

Layout of the state directory::

    secrets/stack.json   generated passwords (dir 0700, file 0600); only `env` prints them
    postgres/data        the cluster (owned by the ``postgres`` OS user when run as root)
    mlflow/              basic_auth.ini and the auth app's own SQLite database
    mlartifacts/         the artifacts the MLflow server stores
    prefect/             PREFECT_HOME
    ssh/                 sshd_config, host key, authorized_keys, the client key, known_hosts
    dvc-remote/          the DVC remote's storage
    logs/<service>.log   each service's output
    run/                 pid files and state.json (ports, project directory)

Other settings: ``RLFN_PROJECT_DIR`` (the clone the worker runs flows in and whose
.dvc/config.local gets the remote; default: this repository), ``RLFN_STACK_TIMEOUT`` (seconds a
service gets to become ready, default 120), ``RLFN_STACK_MLFLOW_WORKERS`` (default 1),
``RLFN_STACK_WORKER_POLL_S`` (how often the worker asks for flow runs; Prefect's default 10),
``RLFN_STACK_WORKER_LIMIT`` (flow runs the worker runs at once, default no limit; its flow runs
then split the cores between them: ``RLFN_PROCESSES``, see rlfn.threads).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
PY = sys.executable
VENV_BIN = Path(PY).parent
POOL = "rlfn-pool"
WORKER_NAME = "rlfn-stack-worker"
DATABASES = ("mlflow", "prefect", "optuna")
DB_ROLE = "rlfn"
PG_SUPERUSER = "postgres"
MLFLOW_ADMIN = "admin"
PREFECT_USER = "rlfn"
PORTS = {  # service -> (env var, default)
    "postgresql": ("RLFN_STACK_PG_PORT", 55432),
    "mlflow": ("RLFN_STACK_MLFLOW_PORT", 55000),
    "prefect": ("RLFN_STACK_PREFECT_PORT", 54200),
    "sshd": ("RLFN_STACK_SSH_PORT", 52222),
}
DAEMONS = ("worker", "prefect", "mlflow", "sshd")  # ours to signal (postgres: pg_ctl), stop order


class StackError(Exception):
    """One clear line about one service."""


# --------------------------------------------------------------------------- paths and state
STACK = Path(os.environ.get("RLFN_STACK_DIR") or ROOT / ".stack").resolve()
SECRETS = STACK / "secrets" / "stack.json"
RUN = STACK / "run"
LOGS = STACK / "logs"
PG_DIR = STACK / "postgres"
PG_DATA = PG_DIR / "data"
SSH = STACK / "ssh"
CLIENT_KEY = SSH / "id_ed25519"
KNOWN_HOSTS = SSH / "known_hosts"
STATE = RUN / "state.json"


def timeout_s() -> float:
    return float(os.environ.get("RLFN_STACK_TIMEOUT", "120"))


def log_path(service: str) -> Path:
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
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def write_private(p: Path, text: str, mode: int = 0o600) -> None:
    """Write ``text`` to ``p`` atomically, the file never readable by others."""
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, p)


def state() -> dict:
    """Ports and project directory: the environment's (``RLFN_STACK_*_PORT``,
    ``RLFN_PROJECT_DIR``), else those the last ``up`` recorded, else the defaults."""
    st = read_json(STATE)
    ports = {s: int(os.environ.get(var) or st.get("ports", {}).get(s) or default)
             for s, (var, default) in PORTS.items()}
    project = os.environ.get("RLFN_PROJECT_DIR") or st.get("project_dir") or str(ROOT)
    return {"ports": ports, "project_dir": str(Path(project).resolve())}


def load_secrets() -> dict:
    s = read_json(SECRETS)
    if not s:
        raise StackError(f"no secrets at {SECRETS}: run `scripts/stack.sh up` first")
    return s


def ensure_secrets() -> dict:
    SECRETS.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(SECRETS.parent, 0o700)
    s = read_json(SECRETS)
    want = {"pg_superuser_password": 24, "db_password": 24, "mlflow_admin_password": 24,
            "mlflow_flask_secret_key": 32, "prefect_password": 24}
    missing = [k for k in want if not s.get(k)]
    if missing and s.get("pg_superuser_password") is None and (PG_DATA / "PG_VERSION").exists():
        raise StackError(f"postgresql: {PG_DATA} exists but {SECRETS} is gone: its passwords are "
                         f"lost (remove {STACK} to start over)")
    if missing:
        for k in missing:
            s[k] = secrets.token_urlsafe(want[k])
        write_private(SECRETS, json.dumps(s, indent=1) + "\n")
    os.chmod(SECRETS, 0o600)
    return s


# --------------------------------------------------------------------------- URLs and env
def pg_url(st: dict, sec: dict, db: str, driver: str = "psycopg") -> str:
    return (f"postgresql+{driver}://{DB_ROLE}:{sec['db_password']}@{HOST}:"
            f"{st['ports']['postgresql']}/{db}")


def mlflow_url(st: dict) -> str:
    return f"http://{HOST}:{st['ports']['mlflow']}"


def prefect_url(st: dict) -> str:
    return f"http://{HOST}:{st['ports']['prefect']}/api"


def prefect_auth(sec: dict) -> str:
    return f"{PREFECT_USER}:{sec['prefect_password']}"


def ssh_user() -> str:
    import getpass

    return getpass.getuser()


def client_exports(st: dict, sec: dict) -> dict[str, str]:
    """What a client shell needs (``env`` prints these)."""
    return {
        "MLFLOW_TRACKING_URI": mlflow_url(st),
        "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
        "MLFLOW_TRACKING_PASSWORD": sec["mlflow_admin_password"],
        "PREFECT_API_URL": prefect_url(st),
        "PREFECT_API_AUTH_STRING": prefect_auth(sec),
        "RLFN_OPTUNA_STORAGE": pg_url(st, sec, "optuna"),
        "RLFN_PROJECT_DIR": st["project_dir"],
    }


def base_env(**extra: str) -> dict[str, str]:
    """The environment of the stack's processes: ours, less any MLflow/Prefect settings of the
    caller's shell (the stack sets its own), the venv's commands first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def prefect_client_env(st: dict, sec: dict, **extra: str) -> dict[str, str]:
    return base_env(PREFECT_HOME=str(STACK / "prefect"), PREFECT_API_URL=prefect_url(st),
                    PREFECT_API_AUTH_STRING=prefect_auth(sec),
                    PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)


# --------------------------------------------------------------------------- processes
def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of a live process, None when gone."""
    try:
        s = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid, pgrp = s[s.rindex(")") + 2:].split()[:3]
    return state, int(ppid), int(pgrp)


def alive(pid: int) -> bool:
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


def kill_tree(leader: int, grace: float = 10) -> None:
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
    try:
        s = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return s[s.rindex(")") + 2:].split()[19]  # field 22, starttime


def _read_pid(service: str) -> int | None:
    """The group leader recorded for ``service``: its pid, also when it has exited (members of
    its group may be left); None when there is none, or when the pid now belongs to another
    process (reused: its start time differs)."""
    try:
        pid, started = (RUN / f"{service}.pid").read_text().split()[:2]
        pid = int(pid)
    except (OSError, ValueError):
        return None
    now = _start_time(pid)
    return None if now is not None and now != started and alive(pid) else pid


def pid_of(service: str) -> int | None:
    """The pid of ``service``'s running leader, else None."""
    pid = _read_pid(service)
    return pid if pid is not None and alive(pid) else None


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
    (RUN / f"{service}.pid").write_text(f"{p.pid} {_start_time(p.pid)}\n")
    return p


def wait_until(service: str, probe: Callable[[], bool], proc: subprocess.Popen | None,
               what: str) -> None:
    deadline = time.monotonic() + timeout_s()
    while True:
        if probe():
            return
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{service}: exited with code {proc.returncode} before {what} "
                             f"answered; read {rel(log_path(service))}")
        if time.monotonic() > deadline:
            raise StackError(f"{service}: {what} did not answer within {timeout_s():.0f} s; "
                             f"read {rel(log_path(service))}")
        time.sleep(0.3)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def require_free(service: str, port: int) -> None:
    if not port_free(port):
        var = PORTS[service][0]
        raise StackError(f"{service}: port {HOST}:{port} is taken by another program (set {var} "
                         "to a free port)")


def run_logged(service: str, cmd: list[str], env: dict | None = None, cwd=None,
               timeout: float | None = None, **kw) -> subprocess.CompletedProcess:
    """Run a short command, its output appended to the service's log."""
    with open_log(service) as log:
        log.write(f"--- {time.strftime('%H:%M:%S')} $ {shlex.join(cmd)}\n".encode())
        log.flush()
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log,
                              stderr=subprocess.STDOUT, env=env, cwd=cwd,
                              timeout=timeout or max(timeout_s(), 120), **kw)


# --------------------------------------------------------------------------- HTTP
def http(method: str, url: str, body: dict | None = None, auth: tuple[str, str] | str | None
         = None, timeout: float = 5) -> tuple[int, object]:
    """(status, decoded JSON or text); status 0 when nothing answered."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if auth is not None:
        raw = auth if isinstance(auth, str) else f"{auth[0]}:{auth[1]}"
        headers["Authorization"] = "Basic " + base64.b64encode(raw.encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text = r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode(errors="replace")
    except (OSError, ValueError):
        return 0, None
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


# --------------------------------------------------------------------------- postgresql
def pg_os_user():
    """The (uid, gid) PostgreSQL runs as: the ``postgres`` OS user (RLFN_STACK_PG_OS_USER) when
    we are root (PostgreSQL refuses root), else None (as ourselves)."""
    if os.geteuid() != 0:
        return None
    import pwd

    name = os.environ.get("RLFN_STACK_PG_OS_USER", "postgres")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise StackError(f"postgresql: running as root needs an OS user {name!r} for the "
                         "server (PostgreSQL refuses root): create it or set "
                         "RLFN_STACK_PG_OS_USER") from None
    return pw.pw_uid, pw.pw_gid


def _as_pg(kw: dict) -> dict:
    u = pg_os_user()
    if u is not None:
        kw.update(user=u[0], group=u[1], extra_groups=[])
    return kw


def _check_traversable(path: Path, uid: int) -> None:
    """As root, the postgres OS user must be able to reach ``path``."""
    for d in reversed(path.parents):
        st = d.stat()
        if st.st_uid != uid and not st.st_mode & 0o001:
            raise StackError(f"postgresql: {d} is not searchable by the server's OS user "
                             f"(uid {uid}): chmod o+x it or set RLFN_STACK_DIR elsewhere")


def pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
            if (d / name).exists():
                return str(d / name)
        raise StackError(f"postgresql: command {name!r} not found (install PostgreSQL's server "
                         "programs: apt-get install postgresql)")
    return found


def pg_running() -> bool:
    try:
        pid = int((PG_DATA / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return alive(pid)


def pg_connect(st: dict, user: str, password: str, db: str = "postgres"):
    import psycopg

    return psycopg.connect(host=HOST, port=st["ports"]["postgresql"], user=user,
                           password=password, dbname=db, connect_timeout=5, autocommit=True)


def pg_healthy(st: dict, sec: dict | None) -> str | None:
    """None when the role ``rlfn`` logs in to every database; else why not."""
    if sec is None:
        return "no secrets (never set up)"
    try:
        for db in DATABASES:
            with pg_connect(st, DB_ROLE, sec["db_password"], db) as c:
                c.execute("SELECT 1")
    except Exception as e:  # noqa: BLE001 - any failure is a health answer
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def up_postgresql(st: dict, sec: dict) -> str:
    port = st["ports"]["postgresql"]
    url = f"postgresql://{HOST}:{port}"
    log = log_path("postgresql")
    u = pg_os_user()
    if pg_running():
        running = read_json(RUN / "postgresql.json").get("port")
        if running and running != port:
            raise StackError(f"postgresql: running on port {running}, not {port}: run "
                             "`scripts/stack.sh down` first")
        _pg_provision(st, sec)
        return f"already up at {url}"
    require_free("postgresql", port)
    PG_DIR.mkdir(exist_ok=True)
    if u is not None:
        _check_traversable(PG_DIR, u[0])
        os.chown(PG_DIR, *u)
    os.chmod(PG_DIR, 0o700)
    open_log("postgresql").close()
    if u is not None:
        os.chown(log, *u)
    if not (PG_DATA / "PG_VERSION").exists():
        if PG_DATA.exists():
            shutil.rmtree(PG_DATA)  # a half-made cluster of a failed first `up`
        pwfile = PG_DIR / "pwfile"
        write_private(pwfile, sec["pg_superuser_password"] + "\n")
        if u is not None:
            os.chown(pwfile, *u)
        try:
            r = run_logged("postgresql", [pg_bin("initdb"), "-D", str(PG_DATA), "-U", PG_SUPERUSER,
                                          "--auth=scram-sha-256", f"--pwfile={pwfile}",
                                          "--encoding=UTF8", "--locale=C", "--no-instructions"],
                           cwd="/", **_as_pg({}))
        finally:
            pwfile.unlink(missing_ok=True)
        if r.returncode != 0:
            raise StackError(f"postgresql: initdb failed (exit {r.returncode}); read {rel(log)}")
        with open(PG_DATA / "postgresql.conf", "a") as f:
            f.write("\n# scripts/stack.py: loopback TCP only, no Unix socket\n"
                    f"listen_addresses = '{HOST}'\n"
                    "unix_socket_directories = ''\n"
                    "password_encryption = 'scram-sha-256'\n"
                    "max_connections = 200\n")
    r = run_logged("postgresql", [pg_bin("pg_ctl"), "start", "-D", str(PG_DATA), "-l", str(log),
                                  "-w", "-t", str(int(timeout_s())), "-o", f"-p {port}"],
                   cwd="/", timeout=timeout_s() + 10, **_as_pg({}))
    if r.returncode != 0 or not pg_running():
        raise StackError(f"postgresql: did not start on {HOST}:{port}; read {rel(log)}")
    (RUN / "postgresql.json").write_text(json.dumps({"port": port}) + "\n")
    _pg_provision(st, sec)
    return f"started at {url}"


def _pg_provision(st: dict, sec: dict) -> None:
    """Role ``rlfn`` (its password as in secrets) owning databases mlflow, prefect, optuna."""
    from psycopg import sql

    try:
        with pg_connect(st, PG_SUPERUSER, sec["pg_superuser_password"]) as c:
            exists = c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (DB_ROLE,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            c.execute(sql.SQL(verb + " ROLE {} WITH LOGIN PASSWORD {}").format(
                sql.Identifier(DB_ROLE), sql.Literal(sec["db_password"])))
            for db in DATABASES:
                if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                 (db,)).fetchone():
                    c.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(db), sql.Identifier(DB_ROLE)))
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StackError(f"postgresql: could not set up role and databases on "
                         f"{HOST}:{st['ports']['postgresql']} ({first}); read "
                         f"{rel(log_path('postgresql'))}") from None


def up_optuna(st: dict, sec: dict) -> str:
    """Optuna's tables in database ``optuna``, made once here: Optuna creates them on first use,
    and two processes doing that at once on an empty database collide (CREATE TYPE ...
    duplicate key), so a study shared from the start needs them made beforehand."""
    with pg_connect(st, DB_ROLE, sec["db_password"], "optuna") as c:
        if c.execute("SELECT to_regclass('public.studies')").fetchone()[0] is not None:
            return "schema ready in database optuna"
    code = ("import os, optuna; optuna.storages.RDBStorage(os.environ['RLFN_OPTUNA_STORAGE'])")
    r = run_logged("optuna", [PY, "-c", code], env=base_env(
        RLFN_OPTUNA_STORAGE=pg_url(st, sec, "optuna")), cwd=STACK)
    if r.returncode != 0:
        raise StackError(f"optuna: could not create its tables in database optuna at "
                         f"{HOST}:{st['ports']['postgresql']}; read {rel(log_path('optuna'))}")
    return "schema created in database optuna"


def down_postgresql() -> str:
    if not pg_running():
        return "not running"
    r = run_logged("postgresql", [pg_bin("pg_ctl"), "stop", "-D", str(PG_DATA), "-m", "fast",
                                  "-w", "-t", "60"], cwd="/", timeout=90, **_as_pg({}))
    if r.returncode != 0:
        raise StackError(f"postgresql: pg_ctl stop failed; read {rel(log_path('postgresql'))}")
    return "stopped"


# --------------------------------------------------------------------------- mlflow
def mlflow_health(st: dict) -> bool:
    return http("GET", f"{mlflow_url(st)}/health", timeout=3)[0] == 200


def mlflow_healthy(st: dict, sec: dict | None) -> str | None:
    if pid_of("mlflow") is None:
        return "not running"
    if not mlflow_health(st):
        return "/health does not answer"
    if sec is None:
        return "no secrets"
    code, _ = http("POST", f"{mlflow_url(st)}/api/2.0/mlflow/experiments/search",
                   {"max_results": 1}, auth=(MLFLOW_ADMIN, sec["mlflow_admin_password"]))
    return None if code == 200 else f"the REST API answered HTTP {code} with the admin login"


def up_mlflow(st: dict, sec: dict) -> str:
    url = mlflow_url(st)
    if pid_of("mlflow") is not None and mlflow_health(st):
        return f"already up at {url}"
    require_free("mlflow", st["ports"]["mlflow"])
    auth_dir = STACK / "mlflow"
    auth_dir.mkdir(exist_ok=True)
    os.chmod(auth_dir, 0o700)
    (STACK / "mlartifacts").mkdir(exist_ok=True)
    ini = auth_dir / "basic_auth.ini"
    ini.write_text("[mlflow]\n"
                   "default_permission = READ\n"
                   f"database_uri = sqlite:///{auth_dir / 'basic_auth.db'}\n"
                   f"admin_username = {MLFLOW_ADMIN}\n"
                   "# admin_password: MLFLOW_AUTH_ADMIN_PASSWORD in the server's environment\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = base_env(
        # secrets by environment, never on a command line (ps shows those)
        MLFLOW_BACKEND_STORE_URI=pg_url(st, sec, "mlflow"),
        MLFLOW_AUTH_CONFIG_PATH=str(ini),
        MLFLOW_AUTH_ADMIN_PASSWORD=sec["mlflow_admin_password"],
        MLFLOW_FLASK_SERVER_SECRET_KEY=sec["mlflow_flask_secret_key"],
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    cmd = [PY, "-m", "mlflow", "server", "--host", HOST, "--port", str(st["ports"]["mlflow"]),
           "--serve-artifacts", "--artifacts-destination", str(STACK / "mlartifacts"),
           "--default-artifact-root", "mlflow-artifacts:/", "--app-name", "basic-auth",
           "--workers", os.environ.get("RLFN_STACK_MLFLOW_WORKERS", "1")]
    p = spawn("mlflow", cmd, env, STACK)
    wait_until("mlflow", lambda: mlflow_health(st), p, f"{url}/health")
    return f"started at {url}"


# --------------------------------------------------------------------------- prefect
def prefect_health(st: dict) -> bool:
    return http("GET", f"{prefect_url(st)}/health", timeout=3)[0] == 200


def prefect_healthy(st: dict, sec: dict | None) -> str | None:
    if pid_of("prefect") is None:
        return "not running"
    if not prefect_health(st):
        return "/api/health does not answer"
    if sec is None:
        return "no secrets"
    code, _ = http("GET", f"{prefect_url(st)}/work_pools/{POOL}", auth=prefect_auth(sec))
    return None if code == 200 else f"work pool {POOL}: HTTP {code}"


def up_prefect(st: dict, sec: dict) -> str:
    url = prefect_url(st)
    if pid_of("prefect") is not None and prefect_health(st):
        return f"already up at {url}"
    require_free("prefect", st["ports"]["prefect"])
    home = STACK / "prefect"
    home.mkdir(exist_ok=True)
    os.chmod(home, 0o700)
    env = base_env(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=pg_url(st, sec, "prefect", driver="asyncpg"),
        PREFECT_SERVER_API_AUTH_STRING=prefect_auth(sec),
        PREFECT_API_AUTH_STRING=prefect_auth(sec),
        PREFECT_SERVER_API_HOST=HOST,
        PREFECT_SERVER_API_PORT=str(st["ports"]["prefect"]),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_API_URL=url,
    )
    cmd = [PY, "-m", "prefect", "server", "start", "--host", HOST,
           "--port", str(st["ports"]["prefect"])]
    p = spawn("prefect", cmd, env, STACK)
    wait_until("prefect", lambda: prefect_health(st), p, f"{url}/health")
    return f"started at {url}"


def expected_deployments(project: Path) -> list[str]:
    import yaml

    doc = yaml.safe_load((project / "prefect.yaml").read_text())
    return [d["name"] for d in doc.get("deployments") or []]


def registered_deployments(st: dict, sec: dict) -> list[str] | None:
    code, data = http("POST", f"{prefect_url(st)}/deployments/filter",
                      {"work_pools": {"name": {"any_": [POOL]}}}, auth=prefect_auth(sec))
    if code != 200 or not isinstance(data, list):
        return None
    return [d["name"] for d in data]


def up_pool(st: dict, sec: dict) -> str:
    code, _ = http("GET", f"{prefect_url(st)}/work_pools/{POOL}", auth=prefect_auth(sec))
    if code == 200:
        return f"work pool {POOL} exists"
    r = run_logged("prefect", [PY, "-m", "prefect", "work-pool", "create", POOL,
                               "--type", "process"],
                   env=prefect_client_env(st, sec), cwd=st["project_dir"])
    if r.returncode != 0:
        raise StackError(f"prefect: could not create work pool {POOL} at {prefect_url(st)}; "
                         f"read {rel(log_path('prefect'))}")
    return f"work pool {POOL} created"


def up_deployments(st: dict, sec: dict) -> str:
    project = Path(st["project_dir"])
    want = expected_deployments(project)
    stamp = {"prefect.yaml": (project / "prefect.yaml").read_text(), "project": str(project)}
    have = registered_deployments(st, sec) or []
    if set(want) <= set(have) and read_json(RUN / "deployed.json") == stamp:
        return f"{len(want)} deployments already on {POOL}"
    log = log_path("deploy")
    env = prefect_client_env(st, sec, RLFN_PROJECT_DIR=str(project))
    r = run_logged("deploy", [PY, "-m", "prefect", "--no-prompt", "deploy", "--all"], env=env,
                   cwd=project, timeout=max(timeout_s(), 300))
    have = registered_deployments(st, sec) or []
    if r.returncode != 0 or not set(want) <= set(have):
        missing = sorted(set(want) - set(have))
        raise StackError(f"prefect deployments: `prefect deploy --all` in {project} failed "
                         f"(missing: {', '.join(missing) or 'none'}); read {rel(log)}")
    (RUN / "deployed.json").write_text(json.dumps(stamp) + "\n")
    return f"{len(want)} deployments on {POOL} (prefect deploy --all)"


def pool_workers(st: dict, sec: dict) -> list[dict]:
    code, data = http("POST", f"{prefect_url(st)}/work_pools/{POOL}/workers/filter", {},
                      auth=prefect_auth(sec))
    return data if code == 200 and isinstance(data, list) else []


def worker_online(st: dict, sec: dict, since: float | None = None) -> bool:
    """Whether the pool shows our worker online (with a heartbeat after ``since``, a time
    stamp: the entry of a worker stopped a minute ago still reads ONLINE)."""
    from datetime import datetime

    for w in pool_workers(st, sec):
        if w.get("name") != WORKER_NAME or w.get("status") != "ONLINE":
            continue
        if since is None:
            return True
        try:
            beat = datetime.fromisoformat(w["last_heartbeat_time"]).timestamp()
        except (KeyError, TypeError, ValueError):
            continue
        if beat >= since - 1:
            return True
    return False


def worker_healthy(st: dict, sec: dict | None) -> str | None:
    if pid_of("worker") is None:
        return "not running"
    if sec is None:
        return "no secrets"
    if not worker_online(st, sec):
        return f"pool {POOL} does not show {WORKER_NAME} online"
    return None


def worker_env(st: dict, sec: dict) -> dict:
    """The worker's environment, which its flow runs inherit: the stack's clients."""
    exports = client_exports(st, sec)
    return prefect_client_env(st, sec, **{k: v for k, v in exports.items()
                                          if not k.startswith("PREFECT_")})


def up_worker(st: dict, sec: dict) -> str:
    where = f"pool {POOL} at {prefect_url(st)}"
    if pid_of("worker") is not None and worker_online(st, sec):
        return f"already up on {where}"
    cmd = [PY, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process",
           "--name", WORKER_NAME]
    env = worker_env(st, sec)
    if os.environ.get("RLFN_STACK_WORKER_POLL_S"):  # how often it asks for flow runs (def. 10)
        env["PREFECT_WORKER_QUERY_SECONDS"] = os.environ["RLFN_STACK_WORKER_POLL_S"]
    limit = os.environ.get("RLFN_STACK_WORKER_LIMIT", "").strip()
    if limit:
        if not limit.isdigit() or int(limit) < 1:
            raise StackError(f"RLFN_STACK_WORKER_LIMIT={limit!r}: not a positive integer")
        cmd += ["--limit", limit]
        env["RLFN_PROCESSES"] = limit  # its flow runs share the cores (rlfn.threads)
    t = time.time()
    p = spawn("worker", cmd, env, st["project_dir"])
    wait_until("worker", lambda: worker_online(st, sec, since=t), p, f"{where} (worker online)")
    return f"started on {where}"


# --------------------------------------------------------------------------- sshd + DVC remote
def sshd_bin() -> str:
    for cand in (shutil.which("sshd"), "/usr/sbin/sshd"):
        if cand and os.access(cand, os.X_OK):
            return cand
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        r = run_logged("sshd", ["apt-get", "install", "-y", "-q", "openssh-server"], env=env,
                       timeout=600)
        if r.returncode != 0:  # a stale package list: update once, then again
            run_logged("sshd", ["apt-get", "update", "-q"], env=env, timeout=600)
            r = run_logged("sshd", ["apt-get", "install", "-y", "-q", "openssh-server"], env=env,
                           timeout=600)
        if r.returncode == 0 and os.access("/usr/sbin/sshd", os.X_OK):
            return "/usr/sbin/sshd"
    raise StackError(f"sshd: not installed and `apt-get install openssh-server` failed (needs "
                     f"root and Debian's packages); read {rel(log_path('sshd'))}")


def _secure_path(p: Path) -> bool:
    """sshd's StrictModes check of ``p``'s directories: each owned by root or us, not group- or
    world-writable."""
    for d in p.parents:
        st = d.stat()
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            return False
    return True


def ssh_probe_cmd(st: dict, key: Path = CLIENT_KEY, *extra: str) -> list[str]:
    return ["ssh", "-F", "/dev/null", "-i", str(key), "-p", str(st["ports"]["sshd"]),
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={KNOWN_HOSTS}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5", *extra,
            f"{ssh_user()}@{HOST}", "true"]


def sshd_answers(st: dict) -> bool:
    try:
        return subprocess.run(ssh_probe_cmd(st), stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def sshd_healthy(st: dict) -> str | None:
    if pid_of("sshd") is None:
        return "not running"
    return None if sshd_answers(st) else "does not let the client key in"


def remote_url(st: dict) -> str:
    return f"ssh://{ssh_user()}@{HOST}:{st['ports']['sshd']}{STACK / 'dvc-remote'}"


def up_sshd(st: dict) -> str:
    port = st["ports"]["sshd"]
    where = f"ssh://{ssh_user()}@{HOST}:{port}"
    exe = sshd_bin()
    SSH.mkdir(exist_ok=True)
    os.chmod(SSH, 0o700)
    (STACK / "dvc-remote").mkdir(exist_ok=True)
    host_key = SSH / "ssh_host_ed25519_key"
    for key, comment in ((host_key, "rlfn-stack-host"), (CLIENT_KEY, "rlfn-stack-client")):
        if not key.exists():
            r = run_logged("sshd", ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                                    "-f", str(key)])
            if r.returncode != 0:
                raise StackError(f"sshd: ssh-keygen failed; read {rel(log_path('sshd'))}")
    pub = CLIENT_KEY.with_suffix(".pub").read_text().strip()
    write_private(SSH / "authorized_keys", f"restrict {pub}\n")
    host_pub = " ".join(host_key.with_suffix(".pub").read_text().split()[:2])
    KNOWN_HOSTS.write_text(f"[{HOST}]:{port} {host_pub}\n")
    dvc_msg = _dvc_remote(st)
    if pid_of("sshd") is not None and sshd_answers(st):
        return f"already up at {where}; {dvc_msg}"
    require_free("sshd", port)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # Debian's privilege separation dir
    strict = "yes" if _secure_path(SSH / "authorized_keys") else "no"
    conf = SSH / "sshd_config"
    conf.write_text(
        "# scripts/stack.py: the DVC remote's private sshd (key only, loopback)\n"
        f"Port {port}\nListenAddress {HOST}\n"
        f'HostKey "{host_key}"\nAuthorizedKeysFile "{SSH / "authorized_keys"}"\n'
        "PidFile none\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitEmptyPasswords no\nHostbasedAuthentication no\nGSSAPIAuthentication no\n"
        "UsePAM no\nPermitRootLogin prohibit-password\n"
        f"AllowUsers {ssh_user()}\n"
        f"# StrictModes: yes unless a directory above the keys is group/world writable (/tmp)\n"
        f"StrictModes {strict}\n"
        "AllowTcpForwarding no\nAllowAgentForwarding no\nX11Forwarding no\nPermitTunnel no\n"
        "PrintMotd no\nSubsystem sftp internal-sftp\n")
    r = run_logged("sshd", [exe, "-t", "-f", str(conf)])
    if r.returncode != 0:
        raise StackError(f"sshd: its config {rel(conf)} is rejected (sshd -t); read "
                         f"{rel(log_path('sshd'))}")
    p = spawn("sshd", [exe, "-D", "-e", "-f", str(conf)], base_env(), STACK)
    wait_until("sshd", lambda: sshd_answers(st), p, f"{where} (key login)")
    return f"started at {where}; {dvc_msg}"


def _dvc_remote(st: dict) -> str:
    """This clone's default DVC remote ``stack`` (``.dvc/config.local``)."""
    import importlib.util

    if importlib.util.find_spec("dvc_ssh") is None:
        raise StackError("sshd: the DVC remote over SSH needs the dvc-ssh plugin, missing from "
                         f"{VENV_BIN.parent}: pip install dvc-ssh")
    project = Path(st["project_dir"])
    if not (project / ".dvc").is_dir():
        return f"no DVC repo at {project}: remote not set"
    url = remote_url(st)
    cfg = project / ".dvc" / "config.local"
    text = cfg.read_text() if cfg.exists() else ""
    if f"url = {url}" in text and f"keyfile = {CLIENT_KEY}" in text and "remote = stack" in text:
        return f"dvc remote 'stack' set ({rel(cfg)})"
    dvc = str(VENV_BIN / "dvc") if (VENV_BIN / "dvc").exists() else "dvc"
    for cmd in ([dvc, "remote", "add", "--local", "-d", "-f", "stack", url],
                [dvc, "remote", "modify", "--local", "stack", "keyfile", str(CLIENT_KEY)]):
        r = run_logged("sshd", cmd, env=base_env(), cwd=project, timeout=120)
        if r.returncode != 0:
            raise StackError(f"sshd: `{' '.join(cmd[1:3])}` for remote 'stack' failed in "
                             f"{project}; read {rel(log_path('sshd'))}")
    return f"dvc remote 'stack' set as default ({rel(cfg)})"


# --------------------------------------------------------------------------- commands
_print_lock = threading.Lock()


def say(line: str, err: bool = False) -> None:
    with _print_lock:
        print(line, file=sys.stderr if err else sys.stdout, flush=True)


def cmd_up() -> int:
    t0 = time.monotonic()
    for d in (STACK, RUN, LOGS):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(STACK, 0o711)  # the postgres OS user passes through to postgres/ (as root)
    os.chmod(RUN, 0o700)
    os.chmod(LOGS, 0o711)  # postgres writes its log (a file of its own) here
    st = state()
    try:
        sec = ensure_secrets()
    except StackError as e:
        say(str(e), err=True)
        return 1
    write_private(STATE, json.dumps(st, indent=1) + "\n", 0o644)
    failed: list[str] = []

    def step(name: str, fn: Callable[[], str], log: str | None = None) -> bool:
        t = time.monotonic()
        try:
            msg = fn()
        except StackError as e:
            failed.append(name)
            say(f"FAILED {e}", err=True)
            return False
        except Exception as e:  # noqa: BLE001 - one line, the log has the rest
            failed.append(name)
            first = (str(e).strip().splitlines() or [""])[0]
            say(f"FAILED {name}: {type(e).__name__}: {first}; read {rel(log_path(log or name))}",
                err=True)
            return False
        say(f"{name:<11} {msg} ({time.monotonic() - t:.1f} s)")
        return True

    where = {"mlflow": mlflow_url(st), "prefect": prefect_url(st), "optuna": "database optuna",
             "worker": f"pool {POOL} at {prefect_url(st)}"}

    def skipped(name: str, because: str) -> None:
        failed.append(name)
        say(f"FAILED {name}: not started at {where[name]}: {because} is not up", err=True)

    def prefect_chain() -> None:
        if not step("prefect", lambda: up_prefect(st, sec)):
            skipped("worker", "prefect")
            return
        if not step("work pool", lambda: up_pool(st, sec), "prefect"):
            skipped("worker", "the work pool")
            return
        with ThreadPoolExecutor(2) as ex:
            dep = ex.submit(step, "deployments", lambda: up_deployments(st, sec), "deploy")
            step("worker", lambda: up_worker(st, sec))
            dep.result()

    with ThreadPoolExecutor(4) as ex:
        ssh = ex.submit(step, "sshd", lambda: up_sshd(st))
        if step("postgresql", lambda: up_postgresql(st, sec)):
            ml = ex.submit(step, "mlflow", lambda: up_mlflow(st, sec))
            opt = ex.submit(step, "optuna", lambda: up_optuna(st, sec))
            prefect_chain()
            ml.result()
            opt.result()
        else:
            for name in ("mlflow", "optuna", "prefect", "worker"):
                skipped(name, "postgresql")
        ssh.result()
    took = time.monotonic() - t0
    if failed:
        say(f"stack: up failed ({', '.join(failed)}) after {took:.1f} s; state in {rel(STACK)}",
            err=True)
        return 1
    say(f"stack: up in {took:.1f} s (state in {rel(STACK)}); "
        'for a shell: eval "$(scripts/stack.sh env)"')
    return 0


def cmd_env() -> int:
    try:
        sec = load_secrets()
    except StackError as e:
        say(f"stack: {e}", err=True)
        return 1
    for k, v in client_exports(state(), sec).items():
        print(f"export {k}={shlex.quote(v)}")
    return 0


def cmd_status() -> int:
    st = state()
    sec = read_json(SECRETS) or None
    p = st["ports"]
    rows = [
        ("postgresql", f"postgresql://{HOST}:{p['postgresql']} (databases "
                       f"{', '.join(DATABASES)})",
         lambda: ("not running" if not pg_running() else pg_healthy(st, sec))),
        ("mlflow", mlflow_url(st), lambda: mlflow_healthy(st, sec)),
        ("prefect", prefect_url(st), lambda: prefect_healthy(st, sec)),
        ("worker", f"{WORKER_NAME} on pool {POOL} at {prefect_url(st)}",
         lambda: worker_healthy(st, sec)),
        ("sshd", f"ssh://{ssh_user()}@{HOST}:{p['sshd']} (DVC remote 'stack': "
                 f"{STACK / 'dvc-remote'})", lambda: sshd_healthy(st)),
    ]
    with ThreadPoolExecutor(len(rows)) as ex:
        results = list(ex.map(lambda r: r[2](), rows))
    down = 0
    for (name, where, _), problem in zip(rows, results):
        if problem is None:
            say(f"{name:<11} up    {where}")
        else:
            down += 1
            say(f"{name:<11} DOWN  {where}: {problem}; read {rel(log_path(name))}")
    if down:
        say(f"stack: {down} of {len(rows)} services down (start them: scripts/stack.sh up)",
            err=True)
    return 1 if down else 0


def cmd_down() -> int:
    if not STACK.exists():
        say(f"stack: nothing at {STACK}")
        return 0
    rc = 0
    for name in DAEMONS:
        pid = _read_pid(name)
        if pid is not None and _tree(pid):
            kill_tree(pid)
            say(f"{name:<11} stopped")
        else:
            say(f"{name:<11} not running")
        (RUN / f"{name}.pid").unlink(missing_ok=True)
    try:
        say(f"{'postgresql':<11} {down_postgresql()}")
    except StackError as e:
        say(f"FAILED {e}", err=True)
        rc = 1
    say(f"stack: down (data kept in {rel(STACK)})")
    return rc


def locked(fn: Callable[[], int]) -> Callable[[], int]:
    """``fn`` with the stack's lock held: one `up` or `down` at a time."""
    def run() -> int:
        import fcntl

        if not STACK.exists():  # nothing to guard yet (`up` makes it)
            return fn()
        RUN.mkdir(parents=True, exist_ok=True)
        with open(RUN / "lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f"stack: another `up` or `down` is running on {rel(STACK)}; waiting", err=True)
                fcntl.flock(f, fcntl.LOCK_EX)
            return fn()
    return run


def main(argv: list[str]) -> int:
    cmds = {"up": locked(cmd_up), "env": cmd_env, "status": cmd_status,
            "down": locked(cmd_down)}
    if len(argv) != 1 or argv[0] not in cmds:
        print("usage: scripts/stack.sh up | env | status | down", file=sys.stderr)
        return 2
    return cmds[argv[0]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
