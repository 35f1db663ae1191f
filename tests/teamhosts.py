"""A team on test hosts (tests/hosts.py): the server host's stack off loopback (TLS), its
bundle, worker hosts that join it, a client host with the bundle's exports; and what a test
does with them from the client (dispatch a deployment, wait for flow runs, ask the workers).
What test_hosts_team.py and the chaos suite's multi-host case (test_chaos_network.py) run
on."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import yaml

from hosts import Host, Net, hosts, install_project
from prereq import ROOT
from teamstack import eval_env, log_tails, prerequisites, stack_ports
from tinyproject import tiny_clone

GIT_EXPORTS = ("RLFN_GIT_URL", "GIT_SSH_COMMAND")
CLIENT_EXPORTS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                  "PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "RLFN_OPTUNA_STORAGE",
                  "MLFLOW_TRACKING_SERVER_CERT_PATH", "PREFECT_API_SSL_CERT_FILE",
                  "RLFN_SERVE_URL", "RLFN_SERVE_CA", "RLFN_DVC_REMOTE", *GIT_EXPORTS)

WORKERS = r"""
import json, sys
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    ws = c.read_workers_for_work_pool(sys.argv[1])
print(json.dumps({w.name: str(getattr(w.status, "value", w.status)) for w in ws}))
"""


# the flow runs' states, from the client, once every one of them is final (bounded)
WAIT_RUNS = r"""
import json, sys, time
from uuid import UUID
from prefect.client.orchestration import get_client
limit, ids = float(sys.argv[1]), sys.argv[2:]
deadline = time.monotonic() + limit
with get_client(sync_client=True) as c:
    while True:
        frs = [c.read_flow_run(UUID(i)) for i in ids]
        if all(fr.state and fr.state.is_final() for fr in frs) or time.monotonic() > deadline:
            break
        time.sleep(2)
print(json.dumps({str(fr.id): {"state": fr.state_type.value if fr.state_type else None,
                               "message": fr.state.message if fr.state else "",
                               "pool": fr.work_pool_name} for fr in frs}))
"""


def ok(r: subprocess.CompletedProcess, what: str, extra: str = "") -> str:
    assert r.returncode == 0, f"{what}: exit {r.returncode}\n{r.stdout}{r.stderr}{extra}"
    return r.stdout


def carry(src: Path, h: Host, name: str = "team.bundle") -> Path:
    """The bundle copied to host ``h`` (its user's, 0600): as a person hands it over."""
    dst = h.home / name
    shutil.copy(src, dst)
    os.chown(dst, h.uid, h.uid)
    os.chmod(dst, 0o600)
    return dst


@dataclass
class Team:
    """What ``team_on_hosts`` made."""

    net: Net
    srv: Host
    srv_env: dict[str, str]        # what the server's stack.sh runs with (state, ports)
    stack_sh: str                  # the server clone's scripts/stack.sh
    up_out: str                    # what the server's `up` printed
    workers: dict[str, Host]       # name -> host
    tools: dict[str, Path]         # name -> the worker host's tool clone (its .venv runs join)
    wstate: dict[str, Path]        # name -> its join state directory
    wenv: dict[str, dict]          # name -> what its stack.sh runs with
    cli: Host
    cli_clone: Path
    client: dict[str, str]         # the client's exports (env --bundle)
    state: Path                    # the server's state directory
    bare: Path                     # the team's git repository on the server host
    head: str                      # the commit the team's repository was seeded with
    git_url: str
    study: str | None
    bundle: dict                   # the bundle (JSON) the server wrote
    repro: str | None = field(default=None)  # repro/<id>, once test 1 checked it out and pulled

    def project(self, name: str) -> Path:
        return self.wstate[name] / "project"

    def wsh(self, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """``stack.sh ARGS`` on worker host ``name`` (its tool clone's, its state directory)."""
        return self.workers[name].run(["bash", str(self.tools[name] / "scripts" / "stack.sh"),
                                       *args], timeout=timeout, **self.wenv[name])

    def join(self, name: str, *extra: str) -> subprocess.CompletedProcess:
        """``join`` on worker host ``name`` with the bundle carried there (``extra``: more
        arguments, e.g. ``--pool NAME``)."""
        j = self.wsh(name, "join", str(carry(self.srv.home / "team.bundle",
                                             self.workers[name])), *extra, timeout=600)
        print(j.stdout + j.stderr)
        ok(j, f"join on {name}", log_tails(self.wstate[name]))
        return j

    def both_joined(self) -> None:
        """Every worker host joined (test 1 joins ``w1``; when it failed before, or did not run,
        the later tests join it here)."""
        for n in self.workers:
            if not (self.wstate[n] / "run" / "state.json").is_file():
                self.join(n)

    def cenv(self) -> dict[str, str]:
        return dict(self.client, PREFECT_HOME=str(self.cli.home / "prefect"))

    def exports_on(self, name: str) -> dict[str, str]:
        """What ``cenv`` is for the client host, on worker host ``name`` (the bundle carried
        there, ``env --bundle`` of its tool clone; not joined: a second client host)."""
        h = self.workers[name]
        got = h.run(["bash", str(self.tools[name] / "scripts" / "stack.sh"), "env", "--bundle",
                     str(carry(self.srv.home / "team.bundle", h))])
        return dict(eval_env(ok(got, f"env --bundle on {name}"), CLIENT_EXPORTS),
                    PREFECT_HOME=str(h.home / "prefect"))

    def py(self) -> str:
        return str(self.cli_clone / ".venv" / "bin" / "python")

    def cdvc(self) -> str:
        return str(self.cli_clone / ".venv" / "bin" / "dvc")

    def client_py(self, code: str, *args: str, timeout: float = 300):
        """``code`` run on the client host with its exports; its last line, as JSON."""
        r = self.cli.run([self.py(), "-c", code, *args], timeout=timeout, **self.cenv())
        return json.loads(ok(r, "client script").strip().splitlines()[-1])

    def runner_of(self, flow_run_id: str) -> list[str]:
        """The worker hosts that ran ``flow_run_id``: the flow run's own first line ("View at
        .../flow-run/<id>") is in that host's worker log only (a worker that lost the race for
        the run logs "submitting" then "Aborted submission", never that line)."""
        line = f"/runs/flow-run/{flow_run_id}"
        logs = {n: st / "logs" / "worker.log" for n, st in self.wstate.items()}
        return [n for n, log in logs.items() if log.is_file() and
                any("View at" in x and x.rstrip().endswith(line)
                    for x in log.read_text(errors="replace").splitlines())]

    def logs(self) -> str:
        return "".join(log_tails(st, 80) for st in self.wstate.values())

    def pull_on_client(self, branch: str, where: Path) -> None:
        """The client's clone of ``RLFN_GIT_URL`` at ``branch`` in ``where`` (cloned, or fetched
        and checked out), its DVC remote the bundle's, ``dvc pull``, ``dvc status`` clean."""
        if not where.exists():
            ok(self.cli.run(["git", "clone", "-q", self.git_url, str(where)], timeout=300,
                             **self.client), "client clone")
        ok(self.cli.run(["git", "fetch", "-q", "origin"], cwd=where, timeout=300,
                         **self.client), "client fetch")
        ok(self.cli.run(["git", "checkout", "-q", branch], cwd=where, **self.client),
            f"checkout {branch}")
        for cmd in (["remote", "add", "--local", "-f", "-d", "stack",
                     self.client["RLFN_DVC_REMOTE"]], ["pull", "-q"]):
            ok(self.cli.run([self.cdvc(), *cmd], cwd=where, timeout=300, **self.client),
                f"dvc {cmd}")
        st = self.cli.run([self.cdvc(), "status", "--json", "dvc.yaml"], cwd=where, timeout=300,
                          **self.client)
        assert json.loads(ok(st, "dvc status")) == {}, st.stdout


@contextlib.contextmanager
def team_on_hosts(worker_names: tuple[str, ...] = ("w1", "w2"), join: tuple[str, ...] = (),
                  params: Callable[[dict], None] | None = None,
                  study: str | None = None, poll_s: str = "1") -> Iterator[Team]:
    """Hosts ``server``, the worker hosts ``worker_names`` and ``client`` (tests/hosts.py); the
    server host's stack up off loopback (TLS; ``RLFN_STACK_WORKER=0``: no worker of its own)
    on a clone made tiny (tinyproject; ``params(prm)`` edits its params.yaml first), the team
    repository seeded from it, the bundle written and carried to the client, whose exports
    (``env --bundle``) are ``Team.client``; the worker hosts ``join`` joined, their workers
    polling every ``poll_s`` seconds. On exit every
    worker host and the server ``down`` (their worker logs' tails printed), the hosts gone."""
    prerequisites(off_loopback=True)
    with hosts("server", *worker_names, "client") as net:
        srv, cli = net.hosts["server"], net.hosts["client"]
        workers = {n: net.hosts[n] for n in worker_names}
        clone = install_project(srv, ROOT)
        # the team's code and params, committed (the team repository is seeded from them)
        if params is not None:
            p = clone / "params.yaml"
            prm = yaml.safe_load(p.read_text())
            params(prm)
            p.write_text(yaml.safe_dump(prm, sort_keys=False))
        tiny_clone(clone, wrap=srv.argv)
        head = ok(srv.run(["git", "rev-parse", "HEAD"], cwd=clone), "HEAD").strip()
        stack_sh = str(clone / "scripts" / "stack.sh")
        tools = {n: install_project(h, ROOT) for n, h in workers.items()}
        cli_clone = install_project(cli, ROOT)
        ports, port_env = stack_ports()
        state = srv.home / "state"
        env = dict(RLFN_STACK_DIR=str(state), RLFN_PROJECT_DIR=str(clone), **port_env,
                   RLFN_STACK_WORKER="0")
        wstate = {n: h.home / "state" for n, h in workers.items()}
        # one flow run at a time per worker host: two runs dispatched together go to both hosts
        wenv = {n: dict(RLFN_STACK_DIR=str(wstate[n]), RLFN_STACK_WORKER_POLL_S=poll_s,
                        RLFN_STACK_WORKER_LIMIT="1") for n in workers}
        try:
            r = srv.run(["bash", stack_sh, "up", "--host", srv.addr], timeout=900, **env)
            print(r.stdout + r.stderr)
            ok(r, "up", log_tails(state))
            ok(srv.run(["bash", stack_sh, "bundle", str(srv.home / "team.bundle")], **env),
                "bundle")
            bundle = json.loads((srv.home / "team.bundle").read_text())
            got = cli.run(["bash", str(cli_clone / "scripts" / "stack.sh"), "env", "--bundle",
                           str(carry(srv.home / "team.bundle", cli))])
            client = eval_env(ok(got, "env --bundle"), CLIENT_EXPORTS)
            assert set(client) == set(CLIENT_EXPORTS), sorted(client)
            t = Team(net, srv, env, stack_sh, r.stdout, workers, tools, wstate, wenv, cli,
                     cli_clone, client, state, state / "git" / "rlfn-pipeline.git", head,
                     f"ssh://{srv.user}@{srv.addr}:{ports['ssh']}{state}/git/rlfn-pipeline.git",
                     study, bundle)
            for n in join:
                t.join(n)
            yield t
        finally:
            for n in workers:
                log = wstate[n] / "logs" / "worker.log"
                if log.is_file():
                    print(f"--- {n}: {log}\n" + "\n".join(
                        log.read_text(errors="replace").splitlines()[-30:]))
                if (wstate[n] / "run" / "state.json").is_file():
                    d = workers[n].run(["bash", str(tools[n] / "scripts" / "stack.sh"), "down"],
                                       timeout=120, **wenv[n])
                    print(d.stdout + d.stderr)
            d = srv.run(["bash", stack_sh, "down"], timeout=300, **env)
            print(d.stdout + d.stderr)


def deploy_run(t: Team, name: str, *args: str) -> str:
    """``prefect deployment run NAME`` from the client host (not watched): the flow run id."""
    prefect = str(t.cli_clone / ".venv" / "bin" / "prefect")
    r = t.cli.run([prefect, "deployment", "run", name, *args], timeout=300, **t.cenv())
    m = re.search(r"UUID: ([0-9a-f-]{36})", r.stdout)
    assert r.returncode == 0 and m, r.stdout + r.stderr
    return m.group(1)


def wait_runs(t: Team, ids: list[str], limit: float) -> dict:
    r = t.cli.run([t.py(), "-c", WAIT_RUNS, str(limit), *ids], timeout=limit + 60,
                  **t.cenv())
    return json.loads(ok(r, "flow runs").strip().splitlines()[-1])
