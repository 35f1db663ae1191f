"""PostgreSQL: a cluster of the project's own on ``HOST`` (scram-sha-256), role ``rlfn`` owning
databases mlflow, prefect and optuna; and Optuna's schema in database optuna. Off loopback
(``up --host ADDR``) it also listens on ADDR with ``ssl=on`` (the stack's server certificate),
and its pg_hba lets clients from other hosts in only over SSL (``hostssl``, scram-sha-256);
the servers of the stack stay on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

from rlfn.io import atomic_write
from stack.core import (CA_CERT, HOST, PG_DATA, PG_DIR, PY, RUN, STACK, Ctx, StackError, base_env,
                        log_path, open_log, read_json, rel, timeout_s, write_private)
from stack.procs import alive, require_free, run_logged

NAME = "postgresql"
DATABASES = ("mlflow", "prefect", "optuna")
DB_ROLE = "rlfn"
PG_SUPERUSER = "postgres"


def url(ctx: Ctx) -> str:
    """Where clients reach the cluster."""
    return f"postgresql://{ctx.host}:{ctx.ports[NAME]}"


def dsn(ctx: Ctx, db: str, driver: str = "psycopg", client: bool = False) -> str:
    """SQLAlchemy's URL of database ``db`` for role ``rlfn``, its password in it: the stack's
    own servers' (on 127.0.0.1), or with ``client`` a client's, which off loopback goes to the
    stack's address over SSL verified with the stack's CA."""
    host = ctx.host if client else HOST
    tail = (f"?sslmode=verify-full&sslrootcert={CA_CERT}" if client and ctx.remote else "")
    return (f"postgresql+{driver}://{DB_ROLE}:{ctx.sec['db_password']}@{host}:"
            f"{ctx.ports[NAME]}/{db}{tail}")


def _os_user() -> tuple[int, int] | None:
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


def _as_pg() -> dict:
    """``subprocess`` keywords that run a command as the server's OS user."""
    u = _os_user()
    return {} if u is None else {"user": u[0], "group": u[1], "extra_groups": []}


def _check_traversable(path: Path, uid: int) -> None:
    """As root, the postgres OS user must be able to reach ``path``."""
    for d in reversed(path.parents):
        st = d.stat()
        if st.st_uid != uid and not st.st_mode & 0o001:
            raise StackError(f"postgresql: {d} is not searchable by the server's OS user "
                             f"(uid {uid}): chmod o+x it or set RLFN_STACK_DIR elsewhere")


def _bin(name: str) -> str:
    """The path of PostgreSQL's program ``name``: on PATH, else Debian's newest."""
    found = shutil.which(name)
    if found is None:
        for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
            if (d / name).exists():
                return str(d / name)
        raise StackError(f"postgresql: command {name!r} not found (install PostgreSQL's server "
                         "programs: apt-get install postgresql)")
    return found


def running() -> bool:
    """Whether the cluster's postmaster runs."""
    try:
        pid = int((PG_DATA / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return alive(pid)


def _connect(ctx: Ctx, user: str, password: str, db: str = "postgres", host: str = HOST,
             **ssl: str):
    """A connection to database ``db`` as ``user`` (autocommit)."""
    import psycopg

    return psycopg.connect(host=host, port=ctx.ports[NAME], user=user, password=password,
                           dbname=db, connect_timeout=5, autocommit=True, **ssl)


def _first_line(e: Exception) -> str:
    """An error's first line, else its type's name."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def row(ctx: Ctx) -> str:
    """``status``'s text for it."""
    return f"{url(ctx)} (databases {', '.join(DATABASES)})"


def health(ctx: Ctx) -> str | None:
    """None when the role ``rlfn`` logs in to every database; else why not."""
    if not running():
        return "not running"
    if ctx.sec is None:
        return "no secrets (never set up)"
    try:
        for db in DATABASES:
            with _connect(ctx, DB_ROLE, ctx.sec["db_password"], db) as c:
                c.execute("SELECT 1")
        if ctx.remote:  # as a client of another host would: SSL, verified with the CA
            with _connect(ctx, DB_ROLE, ctx.sec["db_password"], "optuna", host=ctx.host,
                          sslmode="verify-full", sslrootcert=str(CA_CERT)) as c:
                c.execute("SELECT 1")
    except Exception as e:  # noqa: BLE001 - any failure is a health answer
        return _first_line(e)
    return None


HBA = """# scripts/stack/postgresql.py writes this file at every `up`
local   all          all                  scram-sha-256
host    all          all  127.0.0.1/32    scram-sha-256
host    all          all  ::1/128         scram-sha-256
local   replication  all                  scram-sha-256
host    replication  all  127.0.0.1/32    scram-sha-256
host    replication  all  ::1/128         scram-sha-256
"""
HBA_REMOTE = """# off loopback (up --host): other hosts over SSL only
hostssl    all  all  0.0.0.0/0  scram-sha-256
hostnossl  all  all  0.0.0.0/0  reject
"""


def _configure(ctx: Ctx, u: tuple[int, int] | None) -> list[str]:
    """pg_hba.conf for ``ctx`` (written each start), and off loopback the server certificate
    copied where the server's OS user owns it; the server's options (``pg_ctl -o``)."""
    opts = ["-p", str(ctx.ports[NAME])]
    hba = PG_DATA / "pg_hba.conf"
    atomic_write(hba, HBA + (HBA_REMOTE if ctx.remote else ""))
    if u is not None:
        os.chown(hba, *u)
    os.chmod(hba, 0o600)
    if ctx.remote:
        from stack import tls

        for src, dst in ((tls.SERVER_CERT, PG_DIR / "server.crt"),
                         (tls.SERVER_KEY, PG_DIR / "server.key")):
            write_private(dst, src.read_text())
            if u is not None:
                os.chown(dst, *u)
        opts += ["-c", f"listen_addresses={HOST},{ctx.host}", "-c", "ssl=on",
                 "-c", f"ssl_cert_file={PG_DIR / 'server.crt'}",
                 "-c", f"ssl_key_file={PG_DIR / 'server.key'}"]
    return opts


def start(ctx: Ctx) -> str:
    """``up``: the cluster made (first time), started and provisioned."""
    port = ctx.ports[NAME]
    log = log_path(NAME)
    u = _os_user()
    if running():
        rec = read_json(RUN / "postgresql.json")
        was, was_host = rec.get("port"), rec.get("host", HOST)
        if was and was != port:
            raise StackError(f"postgresql: running on port {was}, not {port}: run "
                             "`scripts/stack.sh down` first")
        if was_host != ctx.host:
            raise StackError(f"postgresql: running for {was_host}, not {ctx.host}: run "
                             "`scripts/stack.sh down` first")
        _provision(ctx)
        return f"already up at {url(ctx)}"
    require_free(ctx, NAME)
    PG_DIR.mkdir(exist_ok=True)
    if u is not None:
        _check_traversable(PG_DIR, u[0])
        os.chown(PG_DIR, *u)
    os.chmod(PG_DIR, 0o700)
    open_log(NAME).close()
    if u is not None:
        os.chown(log, *u)
    if not (PG_DATA / "PG_VERSION").exists():
        _initdb(ctx, u)
    if ctx.remote:
        require_free(ctx, NAME, host=ctx.host)
    opts = shlex.join(_configure(ctx, u))
    r = run_logged(NAME, [_bin("pg_ctl"), "start", "-D", str(PG_DATA), "-l", str(log), "-w",
                          "-t", str(int(timeout_s())), "-o", opts],
                   cwd="/", timeout=timeout_s() + 10, **_as_pg())
    if r.returncode != 0 or not running():
        raise StackError(f"postgresql: did not start on {HOST}:{port}; read {rel(log)}")
    atomic_write(RUN / "postgresql.json", json.dumps({"port": port, "host": ctx.host}) + "\n")
    _provision(ctx)
    return f"started at {url(ctx)}"


def _initdb(ctx: Ctx, u: tuple[int, int] | None) -> None:
    """A new cluster in ``PG_DATA``: loopback TCP only, the superuser's password from the
    secrets (in a file only while initdb reads it)."""
    if PG_DATA.exists():
        shutil.rmtree(PG_DATA)  # a half-made cluster of a failed first `up`
    pwfile = PG_DIR / "pwfile"
    write_private(pwfile, ctx.sec["pg_superuser_password"] + "\n")
    if u is not None:
        os.chown(pwfile, *u)
    try:
        r = run_logged(NAME, [_bin("initdb"), "-D", str(PG_DATA), "-U", PG_SUPERUSER,
                              "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8",
                              "--locale=C", "--no-instructions"], cwd="/", **_as_pg())
    finally:
        pwfile.unlink(missing_ok=True)
    if r.returncode != 0:
        raise StackError(f"postgresql: initdb failed (exit {r.returncode}); read "
                         f"{rel(log_path(NAME))}")
    with open(PG_DATA / "postgresql.conf", "a") as f:
        f.write("\n# scripts/stack/postgresql.py: loopback TCP only, no Unix socket\n"
                f"listen_addresses = '{HOST}'\n"
                "unix_socket_directories = ''\n"
                "password_encryption = 'scram-sha-256'\n"
                "max_connections = 200\n")


def _provision(ctx: Ctx) -> None:
    """Role ``rlfn`` (its password as in secrets) owning databases mlflow, prefect, optuna."""
    from psycopg import sql

    try:
        with _connect(ctx, PG_SUPERUSER, ctx.sec["pg_superuser_password"]) as c:
            exists = c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (DB_ROLE,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            c.execute(sql.SQL(verb + " ROLE {} WITH LOGIN PASSWORD {}").format(
                sql.Identifier(DB_ROLE), sql.Literal(ctx.sec["db_password"])))
            for db in DATABASES:
                if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                 (db,)).fetchone():
                    c.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(db), sql.Identifier(DB_ROLE)))
    except Exception as e:  # noqa: BLE001
        raise StackError(f"postgresql: could not set up role and databases on "
                         f"{HOST}:{ctx.ports[NAME]} ({_first_line(e)}); read "
                         f"{rel(log_path(NAME))}") from None


def set_password(ctx: Ctx, role: str, new: str) -> None:
    """``rotate``: role ``role``'s password changed to ``new`` (as the superuser, with the
    secrets' current password); StackError naming the server and the driver's reason."""
    from psycopg import sql

    try:
        with _connect(ctx, PG_SUPERUSER, ctx.sec["pg_superuser_password"]) as c:
            c.execute(sql.SQL("ALTER ROLE {} WITH PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(new)))
    except Exception as e:  # noqa: BLE001
        raise StackError(f"postgresql at {HOST}:{ctx.ports[NAME]} did not change {role}'s "
                         f"password ({_first_line(e)})") from None


def stop(name: str) -> str:
    """``down``: ``pg_ctl stop`` (fast), its output in ``name``'s log."""
    if not running():
        return "not running"
    r = run_logged(name, [_bin("pg_ctl"), "stop", "-D", str(PG_DATA), "-m", "fast", "-w",
                          "-t", "60"], cwd="/", timeout=90, **_as_pg())
    if r.returncode != 0:
        raise StackError(f"postgresql: pg_ctl stop failed; read {rel(log_path(name))}")
    return "stopped"


# --------------------------------------------------------------------------- optuna
def optuna_exports(ctx: Ctx) -> dict[str, str]:
    """The shared Optuna study's storage, for clients."""
    return {"RLFN_OPTUNA_STORAGE": dsn(ctx, "optuna", client=True)}


def start_optuna(ctx: Ctx) -> str:
    """Optuna's tables in database ``optuna``, made once here: Optuna creates them on first use,
    and two processes doing that at once on an empty database collide (CREATE TYPE ...
    duplicate key), so a study shared from the start needs them made beforehand."""
    with _connect(ctx, DB_ROLE, ctx.sec["db_password"], "optuna") as c:
        if c.execute("SELECT to_regclass('public.studies')").fetchone()[0] is not None:
            return "schema ready in database optuna"
    code = "import os, optuna; optuna.storages.RDBStorage(os.environ['RLFN_OPTUNA_STORAGE'])"
    r = run_logged("optuna", [PY, "-c", code], env=base_env(**optuna_exports(ctx)), cwd=STACK)
    if r.returncode != 0:
        raise StackError(f"optuna: could not create its tables in database optuna at "
                         f"{HOST}:{ctx.ports[NAME]}; read {rel(log_path('optuna'))}")
    return "schema created in database optuna"
