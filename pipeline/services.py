"""The services a stage talks to, checked before any work: team mode's MLflow tracking server
(``MLFLOW_TRACKING_URI`` = http(s)://...) and Prefect server (``PREFECT_API_URL``). Each that is
unreachable, refuses our credentials, or cannot reach its own database (PostgreSQL down: it
answers its health probe but not a query) is one ``ServiceError`` naming the service, its URL
and the reason (exit 1), before a byte is written. Without those variables (the default: a
SQLite store and Prefect's temporary server) there is nothing to check.

During a stage the clients retry a lost server (MLflow: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
set here to a few tries over about half a minute unless the user set it), then the stage fails
with one line naming the server (``describe_failure``); a server that stayed up but answered
5xx to every retry is asked once more why, so its database, when that is what is down, is
named in the same line."""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request

from rlfn.errors import RLFNError

__all__ = ["ServiceError", "check_services", "describe_failure", "masked", "team_mode"]

# Retries of MLflow's HTTP client when a server goes away mid-stage: 4 tries with backoff
# 2, 4, 8, 16 s (about 30 s in all), then the stage fails naming the server.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "4")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


class ServiceError(RLFNError):
    """A service the stage needs is down or refused us: ``ServiceError(service_url, reason)``
    (exit 1, RLFNError's)."""


def masked(url: str) -> str:
    """``url`` without a password."""
    p = urllib.parse.urlsplit(url)
    if p.password:
        netloc = f"{p.username}:***@{p.hostname}" + (f":{p.port}" if p.port else "")
        return urllib.parse.urlunsplit(p._replace(netloc=netloc))
    return url


def _get(url: str, headers: dict, timeout: float, cafile: str | None = None) -> tuple[int, bytes]:
    """GET ``url``; an https URL verified with ``cafile`` (the team's CA) when given, else the
    system's trust store. Never unverified."""
    ctx = None
    if url.startswith("https://"):
        import ssl

        ctx = ssl.create_default_context(cafile=cafile or None)
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _check(service: str, base: str, health: str, api: str, headers: dict,
           how: str, timeout: float, cafile: tuple[str, str] = ("", "")) -> None:
    """``cafile``: (the variable naming the CA file for this service, its value)."""
    import ssl

    where = f"{service} at {masked(base)}"
    var, ca = cafile
    if ca and not os.path.isfile(ca):
        raise ServiceError(where, f"{var}={ca}: no such file (the team's CA certificate)")
    try:
        status, _ = _get(base.rstrip("/") + health, {}, timeout, ca)
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, ssl.SSLCertVerificationError):
            hint = (f"is {var} the team's CA?" if ca else
                    f"set {var} to the team's CA certificate (team mode: "
                    "eval \"$(bash scripts/stack.sh env)\")")
            raise ServiceError(where, f"its TLS certificate is not trusted "
                                      f"({reason.verify_message}); {hint}") from None
        raise ServiceError(where, f"unreachable ({reason}); is it running? (team mode: "
                                  "bash scripts/stack.sh status)") from None
    if status != 200:
        raise ServiceError(where, f"not healthy ({health} answered HTTP {status})")
    try:
        status, body = _get(base.rstrip("/") + api, headers, timeout, ca)
    except (OSError, ValueError) as e:
        raise ServiceError(where, f"unreachable ({getattr(e, 'reason', e)})") from None
    if status in (401, 403):
        raise ServiceError(where, f"refused our credentials (HTTP {status}); {how}")
    if status >= 400:
        raise ServiceError(where, _says(api, status, body))


def team_mode() -> bool:
    """Whether this process works in team mode: its runs and models go to a tracking server
    (``MLFLOW_TRACKING_URI`` = http(s)://..., what ``scripts/stack.sh env`` exports) that
    others read, rather than to this machine's SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://"))


def _mlflow_headers() -> dict:
    """The tracking server's credentials from the environment (MLflow's own variables)."""
    headers = {}
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:
        pw = os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _prefect_headers() -> dict:
    """The Prefect server's credentials from the environment (Prefect's own variables)."""
    headers = {}
    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    key = os.environ.get("PREFECT_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


MLFLOW_PROBE = "/api/2.0/mlflow/experiments/search?" + urllib.parse.urlencode({"max_results": 1})
PREFECT_READY = "/ready"  # Prefect's readiness probe: 503 while its database is not available


def check_services(timeout: float = 10.0) -> list[str]:
    """Check the configured servers; returns what was checked (``[]`` in the default mode).
    A server whose database is down answers its health probe but not a query: named with the
    reason its answer gives (MLflow: ``TEMPORARILY_UNAVAILABLE`` and the driver's message;
    Prefect: its readiness probe)."""
    checked = []
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if team_mode():
        _check("MLflow tracking server", uri, "/health", MLFLOW_PROBE, _mlflow_headers(),
               "set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
               "(team mode: eval \"$(bash scripts/stack.sh env)\")", timeout,
               ("MLFLOW_TRACKING_SERVER_CERT_PATH",
                os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH", "")))
        checked.append(f"MLflow {masked(uri)}")
    api = os.environ.get("PREFECT_API_URL", "")
    if api:
        ca = os.environ.get("PREFECT_API_SSL_CERT_FILE", "")
        _check("Prefect server", api, "/health", "/admin/version", _prefect_headers(),
               "set PREFECT_API_AUTH_STRING (team mode: eval \"$(bash scripts/stack.sh env)\")",
               timeout, ("PREFECT_API_SSL_CERT_FILE", ca))
        ready = _probe(api, PREFECT_READY, {}, ca, timeout)
        if ready is not None:
            raise ServiceError(f"Prefect server at {masked(api)}", ready)
        checked.append(f"Prefect {masked(api)}")
    return checked


def _reason(status: int, body: bytes) -> str:
    """What a server's error answer says, in one line: MLflow's ``error_code: message`` (its
    first line: SQLAlchemy appends a link), Prefect's ``message``, a proxy's error page by its
    title (nginx's ``502 Bad Gateway`` when the server behind it is down: the team stack off
    loopback), else the body's start with its whitespace folded."""
    text = body.decode(errors="replace")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        msg = str(doc.get("message") or doc.get("exception_message") or doc.get("detail") or "")
        msg = msg.strip().splitlines()[0] if msg.strip() else ""
        text = f"{doc['error_code']}: {msg}" if doc.get("error_code") else msg or text
    elif title := re.search(r"<title>(.*?)</title>", text, re.I | re.S):
        text = (f"{title.group(1)} (its proxy's page: the server behind it does not answer)"
                if status in (502, 504) else title.group(1))
    return f"HTTP {status}: {' '.join(text.split())[:240]}"


def _probe(base: str, path: str, headers: dict, ca: str, timeout: float) -> str | None:
    """None when ``base + path`` answers 200; else why not, in one line (a database
    that is down says so here: MLflow's 503 names the driver's error, Prefect's readiness
    probe says ``Database is not available``)."""
    try:
        status, body = _get(base.rstrip("/") + path, headers, timeout, ca or None)
    except (OSError, ValueError) as e:
        return f"unreachable ({getattr(e, 'reason', e)})"
    return None if status == 200 else _says(path, status, body)


def _says(path: str, status: int, body: bytes) -> str:
    """A server's error answer to ``GET path``, in one line; a database that is down named
    as such (MLflow's ``TEMPORARILY_UNAVAILABLE`` with the driver's connection error,
    Prefect's readiness probe's 503)."""
    why = _reason(status, body)
    if (path == PREFECT_READY and status == 503) or \
            ("TEMPORARILY_UNAVAILABLE" in why and "OperationalError" in why):
        return f"its database is not available (GET {path} answered {why})"
    return f"answered {why} to GET {path}"


def describe_failure(exc: BaseException) -> str | None:
    """One line for a failure caused by a lost server (MLflow or Prefect) mid-stage, naming
    it (and, when it answered 5xx to every retry, what it says now: its database not
    available, say); None when ``exc`` is something else."""
    parts, url, seen, cur = [], "", set(), exc
    while cur is not None and id(cur) not in seen:  # it, and what it was raised from (during)
        seen.add(id(cur))
        parts.append(f"{type(cur).__name__}: {cur}")
        req = getattr(cur, "_request", None)  # httpx names no URL in its message: its request
        if not url and req is not None and getattr(req, "url", None) is not None:
            url = f" ({req.method} {req.url})"
        cur = cur.__cause__ or cur.__context__
    text = "; from ".join(parts) + url
    server = _named_server(text)
    if server is None:
        return None
    what, base, probe_path, headers, ca, retries = server
    lowered, quoted = text.lower(), json.dumps(text[:300])
    # up, but answering 5xx to every retry (its database down, for one): ask it why, now
    code = re.search(r"too many (5\d\d) error responses|server error '(5\d\d)", lowered)
    if code:
        now = _probe(base, probe_path, headers, ca, 10)
        return (f"{what} at {masked(base)}: answered HTTP {code.group(1) or code.group(2)} "
                f"{retries or 'during the stage'}; now {now or 'it answers again'} ({quoted})")
    lost = any(s in lowered for s in ("connection refused", "max retries exceeded",
                                      "failed to establish", "connecterror",
                                      "remote end closed", "connection reset",
                                      "temporarily unavailable", "read timed out"))
    if not lost:
        return None
    after = ", still unreachable after the client's retries" if retries else ""
    return f"{what} at {masked(base)}: lost during the stage{after} ({quoted})"


def _named_server(text: str) -> tuple[str, str, str, dict, str, str] | None:
    """The server (MLflow's, else Prefect's) whose host ``text`` names: its label, URL, probe
    path, headers, CA file and how its client retried (MLflow's retries each request)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    api = os.environ.get("PREFECT_API_URL", "")
    host = lambda u: urllib.parse.urlsplit(u).netloc.rsplit("@", 1)[-1]  # noqa: E731
    if uri.startswith("http") and host(uri) and host(uri) in text:
        return ("MLflow tracking server", uri, MLFLOW_PROBE, _mlflow_headers(),
                os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH", ""),
                "to each of the client's retries during the stage")
    if api and host(api) and host(api) in text:
        return ("Prefect server", api, PREFECT_READY, {},
                os.environ.get("PREFECT_API_SSL_CERT_FILE", ""), "")
    return None
