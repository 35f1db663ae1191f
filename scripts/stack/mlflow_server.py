"""The MLflow tracking server: ``mlflow server`` on PostgreSQL's database mlflow, artifacts
served by the server, MLflow's basic-auth app with the stack's admin login."""

from __future__ import annotations

import os

from rlfn.io import atomic_write
from stack import postgresql
from stack.core import CA_CERT, HOST, PY, STACK, Ctx, StackError, base_env
from stack.web import HttpServer, request

ADMIN = "admin"


def local_url(ctx: Ctx) -> str:
    """Where the server itself listens (127.0.0.1 only)."""
    return f"http://{HOST}:{ctx.ports['mlflow']}"


def url(ctx: Ctx) -> str:
    """The tracking URI clients use: the server's own on loopback; off it, nginx's TLS end on
    the stack's address (the same port number)."""
    return f"https://{ctx.host}:{ctx.ports['mlflow']}" if ctx.remote else local_url(ctx)


def exports(ctx: Ctx) -> dict[str, str]:
    """What a client needs to log to the server (off loopback: the CA to verify it with)."""
    out = {"MLFLOW_TRACKING_URI": url(ctx), "MLFLOW_TRACKING_USERNAME": ADMIN,
           "MLFLOW_TRACKING_PASSWORD": ctx.sec["mlflow_admin_password"]}
    if ctx.remote:
        out["MLFLOW_TRACKING_SERVER_CERT_PATH"] = str(CA_CERT)
    return out


# MLflow's basic-auth app checks the password's scrypt hash on every request (about 0.1 s of
# CPU each on a 2-core AMD EPYC): a stage's few hundred requests cost the server tens of CPU
# seconds, taken from the training beside it. Its cache (off by default) keeps a successful
# check for this long, per worker; a wrong password is never cached, and a password changed
# through MLflow's API is dropped from the cache of the worker that changed it at once (the
# stack runs one), elsewhere within this many seconds. bench/mlflow_auth.py measures it.
AUTH_CACHE_TTL_S = 60


def _launch(ctx: Ctx) -> tuple[list[str], dict[str, str]]:
    """The auth app's config and the artifact store; the server's command and environment
    (secrets in the environment, never on a command line: ps shows those)."""
    auth_dir = STACK / "mlflow"
    auth_dir.mkdir(exist_ok=True)
    os.chmod(auth_dir, 0o700)
    (STACK / "mlartifacts").mkdir(exist_ok=True)
    ini = auth_dir / "basic_auth.ini"
    atomic_write(ini, "[mlflow]\n"
                      "default_permission = READ\n"
                      f"database_uri = sqlite:///{auth_dir / 'basic_auth.db'}\n"
                      f"admin_username = {ADMIN}\n"
                      "# admin_password: MLFLOW_AUTH_ADMIN_PASSWORD in the server's environment\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                      f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n")
    env = base_env(
        MLFLOW_BACKEND_STORE_URI=postgresql.dsn(ctx, "mlflow"),
        MLFLOW_AUTH_CONFIG_PATH=str(ini),
        MLFLOW_AUTH_ADMIN_PASSWORD=ctx.sec["mlflow_admin_password"],
        MLFLOW_FLASK_SERVER_SECRET_KEY=ctx.sec["mlflow_flask_secret_key"],
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        **webhook_env(ctx),
    )
    cmd = [PY, "-m", "mlflow", "server", "--host", HOST, "--port", str(ctx.ports["mlflow"]),
           "--serve-artifacts", "--artifacts-destination", str(STACK / "mlartifacts"),
           "--default-artifact-root", "mlflow-artifacts:/", "--app-name", "basic-auth",
           "--workers", os.environ.get("RLFN_STACK_MLFLOW_WORKERS", "1")]
    return cmd, env


def webhook_env(ctx: Ctx) -> dict[str, str]:
    """The server's webhook settings: the key its stored webhook secrets are encrypted with
    (a stable one: MLflow's default is a new key at every start, which loses them), and the
    opt-ins that let it deliver to the stack's own receiver (``webhooks.py``) on 127.0.0.1 over
    plain HTTP. ``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS`` turns MLflow's SSRF check off for every
    webhook of this server: only its admin can make webhooks (basic-auth app), and the
    stack's admin makes only that one. A short webhook cache: a webhook registered by ``up``
    is used by the next event, not a minute later."""
    import base64
    import hashlib

    key = hashlib.sha256(ctx.sec["mlflow_webhook_key"].encode()).digest()
    return {"MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": base64.urlsafe_b64encode(key).decode(),
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
            "MLFLOW_WEBHOOK_CACHE_TTL": "5"}


def _api_check(ctx: Ctx) -> str | None:
    """The REST API with the admin login."""
    code, _ = request("POST", f"{local_url(ctx)}/api/2.0/mlflow/experiments/search",
                      {"max_results": 1}, auth=(ADMIN, ctx.sec["mlflow_admin_password"]))
    return None if code == 200 else f"the REST API answered HTTP {code} with the admin login"


def set_admin_password(ctx: Ctx, new: str) -> None:
    """``rotate``: the admin's password in MLflow's auth database changed to ``new`` through
    its API, logged in with the current one (``MLFLOW_AUTH_ADMIN_PASSWORD`` only creates the
    admin); StackError naming the server and its answer."""
    code, body = request("PATCH", f"{local_url(ctx)}/api/2.0/mlflow/users/update-password",
                         {"username": ADMIN, "password": new,
                          "current_password": ctx.sec["mlflow_admin_password"]},
                         auth=(ADMIN, ctx.sec["mlflow_admin_password"]), timeout=30)
    if code != 200:
        raise StackError(f"the MLflow server at {local_url(ctx)} answered HTTP {code or 'nothing'}"
                         f" to the admin's password change: {str(body)[:200]}")


SERVER = HttpServer("mlflow", url, local_url, _launch, _api_check)
