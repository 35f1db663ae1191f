"""Prefect: ``prefect server start`` on PostgreSQL's database prefect (API auth string), the
work pools ``rlfn-pool`` (the pipeline's flows, run by any host's worker), ``rlfn-serve``
(the rollout of the served endpoint, run only by the server host's own ``rollout-worker``: it
drives daemons and reads secrets that only that host has) and ``rlfn-gpu`` (prefect.yaml's
``*-gpu`` deployments, run only by a worker host joined with ``--pool rlfn-gpu``: a GPU host;
none on the server host) with prefect.yaml's deployments, a worker on the first two, and the automation that ends a silent flow run (``ZOMBIE``): every client of
the stack has its flow runs send a heartbeat every ``HEARTBEAT_S`` seconds, and one that sends
none for ``SILENT_S`` (its process, or its whole host, gone) is marked CRASHED instead of
staying RUNNING for ever (Prefect's recipe for zombie flow runs)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from rlfn.io import atomic_write
from stack import postgresql
from stack.core import (CA_CERT, HOST, PY, RUN, STACK, Ctx, StackError, base_env, log_path, read_json,
                        rel, timeout_s)
from stack.procs import kept, pid_of, run_logged, spawn, wait_until
from stack.web import HttpServer, request

POOL = "rlfn-pool"
SERVE_POOL = "rlfn-serve"
GPU_POOL = "rlfn-gpu"  # prefect.yaml's *-gpu deployments: a worker host joined with --pool
POOLS = (POOL, SERVE_POOL, GPU_POOL)
USER = "rlfn"
HEARTBEAT_S = 30    # PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the stack's clients (Prefect's minimum)
# No heartbeat for this long: the flow run's process is gone. Ten missed beats, not Prefect's
# example's three: a legitimate run on a host loaded past its cores (CI: 2 cores, load 16)
# must never be marked CRASHED while it still works.
SILENT_S = 300
ZOMBIE = "rlfn-crash-silent-flow-runs"


def local_url(ctx: Ctx) -> str:
    """Where the server itself listens (127.0.0.1 only)."""
    return f"http://{HOST}:{ctx.ports['prefect']}/api"


def url(ctx: Ctx) -> str:
    """The API's URL for clients: the server's own on loopback; off it, nginx's TLS end on the
    stack's address (the same port number)."""
    return f"https://{ctx.host}:{ctx.ports['prefect']}/api" if ctx.remote else local_url(ctx)


def _auth(ctx: Ctx) -> str:
    """The API's auth string (basic auth's ``user:password``)."""
    return f"{USER}:{ctx.sec['prefect_password']}"


def exports(ctx: Ctx) -> dict[str, str]:
    """What a client needs to use the API (off loopback: the CA to verify it with)."""
    out = {"PREFECT_API_URL": url(ctx), "PREFECT_API_AUTH_STRING": _auth(ctx),
           "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
    if ctx.remote:
        out["PREFECT_API_SSL_CERT_FILE"] = str(CA_CERT)
    return out


def client_env(ctx: Ctx, **extra: str) -> dict[str, str]:
    """The environment of a Prefect client of the stack's (the CLI, the worker)."""
    return base_env(PREFECT_HOME=str(STACK / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                    **exports(ctx), **extra)


def _api(ctx: Ctx, method: str, path: str, body: dict | None = None,
         timeout: float = 5) -> tuple[int, object]:
    """A request to the API (the server's own, on 127.0.0.1) with the stack's auth string."""
    return request(method, f"{local_url(ctx)}{path}", body, auth=_auth(ctx), timeout=timeout)


# --------------------------------------------------------------------------- server
def _launch(ctx: Ctx) -> tuple[list[str], dict[str, str]]:
    """PREFECT_HOME; the server's command and environment."""
    home = STACK / "prefect"
    home.mkdir(exist_ok=True)
    os.chmod(home, 0o700)
    env = base_env(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=postgresql.dsn(ctx, "prefect", driver="asyncpg"),
        PREFECT_SERVER_API_AUTH_STRING=_auth(ctx),
        PREFECT_API_AUTH_STRING=_auth(ctx),
        PREFECT_SERVER_API_HOST=HOST,
        PREFECT_SERVER_API_PORT=str(ctx.ports["prefect"]),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_API_URL=url(ctx),
    )
    cmd = [PY, "-m", "prefect", "server", "start", "--host", HOST,
           "--port", str(ctx.ports["prefect"])]
    return cmd, env


def _api_check(ctx: Ctx) -> str | None:
    """The work pool, read with the auth string."""
    code, _ = _api(ctx, "GET", f"/work_pools/{POOL}")
    return None if code == 200 else f"work pool {POOL}: HTTP {code}"


SERVER = HttpServer("prefect", url, local_url, _launch, _api_check)


# --------------------------------------------------------------------------- pool, deployments
def start_pool(ctx: Ctx) -> str:
    """``up``: the process work pools ``POOLS``, created when missing."""
    made = []
    for pool in POOLS:
        code, _ = _api(ctx, "GET", f"/work_pools/{pool}")
        if code == 200:
            continue
        r = run_logged("prefect", [PY, "-m", "prefect", "work-pool", "create", pool,
                                   "--type", "process"],
                       env=client_env(ctx), cwd=ctx.project_dir)
        if r.returncode != 0:
            raise StackError(f"prefect: could not create work pool {pool} at {url(ctx)}; "
                             f"read {rel(log_path('prefect'))}")
        made.append(pool)
    if not made:
        return f"work pools {', '.join(POOLS)} exist"
    return f"work pool{'s' if len(made) > 1 else ''} {', '.join(made)} created"


def zombie_automation() -> dict:
    """The automation ``ZOMBIE`` as the API takes it: a flow run that sent a heartbeat and then,
    for ``SILENT_S`` seconds, neither another one nor a final state is set CRASHED."""
    return {
        "name": ZOMBIE,
        "description": (f"rlfn stack: a flow run silent for {SILENT_S} s (no heartbeat; its "
                        "process or host is gone) is marked CRASHED"),
        "enabled": True,
        "trigger": {
            "type": "event", "posture": "Proactive", "threshold": 1, "within": SILENT_S,
            "match": {"prefect.resource.id": ["prefect.flow-run.*"]},
            "after": ["prefect.flow-run.heartbeat"],
            "expect": ["prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                       "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                       "prefect.flow-run.Crashed"],
            "for_each": ["prefect.resource.id"],
        },
        "actions": [{"type": "change-flow-run-state", "state": "CRASHED",
                     "message": (f"no heartbeat for {SILENT_S} s: the flow run's process (or "
                                 f"its host) is gone (automation {ZOMBIE})")}],
    }


def _same(want: object, have: object) -> bool:
    """Whether the server's ``have`` holds every field of ``want`` as given (it adds its own)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(_same(v, have.get(k)) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and \
            all(_same(a, b) for a, b in zip(sorted(want, key=str), sorted(have, key=str)))
    return want == have


def start_automations(ctx: Ctx) -> str:
    """``up``: the automation ``ZOMBIE``, created (or updated) unless the server has it as
    ``zombie_automation`` says."""
    want = zombie_automation()
    code, found = _api(ctx, "POST", "/automations/filter",
                       {"automations": {"name": {"any_": [ZOMBIE]}}}, timeout=30)
    if code != 200 or not isinstance(found, list):
        raise StackError(f"prefect: cannot read the automations at {url(ctx)} (HTTP "
                         f"{code or 'nothing'}); read {rel(log_path('prefect'))}")
    if found and _same(want, found[0]):
        return f"{ZOMBIE} exists"
    if found:
        code, body = _api(ctx, "PUT", f"/automations/{found[0]['id']}", want, timeout=30)
        done = "updated"
    else:
        code, body = _api(ctx, "POST", "/automations/", want, timeout=30)
        done = "created"
    if code not in (200, 201, 204):
        raise StackError(f"prefect: could not create automation {ZOMBIE} at {url(ctx)} (HTTP "
                         f"{code or 'nothing'}: {str(body)[:300]})")
    return (f"{ZOMBIE} {done}: a flow run with no heartbeat for {SILENT_S} s is marked "
            "CRASHED")


def _expected_deployments(project: Path) -> list[str]:
    """The names of the deployments in the project's prefect.yaml."""
    import yaml

    doc = yaml.safe_load((project / "prefect.yaml").read_text())
    return [d["name"] for d in doc.get("deployments") or []]


def _registered_deployments(ctx: Ctx) -> list[str]:
    """The names of the deployments the server has on the pools (none when it does not answer)."""
    code, data = _api(ctx, "POST", "/deployments/filter",
                      {"work_pools": {"name": {"any_": list(POOLS)}}})
    return [d["name"] for d in data] if code == 200 and isinstance(data, list) else []


def start_deployments(ctx: Ctx) -> str:
    """``up``: every deployment of the project's prefect.yaml on its pool (``prefect deploy
    --all``, again when prefect.yaml or the project changed)."""
    project = Path(ctx.project_dir)
    want = _expected_deployments(project)
    stamp = {"prefect.yaml": (project / "prefect.yaml").read_text(), "project": str(project),
             "pull": "at run time"}
    have = _registered_deployments(ctx)
    if set(want) <= set(have) and read_json(RUN / "deployed.json") == stamp:
        return f"{len(want)} deployments already on {', '.join(POOLS)}"
    # No RLFN_PROJECT_DIR here: `prefect deploy` fills prefect.yaml's {{ $RLFN_PROJECT_DIR }}
    # from its own environment when set, baking this host's path into the deployment; unset,
    # the placeholder is kept and each worker's flow run fills it with its own clone (a worker
    # host's, `stack.sh join`).
    env = client_env(ctx)
    env.pop("RLFN_PROJECT_DIR", None)
    r = run_logged("deploy", [PY, "-m", "prefect", "--no-prompt", "deploy", "--all"], env=env,
                   cwd=project, timeout=max(timeout_s(), 300))
    have = _registered_deployments(ctx)
    if r.returncode != 0 or not set(want) <= set(have):
        missing = sorted(set(want) - set(have))
        raise StackError(f"prefect deployments: `prefect deploy --all` in {project} failed "
                         f"(missing: {', '.join(missing) or 'none'}); read "
                         f"{rel(log_path('deploy'))}")
    atomic_write(RUN / "deployed.json", json.dumps(stamp) + "\n")
    return f"{len(want)} deployments on {', '.join(POOLS)} (prefect deploy --all)"


# --------------------------------------------------------------------------- workers
@dataclass(frozen=True)
class Worker:
    """A ``prefect worker start`` of the server host's: its table entry (``service``: pid file
    and log), the pool it serves and the name it has there."""
    service: str
    pool: str
    name: str


WORKER = Worker("worker", POOL, "rlfn-stack-worker")
ROLLOUT_WORKER = Worker("rollout-worker", SERVE_POOL, "rlfn-stack-rollout-worker")
WORKER_NAME = WORKER.name


def worker_where(ctx: Ctx, w: Worker = WORKER) -> str:
    """The pool the worker serves."""
    return f"pool {w.pool} at {url(ctx)}"


def worker_row(ctx: Ctx, w: Worker = WORKER) -> str:
    """``status``'s text for the worker."""
    return f"{w.name} on {worker_where(ctx, w)}"


def _worker_online(ctx: Ctx, w: Worker, since: float | None = None) -> bool:
    """Whether the pool shows the worker online (see ``worker_online``)."""
    return worker_online(local_url(ctx), _auth(ctx), w.pool, w.name, since)


def worker_online(api: str, auth: str, pool: str, name: str, since: float | None = None,
                  cafile: str | None = None) -> bool:
    """Whether pool ``pool`` of the Prefect API at ``api`` shows worker ``name`` online (with a
    heartbeat after ``since``, a time stamp: the entry of a worker stopped a minute ago still
    reads ONLINE); https verified with ``cafile`` (default the stack's CA)."""
    from datetime import datetime

    code, workers = request("POST", f"{api}/work_pools/{pool}/workers/filter", {}, auth=auth,
                            cafile=cafile)
    for w in workers if code == 200 and isinstance(workers, list) else []:
        if w.get("name") != name or w.get("status") != "ONLINE":
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


def worker_health(ctx: Ctx, w: Worker = WORKER) -> str | None:
    """``status``: None when the worker runs and the pool shows it online."""
    if pid_of(w.service) is None:
        return "not running"
    if ctx.sec is None:
        return "no secrets"
    if not _worker_online(ctx, w):
        return f"pool {w.pool} does not show {w.name} online"
    return None


def worker_settings(cmd: list[str], env: dict, limit_flows: bool = True) -> None:
    """The worker's settings from the environment, on any host (this one's or a joined one's):
    ``RLFN_STACK_WORKER_POLL_S`` (how often it asks for flow runs; Prefect's default 10 s) and,
    unless ``limit_flows`` is false, ``RLFN_STACK_WORKER_LIMIT`` (flow runs at once,
    ``--limit``; its flow runs then share the cores, ``RLFN_PROCESSES`` for rlfn.threads),
    added to ``cmd`` and ``env``."""
    if os.environ.get("RLFN_STACK_WORKER_POLL_S"):
        env["PREFECT_WORKER_QUERY_SECONDS"] = os.environ["RLFN_STACK_WORKER_POLL_S"]
    limit = os.environ.get("RLFN_STACK_WORKER_LIMIT", "").strip()
    if limit and limit_flows:
        if not limit.isdigit() or int(limit) < 1:
            raise StackError(f"RLFN_STACK_WORKER_LIMIT={limit!r}: not a positive integer")
        cmd += ["--limit", limit]
        env["RLFN_PROCESSES"] = limit


def start_worker(ctx: Ctx, client_exports: dict[str, str], w: Worker = WORKER) -> str:
    """``up``: ``prefect worker start`` on the worker's pool, in the project; its flow runs
    inherit ``client_exports`` (the stack's clients). The serve worker's flow runs (one
    rollout at a time, ``stack.serve``'s lock) take no share of ``RLFN_STACK_WORKER_LIMIT``."""
    where = worker_where(ctx, w)
    if pid_of(w.service) is not None and _worker_online(ctx, w):
        return f"already up on {where}"
    cmd = [PY, "-m", "prefect", "worker", "start", "--pool", w.pool, "--type", "process",
           "--name", w.name]
    env = client_env(ctx, **{k: v for k, v in client_exports.items()
                              if not k.startswith("PREFECT_")})
    worker_settings(cmd, env, limit_flows=w.pool == POOL)
    t = time.time()
    p = spawn(w.service, kept(w.service, cmd), env, ctx.project_dir)
    wait_until(w.service, lambda: _worker_online(ctx, w, since=t), p,
               f"{where} (worker online)")
    return f"started on {where}"
