"""The stack as a table: one ``Service`` entry per service (or set-up step), in dependency
order. The verbs (``stack.cli``) only iterate over ``TABLE``; adding a service, or an option
every service may set, is a change to this file (and the module that implements it)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

from stack import mlflow_server, nginx, postgresql, prefect_server, serve, sshd, tls, webhooks
from stack.core import STACK, Ctx, Port, load_ctx
from stack.procs import stop_daemon


@dataclass(frozen=True)
class Service:
    """One entry of the table and what each verb does with it.

    ``up`` calls ``start`` (its line's message; StackError for one line naming it) once every
    entry in ``needs`` is up; when one is not, it says where this one was not started
    (``where``; an entry without one is passed over in silence), naming the entry that failed
    by its ``called``. ``status`` shows a row (``row``) for each entry with ``health`` (None
    when healthy, else what is wrong). ``down`` calls ``stop`` with the name, in reverse table
    order. ``env`` prints every entry's ``exports``. ``port`` is the service's port setting,
    ``secrets`` the secrets ``up`` generates for it (name -> bytes of randomness), ``log`` the
    log an unexpected error points to (default: its own, ``logs/<name>.log``). An entry
    ``remote_only`` is there only off loopback (``up --host ADDR``): on 127.0.0.1 it is left out
    of the table (``active``: no start, no status row, no one's need) and ``down`` says nothing
    of it unless it ran."""

    name: str
    start: Callable[[Ctx], str]
    needs: tuple[str, ...] = ()
    port: Port | None = None
    secrets: Mapping[str, int] = field(default_factory=dict)
    where: Callable[[Ctx], str] | None = None
    row: Callable[[Ctx], str] | None = None
    health: Callable[[Ctx], str | None] | None = None
    stop: Callable[[str], str] | None = None
    exports: Callable[[Ctx], dict[str, str]] | None = None
    log: str = ""
    called: str = ""
    remote_only: bool = False

    def __post_init__(self) -> None:
        """``log`` and ``called`` default to the name."""
        object.__setattr__(self, "log", self.log or self.name)
        object.__setattr__(self, "called", self.called or self.name)


TABLE: tuple[Service, ...] = (
    Service("tls", start=tls.start, remote_only=True, called="the stack's TLS (CA)"),
    Service("postgresql", start=postgresql.start, needs=("tls",),
            port=Port("RLFN_STACK_PG_PORT", 55432),
            secrets={"pg_superuser_password": 24, "db_password": 24},
            row=postgresql.row, health=postgresql.health, stop=postgresql.stop),
    Service("mlflow", start=mlflow_server.SERVER.start, needs=("postgresql",),
            port=Port("RLFN_STACK_MLFLOW_PORT", 55000),
            secrets={"mlflow_admin_password": 24, "mlflow_flask_secret_key": 32,
                     "mlflow_webhook_key": 32},
            where=mlflow_server.url, row=mlflow_server.url, health=mlflow_server.SERVER.health,
            stop=stop_daemon, exports=mlflow_server.exports),
    Service("optuna", start=postgresql.start_optuna, needs=("postgresql",),
            where=lambda ctx: "database optuna", exports=postgresql.optuna_exports),
    Service("prefect", start=prefect_server.SERVER.start, needs=("postgresql",),
            port=Port("RLFN_STACK_PREFECT_PORT", 54200), secrets={"prefect_password": 24},
            where=prefect_server.url, row=prefect_server.url,
            health=prefect_server.SERVER.health, stop=stop_daemon,
            exports=prefect_server.exports),
    Service("nginx", start=nginx.start, needs=("tls",), remote_only=True,
            where=nginx.url, row=nginx.url, health=nginx.health, stop=stop_daemon),
    Service("work pool", start=prefect_server.start_pool, needs=("prefect", "nginx"),
            log="prefect",
            called="the work pool"),
    Service("deployments", start=prefect_server.start_deployments, needs=("work pool",),
            log="deploy"),
    Service("automations", start=prefect_server.start_automations, needs=("work pool",),
            log="prefect"),
    Service("worker", start=lambda ctx: prefect_server.start_worker(ctx, worker_exports(ctx)),
            needs=("work pool",), where=prefect_server.worker_where,
            row=prefect_server.worker_row, health=prefect_server.worker_health,
            stop=stop_daemon),
    # The rollout's own worker: on the server host even when it runs no pipeline worker
    # (RLFN_STACK_WORKER=0), since rlfn-serve/rollout drives this host's `serve` daemons.
    Service("rollout-worker", start=lambda ctx: prefect_server.start_worker(
                ctx, worker_exports(ctx), prefect_server.ROLLOUT_WORKER),
            needs=("work pool",),
            where=lambda ctx: prefect_server.worker_where(ctx, prefect_server.ROLLOUT_WORKER),
            row=lambda ctx: prefect_server.worker_row(ctx, prefect_server.ROLLOUT_WORKER),
            health=lambda ctx: prefect_server.worker_health(ctx, prefect_server.ROLLOUT_WORKER),
            stop=stop_daemon),
    Service("webhooks", start=webhooks.start, needs=("mlflow", "prefect"),
            port=Port("RLFN_STACK_HOOK_PORT", 55070), secrets={"webhook_secret": 32},
            row=webhooks.row, health=webhooks.health, stop=stop_daemon),
    Service("serve", start=serve.start, needs=("mlflow",),
            port=Port("RLFN_STACK_SERVE_PORT", 55080), row=serve.row, health=serve.health,
            stop=serve.stop, exports=serve.exports),
    Service("sshd", start=sshd.start, port=Port("RLFN_STACK_SSH_PORT", 52222), row=sshd.row,
            health=sshd.health, stop=stop_daemon, exports=sshd.exports),
)


def _check(table: tuple[Service, ...]) -> None:
    """Every entry needs only entries before it (what lets ``up`` run the table in order), and
    one with a health check has a status row."""
    seen: set[str] = set()
    for s in table:
        if not set(s.needs) <= seen:
            raise ValueError(f"stack table: {s.name} needs {sorted(set(s.needs) - seen)} "
                             "before it")
        if s.health is not None and s.row is None:
            raise ValueError(f"stack table: {s.name} has a health check but no status row")
        seen.add(s.name)


_check(TABLE)


def active(ctx: Ctx) -> tuple[Service, ...]:
    """The table as ``ctx``'s host has it: all of it off loopback; on 127.0.0.1 without the
    ``remote_only`` entries, which are then no one's need (nothing waits on, or fails with,
    an entry that is not there); without the ``worker`` when the host runs none
    (``RLFN_STACK_WORKER=0``: the pool's workers are other hosts', ``stack.sh join``)."""
    gone = set() if ctx.remote else {s.name for s in TABLE if s.remote_only}
    if not ctx.worker:
        gone.add("worker")
    if not gone:
        return TABLE
    return tuple(replace(s, needs=tuple(n for n in s.needs if n not in gone))
                 for s in TABLE if s.name not in gone)


def context(sec: dict | None) -> Ctx:
    """The context of a verb, the table's ports resolved (see ``core.load_ctx``)."""
    return load_ctx({s.name: s.port for s in TABLE if s.port is not None}, sec)


def wanted_secrets() -> dict[str, int]:
    """Every secret an entry asks for (name -> bytes of randomness)."""
    return {k: n for s in TABLE for k, n in s.secrets.items()}


def client_exports(ctx: Ctx) -> dict[str, str]:
    """What a client shell needs (``env`` prints these; the worker's flow runs inherit them):
    every entry's exports, then ``RLFN_PROJECT_DIR``."""
    out = {k: v for s in TABLE if s.exports is not None for k, v in s.exports(ctx).items()}
    out["RLFN_PROJECT_DIR"] = ctx.project_dir
    return out


def worker_exports(ctx: Ctx) -> dict[str, str]:
    """What this host's workers' flow runs get: the client exports and the stack's directory
    (``rlfn-serve/rollout``, run by ``rollout-worker``, drives the ``serve`` entry's daemons,
    ``stack.serve``)."""
    return {**client_exports(ctx), "RLFN_STACK_DIR": str(STACK)}
