"""The registry's events into Prefect (``webhooks``): a small receiver on 127.0.0.1
(``RLFN_STACK_HOOK_PORT``) of MLflow's model-registry webhook ``model_version_alias.created``,
registered with the stack's MLflow server by ``up`` (idempotent: one webhook named
``rlfn-stack-receiver``, its URL and secret brought up to date). Each delivery is HMAC-signed
(MLflow's ``X-MLflow-Signature``: ``v1,`` base64 HMAC-SHA256 of ``<delivery id>.<timestamp>.<body>``
with the stack's ``webhook_secret``); the receiver checks it (and that the timestamp is within
5 minutes): a bad or missing signature is answered 401 and nothing is emitted. A good one
becomes the Prefect event ``mlflow.model_version_alias.created`` (resource
``mlflow.registered-model.<name>``, labels ``mlflow.alias`` and ``mlflow.version``; payload
MLflow's), emitted before the answer (503 when Prefect does not take it: MLflow retries), once
per delivery id. prefect.yaml's trigger on it runs ``rlfn-serve/rollout`` for ``champion``.

MLflow refuses webhook targets on loopback and private addresses, and plain-HTTP ones: the
stack's MLflow server is started with ``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true`` and
``MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https`` for this receiver (``mlflow_server.py``; webhooks
can only be made by the MLflow admin)."""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import json
import os
import sys
import time
from pathlib import Path

from stack import mlflow_server, prefect_server
from stack.core import HOST, PY, STACK, Ctx, StackError
from stack.procs import pid_of, require_free, spawn, wait_until
from stack.web import probe, request

NAME = "webhooks"
PATH = "/mlflow-webhook"
HOOK_NAME = "rlfn-stack-receiver"
EVENT = "mlflow.model_version_alias.created"  # the Prefect event (prefect.yaml's trigger)
MLFLOW_EVENTS = [{"entity": "MODEL_VERSION_ALIAS", "action": "CREATED"}]
TOLERANCE_S = 300  # a delivery's timestamp may be this far from the receiver's clock
MAX_BODY = 1 << 20
SECRET_VAR = "RLFN_WEBHOOK_SECRET"


def url(ctx: Ctx) -> str:
    return f"http://{HOST}:{ctx.ports[NAME]}{PATH}"


def row(ctx: Ctx) -> str:
    return f"{url(ctx)} -> Prefect event {EVENT}"


def _health_url(ctx: Ctx) -> str:
    return f"http://{HOST}:{ctx.ports[NAME]}/health"


def _api(ctx: Ctx, method: str, path: str = "", body: dict | None = None):
    return request(method, f"{mlflow_server.local_url(ctx)}/api/2.0/mlflow/webhooks{path}", body,
                   auth=(mlflow_server.ADMIN, ctx.sec["mlflow_admin_password"]))


def register(ctx: Ctx) -> str:
    """The stack's webhook in MLflow, created or brought up to date (URL, event, secret)."""
    code, data = _api(ctx, "GET", "?max_results=100")
    if code != 200 or not isinstance(data, dict):
        raise StackError(f"webhooks: MLflow's webhooks at {mlflow_server.local_url(ctx)}: HTTP "
                         f"{code or 'nothing'}")
    mine = [w for w in data.get("webhooks") or [] if w.get("name") == HOOK_NAME]
    body = {"name": HOOK_NAME, "url": url(ctx), "events": MLFLOW_EVENTS, "status": "ACTIVE",
            "secret": ctx.sec["webhook_secret"],
            "description": "scripts/stack: champion moves -> Prefect event -> rlfn-serve/rollout"}
    for extra in mine[1:]:
        _api(ctx, "DELETE", f"/{extra['webhook_id']}")
    if mine:
        code, data = _api(ctx, "PATCH", f"/{mine[0]['webhook_id']}", body)
        done = "webhook up to date"
    else:
        code, data = _api(ctx, "POST", "", body)
        done = "webhook registered"
    if code != 200:
        why = data.get("message") if isinstance(data, dict) else data
        raise StackError(f"webhooks: MLflow refused the webhook to {url(ctx)} (HTTP "
                         f"{code or 'nothing'}: {str(why)[:300]})")
    return done


def start(ctx: Ctx) -> str:
    """``up``: the receiver (unless it answers) and the webhook registered in MLflow."""
    if pid_of(NAME) is not None and probe(_health_url(ctx))[0] == 200:
        said = "already up"
    else:
        require_free(ctx, NAME)
        env = prefect_server.client_env(ctx, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
                                        **{SECRET_VAR: ctx.sec["webhook_secret"]})
        p = spawn(NAME, [PY, "-m", "stack.webhooks", str(ctx.ports[NAME])], env, STACK)
        wait_until(NAME, lambda: probe(_health_url(ctx))[0] == 200, p, _health_url(ctx))
        said = "started"
    return f"{said}: {row(ctx)}; {register(ctx)}"


def health(ctx: Ctx) -> str | None:
    if pid_of(NAME) is None:
        return "not running"
    code, _ = probe(_health_url(ctx))
    return None if code == 200 else f"/health: HTTP {code or 'nothing'}"


# --------------------------------------------------------------------------- the receiver
def verify(secret: str, headers, body: bytes, now: float) -> str | None:
    """None when ``body`` carries MLflow's valid signature for ``secret``; else why not."""
    sig = headers.get("X-MLflow-Signature")
    did = headers.get("X-MLflow-Delivery-Id")
    ts = headers.get("X-MLflow-Timestamp")
    if not (sig and did and ts):
        return "no X-MLflow-Signature, X-MLflow-Delivery-Id or X-MLflow-Timestamp header"
    if not ts.isdigit() or abs(now - int(ts)) > TOLERANCE_S:
        return f"X-MLflow-Timestamp {ts!r} is not within {TOLERANCE_S} s of now"
    mac = hmac.new(secret.encode(), f"{did}.{ts}.".encode() + body, hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(mac).decode()
    if not any(hmac.compare_digest(expected, s) for s in sig.split()):
        return "X-MLflow-Signature does not match (wrong secret or altered body)"
    return None


def _emit(data: dict, delivery_id: str) -> None:
    """The Prefect event of an alias moved, sent and confirmed before returning."""
    import asyncio

    from prefect.events import Event
    from prefect.events.clients import get_events_client

    name, alias, version = str(data["name"]), str(data["alias"]), str(data["version"])
    event = Event(event=EVENT, resource={"prefect.resource.id": f"mlflow.registered-model.{name}",
                                         "prefect.resource.name": name, "mlflow.alias": alias,
                                         "mlflow.version": version},
                  payload={"name": name, "alias": alias, "version": version,
                           "delivery_id": delivery_id})

    async def send() -> None:
        async with get_events_client(reconnection_attempts=2, checkpoint_every=1) as c:
            await c.emit(event)

    asyncio.run(send())


def _log(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def serve(port: int, secret: str) -> None:
    """The receiver's loop, on 127.0.0.1:``port``."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: collections.deque[str] = collections.deque(maxlen=1000)

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict) -> None:
            raw = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, fmt, *args) -> None:  # one line per request, ours
            pass

        def do_GET(self) -> None:
            if self.path == "/health":
                self._reply(200, {"status": "ok"})
            else:
                self._reply(404, {"error": f"no {self.path} here (POST {PATH})"})

        def do_POST(self) -> None:
            if self.path != PATH:
                return self._reply(404, {"error": f"no {self.path} here (POST {PATH})"})
            n = int(self.headers.get("Content-Length") or 0)
            if n > MAX_BODY:
                return self._reply(413, {"error": f"body over {MAX_BODY} bytes"})
            body = self.rfile.read(n)
            why = verify(secret, self.headers, body, time.time())
            did = self.headers.get("X-MLflow-Delivery-Id", "?")
            if why:
                _log(f"401 delivery {did}: {why}; nothing emitted")
                return self._reply(401, {"error": why})
            try:
                msg = json.loads(body)
                kind = (msg.get("entity"), msg.get("action"))
                data = msg.get("data") or {}
            except (ValueError, AttributeError):
                return self._reply(400, {"error": "the body is not a JSON object"})
            if kind != ("model_version_alias", "created"):
                _log(f"200 delivery {did}: {kind[0]}.{kind[1]} ignored")
                return self._reply(200, {"ignored": f"{kind[0]}.{kind[1]}"})
            if did in seen:
                return self._reply(200, {"duplicate": did})
            try:
                _emit(data, did)
            except Exception as e:  # noqa: BLE001 - MLflow retries a 503
                _log(f"503 delivery {did}: Prefect did not take the event: "
                     f"{type(e).__name__}: {e}")
                return self._reply(503, {"error": f"Prefect did not take the event ({e})"})
            seen.append(did)
            _log(f"200 delivery {did}: {data.get('name')}@{data.get('alias')} -> "
                 f"v{data.get('version')}: {EVENT} emitted")
            self._reply(200, {"emitted": EVENT})

    server = ThreadingHTTPServer((HOST, port), Handler)
    _log(f"receiving MLflow webhooks on http://{HOST}:{port}{PATH}")
    server.serve_forever()


if __name__ == "__main__":
    serve(int(sys.argv[1]), os.environ[SECRET_VAR])
