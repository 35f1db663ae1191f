"""The stack's TLS off loopback (``up --host ADDR``): a CA of the stack's own, made once by
``up`` (``tls/ca.key``, never leaves the state directory), and a server certificate for ADDR
(and 127.0.0.1) signed by it, made again when ADDR changes. ``tls/`` is owner-only (0700, the
keys 0600), beside ``secrets/``. Clients verify the servers with ``tls/ca.crt``: MLflow's
``MLFLOW_TRACKING_SERVER_CERT_PATH``, Prefect's ``PREFECT_API_SSL_CERT_FILE``, PostgreSQL's
``sslmode=verify-full&sslrootcert=`` (see each service's exports). There is no way to skip
verification."""

from __future__ import annotations

import os
import subprocess

from stack.core import CA_CERT, HOST, TLS, Ctx, StackError, log_path, rel
from stack.procs import run_logged

NAME = "tls"
CA_KEY = TLS / "ca.key"
SERVER_KEY = TLS / "server.key"
SERVER_CERT = TLS / "server.crt"
DAYS = "825"


def _sans(ctx: Ctx) -> str:
    """The server certificate's subjectAltName."""
    return f"IP:{ctx.host},IP:{HOST},DNS:localhost"


def _openssl(args: list[str]) -> None:
    r = run_logged(NAME, ["openssl", *args], cwd=TLS, timeout=60)
    if r.returncode != 0:
        raise StackError(f"tls: `openssl {args[0]}` failed (exit {r.returncode}); read "
                         f"{rel(log_path(NAME))}")


def _cert_sans(path) -> str:
    """The SANs a certificate on disk has, as openssl prints them ('' when unreadable)."""
    r = subprocess.run(["openssl", "x509", "-in", str(path), "-noout", "-ext",
                        "subjectAltName"], capture_output=True, text=True, timeout=30)
    return r.stdout if r.returncode == 0 else ""


def start(ctx: Ctx) -> str:
    """``up`` off loopback: the CA (once) and a server certificate for ``ctx.host``."""
    TLS.mkdir(exist_ok=True)
    os.chmod(TLS, 0o700)
    made = []
    if not (CA_KEY.exists() and CA_CERT.exists()):
        _openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                  "-nodes", "-keyout", str(CA_KEY), "-out", str(CA_CERT), "-days", "3650",
                  "-subj", "/CN=rlfn-stack CA", "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        made.append("CA")
    os.chmod(CA_KEY, 0o600)
    os.chmod(CA_CERT, 0o644)
    if f"IP Address:{ctx.host}" not in _cert_sans(SERVER_CERT) or not SERVER_KEY.exists():
        csr = TLS / "server.csr"
        ext = TLS / "server.ext"
        ext.write_text(f"subjectAltName={_sans(ctx)}\nbasicConstraints=CA:FALSE\n"
                       "keyUsage=critical,digitalSignature,keyEncipherment\n"
                       "extendedKeyUsage=serverAuth\n")
        _openssl(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                  "-keyout", str(SERVER_KEY), "-out", str(csr), "-subj",
                  f"/CN={ctx.host}"])
        _openssl(["x509", "-req", "-in", str(csr), "-CA", str(CA_CERT), "-CAkey", str(CA_KEY),
                  "-CAcreateserial", "-out", str(SERVER_CERT), "-days", DAYS,
                  "-extfile", str(ext)])
        csr.unlink(missing_ok=True)
        made.append(f"server certificate for {ctx.host}")
    os.chmod(SERVER_KEY, 0o600)
    what = " and ".join(made) if made else f"CA and certificate for {ctx.host} exist"
    return f"{what} ({rel(TLS)})" if made else what


def ca(ctx: Ctx) -> str:
    """The CA certificate clients verify the servers with."""
    return str(CA_CERT)


def client_context():
    """An SSL context that trusts only the stack's CA (the stack's own health checks)."""
    import ssl

    return ssl.create_default_context(cafile=str(CA_CERT))
