"""HTTP: one request (``request``), and ``HttpServer``, the start and health check of a daemon
of ours that serves HTTP with an open ``/health`` (the MLflow and Prefect servers)."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from stack.core import CA_CERT, STACK, Ctx
from stack.procs import pid_of, require_free, spawn, wait_until


def request(method: str, url: str, body: dict | None = None,
            auth: tuple[str, str] | str | None = None,
            timeout: float = 5, cafile: str | None = None) -> tuple[int, object]:
    """(status, decoded JSON or text); status 0 when nothing answered. An https URL is verified
    with the stack's CA only (``tls/ca.crt``; a joined host's: ``cafile``)."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if auth is not None:
        raw = auth if isinstance(auth, str) else f"{auth[0]}:{auth[1]}"
        headers["Authorization"] = "Basic " + base64.b64encode(raw.encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    ssl_ctx = None
    if url.startswith("https://"):
        import ssl

        ssl_ctx = ssl.create_default_context(cafile=cafile or str(CA_CERT))
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ssl_ctx) as r:
            status, text = r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode(errors="replace")
    except (OSError, ValueError):
        return 0, None
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def probe(url: str, timeout: float = 3) -> tuple[int, dict[str, str]]:
    """GET ``url`` (plain HTTP, on loopback): (status, response headers); (0, {}) when
    nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)
    except (OSError, ValueError):
        return 0, {}


@dataclass(frozen=True)
class HttpServer:
    """Daemon ``name`` serving HTTP at ``local_url(ctx)`` (on 127.0.0.1), ``<url>/health`` open
    to anyone; clients use ``url(ctx)`` (the same on loopback; off it, nginx's TLS end):
    ``launch(ctx)`` prepares its files and gives its command and environment; ``api_check(ctx)``
    makes a request that needs the stack's login (None when it works, else what is wrong)."""

    name: str
    url: Callable[[Ctx], str]
    local_url: Callable[[Ctx], str]
    launch: Callable[[Ctx], tuple[list[str], dict[str, str]]]
    api_check: Callable[[Ctx], str | None]

    def answers(self, ctx: Ctx) -> bool:
        """Whether ``<local url>/health`` answers HTTP 200."""
        return request("GET", f"{self.local_url(ctx)}/health", timeout=3)[0] == 200

    def start(self, ctx: Ctx) -> str:
        """``up``: nothing when it runs and answers, else start it and wait for its health."""
        url = self.url(ctx)
        if pid_of(self.name) is not None and self.answers(ctx):
            return f"already up at {url}"
        require_free(ctx, self.name)
        cmd, env = self.launch(ctx)
        p = spawn(self.name, cmd, env, STACK)
        wait_until(self.name, lambda: self.answers(ctx), p, f"{self.local_url(ctx)}/health")
        return f"started at {url}"

    def health(self, ctx: Ctx) -> str | None:
        """``status``: None when it runs, answers and takes the login; else what is wrong."""
        if pid_of(self.name) is None:
            return "not running"
        if not self.answers(ctx):
            return f"{urlsplit(self.local_url(ctx)).path}/health does not answer"
        if ctx.sec is None:
            return "no secrets"
        return self.api_check(ctx)
