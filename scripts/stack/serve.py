"""The served endpoint (``serve``): an nginx of its own (Debian's package; its config, pid and
temporary files in ``serve/``, apart from the TLS nginx of ``up --host``) on 127.0.0.1 at
``RLFN_STACK_SERVE_PORT`` (off loopback, ``up --host ADDR``, also on ADDR at that port over TLS,
with the stack's server certificate: the plain port stays on 127.0.0.1, for this host's own
probes and the rollout's canary), in front of ``RLFN_STACK_SERVE_INSTANCES`` (default 1)
instances of ``mlflow models serve -m models:/<registered model>/<version> --env-manager local``
of one version, each a daemon of the stack (``run/serve-<slot>-<i>.pid``,
``logs/serve-<slot>-<i>.log``).

Every answer through it carries ``X-Model-Name`` and ``X-Model-Version``: the route
(``serve/route.conf``, included by ``serve/nginx.conf``) is written for one version at a time,
upstream and headers together. Two slots of instance ports, ``PORT+1 ..`` and ``PORT+1+N ..``
(N instances): a rollout (``pipeline/serve.py``, deployment ``rlfn-serve/rollout``) starts the
new version in the slot not serving (``launch``), checks it, then ``switch`` writes the route,
``nginx -s reload`` (graceful: old workers finish their requests on the old upstream), waits for
the old workers to exit (drained) and stops the old slot's instances; ``discard`` stops a
launched version that is not switched to. One rollout at a time (``serve/rollout.lock``).

``up`` starts nginx and the version recorded as serving (``serve/state.json``); with none
recorded, the champion (alias ``champion`` of the project's registered model, params.yaml's
``promote.registered_model``); with no champion yet the endpoint answers HTTP 503 "waiting for a
champion" and ``status`` says so (``up`` does not fail: the first promotion's rollout starts
it). Settings: ``RLFN_STACK_SERVE_MAX_BODY`` (nginx's ``client_max_body_size``, default
``16m``: a larger request gets 413), ``RLFN_STACK_SERVE_TIMEOUT_S`` (seconds nginx waits for a
model's answer and a model server lets a request run, default 300), ``RLFN_STACK_SERVE_CLIENT_TIMEOUT_S`` (seconds nginx waits for
the next piece of a client's request headers or body, default 30: a client that stalls sending
is cut off), ``RLFN_STACK_SERVE_THREADS`` (torch threads of each model server; default 0: the
cores shared among the instances)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from rlfn.io import atomic_write
from stack import mlflow_server, nginx
from stack.core import (CA_CERT, HOST, PY, RUN, STACK, Ctx, StackError, base_env, log_path,
                        open_log, read_json, rel, timeout_s)
from stack.procs import (children, pid_of, port_free, require_free, run_logged, spawn,
                         stop_daemon, wait_until)
from stack.web import probe, request

NAME = "serve"
DIR = STACK / "serve"
CONF = DIR / "nginx.conf"
ROUTE = DIR / "route.conf"
STATE = DIR / "state.json"
LOCK = DIR / "rollout.lock"
ALIAS = "champion"
MODEL_HEADERS = ("X-Model-Name", "X-Model-Version")


# --------------------------------------------------------------------------- settings
def instances() -> int:
    """``RLFN_STACK_SERVE_INSTANCES``: model servers of the serving version (default 1)."""
    v = os.environ.get("RLFN_STACK_SERVE_INSTANCES", "1").strip()
    if not v.isdigit() or not 1 <= int(v) <= 16:
        raise StackError(f"serve: RLFN_STACK_SERVE_INSTANCES={v!r}: not an integer 1-16")
    return int(v)


def max_body() -> str:
    """``RLFN_STACK_SERVE_MAX_BODY``: the largest request body (nginx size, default 16m)."""
    v = os.environ.get("RLFN_STACK_SERVE_MAX_BODY", "16m").strip()
    if not re.fullmatch(r"[1-9][0-9]*[kKmMgG]?", v):
        raise StackError(f"serve: RLFN_STACK_SERVE_MAX_BODY={v!r}: not a size such as 16m, "
                         "512k or 1048576")
    return v


def read_timeout_s() -> int:
    """``RLFN_STACK_SERVE_TIMEOUT_S``: how long nginx waits for a model's answer, and each
    model server (``mlflow models serve --timeout``; MLflow's default, 60 s, answered a 2K
    input on 2 cores with HTTP 504) lets a request run (300)."""
    v = os.environ.get("RLFN_STACK_SERVE_TIMEOUT_S", "300").strip()
    if not v.isdigit() or int(v) < 1:
        raise StackError(f"serve: RLFN_STACK_SERVE_TIMEOUT_S={v!r}: not a positive integer")
    return int(v)


def client_timeout_s() -> int:
    """``RLFN_STACK_SERVE_CLIENT_TIMEOUT_S``: how long nginx waits between two reads of a
    client's request headers or body before it closes the connection (default 30): a client
    that stalls sending is cut off, its worker connection and buffers freed."""
    v = os.environ.get("RLFN_STACK_SERVE_CLIENT_TIMEOUT_S", "30").strip()
    if not v.isdigit() or int(v) < 1:
        raise StackError(f"serve: RLFN_STACK_SERVE_CLIENT_TIMEOUT_S={v!r}: not a positive "
                         "integer")
    return int(v)


def threads(n_instances: int | None = None) -> int:
    """``RLFN_STACK_SERVE_THREADS``: torch threads of each model server; 0 (the default):
    an explicit count of the stack's environment (``RLFN_THREADS``, ``OMP_NUM_THREADS``: the
    ``rlfn.threads`` policy), else the cores (``rlfn.threads.available_cores``) shared among
    the instances, at least 1. torch alone would give each instance every core: N instances
    on C cores would run N x C threads, each parallel region waiting on descheduled ones
    (``bench/busy.py``)."""
    from rlfn.threads import choose_threads

    v = os.environ.get("RLFN_STACK_SERVE_THREADS", "0").strip()
    if not v.isdigit():
        raise StackError(f"serve: RLFN_STACK_SERVE_THREADS={v!r}: not an integer >= 0 "
                         "(0: the cores shared among the instances)")
    if int(v) > 0:
        return int(v)
    env = {**os.environ, "RLFN_PROCESSES": str(n_instances or instances())}
    return choose_threads(0, load_aware=False, environ=env).threads


def instance_env(n_instances: int) -> dict[str, str]:
    """What each model server gets beside the tracking server's settings: its thread count
    (``OMP_NUM_THREADS``, which sizes torch's pool at its start; ``RLFN_PROCESSES``: the
    instances sharing the cores) and sleeping, not spinning, idle OpenMP threads."""
    return {"OMP_NUM_THREADS": str(threads(n_instances)), "RLFN_PROCESSES": str(n_instances),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def url(ctx: Ctx) -> str:
    """The endpoint on this host's loopback (plain HTTP): POST ``<url>/invocations``."""
    return f"http://{HOST}:{ctx.ports[NAME]}"


def public_url(ctx: Ctx) -> str:
    """The endpoint for clients (``RLFN_SERVE_URL``): on loopback ``url``; off it the TLS end on
    the stack's address."""
    return f"https://{ctx.host}:{ctx.ports[NAME]}" if ctx.remote else url(ctx)


def exports(ctx: Ctx) -> dict[str, str]:
    """``RLFN_SERVE_URL``; off loopback with ``RLFN_SERVE_CA``, the CA to verify it with (the
    stack's; a bundle carries it, as it does for MLflow and Prefect)."""
    out = {"RLFN_SERVE_URL": public_url(ctx)}
    if ctx.remote:
        out["RLFN_SERVE_CA"] = str(CA_CERT)
    return out


def model_name(ctx: Ctx) -> str:
    """The project's registered model (its params.yaml: ``promote.registered_model``, default
    ``rlfn-x<scale>``)."""
    from pipeline.settings import load_settings
    from rlfn.errors import RLFNError

    try:
        return load_settings(Path(ctx.project_dir) / "params.yaml").registered_model
    except RLFNError as e:
        raise StackError(f"serve: the registered model's name: {e}") from None


def champion_version(ctx: Ctx, name: str) -> str | None:
    """The version the alias ``champion`` of ``name`` names (None: no champion, or no model)."""
    code, data = request("GET", f"{mlflow_server.local_url(ctx)}/api/2.0/mlflow/registered-models"
                         f"/alias?{urlencode({'name': name, 'alias': ALIAS})}",
                         auth=(mlflow_server.ADMIN, ctx.sec["mlflow_admin_password"]))
    if code == 200 and isinstance(data, dict):
        return str(data["model_version"]["version"])
    if code == 404:  # no registered model of that name
        return None
    if code == 400 and isinstance(data, dict) and "not found" in str(data.get("message")):
        return None  # the model, no champion yet: "Registered model alias champion not found."
    raise StackError(f"serve: the champion of {name}: the MLflow server answered HTTP "
                     f"{code or 'nothing'} at {mlflow_server.local_url(ctx)}")


# --------------------------------------------------------------------------- state
def state() -> dict:
    """``serve/state.json``: ``name``, ``version`` serving (None: waiting), its ``slot`` and
    ``ports``; ``refused``: the last version a rollout refused, and why."""
    return read_json(STATE)


def _save(st: dict) -> None:
    atomic_write(STATE, json.dumps(st, indent=1) + "\n")


@dataclass(frozen=True)
class Launched:
    """A version's instances, started and healthy, not (yet) what the endpoint serves."""

    name: str
    version: str
    slot: int
    ports: tuple[int, ...]

    @property
    def urls(self) -> list[str]:
        return [f"http://{HOST}:{p}" for p in self.ports]


def _daemon(slot: int, i: int) -> str:
    return f"{NAME}-{slot}-{i}"


def _slot_ports(ctx: Ctx, slot: int, n: int) -> tuple[int, ...]:
    base = ctx.ports[NAME] + 1 + slot * n
    return tuple(range(base, base + n))


def _stop_slot(slot: int) -> None:
    for f in RUN.glob(f"{NAME}-{slot}-*.pid"):
        stop_daemon(f.stem)


@contextlib.contextmanager
def rollout_lock():
    """One rollout (or ``up`` of ``serve``) at a time (an flock on ``serve/rollout.lock``, the
    promotion's lock class): StackError after the stack's timeout."""
    from pipeline.mlflow_registry.locks import _FileLock

    lock = _FileLock(LOCK, timeout_s(), holder="another rollout of the served endpoint")
    try:
        lock.__enter__()
    except TimeoutError as e:
        raise StackError(f"serve: {e}") from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


# --------------------------------------------------------------------------- instances
def launch(ctx: Ctx, name: str, version: str, tracking: dict[str, str] | None = None
           ) -> Launched:
    """Start ``version``'s instances in the slot not serving and wait for each one's
    ``/ping``; StackError (one line, its log named) when one does not come up (then none of
    them is left running). ``tracking``: where the model is read from (the stack's MLflow
    server by default; ``bench/serving_load.py`` gives its own registry)."""
    st = state()
    slot = 1 - int(st.get("slot", 1)) if st.get("version") else 0
    n = instances()
    ports = _slot_ports(ctx, slot, n)
    _stop_slot(slot)
    tracking = mlflow_server.exports(ctx) if tracking is None else tracking
    # PYTHONPATH empty: the model runs its own code
    env = base_env(**tracking, **instance_env(n), PYTHONPATH="")
    work = DIR / f"v{version}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        procs = []
        for i, port in enumerate(ports):
            if not port_free(port):
                raise StackError(f"serve: port {HOST}:{port} (instance {i} of slot {slot}, "
                                 f"RLFN_STACK_SERVE_PORT+{port - ctx.ports[NAME]}) is taken by "
                                 "another program (set RLFN_STACK_SERVE_PORT elsewhere)")
            cmd = [PY, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}/{version}",
                   "--env-manager", "local", "-h", HOST, "-p", str(port), "--workers", "1",
                   "--timeout", str(read_timeout_s())]  # MLflow's own cut is 60 s: a 504
            procs.append(spawn(_daemon(slot, i), cmd, env, work))
        for i, (port, p) in enumerate(zip(ports, procs)):
            wait_until(_daemon(slot, i), lambda port=port: probe(
                f"http://{HOST}:{port}/ping")[0] == 200, p,
                f"{name} v{version} at http://{HOST}:{port}/ping")
    except BaseException:
        _stop_slot(slot)
        raise
    return Launched(name, version, slot, ports)


def discard(launched: Launched) -> None:
    """Stop a launched version's instances (unless the endpoint serves that slot)."""
    if state().get("version") and int(state().get("slot", -1)) == launched.slot:
        return
    _stop_slot(launched.slot)


def refuse(name: str, version: str, reason: str) -> None:
    """Record that a rollout refused ``version`` (``status`` shows it)."""
    st = state()
    st["refused"] = {"name": name, "version": version, "reason": reason}
    _save(st)


# --------------------------------------------------------------------------- nginx
def _conf(ctx: Ctx) -> str:
    certs = nginx.tls_lines() if ctx.remote else ""
    return nginx.head(DIR, f"scripts/stack/serve.py: the served endpoint on {public_url(ctx)}") \
        + certs + f"""\
    client_max_body_size {max_body()};
    client_body_timeout {client_timeout_s()}s;
    client_header_timeout {client_timeout_s()}s;
    send_timeout 60s;
    proxy_http_version 1.1;
    proxy_connect_timeout 5s;
    proxy_read_timeout {read_timeout_s()}s;
    proxy_send_timeout 60s;
    include {ROUTE};
}}
"""


def _route(ctx: Ctx, name: str, version: str | None, ports: tuple[int, ...] = ()) -> str:
    """The route: the upstream of ``version``'s instances and the headers naming it; without a
    version, HTTP 503 "waiting for a champion"."""
    listen = f"listen {HOST}:{ctx.ports[NAME]};"
    if ctx.remote:  # the TLS end for other hosts (the plain port stays on loopback)
        listen += f"\n    listen {ctx.host}:{ctx.ports[NAME]} ssl;"
    if version is None:
        msg = json.dumps({"error_code": "SERVICE_UNAVAILABLE",
                          "message": f"serve: no champion of {name} yet (waiting for one)"})
        return f"""# no champion of {name} yet
server {{
    {listen}
    location / {{
        default_type application/json;
        return 503 '{msg}';
    }}
}}
"""
    servers = "".join(f"    server {HOST}:{p};\n" for p in ports)
    return f"""# {name} v{version}
upstream rlfn_serve {{
{servers}    keepalive 8;
}}
server {{
    {listen}
    location / {{
        proxy_pass http://rlfn_serve;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_hide_header X-Model-Name;
        proxy_hide_header X-Model-Version;
        add_header X-Model-Name "{name}" always;
        add_header X-Model-Version "{version}" always;
    }}
}}
"""


def _tls_answers(ctx: Ctx) -> bool:
    """Whether the TLS end answers /ping (verified with the CA); True on loopback (none)."""
    return not ctx.remote or request("GET", f"{public_url(ctx)}/ping", timeout=3)[0] != 0


def _answers(ctx: Ctx) -> bool:
    """Whether nginx answers on loopback and, off it, on its TLS end."""
    return probe(f"{url(ctx)}/ping")[0] != 0 and _tls_answers(ctx)


def _reload(exe: str) -> None:
    r = run_logged(NAME, _reload_cmd(exe))
    if r.returncode != 0:
        raise StackError(f"serve: nginx -s reload failed; read {rel(log_path(NAME))}")


def _reload_cmd(exe: str) -> list[str]:
    return [exe, "-s", "reload", "-c", str(CONF), "-p", str(DIR), "-e", "stderr"]


def _reload_fenced(exe: str, master: int) -> set[int]:
    """``nginx -s reload``, the old workers told to shut down gracefully (SIGQUIT: no new
    connections, the ones they have finished) as soon as the first new worker exists: nginx's
    master itself waits 100 ms before it does, and in that overlap old and new workers both
    accept connections, so a client could get the new version and then the old one again.
    Connections that arrive while no worker accepts wait in the listening socket's queue (the
    master holds it). Returns the old workers."""
    before = children(master)
    with open_log(NAME) as log:
        p = subprocess.Popen(_reload_cmd(exe), stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s()
        while not children(master) - before:
            if (p.poll() not in (None, 0)) or time.monotonic() > deadline:
                p.wait(timeout=timeout_s())
                raise StackError(f"serve: nginx -s reload started no new worker (exit "
                                 f"{p.returncode}); read {rel(log_path(NAME))}")
            time.sleep(0.001)
        for pid in before:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT)
        if p.wait(timeout=timeout_s()) != 0:
            raise StackError(f"serve: nginx -s reload failed; read {rel(log_path(NAME))}")
    return before


def _write_route(ctx: Ctx, exe: str, text: str) -> None:
    """Write the route, checked by ``nginx -t`` (the old one is put back when rejected)."""
    old = ROUTE.read_text() if ROUTE.exists() else None
    atomic_write(ROUTE, text)
    try:
        nginx.check_conf(NAME, exe, CONF, DIR)
    except StackError:
        if old is not None:
            atomic_write(ROUTE, old)
        raise


def switch(ctx: Ctx, launched: Launched) -> dict:
    """Make the endpoint serve ``launched``: the route written, ``nginx -s reload``, new
    workers answering with its version, the old workers drained (exited: their requests
    done), the old slot's instances stopped. Returns the timings (s)."""
    exe = nginx.nginx_bin(NAME, "the served endpoint")
    master = pid_of(NAME)
    if master is None:
        raise StackError(f"serve: nginx is not running (scripts/stack.sh up starts it; read "
                         f"{rel(log_path(NAME))})")
    old = state()
    t0 = time.monotonic()
    _write_route(ctx, exe, _route(ctx, launched.name, launched.version, launched.ports))
    before = _reload_fenced(exe, master)
    deadline = time.monotonic() + timeout_s()
    while True:  # new workers up, answering with the new version
        status, headers = probe(f"{url(ctx)}/ping")
        if status == 200 and headers.get("X-Model-Version") == launched.version:
            break
        if time.monotonic() > deadline:
            raise StackError(f"serve: after nginx -s reload {url(ctx)} does not answer with "
                             f"v{launched.version} within {timeout_s():.0f} s (HTTP {status}, "
                             f"version {headers.get('X-Model-Version')})")
        time.sleep(0.1)
    switched = time.monotonic() - t0
    st = {"name": launched.name, "version": launched.version, "slot": launched.slot,
          "ports": list(launched.ports)}
    if old.get("refused", {}).get("version") not in (None, launched.version):
        st["refused"] = old["refused"]
    _save(st)
    drain_deadline = time.monotonic() + read_timeout_s() + 10
    while before & children(master) and time.monotonic() < drain_deadline:
        time.sleep(0.2)
    undrained = sorted(before & children(master))
    if old.get("version") and int(old.get("slot", -1)) != launched.slot:
        _stop_slot(int(old["slot"]))
    return {"switched_s": round(switched, 3), "drained_s": round(time.monotonic() - t0, 3),
            "undrained_workers": undrained, "previous": old.get("version")}


def _instances_up(st: dict) -> bool:
    """Whether every instance of the serving slot runs and answers ``/ping``."""
    ports = st.get("ports") or []
    return bool(ports) and all(
        pid_of(_daemon(int(st["slot"]), i)) is not None
        and probe(f"http://{HOST}:{p}/ping")[0] == 200 for i, p in enumerate(ports))


# --------------------------------------------------------------------------- verbs
def start(ctx: Ctx) -> str:
    """``up``: nginx, and the version recorded as serving (else the champion; else waiting)."""
    exe = nginx.nginx_bin(NAME, "the served endpoint")
    with rollout_lock():
        nginx.prepare_dir(DIR)
        st = state()
        name = st.get("name") or model_name(ctx)
        serving = st.get("version")
        if serving and _instances_up(st):
            version = None  # serving, and up
        elif serving:
            version = str(serving)  # restarted (after `down`, or an instance died)
        else:
            version = champion_version(ctx, name)
        route = None
        if version is not None:
            launched = launch(ctx, name, version)
            _save({"name": name, "version": version, "slot": launched.slot,
                   "ports": list(launched.ports),
                   **({"refused": st["refused"]} if "refused" in st else {})})
            route = _route(ctx, name, version, launched.ports)
            _stop_slot(1 - launched.slot)
        elif not serving:
            _save({"name": name, "version": None})
            route = _route(ctx, name, None)
        st = state()
        if route is None:
            route = _route(ctx, name, st["version"], tuple(st["ports"]))
        conf = _conf(ctx)
        same = CONF.exists() and CONF.read_text() == conf
        running = pid_of(NAME) is not None
        if running and same and ROUTE.exists() and ROUTE.read_text() == route and _answers(ctx):
            return f"already up: {row(ctx)}"
        atomic_write(CONF, conf)
        _write_route(ctx, exe, route)
        if running and same:
            _reload(exe)
        else:
            if running:
                stop_daemon(NAME)
            spawn_nginx(ctx, exe)
    return f"started: {row(ctx)}"


def spawn_nginx(ctx: Ctx, exe: str) -> None:
    """Start the endpoint's nginx on the config and route written, and wait for it to answer."""
    require_free(ctx, NAME)
    if ctx.remote:
        require_free(ctx, NAME, host=ctx.host)
    p = spawn(NAME, [exe, "-c", str(CONF), "-p", str(DIR), "-e", "stderr"], base_env(), DIR)
    wait_until(NAME, lambda: _answers(ctx), p, f"{url(ctx)}/ping")


def stop(service: str) -> str:
    """``down``: nginx and every instance (what serves is kept in ``serve/state.json``)."""
    msgs = [stop_daemon(service)]
    msgs += [stop_daemon(f.stem) for f in sorted(RUN.glob(f"{service}-*.pid"))]
    return "stopped" if "stopped" in msgs else "not running"


def row(ctx: Ctx) -> str:
    """``status``'s text: the URL, the version serving and its instances (or waiting)."""
    st = state()
    name = st.get("name") or "the registered model"
    if st.get("version"):
        n = len(st.get("ports") or [])
        text = f"{public_url(ctx)} -> {name} v{st['version']} ({n} instance{'s' * (n != 1)})"
    else:
        text = f"{public_url(ctx)}: waiting for a champion of {name}"
    refused = st.get("refused")
    if refused:
        text += f"; v{refused['version']} refused: {refused['reason']}"
    return text


def health(ctx: Ctx) -> str | None:
    """``status``: None when nginx answers and, when a version serves, its instances run and
    the endpoint answers with its version."""
    if pid_of(NAME) is None:
        return "not running"
    if not _tls_answers(ctx):
        return f"its TLS end {public_url(ctx)} does not answer"
    st = state()
    status, headers = probe(f"{url(ctx)}/ping")
    if not st.get("version"):
        return None if status == 503 else f"/ping: HTTP {status or 'nothing'}"
    if not _instances_up(st):
        return f"an instance of v{st['version']} does not answer (read logs/serve-*.log)"
    if status != 200 or headers.get("X-Model-Version") != str(st["version"]):
        return (f"/ping through nginx: HTTP {status or 'nothing'}, version "
                f"{headers.get('X-Model-Version')}")
    return None
