"""Team mode across hosts (issue 23 item 1): a server host runs ``stack.sh up --host <its
address>`` (tests/hosts.py: its own network namespace, Unix user and home); from a client host
(another namespace and user) MLflow and Prefect answer over HTTPS verified with the stack's CA,
a client without the CA is refused (one line naming the service, pipeline/services.py's
check), the servers' plain HTTP listeners are not reachable from the client, the served
endpoint answers over TLS on the server's address (``RLFN_SERVE_URL``, ``RLFN_SERVE_CA`` in the
bundle; 503 before a champion) and refuses a client without the CA, and PostgreSQL refuses a
connection without SSL and accepts verify-full with the CA; DVC's remote, reached by
``RLFN_DVC_REMOTE`` through the pinned route ``env --bundle`` sets up, takes a push and
refuses an impostor sshd with another host key; after ``rotate tls ssh_host_key ssh_key``
the old bundle's files are refused (TLS and the pin) and the new bundle's let in."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from hosts import hosts, install_project
from prereq import ROOT
from servers import clean_env
from teamstack import (EXPORTS, TLS_EXPORTS, eval_env, log_tails, prerequisites,
                       stack_ports)

pytestmark = pytest.mark.stack


CHECK = r"""
import sys
from pipeline.services import ServiceError, check_services
try:
    print("ok:", "; ".join(check_services(timeout=10)))
except ServiceError as e:
    print(f"error: {e}"); sys.exit(1)
"""

CLIENTS = r"""
import json, mlflow
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
exp = mlflow.set_experiment("across-hosts")
with mlflow.start_run(experiment_id=exp.experiment_id) as run:
    mlflow.log_metric("psnr", 30.5)
    mlflow.log_text("hello", "note.txt")
got = MlflowClient().get_run(run.info.run_id).data.metrics
with get_client(sync_client=True) as c:
    pool = c.read_work_pool("rlfn-pool")
import os, optuna
storage = optuna.storages.RDBStorage(os.environ["RLFN_OPTUNA_STORAGE"])
study = optuna.create_study(study_name="across-hosts", storage=storage, load_if_exists=True)
print(json.dumps({"metrics": got, "pool": pool.name, "study": study.study_name}))
"""

PG = r"""
import sys, psycopg
host, port, pw, mode = sys.argv[1:5]
extra = {"sslrootcert": sys.argv[5]} if len(sys.argv) > 5 else {}
try:
    with psycopg.connect(host=host, port=int(port), user="rlfn", password=pw, dbname="optuna",
                         sslmode=mode, connect_timeout=5, **extra) as c:
        print("ok", c.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
              .fetchone()[0])
except psycopg.OperationalError as e:
    print("refused:", str(e).strip().splitlines()[-1]); sys.exit(1)
"""

HTTP = r"""
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        print(r.status, r.read(200).decode(errors="replace"))
except urllib.error.HTTPError as e:
    print(e.code, e.read(200).decode(errors="replace")); sys.exit(1)
except OSError as e:
    print("unreachable:", getattr(e, "reason", e)); sys.exit(1)
"""


HTTPS = r"""
import ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[2] if len(sys.argv) > 2 else None)
try:
    with urllib.request.urlopen(sys.argv[1], timeout=10, context=ctx) as r:
        print(r.status, r.read(300).decode(errors="replace"))
except urllib.error.HTTPError as e:
    print(e.code, e.read(300).decode(errors="replace"))
except OSError as e:
    print("refused:", getattr(e, "reason", e)); sys.exit(1)
"""


def _listeners(h) -> set[tuple[str, int]]:
    out = h.root(["ss", "-ltnH"]).stdout
    found = set()
    for line in out.splitlines():
        local = line.split()[3]
        addr, port = local.rsplit(":", 1)
        found.add((addr, int(port)))
    return found


def test_server_host_over_tls():
    prerequisites(off_loopback=True)
    with hosts("server", "client") as net:
        srv, cli = net.hosts["server"], net.hosts["client"]
        clone = install_project(srv, ROOT)  # the server host's own copy and environment
        stack_sh = str(clone / "scripts" / "stack.sh")
        cli_clone = install_project(cli, ROOT)  # the client host's own
        py = str(cli_clone / ".venv" / "bin" / "python")
        ports, port_env = stack_ports()
        env = dict(RLFN_STACK_DIR=str(srv.home / "state"), RLFN_PROJECT_DIR=str(clone),
                   **port_env, RLFN_STACK_WORKER_POLL_S="1")
        try:
            r = srv.run(["bash", stack_sh, "up", "--host", srv.addr], timeout=900, **env)
            print(r.stdout + r.stderr)
            assert r.returncode == 0, r.stdout + r.stderr + log_tails(srv.home / "state")
            st = srv.run(["bash", stack_sh, "status"], timeout=120, **env)
            assert st.returncode == 0 and "nginx" in st.stdout, st.stdout + st.stderr
            exports = eval_env(srv.run(["bash", stack_sh, "env"], **env).stdout,
                               EXPORTS + TLS_EXPORTS)
            assert set(exports) == set(EXPORTS + TLS_EXPORTS), exports
            assert exports["MLFLOW_TRACKING_URI"] == f"https://{srv.addr}:{ports['mlflow']}"
            assert exports["PREFECT_API_URL"] == f"https://{srv.addr}:{ports['prefect']}/api"
            assert "sslmode=verify-full" in exports["RLFN_OPTUNA_STORAGE"]
            assert "http://" not in json.dumps(exports)

            # on the server host: off loopback only the TLS ends, PostgreSQL and sshd listen
            outside = {(a, p) for a, p in _listeners(srv) if not a.startswith("127.")}
            # (the webhook receiver stays on loopback; the served endpoint has its TLS end here)
            assert outside == {(srv.addr, ports[s])
                               for s in ("pg", "mlflow", "prefect", "ssh", "serve")}, outside
            for s in ("mlflow", "prefect", "serve"):
                assert ("127.0.0.1", ports[s]) in _listeners(srv)

            # the bundle: owner-only on the server host, carried to the client host, where
            # `env --bundle` gives the exports with the CA kept in the client's own directory
            b = srv.run(["bash", stack_sh, "bundle", str(srv.home / "team.bundle")], **env)
            assert b.returncode == 0, b.stdout + b.stderr
            assert (srv.home / "team.bundle").stat().st_mode & 0o777 == 0o600
            secrets = json.loads((srv.home / "state" / "secrets" / "stack.json").read_text())
            carried = cli.home / "team.bundle"
            shutil.copy(srv.home / "team.bundle", carried)
            os.chown(carried, cli.uid, cli.uid)
            os.chmod(carried, 0o644)
            cli_sh = ["bash", str(cli_clone / "scripts" / "stack.sh")]
            loose = cli.run(cli_sh + ["env", "--bundle", str(carried)])
            assert loose.returncode == 2 and loose.stderr.count("\n") == 1, loose.stderr
            assert loose.stderr.startswith("error: env --bundle") and "chmod 600" in loose.stderr
            os.chmod(carried, 0o600)
            got = cli.run(cli_sh + ["env", "--bundle", str(carried)])
            assert got.returncode == 0, got.stdout + got.stderr
            client = eval_env(got.stdout, EXPORTS + TLS_EXPORTS)
            ca = cli.home / ".config" / "rlfn-stack" / srv.addr / "ca.crt"
            assert client["MLFLOW_TRACKING_SERVER_CERT_PATH"] == str(ca), client
            assert f"sslrootcert={ca}" in client["RLFN_OPTUNA_STORAGE"], client
            assert client == {k: v.replace(str(srv.home / "state" / "tls" / "ca.crt"), str(ca))
                              for k, v in exports.items() if k != "RLFN_PROJECT_DIR"}
            client["PREFECT_HOME"] = str(cli.home / "prefect")
            # the served endpoint (no champion yet): its TLS end, verified with the bundle's CA
            serve = eval_env(got.stdout, ("RLFN_SERVE_URL", "RLFN_SERVE_CA"))
            assert serve == {"RLFN_SERVE_URL": f"https://{srv.addr}:{ports['serve']}",
                             "RLFN_SERVE_CA": str(ca)}, serve
            dvc_remote = eval_env(got.stdout, ("RLFN_DVC_REMOTE",))["RLFN_DVC_REMOTE"]
            ping = cli.run([py, "-c", HTTPS, f"{serve['RLFN_SERVE_URL']}/ping", str(ca)],
                           timeout=60)
            assert ping.stdout.startswith("503 ") and "no champion" in ping.stdout, \
                ping.stdout + ping.stderr
            ping = cli.run([py, "-c", HTTPS, f"{serve['RLFN_SERVE_URL']}/ping"], timeout=60)
            assert ping.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in ping.stdout, \
                ping.stdout + ping.stderr

            ok = cli.run([py, "-c", CHECK], timeout=60, **client)
            assert ok.returncode == 0 and ok.stdout.startswith("ok: MLflow https://"), \
                ok.stdout + ok.stderr
            work = cli.run([py, "-c", CLIENTS], timeout=180, **client)
            assert work.returncode == 0, work.stdout + work.stderr
            got = json.loads(work.stdout.strip().splitlines()[-1])
            assert got == {"metrics": {"psnr": 30.5}, "pool": "rlfn-pool", "study": "across-hosts"}, got

            # without the CA: refused, one line naming the service and why
            no_ca = {k: v for k, v in client.items()
                     if k not in ("MLFLOW_TRACKING_SERVER_CERT_PATH", "PREFECT_API_SSL_CERT_FILE")}
            bad = cli.run([py, "-c", CHECK], timeout=60, **no_ca)
            lines = bad.stdout.strip().splitlines()
            assert bad.returncode == 1 and len(lines) == 1, bad.stdout + bad.stderr
            assert lines[0].startswith("error: MLflow tracking server at https://"), lines
            assert "certificate" in lines[0], lines

            # the servers' plain HTTP is not reachable from the client
            for s, path in (("mlflow", "/health"), ("prefect", "/api/health"),
                            ("serve", "/ping")):
                for target in (f"http://{srv.addr}:{ports[s]}{path}",
                               f"http://127.0.0.1:{ports[s]}{path}"):
                    h = cli.run([py, "-c", HTTP, target], timeout=30)
                    assert h.returncode == 1, (target, h.stdout)
                    assert "unreachable" in h.stdout or "plain HTTP" in h.stdout, \
                        (target, h.stdout)

            # PostgreSQL: no SSL refused, verify-full with the CA accepted, without it refused
            pw = secrets["db_password"]
            base = [py, "-c", PG, srv.addr, str(ports["pg"]), pw]
            plain = cli.run(base + ["disable"], timeout=30)
            assert plain.returncode == 1 and "no encryption" in plain.stdout, plain.stdout
            full = cli.run(base + ["verify-full", str(ca)], timeout=30)
            assert full.returncode == 0 and full.stdout.strip() == "ok True", \
                full.stdout + full.stderr
            unverified = cli.run(base + ["verify-full"], timeout=30)
            assert unverified.returncode == 1, unverified.stdout

            _dvc_remote_pins_the_host_key(srv, cli, cli_clone, dvc_remote, stack_sh, env)
            _rotated_keys_need_the_new_bundle(srv, cli, cli_clone, client, stack_sh, env)
        finally:
            d = srv.run(["bash", stack_sh, "down"], timeout=300, **env)
            print(d.stdout + d.stderr)


def _push_probe(srv, cli, clone: Path, name: str) -> tuple[subprocess.CompletedProcess, Path]:
    """A new random file ``name`` in the client's ``clone``, ``dvc add``ed, then ``dvc push``ed
    to its default remote: the push's result (DVC's stderr in stdout) and where the object
    lands in the server's remote (``state/dvc-remote``) when it gets there."""
    dvc = str(clone / ".venv" / "bin" / "dvc")
    blob = os.urandom(32).hex() + "\n"
    (clone / name).write_text(blob)
    os.chown(clone / name, cli.uid, cli.uid)
    add = cli.run([dvc, "add", "-q", name], cwd=clone, timeout=300)
    assert add.returncode == 0, add.stdout + add.stderr
    md5 = hashlib.md5(blob.encode()).hexdigest()
    # DVC's stderr a pipe of the client's user, as in a shell (`| tee`): one made by the
    # test's root the proxy could not open (its words then go to ssh_errors.log)
    cmd = f"{dvc} push {name}.dvc 2>&1 | cat; exit ${{PIPESTATUS[0]}}"
    stored = srv.home / "state" / "dvc-remote" / "files" / "md5"
    return cli.run(["bash", "-c", cmd], cwd=clone, timeout=300), stored / md5[:2] / md5[2:]


def _dvc_remote_pins_the_host_key(srv, cli, clone, remote: str, stack_sh: str,
                                  env: dict) -> None:
    """DVC's SSH client checks no host key (sshfs gives asyncssh ``known_hosts=None``): the
    bundle's remote is reached by the alias of ``RLFN_DVC_REMOTE``, which only the client's
    pinned route resolves (an OpenSSH tunnel, strict, the pinned key). A push through it lands
    on the server's remote; an impostor sshd on the server's address and port, with the same
    authorized key but another host key, is refused (OpenSSH's own words on DVC's stderr) and
    gets no byte."""
    dvc = str(clone / ".venv" / "bin" / "dvc")
    assert remote.startswith(f"ssh://{srv.user}@rlfn-stack-{srv.addr}:"), remote
    included = (cli.home / ".ssh" / "config").read_text()
    assert f'Include "{cli.home}/.config/rlfn-stack/{srv.addr}/dvc_ssh_config"' in included
    ok = cli.run([dvc, "remote", "add", "--local", "-d", "-f", "stack", remote], cwd=clone,
                 timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    def push(name: str) -> tuple[subprocess.CompletedProcess, Path]:
        return _push_probe(srv, cli, clone, name)

    r, obj = push("pin-probe-1.bin")
    assert r.returncode == 0 and obj.is_file(), r.stdout + r.stderr

    # the impostor: the stack's sshd stopped, another on its address and port, a new host key
    state = srv.home / "state"
    where = (srv.addr, urlsplit(remote).port)

    def listening(want: bool, p: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + 60
        while (where in _listeners(srv)) != want:
            assert p is None or p.poll() is None, p.stdout.read()
            assert time.monotonic() < deadline, (where, want)
            time.sleep(0.2)

    os.kill(int((state / "run" / "sshd.pid").read_text().split()[0]), signal.SIGTERM)
    listening(False)
    conf = state / "ssh" / "sshd_config"
    fake_key = srv.home / "impostor_host_key"
    made = srv.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(fake_key)])
    assert made.returncode == 0, made.stderr
    fake_conf = srv.home / "impostor_sshd_config"
    fake_conf.write_text(re.sub(r'(?m)^HostKey .*$', f'HostKey "{fake_key}"',
                                conf.read_text()))
    impostor = srv.popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(fake_conf)])
    try:
        listening(True, impostor)
        bad, obj = push("pin-probe-2.bin")
        assert bad.returncode != 0 and not obj.exists(), bad.stdout + bad.stderr
        assert "Host key verification failed." in bad.stdout, bad.stdout
        assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in bad.stdout, bad.stdout
    finally:
        os.killpg(impostor.pid, signal.SIGKILL)
        impostor.wait(timeout=30)
    listening(False)
    # the stack's own sshd again (`up` starts what is down), and the push goes through
    again = srv.run(["bash", stack_sh, "up", "--host", srv.addr], timeout=600, **env)
    assert again.returncode == 0, again.stdout + again.stderr
    r = cli.run([dvc, "push", "pin-probe-2.bin.dvc"], cwd=clone, timeout=300)
    assert r.returncode == 0 and obj.is_file(), r.stdout + r.stderr


def _rotated_keys_need_the_new_bundle(srv, cli, clone, client: dict, stack_sh: str,
                                      env: dict) -> None:
    """``rotate tls ssh_host_key ssh_key`` on the server host: a new CA and server
    certificate, host key and client key pair. The client with the old bundle's files is
    refused: by its own TLS check (one line naming MLflow and the certificate) and by the
    pinned route (the host key changed); with the new bundle both go through."""
    py = str(clone / ".venv" / "bin" / "python")
    r = srv.run(["bash", stack_sh, "rotate", "tls", "ssh_host_key", "ssh_key"], timeout=900,
                **env)
    assert r.returncode == 0, r.stdout + r.stderr + log_tails(srv.home / "state")
    assert "rotate: tls removed" in r.stdout and "stack: rotated tls, ssh_host_key, ssh_key" \
        in r.stdout, r.stdout

    def works() -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
        return (cli.run([py, "-c", CHECK], timeout=60, **client),
                _push_probe(srv, cli, clone, "pin-probe-3.bin")[0])

    check, push = works()  # the old bundle's CA, key and pin
    assert check.returncode == 1 and check.stdout.startswith(
        "error: MLflow tracking server at https://") and "certificate" in check.stdout, \
        check.stdout + check.stderr
    assert push.returncode != 0 and "Host key verification failed." in push.stdout, push.stdout

    b = srv.run(["bash", stack_sh, "bundle", str(srv.home / "team.bundle")], **env)
    assert b.returncode == 0, b.stdout + b.stderr
    carried = cli.home / "team.bundle"
    shutil.copy(srv.home / "team.bundle", carried)
    os.chown(carried, cli.uid, cli.uid)
    os.chmod(carried, 0o600)
    got = cli.run(["bash", str(clone / "scripts" / "stack.sh"), "env", "--bundle", str(carried)])
    assert got.returncode == 0, got.stdout + got.stderr
    assert eval_env(got.stdout, EXPORTS + TLS_EXPORTS) == \
        {k: v for k, v in client.items() if k != "PREFECT_HOME"}  # the same paths: new files
    check, push = works()
    assert check.returncode == 0 and check.stdout.startswith("ok: MLflow https://"), \
        check.stdout + check.stderr
    assert push.returncode == 0, push.stdout


@pytest.mark.parametrize("args, env, says", [
    (["up", "--host", "db.example"], {}, "error: --host 'db.example': not an IP address"),
    (["up", "--host", "192.0.2.77"], {}, "error: --host '192.0.2.77': not an address of this host"),
    (["up", "--host", "0.0.0.0"], {}, "error: --host '0.0.0.0': give one address"),
    (["up"], {"RLFN_STACK_HOST": "::1"}, "error: RLFN_STACK_HOST '::1': only IPv4"),
    (["up", "--host"], {}, "error: up --host: needs a value"),
    (["up", "--hots", "1"], {}, "error: up: unknown option '--hots'"),
    (["env", "--bundle", "/nonexistent/team.bundle"], {},
     "error: env --bundle /nonexistent/team.bundle: No such file"),
    (["bundle", "team.bundle"], {}, "error: bundle: no secrets at"),
])
def test_bad_input_is_one_error_line(tmp_path, args, env, says):
    """Nothing is started or written: one ``error:`` line naming the flag, exit 2."""
    state = tmp_path / "state"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "stack.sh"), *args], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path,
                       env={**clean_env(RLFN_STACK_DIR=str(state)), **env})
    first = r.stderr.splitlines()[0] if r.stderr else ""
    assert r.returncode == 2 and first.startswith(says), (r.returncode, r.stderr)
    assert r.stdout == "" and not state.exists(), (r.stdout, list(tmp_path.iterdir()))
