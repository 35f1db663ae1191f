"""A worker host joins the team's stack (issue 23 item 2): hosts made by tests/hosts.py (each its
own network namespace, Unix user and home; no shared disk). The server host runs ``stack.sh up
--host <its address>`` and writes the bundle; the bundle is carried to a worker host (a copy,
as a person would hand it over), which runs ``stack.sh join FILE``:

* bad input first: a bundle readable by others, a bad ``--pool``: one ``error:`` line naming
  it, exit 2, nothing written (no state directory, no client directory);
* the worker host's own clone of ``RLFN_GIT_URL`` (over the server's sshd, host key pinned),
  at the server repository's HEAD, its DVC remote ``stack`` from the bundle in
  ``.dvc/config.local``; ``status`` shows its worker up;
* from a client host (``env --bundle``): the worker is ONLINE on ``rlfn-pool`` through the
  server's Prefect API over TLS, and the branch the worker host pushed over SSH is in the clone
  the client makes of ``RLFN_GIT_URL``;
* ``dvc push`` from the worker host's clone puts the file's bytes in the server host's remote;
* the server host runs no worker (``RLFN_STACK_WORKER=0``), so the deployment run
  ``rlfn-repro/repro --param push=true`` (the whole tiny pipeline, test_stack_repro's params)
  dispatched from the client host is run by the worker host: COMPLETED, its outputs pushed to
  the server's remote and ``dvc.lock`` committed to ``repro/<flow run id>`` pushed to
  ``RLFN_GIT_URL``; on the client, checking out that branch and ``dvc pull`` restore the
  outputs byte for byte and ``dvc status`` is clean; the champion loads on the client from the
  tracking server over TLS and upscales an image;
* nothing secret on the wire (item 5): tcpdump on the bridge from the join to the champion's
  check holds more bytes than the outputs pulled and none of the passwords ``up`` made,
  MLflow's HTTP Basic ``user:password`` (plain or base64) or a line of a private key;
* ``down`` on the worker host stops its worker (``status``: DOWN, exit 1).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from hosts import capture, hosts, install_project, secrets_seen
from prereq import ROOT
from servers import free_port
from teamstack import eval_env, log_tails, prerequisites
from tinyproject import DVC_STAGES, TRAIN_IMAGES, tiny_params

pytestmark = pytest.mark.stack

GIT_EXPORTS = ("RLFN_GIT_URL", "GIT_SSH_COMMAND")
CLIENT_EXPORTS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                  "PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "RLFN_OPTUNA_STORAGE",
                  "MLFLOW_TRACKING_SERVER_CERT_PATH", "PREFECT_API_SSL_CERT_FILE", *GIT_EXPORTS)

WORKERS = r"""
import json, sys
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    ws = c.read_workers_for_work_pool(sys.argv[1])
print(json.dumps({w.name: str(getattr(w.status, "value", w.status)) for w in ws}))
"""

FLOW_RUN = r"""
import json, sys
from uuid import UUID
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    fr = c.read_flow_run(UUID(sys.argv[1]))
print(json.dumps({"state": fr.state_type.value, "message": fr.state.message if fr.state else "",
                  "pool": fr.work_pool_name}))
"""
CACHED = ("data/manifest.parquet", "data/lr", "data/patches", "models/stage1", "models/stage2",
          "models/stage3")  # outputs DVC caches (pushed by the worker host, pulled by the client)

PYFUNC = r"""
import json
import numpy as np
import mlflow

model = mlflow.pyfunc.load_model("models:/rlfn-x4@champion")
img = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
out = np.asarray(model.predict(img))
print(json.dumps({"shape": list(out.shape), "dtype": str(out.dtype)}))
"""


def _carry(src, h, name: str = "team.bundle"):
    """The bundle copied to host ``h`` (its user's, 0600): as a person hands it over."""
    dst = h.home / name
    shutil.copy(src, dst)
    os.chown(dst, h.uid, h.uid)
    os.chmod(dst, 0o600)
    return dst


def _secrets(state: Path) -> dict[str, str]:
    """What must never cross the bridge in clear: every password the server's ``up`` made
    (``secrets/stack.json``: PostgreSQL's, MLflow's, Prefect's auth string), MLflow's
    ``user:password`` (HTTP Basic), and each base64 line of the private keys (the DVC remote's
    and git's client key, the CA's and the servers' TLS keys)."""
    doc = json.loads((state / "secrets" / "stack.json").read_text())
    out = {f"secret {k}": v for k, v in doc.items() if isinstance(v, str) and len(v) >= 12}
    keys = [state / "ssh" / "id_ed25519", *sorted((state / "tls").glob("*.key"))]
    assert len(keys) >= 2, keys
    for key in keys:
        body = [ln for ln in key.read_text().splitlines() if ln and not ln.startswith("-----")]
        out.update({f"{key.name} line {i}": ln for i, ln in enumerate(body) if len(ln) >= 40})
    return out


def _ok(r: subprocess.CompletedProcess, what: str, extra: str = "") -> str:
    assert r.returncode == 0, f"{what}: exit {r.returncode}\n{r.stdout}{r.stderr}{extra}"
    return r.stdout


@pytest.mark.timeout(1800)  # the whole tiny pipeline runs on the worker host
def test_worker_host_joins():
    prerequisites(off_loopback=True)
    with hosts("server", "worker", "client") as net:
        srv, wrk, cli = net.hosts["server"], net.hosts["worker"], net.hosts["client"]
        clone = install_project(srv, ROOT)
        # the server's project holds the working tree as a commit, made tiny (test_stack_repro's
        # params, 4 training images): the team's repository is seeded from its branches (the
        # code and params the worker host then runs)
        tiny_params(clone / "params.yaml", int8=False)
        extra = sorted((clone / "data" / "sample" / "train").glob("*.png"))[TRAIN_IMAGES:]
        _ok(srv.run(["git", "rm", "-q", *[str(p) for p in extra]], cwd=clone), "git rm")
        _ok(srv.run(["git", "add", "-A"], cwd=clone), "git add")
        _ok(srv.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-q",
                     "--allow-empty", "-m", "the working tree under test"], cwd=clone),
            "git commit")
        stack_sh = str(clone / "scripts" / "stack.sh")
        wrk_clone = install_project(wrk, ROOT)  # the worker host's tool clone and environment
        cli_clone = install_project(cli, ROOT)
        ports = {k: free_port() for k in ("pg", "mlflow", "prefect", "ssh")}
        state = srv.home / "state"
        env = dict(RLFN_STACK_DIR=str(state), RLFN_PROJECT_DIR=str(clone),
                   RLFN_STACK_PG_PORT=str(ports["pg"]),
                   RLFN_STACK_MLFLOW_PORT=str(ports["mlflow"]),
                   RLFN_STACK_PREFECT_PORT=str(ports["prefect"]),
                   RLFN_STACK_SSH_PORT=str(ports["ssh"]), RLFN_STACK_WORKER="0")
        wsh = ["bash", str(wrk_clone / "scripts" / "stack.sh")]
        wstate = wrk.home / "state"
        wenv = dict(RLFN_STACK_DIR=str(wstate), RLFN_STACK_WORKER_POLL_S="1")
        try:
            r = srv.run(["bash", stack_sh, "up", "--host", srv.addr], timeout=900, **env)
            print(r.stdout + r.stderr)
            _ok(r, "up", log_tails(state))
            assert "git repository made at ssh://" in r.stdout, r.stdout
            # RLFN_STACK_WORKER=0: the pool's workers are other hosts'
            assert "\nworker " not in r.stdout, r.stdout
            assert not (state / "run" / "worker.pid").exists()
            exports = eval_env(srv.run(["bash", stack_sh, "env"], **env).stdout, GIT_EXPORTS)
            git_url = f"ssh://{srv.user}@{srv.addr}:{ports['ssh']}{state}/git/rlfn-pipeline.git"
            assert exports["RLFN_GIT_URL"] == git_url, exports
            bare = state / "git" / "rlfn-pipeline.git"
            head = _ok(srv.run(["git", "rev-parse", "HEAD"], cwd=clone), "rev-parse").strip()
            assert _ok(srv.run(["git", "rev-parse", "HEAD"], cwd=bare), "bare HEAD").strip() \
                == head

            b = srv.run(["bash", stack_sh, "bundle", str(srv.home / "team.bundle")], **env)
            _ok(b, "bundle")
            doc = json.loads((srv.home / "team.bundle").read_text())
            assert doc["git"] == {"url": git_url}, doc["git"]
            carried = _carry(srv.home / "team.bundle", wrk)
            client_dir = wrk.home / ".config" / "rlfn-stack" / srv.addr

            # bad input: one error line naming it, exit 2, nothing written
            os.chmod(carried, 0o644)
            loose = wrk.run(wsh + ["join", str(carried)], **wenv)
            assert loose.returncode == 2 and loose.stderr.count("\n") == 1, loose.stderr
            assert loose.stderr.startswith(f"error: join {carried}: readable by others"), \
                loose.stderr
            os.chmod(carried, 0o600)
            pool = wrk.run(wsh + ["join", str(carried), "--pool", "gpu pool"], **wenv)
            assert pool.returncode == 2 and pool.stderr.count("\n") == 1, pool.stderr
            assert pool.stderr.startswith("error: join --pool 'gpu pool'"), pool.stderr
            assert not wstate.exists() and not client_dir.exists(), \
                (list(wrk.home.iterdir()), loose.stderr)

            # from here to the champion on the client, every packet on the bridge is captured
            wire = contextlib.ExitStack()
            pcap = wire.enter_context(capture(net, net.base / "bridge.pcap"))

            # the join
            j = wrk.run(wsh + ["join", str(carried)], timeout=600, **wenv)
            print(j.stdout + j.stderr)
            _ok(j, "join", log_tails(wstate))
            project = wstate / "project"
            joined = json.loads((wstate / "run" / "state.json").read_text())["joined"]
            assert joined["pool"] == "rlfn-pool" and joined["project_dir"] == str(project)
            worker_name = joined["worker"]
            assert wrk.addr in worker_name, worker_name
            origin = _ok(wrk.run(["git", "remote", "get-url", "origin"], cwd=project), "origin")
            assert origin.strip() == git_url
            assert _ok(wrk.run(["git", "rev-parse", "HEAD"], cwd=project), "HEAD").strip() == head
            local = (project / ".dvc" / "config.local").read_text()
            assert f"url = {doc['ssh']['remote']}" in local, local
            assert f"keyfile = {client_dir / 'id_ed25519'}" in local, local
            assert "remote = stack" in local, local
            st = wrk.run(wsh + ["status"], timeout=120, **wenv)
            assert st.returncode == 0, st.stdout + st.stderr
            assert st.stdout.startswith("worker      up    ") and worker_name in st.stdout, \
                st.stdout

            # the worker, seen from a client host through the server's Prefect API over TLS
            cli_bundle = _carry(srv.home / "team.bundle", cli)
            got = cli.run(["bash", str(cli_clone / "scripts" / "stack.sh"), "env", "--bundle",
                           str(cli_bundle)])
            client = eval_env(_ok(got, "env --bundle"), CLIENT_EXPORTS)
            assert set(client) == set(CLIENT_EXPORTS), sorted(client)
            assert client["RLFN_GIT_URL"] == git_url
            assert client["PREFECT_API_URL"].startswith(f"https://{srv.addr}:")
            py = str(cli_clone / ".venv" / "bin" / "python")
            w = cli.run([py, "-c", WORKERS, "rlfn-pool"], timeout=120,
                        PREFECT_HOME=str(cli.home / "prefect"), **client)
            workers = json.loads(_ok(w, "workers").strip().splitlines()[-1])
            assert workers.get(worker_name) == "ONLINE", workers

            # git over SSH from the worker host: a branch pushed to RLFN_GIT_URL ...
            wexp = eval_env(_ok(wrk.run(wsh + ["env", "--bundle", str(carried)]), "env"),
                            CLIENT_EXPORTS)
            git_id = ["-c", "user.name=w", "-c", "user.email=w@localhost"]
            (project / "join-probe.txt").write_text(f"from {wrk.name}\n")
            os.chown(project / "join-probe.txt", wrk.uid, wrk.uid)
            for cmd in (["checkout", "-q", "-b", "join-probe"], ["add", "join-probe.txt"],
                        [*git_id, "commit", "-q", "-m", "a commit of the worker host"],
                        ["push", "-q", "origin", "join-probe"]):
                _ok(wrk.run(["git", *cmd], cwd=project, timeout=120, **wexp), f"git {cmd}")
            pushed = _ok(wrk.run(["git", "rev-parse", "HEAD"], cwd=project), "HEAD").strip()
            assert _ok(srv.run(["git", "rev-parse", "refs/heads/join-probe"], cwd=bare),
                       "server's branch").strip() == pushed
            # ... is in the client host's own clone of RLFN_GIT_URL
            cclone = cli.home / "team-clone"
            _ok(cli.run(["git", "clone", "-q", git_url, str(cclone)], timeout=300, **client),
                "client clone")
            assert _ok(cli.run(["git", "rev-parse", "origin/join-probe"], cwd=cclone),
                       "client's branch").strip() == pushed
            # without the bundle's ssh config git cannot reach it (no key, no pinned host key)
            bare_env = {k: v for k, v in client.items() if k != "GIT_SSH_COMMAND"}
            refused = cli.run(["git", "ls-remote", git_url], timeout=120,
                              GIT_SSH_COMMAND="ssh -o BatchMode=yes", **bare_env)
            assert refused.returncode != 0, refused.stdout

            # dvc push from the worker host reaches the server host's remote
            dvc = str(wrk_clone / ".venv" / "bin" / "dvc")
            blob = os.urandom(64).hex() + "\n"
            (project / "join-probe.bin").write_text(blob)
            os.chown(project / "join-probe.bin", wrk.uid, wrk.uid)
            _ok(wrk.run([dvc, "add", "-q", "join-probe.bin"], cwd=project, timeout=300, **wexp),
                "dvc add")
            p = wrk.run([dvc, "push", "join-probe.bin.dvc"], cwd=project, timeout=300, **wexp)
            _ok(p, "dvc push")
            md5 = yaml.safe_load((project / "join-probe.bin.dvc").read_text())["outs"][0]["md5"]
            stored = state / "dvc-remote" / "files" / "md5" / md5[:2] / md5[2:]
            assert stored.is_file() and stored.read_text() == blob, (stored, p.stdout)

            # a deployment run from the client host, run by the worker host
            prefect = str(cli_clone / ".venv" / "bin" / "prefect")
            cenv = dict(client, PREFECT_HOME=str(cli.home / "prefect"))
            run = cli.run([prefect, "deployment", "run", "rlfn-repro/repro", "--params",
                           json.dumps({"push": True}), "--watch",
                           "--watch-interval", "2", "--watch-timeout", "1800"],
                          timeout=1900, **cenv)
            out = run.stdout + run.stderr
            print(out[-3000:])
            m = re.search(r"UUID: ([0-9a-f-]{36})", out)
            assert m, out
            fr = json.loads(_ok(cli.run([py, "-c", FLOW_RUN, m.group(1)], timeout=120, **cenv),
                                "flow run").strip().splitlines()[-1])
            if fr["state"] != "COMPLETED":
                print(log_tails(wstate, 200))
            assert fr["state"] == "COMPLETED", fr
            assert fr["pool"] == "rlfn-pool", fr
            lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
            assert set(DVC_STAGES) <= set(lock), sorted(lock)  # the worker host's clone
            branch = f"repro/{m.group(1)}"
            on_server = _ok(srv.run(["git", "rev-parse", f"refs/heads/{branch}"], cwd=bare),
                            "the repro branch on the server").strip()
            _ok(cli.run(["git", "fetch", "-q", "origin"], cwd=cclone, timeout=300, **client),
                "client fetch")
            _ok(cli.run(["git", "checkout", "-q", branch], cwd=cclone, **client), "checkout")
            assert _ok(cli.run(["git", "rev-parse", "HEAD"], cwd=cclone), "HEAD").strip() == \
                on_server
            cdvc = str(cli_clone / ".venv" / "bin" / "dvc")
            ckey = cli.home / ".config" / "rlfn-stack" / srv.addr / "id_ed25519"
            for cmd in (["remote", "add", "--local", "-d", "stack", doc["ssh"]["remote"]],
                        ["remote", "modify", "--local", "stack", "keyfile", str(ckey)],
                        ["pull", "-q"]):
                _ok(cli.run([cdvc, *cmd], cwd=cclone, timeout=600, **client), f"dvc {cmd}")
            for out_path in CACHED:
                a, b = project / out_path, cclone / out_path
                files = sorted(x.relative_to(a) for x in a.rglob("*") if x.is_file()) \
                    if a.is_dir() else [Path()]
                assert files, out_path
                for f in files:
                    assert (b / f).read_bytes() == (a / f).read_bytes(), (out_path, f)
            st = cli.run([cdvc, "status", "--json", "dvc.yaml"], cwd=cclone, timeout=300,
                         **client)
            assert json.loads(_ok(st, "dvc status")) == {}, st.stdout
            # the champion, from the tracking server over TLS, upscales x4 on the client
            got = cli.run([py, "-c", PYFUNC], cwd=cli.home, timeout=600, **cenv)
            assert json.loads(_ok(got, "pyfunc").strip().splitlines()[-1]) == \
                {"shape": [80, 96, 3], "dtype": "uint8"}, got.stdout

            # nothing secret on the wire: the capture holds the run's traffic (more bytes than
            # the outputs the client pulled) and none of the secrets, plain or base64
            wire.close()
            pulled = sum(f.stat().st_size for o in CACHED for f in
                         ((cclone / o).rglob("*") if (cclone / o).is_dir() else [cclone / o])
                         if f.is_file())
            assert pcap.stat().st_size > pulled > 0, (pcap.stat().st_size, pulled)
            secret = _secrets(state)
            assert len(secret) >= 5, sorted(secret)
            assert secrets_seen(pcap, secret) == [], "in clear on the bridge"

            # down on the worker host stops its worker
            d = wrk.run(wsh + ["down"], timeout=120, **wenv)
            assert d.returncode == 0 and "worker      stopped" in d.stdout, d.stdout + d.stderr
            st = wrk.run(wsh + ["status"], timeout=120, **wenv)
            assert st.returncode == 1 and "worker      DOWN" in st.stdout, st.stdout
        finally:
            if "wire" in locals():
                wire.close()  # a failure before the capture's end: stop tcpdump
            print(log_tails(wstate, 30))
            d = wrk.run(wsh + ["down"], timeout=120, **wenv)
            print(d.stdout + d.stderr)
            d = srv.run(["bash", stack_sh, "down"], timeout=300, **env)
            print(d.stdout + d.stderr)
