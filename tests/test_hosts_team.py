"""A team on several hosts (issue 23 item 4, second and third bullets): hosts made by
tests/hosts.py (each its own network namespace, Unix user and home; no shared disk). The server
host runs ``RLFN_STACK_WORKER=0 stack.sh up --host <its address>`` (no worker of its own) and
writes the bundle; two worker hosts ``join`` it (each its own clone of ``RLFN_GIT_URL``, a
Prefect worker on ``rlfn-pool`` taking one flow run at a time); a client host has the bundle's
exports (``env --bundle``). Then:

* **one Optuna study drained by two worker hosts at once**: the client dispatches the
  deployment ``rlfn-tune/tune`` twice; each run is taken by a different worker host (each
  worker's log names its run) and reaches the first trial's step ``PAUSE_STEP`` on its host
  (failpoint ``train.step``, armed through the run's job variables) before either is let go:
  both train trials of the same study at the same time, by construction. The study lives on the
  server's PostgreSQL, reached over TLS (``RLFN_OPTUNA_STORAGE`` with ``sslmode=verify-full``
  and the bundle's CA). Read from the client: exactly ``n_trials`` finished, none failed or
  left running, no draw (``lr``) repeated; each worker host's clone holds the trial folders it
  ran, the two sets disjoint, both non-empty, their union every trial; every trial a nested run
  (under one stage run per host) on the tracking server, found from the client over TLS.
* **a retrain from the client**: ``bash scripts/retrain.sh <branch>`` on the client host (the
  workflow's command) dispatches ``rlfn-retrain/retrain``; a worker host runs it (its log names
  the flow run), reproduces the tiny pipeline and pushes ``retrain/<flow run id>`` over SSH to
  the team's repository on the server host (``RLFN_GIT_URL``). In the server's bare repository:
  the branch's parent is the branch retrained, its ``dvc.lock`` has every stage and differs from
  the parent's, ``reports/promotion.json`` has the promote stage's decision; its outputs are in
  the server's DVC remote (pushed by the worker host: the client clones the branch, ``dvc pull``
  from the bundle's remote restores them, ``dvc status`` is clean); the retrain's MLflow run
  names the branch.

Marked ``stack`` and ``multihost_slow`` (the retrain reproduces the whole tiny pipeline on a
worker host): ~12-15 min on 2 busy cores (setup ~1-2 min, the study ~2-4 min, the
retrain ~9 min).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from hosts import Host, hosts, install_project
from prereq import ROOT, unavailable
from servers import free_port
from teamstack import eval_env, prerequisites
from tinyproject import DVC_STAGES, tiny_params

pytestmark = [pytest.mark.stack, pytest.mark.multihost_slow]

CLIENT_EXPORTS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                  "PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "RLFN_OPTUNA_STORAGE",
                  "MLFLOW_TRACKING_SERVER_CERT_PATH", "PREFECT_API_SSL_CERT_FILE",
                  "RLFN_GIT_URL", "GIT_SSH_COMMAND")
TRAIN_IMAGES = 4
N_TRIALS = 4
PAUSE_STEP = 3  # the failpoint train.step@3: both hosts inside a trial, gated together
FP_DIR = "failpoints"  # relative: the flow run's working directory, the worker host's clone

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

TUNE_STATE = r"""
import json, sys
import optuna
study = optuna.load_study(study_name=sys.argv[1], storage=sys.argv[2])
print(json.dumps([{"number": t.number, "state": t.state.name, "params": t.params,
                   "run": t.user_attrs.get("mlflow_run_id")} for t in study.get_trials()]))
"""

TUNE_RUNS = r"""
import json, sys
from mlflow import MlflowClient
c = MlflowClient()
exp = c.get_experiment_by_name("rlfn")
runs = c.search_runs([exp.experiment_id], "tags.dvc_stage = 'tune'", max_results=1000)
print(json.dumps([{"id": r.info.run_id, "status": r.info.status,
                   "kind": r.data.tags.get("rlfn.kind"), "study": r.data.tags.get("optuna.study"),
                   "parent": r.data.tags.get("mlflow.parentRunId"),
                   "state": r.data.tags.get("optuna.state")} for r in runs]))
"""

RETRAIN_RUNS = r"""
import json
from mlflow import MlflowClient
c = MlflowClient()
exp = c.get_experiment_by_name("rlfn")
runs = c.search_runs([exp.experiment_id], "tags.`rlfn.kind` = 'retrain'", max_results=100)
print(json.dumps([{"branch": r.data.tags.get("rlfn.retrain.branch"),
                   "promoted": r.data.tags.get("promotion.promoted")} for r in runs]))
"""


def _ok(r: subprocess.CompletedProcess, what: str, extra: str = "") -> str:
    assert r.returncode == 0, f"{what}: exit {r.returncode}\n{r.stdout}{r.stderr}{extra}"
    return r.stdout


def _carry(src: Path, h: Host, name: str = "team.bundle") -> Path:
    dst = h.home / name
    shutil.copy(src, dst)
    os.chown(dst, h.uid, h.uid)
    os.chmod(dst, 0o600)
    return dst


def _log_tails(state: Path, n: int = 15) -> str:
    out = []
    for log in sorted((state / "logs").glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-n:]
        out.append(f"\n--- {state}/logs/{log.name}\n" + "\n".join(lines))
    return "".join(out)


@dataclass
class Team:
    srv: Host
    workers: dict[str, Host]       # name -> host
    wstate: dict[str, Path]        # name -> its join state directory
    cli: Host
    cli_clone: Path
    client: dict[str, str]         # the client's exports (env --bundle)
    state: Path                    # the server's state directory
    bare: Path                     # the team's git repository on the server host
    branch: str                    # the branch the team's repository was seeded with
    head: str
    study: str
    remote: str                    # the DVC remote's URL (the bundle's ssh.remote)

    def project(self, name: str) -> Path:
        return self.wstate[name] / "project"

    def cenv(self) -> dict[str, str]:
        return dict(self.client, PREFECT_HOME=str(self.cli.home / "prefect"))

    def py(self) -> str:
        return str(self.cli_clone / ".venv" / "bin" / "python")

    def runner_of(self, flow_run_id: str) -> list[str]:
        """The worker hosts that ran ``flow_run_id``: the flow run's own first line ("View at
        .../flow-run/<id>") is in that host's worker log only (a worker that lost the race for
        the run logs "submitting" then "Aborted submission", never that line)."""
        line = f"/runs/flow-run/{flow_run_id}"
        return [n for n, st in self.wstate.items()
                if any("View at" in x and x.rstrip().endswith(line) for x in
                       (st / "logs" / "worker.log").read_text(errors="replace").splitlines())]

    def logs(self) -> str:
        return "".join(_log_tails(st, 40) for st in self.wstate.values())


@pytest.fixture(scope="module")
def team():
    prerequisites()
    for tool in ("nginx", "openssl", "ss"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            unavailable(f"command {tool!r} is not installed (apt-get install nginx openssl "
                        "iproute2)")
    study = f"team-{uuid.uuid4().hex[:8]}"
    with hosts("server", "w1", "w2", "client") as net:
        srv, cli = net.hosts["server"], net.hosts["client"]
        workers = {n: net.hosts[n] for n in ("w1", "w2")}
        clone = install_project(srv, ROOT)
        # the team's code and params: the tiny pipeline (test_join_hosts's) and a tiny study
        p = clone / "params.yaml"
        tiny_params(p, int8=False)
        prm = yaml.safe_load(p.read_text())
        prm["tune"].update(study=study, n_trials=N_TRIALS, sampler={"name": "random", "seed": 3},
                           pruner={"name": "none"}, heartbeat_s=2, grace_s=30,
                           base={"iterations": 8, "val_every": 4, "checkpoint_every": 8,
                                 "lr_step": 8, "batch_size": 2, "patch_size": 64,
                                 "model": "rlfn_ntire", "num_workers": 0, "threads": 1,
                                 "log_every": 4, "val_max_images": 2},
                           space={"lr": {"type": "float", "low": 1e-3, "high": 4e-3,
                                         "log": True}})
        p.write_text(yaml.safe_dump(prm, sort_keys=False))
        extra = sorted((clone / "data" / "sample" / "train").glob("*.png"))[TRAIN_IMAGES:]
        _ok(srv.run(["git", "rm", "-q", *[str(x) for x in extra]], cwd=clone), "git rm")
        _ok(srv.run(["git", "add", "-A"], cwd=clone), "git add")
        _ok(srv.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-q",
                     "--allow-empty", "-m", "the working tree under test"], cwd=clone),
            "git commit")
        branch = _ok(srv.run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=clone),
                     "branch").strip()
        head = _ok(srv.run(["git", "rev-parse", "HEAD"], cwd=clone), "HEAD").strip()
        stack_sh = str(clone / "scripts" / "stack.sh")
        tools = {n: install_project(h, ROOT) for n, h in workers.items()}
        cli_clone = install_project(cli, ROOT)
        ports = {k: free_port() for k in ("pg", "mlflow", "prefect", "ssh")}
        state = srv.home / "state"
        env = dict(RLFN_STACK_DIR=str(state), RLFN_PROJECT_DIR=str(clone),
                   RLFN_STACK_PG_PORT=str(ports["pg"]),
                   RLFN_STACK_MLFLOW_PORT=str(ports["mlflow"]),
                   RLFN_STACK_PREFECT_PORT=str(ports["prefect"]),
                   RLFN_STACK_SSH_PORT=str(ports["ssh"]), RLFN_STACK_WORKER="0")
        wstate = {n: h.home / "state" for n, h in workers.items()}
        # one flow run at a time per worker host: two runs dispatched together go to both hosts
        wenv = {n: dict(RLFN_STACK_DIR=str(wstate[n]), RLFN_STACK_WORKER_POLL_S="1",
                        RLFN_STACK_WORKER_LIMIT="1") for n in workers}
        wsh = {n: ["bash", str(tools[n] / "scripts" / "stack.sh")] for n in workers}
        try:
            r = srv.run(["bash", stack_sh, "up", "--host", srv.addr], timeout=900, **env)
            print(r.stdout + r.stderr)
            _ok(r, "up", _log_tails(state))
            assert "\nworker " not in r.stdout, r.stdout  # the pool's workers are other hosts'
            _ok(srv.run(["bash", stack_sh, "bundle", str(srv.home / "team.bundle")], **env),
                "bundle")
            for n, h in workers.items():
                carried = _carry(srv.home / "team.bundle", h)
                j = h.run(wsh[n] + ["join", str(carried)], timeout=600, **wenv[n])
                print(j.stdout + j.stderr)
                _ok(j, f"join on {n}", _log_tails(wstate[n]))
            got = cli.run(["bash", str(cli_clone / "scripts" / "stack.sh"), "env", "--bundle",
                           str(_carry(srv.home / "team.bundle", cli))])
            client = eval_env(_ok(got, "env --bundle"), CLIENT_EXPORTS)
            assert set(client) == set(CLIENT_EXPORTS), sorted(client)
            storage = client["RLFN_OPTUNA_STORAGE"]
            assert storage.startswith("postgresql") and f"@{srv.addr}:" in storage \
                and "sslmode=verify-full" in storage, storage.split("@")[-1]
            remote = json.loads((srv.home / "team.bundle").read_text())["ssh"]["remote"]
            yield Team(srv, workers, wstate, cli, cli_clone, client, state,
                       state / "git" / "rlfn-pipeline.git", branch, head, study, remote)
        finally:
            for n, h in workers.items():
                for st in ("worker.log",):
                    log = wstate[n] / "logs" / st
                    if log.is_file():
                        print(f"--- {n}: {log}\n" + "\n".join(
                            log.read_text(errors="replace").splitlines()[-30:]))
                d = h.run(wsh[n] + ["down"], timeout=120, **wenv[n])
                print(d.stdout + d.stderr)
            d = srv.run(["bash", stack_sh, "down"], timeout=300, **env)
            print(d.stdout + d.stderr)


def _deploy_run(t: Team, name: str, *args: str) -> str:
    """``prefect deployment run NAME`` from the client host (not watched): the flow run id."""
    prefect = str(t.cli_clone / ".venv" / "bin" / "prefect")
    r = t.cli.run([prefect, "deployment", "run", name, *args], timeout=300, **t.cenv())
    m = re.search(r"UUID: ([0-9a-f-]{36})", r.stdout)
    assert r.returncode == 0 and m, r.stdout + r.stderr
    return m.group(1)


def _wait_runs(t: Team, ids: list[str], limit: float) -> dict:
    r = t.cli.run([t.py(), "-c", WAIT_RUNS, str(limit), *ids], timeout=limit + 300,
                  **t.cenv())
    return json.loads(_ok(r, "flow runs").strip().splitlines()[-1])


@pytest.mark.timeout(2400)  # the hosts, the stack, two joins (setup) and the study
def test_two_worker_hosts_drain_one_study(team: Team):
    t = team
    fp_env = json.dumps({"RLFN_FAILPOINTS": f"train.step@{PAUSE_STEP}",
                         "RLFN_FAILPOINT_DIR": FP_DIR, "RLFN_FAILPOINT_TIMEOUT_S": "1200"})
    ids = [_deploy_run(t, "rlfn-tune/tune", "--job-variable", f"env={fp_env}")
           for _ in range(2)]
    # both hosts inside a trial of the study at once: each paused at the failpoint
    markers = {n: t.project(n) / FP_DIR / "train.step.reached" for n in t.workers}
    deadline = time.monotonic() + 1200  # a bound on waiting (each host's marker, as root)
    while not all(m.exists() for m in markers.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    waited = {n: m.exists() for n, m in markers.items()}
    if not all(waited.values()):
        states = _wait_runs(t, ids, 1)
        pytest.fail(f"not both hosts at the failpoint: {waited}; flow runs {states}"
                    f"{t.logs()}")
    for n, h in t.workers.items():  # let both go on
        _ok(h.run(["touch", str(t.project(n) / FP_DIR / "train.step.release")]), "release")
    states = _wait_runs(t, ids, 1500)
    assert all(s["state"] == "COMPLETED" for s in states.values()), (states, t.logs())
    assert all(s["pool"] == "rlfn-pool" for s in states.values()), states
    # each run taken by another worker host (one flow run at a time each)
    runners = {i: t.runner_of(i) for i in ids}
    assert sorted(sum(runners.values(), [])) == sorted(t.workers), runners

    # the study, read from the client over TLS (verify-full against the bundle's CA)
    r = t.cli.run([t.py(), "-c", TUNE_STATE, t.study, t.client["RLFN_OPTUNA_STORAGE"]],
                  timeout=300, **t.cenv())
    trials = json.loads(_ok(r, "the study").strip().splitlines()[-1])
    print(f"\nstudy {t.study}: {[(x['number'], x['state'], x['params']) for x in trials]}")
    by_state: dict[str, list] = {}
    for x in trials:
        by_state.setdefault(x["state"], []).append(x)
    assert len(by_state.get("COMPLETE", [])) + len(by_state.get("PRUNED", [])) == N_TRIALS, \
        by_state  # exactly n_trials finished: none lost, none extra
    assert set(by_state) <= {"COMPLETE", "PRUNED"}, by_state  # none failed or left running
    assert sorted(x["number"] for x in trials) == list(range(len(trials)))
    lrs = [x["params"]["lr"] for x in trials]
    assert len(set(lrs)) == len(lrs) == len(trials), lrs  # no draw repeated
    # each host ran its share in its own clone: disjoint, both non-empty, all of them
    ran = {n: {int(d.name) for d in (t.project(n) / "tune" / "trials" / t.study).iterdir()
               if d.name.isdigit()} if (t.project(n) / "tune" / "trials" / t.study).is_dir()
           else set() for n in t.workers}
    print(f"trials per host: {ran}")
    assert all(ran.values()), ran
    assert not set.intersection(*ran.values()), ran
    assert set.union(*ran.values()) == {x["number"] for x in trials}, ran
    # every trial a nested run on the tracking server, under one stage run per host
    r = t.cli.run([t.py(), "-c", TUNE_RUNS], timeout=300, **t.cenv())
    runs = json.loads(_ok(r, "MLflow runs").strip().splitlines()[-1])
    stage_ids = {x["id"] for x in runs if x["kind"] == "stage"}
    trial_runs = {x["id"]: x for x in runs if x["kind"] == "trial" and x["study"] == t.study}
    assert set(trial_runs) == {x["run"] for x in trials}, (trial_runs, trials)
    assert all(x["parent"] in stage_ids and x["status"] == "FINISHED"
               for x in trial_runs.values()), runs
    assert len({x["parent"] for x in trial_runs.values()}) == 2, trial_runs


@pytest.mark.timeout(3600)  # the whole tiny pipeline reproduced on a worker host
def test_retrain_from_the_client_runs_on_a_worker_host(team: Team):
    t = team
    r = t.cli.run(["bash", "scripts/retrain.sh", t.branch], cwd=t.cli_clone, timeout=3000,
                  **t.cenv())
    out = r.stdout + r.stderr
    print(out[-3000:])
    m = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert m, out
    fid = m.group(1)
    states = _wait_runs(t, [fid], 60)
    assert r.returncode == 0 and states[fid]["state"] == "COMPLETED", (states, out[-3000:],
                                                                       t.logs())
    assert states[fid]["pool"] == "rlfn-pool"
    assert len(t.runner_of(fid)) == 1, t.runner_of(fid)  # a worker host ran it

    # the branch, pushed over SSH to the team's repository on the server host
    b = f"retrain/{fid}"
    git = lambda *a: t.srv.run(["git", *a], cwd=t.bare)  # noqa: E731
    tip = _ok(git("rev-parse", f"refs/heads/{b}"), f"{b} on the server").strip()
    assert _ok(git("rev-parse", f"{tip}^"), "parent").strip() == t.head
    lock_text = _ok(git("show", f"{tip}:dvc.lock"), "dvc.lock")
    parent_lock = git("show", f"{t.head}:dvc.lock").stdout
    assert lock_text != parent_lock
    lock = yaml.safe_load(lock_text)["stages"]
    assert set(DVC_STAGES) <= set(lock), sorted(lock)
    promo = json.loads(_ok(git("show", f"{tip}:reports/promotion.json"), "promotion.json"))
    assert "decision" in promo and "promoted" in promo, promo
    # its outputs are in the server's DVC remote (pushed by the worker host): the client's clone
    # of RLFN_GIT_URL at that branch, `dvc pull` from the bundle's remote, `dvc status` clean
    cclone = t.cli.home / "team-clone"
    _ok(t.cli.run(["git", "clone", "-q", "-b", b, t.client["RLFN_GIT_URL"], str(cclone)],
                  timeout=300, **t.client), "client clone")
    cdvc = str(t.cli_clone / ".venv" / "bin" / "dvc")
    ckey = t.cli.home / ".config" / "rlfn-stack" / t.srv.addr / "id_ed25519"
    for cmd in (["remote", "add", "--local", "-d", "stack", t.remote],
                ["remote", "modify", "--local", "stack", "keyfile", str(ckey)], ["pull", "-q"]):
        _ok(t.cli.run([cdvc, *cmd], cwd=cclone, timeout=900, **t.client), f"dvc {cmd}")
    assert (cclone / "models" / "stage3" / "model.safetensors").is_file()
    st = t.cli.run([cdvc, "status", "--json", "dvc.yaml"], cwd=cclone, timeout=300, **t.client)
    assert json.loads(_ok(st, "dvc status")) == {}, st.stdout
    # the retrain's MLflow run names the branch (read from the client)
    r = t.cli.run([t.py(), "-c", RETRAIN_RUNS], timeout=300, **t.cenv())
    runs = json.loads(_ok(r, "retrain runs").strip().splitlines()[-1])
    assert [x["branch"] for x in runs] == [b], runs
