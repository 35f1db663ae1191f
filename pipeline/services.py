"""The services a stage talks to, checked before any work: team mode's MLflow tracking server
(``MLFLOW_TRACKING_URI`` = http(s)://...) and Prefect server (``PREFECT_API_URL``). Each that is
unreachable, or refuses our credentials, is one ``ServiceError`` naming the service, its URL
and the reason (exit 1), before a byte is written. Without those variables (the default: a
SQLite store and Prefect's temporary server) there is nothing to check.

During a stage the clients retry a lost server (MLflow: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
set here to a few tries over about half a minute unless the user set it), then the stage fails
with one line naming the server (``describe_failure``)."""

from __future__ import annotations

import base64
import json
import os
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
        raise ServiceError(where, f"answered HTTP {status} to {api}: "
                                  f"{body[:200].decode(errors='replace')}")


def team_mode() -> bool:
    """Whether this process works in team mode: its runs and models go to a tracking server
    (``MLFLOW_TRACKING_URI`` = http(s)://..., what ``scripts/stack.sh env`` exports) that
    others read, rather than to this machine's SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://"))


def check_services(timeout: float = 10.0) -> list[str]:
    """Check the configured servers; returns what was checked (``[]`` in the default mode)."""
    checked = []
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if team_mode():
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        pw = os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
        headers = {}
        if user:
            headers["Authorization"] = "Basic " + base64.b64encode(
                f"{user}:{pw}".encode()).decode()
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        q = urllib.parse.urlencode({"max_results": 1})
        _check("MLflow tracking server", uri, "/health",
               f"/api/2.0/mlflow/experiments/search?{q}", headers,
               "set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
               "(team mode: eval \"$(bash scripts/stack.sh env)\")", timeout,
               ("MLFLOW_TRACKING_SERVER_CERT_PATH",
                os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH", "")))
        checked.append(f"MLflow {masked(uri)}")
    api = os.environ.get("PREFECT_API_URL", "")
    if api:
        headers = {}
        auth = os.environ.get("PREFECT_API_AUTH_STRING")
        if auth:
            headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        key = os.environ.get("PREFECT_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        _check("Prefect server", api, "/health", "/admin/version", headers,
               "set PREFECT_API_AUTH_STRING (team mode: eval \"$(bash scripts/stack.sh env)\")",
               timeout, ("PREFECT_API_SSL_CERT_FILE", os.environ.get("PREFECT_API_SSL_CERT_FILE", "")))
        checked.append(f"Prefect {masked(api)}")
    return checked


def describe_failure(exc: BaseException) -> str | None:
    """One line for a failure caused by a lost server (MLflow or Prefect) mid-stage, naming
    it; None when ``exc`` is something else."""
    parts, url, seen, cur = [], "", set(), exc
    while cur is not None and id(cur) not in seen:  # it, and what it was raised from (during)
        seen.add(id(cur))
        parts.append(f"{type(cur).__name__}: {cur}")
        req = getattr(cur, "_request", None)  # httpx names no URL in its message: its request
        if not url and req is not None and getattr(req, "url", None) is not None:
            url = f" ({req.method} {req.url})"
        cur = cur.__cause__ or cur.__context__
    text = "; from ".join(parts) + url
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    api = os.environ.get("PREFECT_API_URL", "")
    lowered = text.lower()
    lost = any(s in lowered for s in ("connection refused", "max retries exceeded",
                                      "failed to establish", "connecterror",
                                      "remote end closed", "connection reset",
                                      "temporarily unavailable", "read timed out"))
    if not lost:
        return None
    host = lambda u: urllib.parse.urlsplit(u).netloc.rsplit("@", 1)[-1]  # noqa: E731
    if uri.startswith("http") and host(uri) and host(uri) in text:
        return (f"MLflow tracking server at {masked(uri)}: lost during the stage, still "
                f"unreachable after the client's retries ({json.dumps(text[:300])})")
    if api and host(api) and host(api) in text:
        return (f"Prefect server at {masked(api)}: lost during the stage "
                f"({json.dumps(text[:300])})")
    return None
