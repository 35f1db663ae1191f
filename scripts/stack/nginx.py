"""nginx (Debian's package), off loopback only (``up --host ADDR``): the TLS end of the MLflow
and Prefect servers. It listens on ADDR at each server's port (the servers themselves stay on
127.0.0.1 at that port, unreachable from other hosts) with the stack's server certificate
(``tls.py``) and proxies to them; WebSockets (Prefect's events) pass through."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rlfn.io import atomic_write
from stack import tls
from stack.core import HOST, STACK, Ctx, StackError, base_env, log_path, rel
from stack.procs import pid_of, require_free, run_logged, spawn, wait_until
from stack.web import request

NAME = "nginx"
FRONTS = (("mlflow", "/health"), ("prefect", "/api/health"))  # (server, health path)
DIR = STACK / "nginx"


def url(ctx: Ctx) -> str:
    """``status``'s text: the TLS ends."""
    return ", ".join(f"https://{ctx.host}:{ctx.ports[s]} -> http://{HOST}:{ctx.ports[s]}"
                     for s, _ in FRONTS)


def nginx_bin(service: str = NAME, what: str = "the TLS end of MLflow and Prefect off "
              "loopback") -> str:
    """The nginx program; StackError naming ``service`` and ``what`` it is for when missing."""
    for cand in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise StackError(f"{service}: nginx is not installed ({what}: apt-get install nginx)")


def prepare_dir(d: Path) -> None:
    """An nginx's own directory ``d`` with its ``tmp/`` (as root: owned by nobody, whom its
    workers run as; ``head`` gives the config's matching ``user`` line)."""
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700 if os.geteuid() != 0 else 0o711)
    tmp = d / "tmp"
    tmp.mkdir(exist_ok=True)
    if os.geteuid() == 0:  # its workers run as nobody
        import pwd

        nobody = pwd.getpwnam("nobody")
        os.chown(tmp, nobody.pw_uid, nobody.pw_gid)


def head(d: Path, what: str) -> str:
    """The top of a config of an nginx of ours in directory ``d`` (``what``: its first comment
    line) and the start of its ``http`` block: one worker, in the foreground (the stack's
    daemon), its pid and temporary files in ``d``, errors to its log."""
    tmp = d / "tmp"
    user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
    return f"""# {what}
{user}daemon off;
master_process on;
worker_processes 1;
pid {d / 'nginx.pid'};
error_log stderr warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {tmp / 'body'};
    proxy_temp_path {tmp / 'proxy'};
    fastcgi_temp_path {tmp / 'fastcgi'};
    uwsgi_temp_path {tmp / 'uwsgi'};
    scgi_temp_path {tmp / 'scgi'};
"""


def check_conf(service: str, exe: str, conf: Path, d: Path) -> None:
    """``nginx -t`` of ``conf``; StackError naming ``service`` when it is rejected."""
    r = run_logged(service, [exe, "-t", "-q", "-c", str(conf), "-p", str(d), "-e", "stderr"])
    if r.returncode != 0:
        raise StackError(f"{service}: its nginx config {rel(conf)} is rejected (nginx -t); "
                         f"read {rel(log_path(service))}")


def _answers(ctx: Ctx) -> bool:
    """Whether nginx answers HTTPS (verified with the CA) on each TLS end: any HTTP status, a
    502 while a server behind it is still starting included (nothing waits on the servers)."""
    return all(request("GET", f"https://{ctx.host}:{ctx.ports[s]}{path}", timeout=3)[0] != 0
               for s, path in FRONTS)


def health(ctx: Ctx) -> str | None:
    """``status``: None when nginx runs and both servers answer through it over TLS."""
    if pid_of(NAME) is None:
        return "not running"
    for s, path in FRONTS:
        code, _ = request("GET", f"https://{ctx.host}:{ctx.ports[s]}{path}", timeout=3)
        if code != 200:
            return f"{s} does not answer through it over TLS ({path}: HTTP {code or 'nothing'})"
    return None


def tls_lines() -> str:
    """The http block's TLS lines (the stack's server certificate): this nginx's and serve's."""
    return (f"    ssl_certificate {tls.SERVER_CERT};\n"
            f"    ssl_certificate_key {tls.SERVER_KEY};\n"
            "    ssl_protocols TLSv1.2 TLSv1.3;\n")


def _conf(ctx: Ctx) -> str:
    servers = "".join(f"""
    server {{  # {s}
        listen {ctx.host}:{ctx.ports[s]} ssl;
        location / {{
            proxy_pass http://{HOST}:{ctx.ports[s]};
            proxy_set_header Host {HOST}:{ctx.ports[s]};
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
        }}
    }}
""" for s, _ in FRONTS)
    title = f"scripts/stack/nginx.py: the TLS end of MLflow and Prefect on {ctx.host}"
    return head(DIR, title) + f"""\
    client_max_body_size 0;
    proxy_http_version 1.1;
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_read_timeout 3600s;
    proxy_send_timeout 3600s;
{tls_lines()}    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
{servers}}}
"""


def start(ctx: Ctx) -> str:
    """``up`` off loopback: nginx with the current config, unless it runs with it."""
    where = url(ctx)
    exe = nginx_bin()
    prepare_dir(DIR)
    conf = DIR / "nginx.conf"
    text = _conf(ctx)
    same = conf.exists() and conf.read_text() == text
    if pid_of(NAME) is not None and same and _answers(ctx):
        return f"already up: {where}"
    if pid_of(NAME) is not None:
        from stack.procs import stop_daemon

        stop_daemon(NAME)
    for s, _ in FRONTS:
        require_free(ctx, NAME, host=ctx.host, port_of=s)
    atomic_write(conf, text)
    check_conf(NAME, exe, conf, DIR)
    p = spawn(NAME, [exe, "-c", str(conf), "-p", str(DIR), "-e", "stderr"], base_env(), DIR)
    wait_until(NAME, lambda: _answers(ctx), p, f"{where} (health over TLS)")
    return f"started: {where}"
