"""``stack.sh join FILE [--pool NAME]``: a worker host joins the team's stack from its bundle
(issue 23). Run from a clone of the project with its environment (``scripts/setup.sh``); the
state directory (``RLFN_STACK_DIR``, default ``.stack/``) is then a worker host's, not a
server's:

1. the bundle is read as ``env --bundle`` reads it (CA, SSH key, pinned host key and the ssh
   config for git in ``~/.config/rlfn-stack/<server address>/``);
2. the host's own clone of the team's repository (``RLFN_GIT_URL``, over SSH): at
   ``RLFN_PROJECT_DIR``, default ``<state>/project``; cloned into a temporary directory and
   renamed (never half made); kept (fetched) when it is already a clone of that URL. The clone
   that runs ``stack.sh`` is only the tool (its ``.venv`` runs the worker): flows run in the
   host's clone of the team's repository, so what they commit and push goes back there;
3. in that clone, its own DVC cache (the clone's ``.dvc/cache``) and the DVC remote ``stack``
   from the bundle as its default (``.dvc/config.local``, the client key);
4. ``prefect worker start --pool NAME`` (``rlfn-pool`` by default; ``rlfn-gpu`` for a GPU host,
   which prefect.yaml's ``*-gpu`` deployments target; another pool is made by the worker when
   missing) named
   ``rlfn-<hostname>-<address>``, its flow runs with the bundle's exports, ``RLFN_PROJECT_DIR``
   the clone; ``status`` shows it, ``down`` stops it.

Bad input (the bundle, ``--pool``, a state directory of a server, a project directory that is
not a clone of the URL) is one ``error:`` line naming it, exit 2, before anything is written.
What ``join`` recorded: ``run/state.json`` (``joined``: server, pool, worker, project) and
``secrets/join.json`` (the exports, owner-only: the worker's health check needs the API's
auth string)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from stack import bundle, prefect_server, sshd
from stack.core import (LOGS, PY, RUN, SECRETS, STACK, STATE, VENV_BIN, StackError, base_env,
                        log_path, read_json, rel, say, write_private)
from stack.procs import kept, pid_of, run_logged, spawn, stop_daemon, wait_until

JOIN_SECRETS = SECRETS.parent / "join.json"
POOL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
NAME = "worker"


def joined() -> dict:
    """What ``join`` recorded in this state directory (empty when it is not a worker host's)."""
    return read_json(STATE).get("joined") or {}


def _project_dir() -> Path:
    """The host's clone of the team's repository."""
    return Path(os.environ.get("RLFN_PROJECT_DIR") or STACK / "project").resolve()


def _origin(project: Path) -> str | None:
    """``origin``'s URL of the git repository ``project``; None when it is not one."""
    r = subprocess.run(["git", "remote", "get-url", "origin"], cwd=project, capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    return r.stdout.strip() if r.returncode == 0 else None


def _check(path: Path, pool: str) -> tuple[dict, Path]:
    """The bundle and the project directory, every input checked before anything is written;
    StackError (one line naming what is wrong) otherwise."""
    if not POOL_RE.match(pool):
        raise StackError(f"join --pool {pool!r}: not a work pool name (letters, digits, '.', "
                         "'_', '-'; e.g. rlfn-gpu)")
    doc = bundle.read(path, where=f"join {path}")
    if SECRETS.exists():
        raise StackError(f"join {path}: {STACK} is a server's state directory (it has "
                         f"{rel(SECRETS)}); a worker host joins with one of its own "
                         "(RLFN_STACK_DIR)")
    project = _project_dir()
    url = doc["git"]["url"]
    if project.exists() and any(project.iterdir()):
        if not (project / ".git").exists():
            raise StackError(f"join {path}: the project directory {project} exists and is not "
                             "a git clone (remove it, or set RLFN_PROJECT_DIR)")
        have = _origin(project)
        if have != url:
            raise StackError(f"join {path}: the project directory {project} is a clone of "
                             f"{have or 'nothing'}, not of the bundle's {url} (remove it, or "
                             "set RLFN_PROJECT_DIR)")
    return doc, project


def _git(args: list[str], env: dict, cwd: Path | None = None,
         timeout: float = 1800) -> subprocess.CompletedProcess:
    return run_logged(NAME, ["git", *args], env={**env, "GIT_TERMINAL_PROMPT": "0"}, cwd=cwd,
                      timeout=timeout)


def _clone(url: str, project: Path, env: dict) -> str:
    """The host's clone of ``url`` at ``project``: made (a temporary directory renamed), or
    fetched when it is there."""
    if (project / ".git").exists():
        r = _git(["fetch", "-q", "origin"], env, cwd=project)
        if r.returncode != 0:
            raise StackError(f"join: git fetch from {url} failed in {project}; read "
                             f"{rel(log_path(NAME))}")
        return f"kept {project} (fetched {url})"
    project.parent.mkdir(parents=True, exist_ok=True)
    tmp = project.with_name(f".{project.name}.joining")
    shutil.rmtree(tmp, ignore_errors=True)
    r = _git(["clone", "-q", url, str(tmp)], env)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StackError(f"join: git clone {url} failed; read {rel(log_path(NAME))}")
    if project.exists():
        project.rmdir()  # empty (checked)
    tmp.rename(project)
    return f"cloned {url} to {project}"


def _dvc_remote(doc: dict, project: Path, key: Path, env: dict) -> str:
    """The clone's default DVC remote ``stack``: the bundle's, through its pinned route
    (``sshd.pinned_remote``), with the client key."""
    dvc = str(VENV_BIN / "dvc") if (VENV_BIN / "dvc").exists() else "dvc"
    remote = sshd.pinned_remote(doc["ssh"]["remote"])
    for cmd in ([dvc, "remote", "add", "--local", "-d", "-f", "stack", remote],
                [dvc, "remote", "modify", "--local", "stack", "keyfile", str(key)]):
        r = run_logged(NAME, cmd, env=env, cwd=project, timeout=120)
        if r.returncode != 0:
            raise StackError(f"join: `{' '.join(cmd[1:3])}` for remote 'stack' failed in "
                             f"{project}; read {rel(log_path(NAME))}")
    return f"dvc remote 'stack' = {remote} ({rel(project / '.dvc' / 'config.local')})"


def _worker_name(server: str) -> str:
    """``rlfn-<hostname>-<this host's address toward the server>``: unique per host."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((server, 9))  # no packet: only picks the route's source address
            addr = s.getsockname()[0]
        except OSError:
            addr = "unknown"
    return f"rlfn-{socket.gethostname()}-{addr}"


def _online(j: dict, exports: dict, since: float | None = None) -> bool:
    return prefect_server.worker_online(
        exports["PREFECT_API_URL"], exports["PREFECT_API_AUTH_STRING"], j["pool"], j["worker"],
        since, cafile=exports.get("PREFECT_API_SSL_CERT_FILE"))


def cmd_join(file: str, pool: str) -> int:
    """``join FILE [--pool NAME]`` (see the module); 2 for bad input, 1 when a step fails."""
    path = Path(file)
    try:
        doc, project = _check(path, pool)
    except StackError as e:
        say(f"error: {e}", err=True)
        return 2
    t0 = time.monotonic()
    try:
        exports = bundle.client_exports(path, doc)
        client = bundle.client_dir(doc)
        for d in (STACK, RUN, LOGS, SECRETS.parent):
            d.mkdir(parents=True, exist_ok=True)
        for d in (STACK, RUN, SECRETS.parent):
            os.chmod(d, 0o700)
        say(f"{'client':<11} the bundle of {doc['host']}: CA, key, known_hosts, ssh_config, "
            f"dvc_ssh_config (included from ~/.ssh/config) in {client}")
        env = base_env(**exports)
        say(f"{'clone':<11} {_clone(doc['git']['url'], project, env)}")
        say(f"{'dvc':<11} {_dvc_remote(doc, project, client / 'id_ed25519', env)}")
        j = {"server": doc["host"], "pool": pool, "worker": _worker_name(doc["host"]),
             "project_dir": str(project), "client_dir": str(client),
             "prefect_api": exports["PREFECT_API_URL"]}
        write_private(JOIN_SECRETS, json.dumps(exports, indent=1) + "\n")
        old = joined()
        write_private(STATE, json.dumps({"joined": j}, indent=1) + "\n", 0o644)
        say(f"{NAME:<11} {_start_worker(j, exports, restart=old != j)}")
    except StackError as e:
        say(f"FAILED {e}", err=True)
        return 1
    say(f"stack: joined {doc['host']} in {time.monotonic() - t0:.1f} s as worker {j['worker']} "
        f"on pool {pool} (project in {project}); stop it: scripts/stack.sh down")
    return 0


def _start_worker(j: dict, exports: dict, restart: bool) -> str:
    """The host's ``prefect worker start`` on the pool (again when what it serves changed)."""
    where = f"pool {j['pool']} at {j['prefect_api']}"
    if pid_of(NAME) is not None and not restart and _online(j, exports):
        return f"{j['worker']} already up on {where}"
    cmd = [PY, "-m", "prefect", "worker", "start", "--pool", j["pool"], "--type", "process",
           "--name", j["worker"]]
    env = base_env(PREFECT_HOME=str(STACK / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   **exports, RLFN_PROJECT_DIR=j["project_dir"])
    prefect_server.worker_settings(cmd, env)
    (STACK / "prefect").mkdir(exist_ok=True)
    os.chmod(STACK / "prefect", 0o700)
    t = time.time()
    p = spawn(NAME, kept(NAME, cmd), env, j["project_dir"])
    wait_until(NAME, lambda: _online(j, exports, since=t), p, f"{where} (worker online)")
    return f"{j['worker']} started on {where}"


def status() -> int:
    """``status`` on a worker host: its worker's row; 1 when it is down."""
    j = joined()
    row = f"{j['worker']} on pool {j['pool']} at {j['prefect_api']}"
    exports = read_json(JOIN_SECRETS)
    if pid_of(NAME) is None:
        problem = "not running"
    elif not exports:
        problem = f"no {rel(JOIN_SECRETS)} (join again)"
    elif not _online(j, exports):
        problem = f"pool {j['pool']} does not show {j['worker']} online"
    else:
        say(f"{NAME:<11} up    {row}")
        return 0
    say(f"{NAME:<11} DOWN  {row}: {problem}; read {rel(log_path(NAME))}")
    say("stack: the worker is down (start it: scripts/stack.sh join FILE)", err=True)
    return 1


def down() -> int:
    """``down`` on a worker host: its worker stopped; the clone and its cache kept."""
    say(f"{NAME:<11} {stop_daemon(NAME)}")
    say(f"stack: down (worker host of {joined()['server']}; the clone and DVC cache kept in "
        f"{joined()['project_dir']})")
    return 0
