"""Team mode's service stack (scripts/stack.sh): real PostgreSQL, MLflow server, Prefect server
and worker, sshd, on 127.0.0.1, no mocks.

One stack for the module, in a temporary state directory (``RLFN_STACK_DIR``) on free ports,
serving a temporary ``git clone`` of this repository (``RLFN_PROJECT_DIR``: the worker's flow
runs write there, and its .dvc/config.local gets the remote), so a developer's own stack and
working tree are left alone. ``down`` at teardown, then a check that none of its processes
survived."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from faults import armed_env, wait_reached
from prereq import ROOT, require_tool
from servers import _group_alive, clean_env, worker_under_keep
from teamstack import EXPORTS, SERVICES, STACK_SH, TUNE_RUNS, http, stack_up, why
from tinyproject import tune_project

pytestmark = pytest.mark.stack  # .ci/run: beside the other tests (mostly waiting on servers)


@pytest.fixture(scope="module")
def stack():
    with stack_up("rlfn-stack-test-") as st:
        yield st


def _status_lines(out: str) -> dict[str, str]:
    return {line.split()[0]: line for line in out.splitlines() if line.split()
            and line.split()[0] in SERVICES}


def test_stack_sh_shellcheck():
    p = subprocess.run([require_tool("shellcheck"), str(STACK_SH)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


# --------------------------------------------------------------------------- 1
@pytest.mark.timeout(600)
def test_up_status_idempotent_env(stack):
    r = stack.sh("status")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = _status_lines(r.stdout)
    assert set(lines) == set(SERVICES), r.stdout
    for name, line in lines.items():
        assert line.split()[1] == "up", line
    assert f"http://127.0.0.1:{stack.ports['mlflow']}" in lines["mlflow"]
    assert f"http://127.0.0.1:{stack.ports['prefect']}/api" in lines["prefect"]
    assert f"127.0.0.1:{stack.ports['pg']}" in lines["postgresql"]
    assert f"127.0.0.1:{stack.ports['ssh']}" in lines["sshd"]

    def pids() -> dict[str, str]:  # "<pid> <start time>" of every daemon `up` started
        run = stack.state / "run"
        out = {f.stem: f.read_text().strip() for f in run.glob("*.pid")}
        pg = stack.state / "postgres" / "data" / "postmaster.pid"
        out["postgresql"] = pg.read_text().split()[0]
        return out

    before = pids()
    t = time.monotonic()
    again = stack.sh("up")
    print(f"stack up (warm): {time.monotonic() - t:.1f} s")  # a figure, not a check
    assert again.returncode == 0, again.stdout + again.stderr
    # a warm `up` only checks: every daemon is the same process (pid and start time) as before
    assert pids() == before, (before, pids())
    assert set(before) >= {"mlflow", "prefect", "worker", "rollout-worker", "sshd",
                           "postgresql"}, before
    for name in ("postgresql", "mlflow", "prefect", "worker", "rollout-worker", "sshd"):
        assert re.search(rf"^{name}\s+already up", again.stdout, re.M), again.stdout
    n = len(yaml.safe_load((stack.clone / "prefect.yaml").read_text())["deployments"])
    assert re.search(rf"^deployments\s+{n} deployments already on rlfn-pool", again.stdout,
                     re.M), again.stdout
    # the automation that ends a silent flow run: made by the first up, found as it is by this
    assert re.search(r"^automations\s+rlfn-crash-silent-flow-runs created", stack.up_output,
                     re.M), stack.up_output
    assert re.search(r"^automations\s+rlfn-crash-silent-flow-runs exists", again.stdout,
                     re.M), again.stdout

    exports = stack.exports()
    assert set(exports) == set(EXPORTS), exports
    assert exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{stack.ports['mlflow']}"
    assert exports["PREFECT_API_URL"] == f"http://127.0.0.1:{stack.ports['prefect']}/api"
    assert exports["RLFN_OPTUNA_STORAGE"].startswith("postgresql+psycopg://rlfn:")
    assert exports["RLFN_OPTUNA_STORAGE"].endswith(f"@127.0.0.1:{stack.ports['pg']}/optuna")
    assert exports["RLFN_PROJECT_DIR"] == str(stack.clone)
    assert exports["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"  # the automation's input

    # secrets: private files, never printed by up/status nor written to a log
    sec_dir = stack.state / "secrets"
    assert stat.S_IMODE(sec_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((sec_dir / "stack.json").stat().st_mode) == 0o600
    secrets = [v for v in stack.secrets().values() if len(v) >= 16]
    assert len(secrets) >= 4
    printed = stack.up_output + again.stdout + again.stderr + r.stdout + r.stderr
    logs = {p: p.read_text(errors="replace") for p in (stack.state / "logs").glob("*.log")}
    for s in secrets:
        assert s not in printed
        for p, text in logs.items():
            assert s not in text, f"a secret in {p}"

    # every service listens on loopback only
    listening = _listening_addresses()
    for port in stack.ports.values():
        assert listening.get(port) == {"127.0.0.1"}, (port, listening.get(port))


def _listening_addresses() -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] != "0A":  # LISTEN
                continue
            addr, port = f[1].split(":")
            ip = ("127.0.0.1" if addr == "0100007F" else
                  ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
                  if len(addr) == 8 else addr)
            out.setdefault(int(port, 16), set()).add(ip)
    return out


# --------------------------------------------------------------------------- 2: credentials
@pytest.mark.timeout(300)
def test_postgresql_needs_the_password(stack):
    import psycopg

    port = stack.ports["pg"]
    for kw, says in (({}, "no password supplied"),
                     ({"password": "wrong"}, 'password authentication failed for user "rlfn"')):
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(host="127.0.0.1", port=port, user="rlfn", dbname="mlflow",
                            connect_timeout=10, **kw)
        msg = str(e.value)
        assert f'connection to server at "127.0.0.1", port {port} failed' in msg, msg
        assert says in msg, msg
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host="127.0.0.1", port=port, user="postgres", password="wrong",
                        dbname="postgres", connect_timeout=10)
    if shutil.which("psql"):
        r = subprocess.run(["psql", "-w", "-h", "127.0.0.1", "-p", str(port), "-U", "rlfn",
                            "-d", "optuna", "-c", "select 1"], capture_output=True, text=True,
                           env={**clean_env(), "PGPASSWORD": "wrong"}, timeout=30)
        assert r.returncode != 0 and "password authentication failed" in r.stderr, r.stderr
    sec = stack.secrets()
    with psycopg.connect(host="127.0.0.1", port=port, user="rlfn", password=sec["db_password"],
                         dbname="mlflow", connect_timeout=10) as c:
        assert c.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
        assert c.execute("SHOW password_encryption").fetchone()[0] == "scram-sha-256"
    with psycopg.connect(host="127.0.0.1", port=port, user="postgres",
                         password=sec["pg_superuser_password"], dbname="postgres",
                         connect_timeout=10) as c:
        rules = {m for (m,) in c.execute("SELECT auth_method FROM pg_hba_file_rules")}
        dbs = {d for (d,) in c.execute("SELECT datname FROM pg_database")}
    assert rules == {"scram-sha-256"}, rules
    assert {"mlflow", "prefect", "optuna"} <= dbs


@pytest.mark.timeout(300)
def test_mlflow_needs_a_login_and_serves_artifacts(stack, monkeypatch, tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    exports = stack.exports()
    uri = exports["MLFLOW_TRACKING_URI"]
    code, body = http("POST", f"{uri}/api/2.0/mlflow/experiments/search", {"max_results": 1})
    assert code == 401, (code, body)
    code, _ = http("POST", f"{uri}/api/2.0/mlflow/experiments/search", {"max_results": 1},
                    auth=f"admin:{'x' * 20}")
    assert code == 401

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", exports["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException) as e:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    assert "401" in str(e.value) and "mlflow" in str(e.value).lower(), str(e.value)

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", exports["MLFLOW_TRACKING_PASSWORD"])
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(f"stack-test-{uuid.uuid4().hex[:8]}")
    run = client.create_run(exp)
    client.log_param(run.info.run_id, "p", 1)
    client.log_metric(run.info.run_id, "m", 0.5)
    art = tmp_path / "hello.txt"
    art.write_text("served by the stack\n")
    client.log_artifact(run.info.run_id, str(art))
    client.set_terminated(run.info.run_id)
    got = client.get_run(run.info.run_id)
    assert got.info.artifact_uri.startswith("mlflow-artifacts:/"), got.info.artifact_uri
    assert got.data.metrics == {"m": 0.5}
    stored = stack.state / "mlartifacts" / exp / run.info.run_id / "artifacts" / "hello.txt"
    assert stored.read_text() == "served by the stack\n"
    assert [f.path for f in client.list_artifacts(run.info.run_id)] == ["hello.txt"]


@pytest.mark.timeout(300)
def test_prefect_needs_the_auth_string_and_has_the_deployments(stack):
    exports = stack.exports()
    api = exports["PREFECT_API_URL"]
    assert http("GET", f"{api}/health")[0] == 200  # health stays open for probes
    for method, path, body in (("POST", "/flows/filter", {}),
                               ("GET", "/work_pools/rlfn-pool", None),
                               ("POST", "/deployments/filter", {})):
        assert http(method, api + path, body)[0] == 401, path
        assert http(method, api + path, body, auth="rlfn:wrong")[0] == 401, path
    assert http("POST", f"{api}/flows/filter", {},
                 auth=exports["PREFECT_API_AUTH_STRING"])[0] == 200

    code = """
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName
with get_client(sync_client=True) as c:
    pool = c.read_work_pool("rlfn-pool")
    deps = c.read_deployments(work_pool_filter=WorkPoolFilter(
        name=WorkPoolFilterName(any_=["rlfn-pool", "rlfn-serve", "rlfn-gpu"])))
    workers = {p: {w.name: str(w.status) for w in c.read_workers_for_work_pool(p)}
               for p in ("rlfn-pool", "rlfn-serve", "rlfn-gpu")}
print(json.dumps({"type": pool.type, "workers": workers,
                  "deployments": {d.name: [d.entrypoint, d.work_pool_name] for d in deps}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=stack.client_env(), timeout=120, cwd=stack.clone)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["type"] == "process"
    doc = yaml.safe_load((stack.clone / "prefect.yaml").read_text())  # what `up` deployed
    assert got["deployments"] == {d["name"]: [d["entrypoint"], d["work_pool"]["name"]]
                                  for d in doc["deployments"]}
    # the rollout is the serving host's alone: its own pool, its own worker
    assert got["deployments"]["rollout"][1] == "rlfn-serve", got["deployments"]
    assert {n for n, (_, pool) in got["deployments"].items() if pool != "rlfn-pool"} == \
        {"rollout", "repro-gpu", "train-gpu"}, got["deployments"]
    # the GPU pool's: taken only by a worker host joined --pool rlfn-gpu (none on this host)
    assert got["deployments"]["repro-gpu"] == ["pipeline.repro:repro", "rlfn-gpu"]
    assert got["deployments"]["train-gpu"] == ["pipeline.train:train_stage", "rlfn-gpu"]
    assert got["workers"]["rlfn-gpu"] == {}, got["workers"]
    assert "ONLINE" in got["workers"]["rlfn-pool"].get("rlfn-stack-worker", ""), got["workers"]
    assert "ONLINE" in got["workers"]["rlfn-serve"].get("rlfn-stack-rollout-worker", ""), \
        got["workers"]
    assert "rlfn-stack-worker" not in got["workers"]["rlfn-serve"], got["workers"]

    # without the auth string the same client is refused
    env = stack.client_env()
    env.pop("PREFECT_API_AUTH_STRING")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120, cwd=stack.clone)
    assert r.returncode != 0 and "401" in r.stderr, r.stderr[-2000:]


@pytest.mark.timeout(300)
def test_sshd_takes_the_key_only_and_dvc_pushes(stack, tmp_path):
    ssh = stack.state / "ssh"
    port = str(stack.ports["ssh"])
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", "")
    base = ["ssh", "-F", "/dev/null", "-p", port, "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={ssh / 'known_hosts'}",
            "-o", "ConnectTimeout=10"]
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                   check=True, timeout=30)
    for extra in (["-i", str(other)],                                       # a wrong key
                  ["-o", "PubkeyAuthentication=no",                         # no key: a password?
                   "-o", "PreferredAuthentications=password,keyboard-interactive"]):
        r = subprocess.run([*base, *extra, f"{user}@127.0.0.1", "true"], capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 255, r.stderr
        assert "Permission denied (publickey)" in r.stderr, r.stderr  # key is the only method
    r = subprocess.run([*base, "-i", str(ssh / "id_ed25519"), f"{user}@127.0.0.1", "echo ok"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr

    # the clone's default DVC remote is `stack`: a file pushes over SSH, non-interactively
    dvc = [str(Path(sys.executable).parent / "dvc")]
    env = clean_env(HOME=str(tmp_path))  # no ~/.ssh of the developer's: nothing to answer
    (stack.clone / "stack-probe.txt").write_text(f"{uuid.uuid4()}\n")
    for cmd in (["add", "-q", "stack-probe.txt"], ["push", "stack-probe.txt.dvc"]):
        r = subprocess.run(dvc + cmd, capture_output=True, text=True, env=env, timeout=120,
                           cwd=stack.clone, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stdout + r.stderr
    md5 = yaml.safe_load((stack.clone / "stack-probe.txt.dvc").read_text())["outs"][0]["md5"]
    assert (stack.state / "dvc-remote" / "files" / "md5" / md5[:2] / md5[2:]).is_file()


@pytest.mark.timeout(300)
def test_optuna_study_shared_by_two_processes(stack):
    code = """
import json, os, sys, time
import optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(study_name=sys.argv[1], load_if_exists=True,
                            storage=os.environ["RLFN_OPTUNA_STORAGE"])
study.optimize(lambda t: (t.suggest_float("x", -1, 1)) ** 2, n_trials=2)
deadline = time.monotonic() + 60
done = lambda: study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
while len(done()) < 4 and time.monotonic() < deadline:
    time.sleep(0.2)
print(json.dumps(sorted(t.number for t in done())))
"""
    name = f"stack-test-{uuid.uuid4().hex[:8]}"
    env = stack.client_env()
    procs = [subprocess.Popen([sys.executable, "-c", code, name], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1]) == [0, 1, 2, 3]


TUNE_STATE = r"""
import json, sys
import optuna
study = optuna.load_study(study_name=sys.argv[1], storage=sys.argv[2])
print(json.dumps([{"number": t.number, "state": t.state.name, "params": t.params,
                   "steps": len(t.intermediate_values), "run": t.user_attrs.get("mlflow_run_id")}
                  for t in study.get_trials()]))
"""


@pytest.mark.timeout(600)
def test_two_tune_processes_share_one_study_and_survive_a_kill(stack, tmp_path):
    """Two ``python -m pipeline.tune`` started together on the stack's PostgreSQL study and
    tracking server: while both train, one is SIGKILLed; its trial is failed by the heartbeat
    and the other finishes the study's n_trials, every trial a nested run on the server."""
    name = f"shared-{uuid.uuid4().hex[:8]}"
    n = 5
    d = tune_project(tmp_path / "proj", {
        "study": name, "n_trials": n, "sampler": {"name": "random", "seed": 3},
        "pruner": {"name": "none"},
        "space": {"lr": {"type": "float", "low": 1e-3, "high": 4e-3, "log": True}}},
        train={"iterations": 40})
    env = stack.client_env(PYTHONPATH=str(ROOT))
    storage = env["RLFN_OPTUNA_STORAGE"]

    def state() -> list[dict]:
        r = subprocess.run([sys.executable, "-c", TUNE_STATE, name, storage], env=env,
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            return []  # not created yet
        return json.loads(r.stdout.strip().splitlines()[-1])

    logs = [open(tmp_path / f"tune{i}.log", "w+") for i in range(2)]
    # the first is held inside its first trial's training (failpoint train.step@12: its MLflow
    # run made, the validation of iteration 10 reported) until the kill: polled states alone
    # once let it finish that trial and be killed in the next, before its run existed (CI R7)
    fp = tmp_path / "failpoints"
    envs = [{**env, **armed_env(fp, "train.step@12")}, env]
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.tune"], cwd=d, env=envs[i],
                              stdout=logs[i], stderr=subprocess.STDOUT, start_new_session=True)
             for i in range(2)]
    try:
        wait_reached(fp, "train.step", procs[0], limit_s=300,
                     what=lambda: (tmp_path / "tune0.log").read_text()[-3000:])
        # the other mid-training too (two RUNNING trials with reports), then kill the first
        deadline = time.monotonic() + 300
        while True:
            trials = state()
            running = [t for t in trials if t["state"] == "RUNNING" and t["steps"]]
            if len(running) == 2:
                break
            assert all(p.poll() is None for p in procs), trials
            assert time.monotonic() < deadline, trials
            time.sleep(0.2)
        os.killpg(procs[0].pid, signal.SIGKILL)
        procs[0].wait(timeout=30)
        assert procs[1].wait(timeout=400) == 0, (logs[1].seek(0), logs[1].read()[-4000:])[1]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
        for f in logs:
            f.close()
    trials = state()
    print(f"\nshared study {name}: {[(t['number'], t['state']) for t in trials]}")
    by_state: dict[str, list] = {}
    for t in trials:
        by_state.setdefault(t["state"], []).append(t)
    assert len(by_state.get("COMPLETE", [])) == n, by_state  # n finished: none lost, none extra
    assert len(by_state.get("FAIL", [])) == 1, by_state      # the killed process's trial
    assert "RUNNING" not in by_state, by_state
    assert sorted(t["number"] for t in trials) == list(range(len(trials)))
    lrs = [t["params"]["lr"] for t in trials if "lr" in t["params"]]
    assert len(set(lrs)) == len(lrs), lrs  # two processes, one seed: no draw repeated
    r = subprocess.run([sys.executable, "-c", TUNE_RUNS, name], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = json.loads(r.stdout.strip().splitlines()[-1])
    stage_ids = {x["id"] for x in runs if x["kind"] == "stage"}
    trial_runs = {x["id"]: x for x in runs if x["kind"] == "trial" and x["study"] == name}
    tails = [(tmp_path / f"tune{i}.log").read_text(errors="replace")[-3000:] for i in range(2)]
    assert len(trial_runs) == len(trials), why(len(trial_runs), len(trials), runs, trials, *tails)
    assert all(x["parent"] in stage_ids for x in trial_runs.values()), runs
    assert len({x["parent"] for x in trial_runs.values()}) == 2  # one stage run per process
    dead = by_state["FAIL"][0]
    assert trial_runs[dead["run"]]["status"] == "KILLED", trial_runs[dead["run"]]
    assert trial_runs[dead["run"]]["state"] == "FAIL"


# --------------------------------------------------------------------------- 3: the worker
@pytest.mark.timeout(600)
def test_worker_runs_a_deployment(stack):
    env = stack.client_env()
    t = time.monotonic()
    r = subprocess.run([str(Path(sys.executable).parent / "prefect"), "deployment", "run",
                        "rlfn-prepare/prepare"], capture_output=True, text=True, env=env,
                       timeout=120, cwd=stack.clone)
    assert r.returncode == 0, r.stdout + r.stderr
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", r.stdout).group(1)
    api, auth = env["PREFECT_API_URL"], env["PREFECT_API_AUTH_STRING"]
    deadline = time.monotonic() + 300
    while True:
        code, body = http("GET", f"{api}/flow_runs/{run_id}", auth=auth)
        assert code == 200, body
        fr = json.loads(body)
        if fr["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        assert time.monotonic() < deadline, f"flow run still {fr['state']['type']} after 300 s"
        time.sleep(1)
    took = time.monotonic() - t
    print(f"prepare through the worker: {took:.1f} s")
    if fr["state"]["type"] != "COMPLETED":
        _, logs = http("POST", f"{api}/logs/filter",
                        {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}, auth=auth)
        lines = "\n".join(x["message"] for x in json.loads(logs))
        pytest.fail(f"flow run {fr['state']['type']}: {fr['state'].get('message')}\n{lines}")
    assert fr["work_pool_name"] == "rlfn-pool"
    assert (stack.clone / "data" / "manifest.parquet").is_file()  # it ran in the clone
    # run outside `dvc repro`, the stage recorded its outputs: DVC's view is consistent
    st = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", "prepare"],
                        capture_output=True, text=True, cwd=stack.clone, timeout=120,
                        env=clean_env())
    if st.returncode != 0 or json.loads(st.stdout) != {}:
        _, logs = http("POST", f"{api}/logs/filter",
                        {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}, auth=auth)
        lines = "\n".join(x["message"] for x in json.loads(logs))
        pytest.fail(f"dvc status after the worker's run: {st.stdout}{st.stderr}\n"
                    f"flow run log:\n{lines}")
    # and logged to the stack's MLflow, its artifact stored by the server
    assert list((stack.state / "mlartifacts").glob("*/*/artifacts/manifest.summary.json"))
    # the pipeline's own lines (logger rlfn) in the flow run's log on the server, and in the
    # worker's log (they reached neither when the flow run's process set up Prefect's logging
    # before pipeline/__init__ named the logger)
    _, logs = http("POST", f"{api}/logs/filter",
                    {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}, auth=auth)
    said = [x["message"] for x in json.loads(logs)]
    assert any(m.startswith("prepare: ready after") for m in said), "\n".join(said)
    assert "prepare: ready after" in (stack.state / "logs" / "worker.log").read_text(
        errors="replace")


# --------------------------------------------------------------------------- 4: failures
ORPHANS = r"""
import json, mlflow, uuid
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Crashed, Running
from pipeline import tags as T, tracking

@flow(name="orphan-probe")
def probe():
    pass

client = mlflow.MlflowClient()
exp = client.create_experiment(f"orphans-{uuid.uuid4().hex[:8]}")
runs = {}
with get_client(sync_client=True) as pc:
    for name in ("crashed", "running"):
        fr = pc.create_flow_run(probe)
        pc.set_flow_run_state(fr.id, Running(), force=True)
        if name == "crashed":  # what the stack's automation does to a silent flow run
            pc.set_flow_run_state(fr.id, Crashed(message="gone"), force=True)
        parent = client.create_run(exp, tags={T.KIND: "repro"}).info.run_id
        runs[f"{name}'s repro"] = parent
        runs[name] = client.create_run(exp, tags={T.KIND: "stage", T.DVC_STAGE: name,
                                                  T.FLOW_RUN: str(fr.id),
                                                  T.PARENT_RUN: parent}).info.run_id
runs["untagged"] = client.create_run(exp, tags={T.KIND: "stage"}).info.run_id
marked = tracking.settle_orphans(client, exp)
print(json.dumps({"marked": [k for k, v in runs.items() if v in marked],
                  "status": {k: client.get_run(v).info.status for k, v in runs.items()}}))
"""


def test_a_stage_run_whose_flow_run_ended_is_marked_killed(stack):
    """``pipeline.tracking.settle_orphans`` (each stage's start) against the stack's servers:
    a stage's MLflow run left RUNNING whose Prefect flow run ended (CRASHED: its process, or
    its host, gone) is marked KILLED, and its repro's parent run with it; one whose flow run
    still runs (and its parent), and one without a flow run, are left RUNNING."""
    r = subprocess.run([sys.executable, "-c", ORPHANS], capture_output=True, text=True,
                       timeout=300, env=stack.client_env(), cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"marked": ["crashed's repro", "crashed"],
                   "status": {"crashed's repro": "KILLED", "crashed": "KILLED",
                              "running's repro": "RUNNING", "running": "RUNNING",
                              "untagged": "RUNNING"}}, got


@pytest.mark.timeout(300)
def test_a_worker_that_exits_is_started_again(stack):
    """The stack's workers run under scripts/stack/keep.py: the Prefect worker process
    SIGKILLed (as it exits on its own after its polls fail for a while, Prefect's error
    threshold), keep.py starts it again, and the pool shows it ONLINE, with no ``up``."""
    keeper, worker = worker_under_keep(stack.state)
    os.kill(worker, signal.SIGKILL)
    log = stack.state / "logs" / "worker.log"
    deadline = time.monotonic() + 180  # a bound on waiting: keep's 5 s, the worker's start
    while not (re.search(r"keep: worker exited -9 after \d+ s; starting it again",
                         log.read_text(errors="replace"))
               and stack.sh("status").returncode == 0):
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(2)
    assert int((stack.state / "run" / "worker.pid").read_text().split()[0]) == keeper


@pytest.mark.timeout(600)
def test_status_names_a_stopped_service_and_up_restarts_it(stack):
    pid = int((stack.state / "run" / "mlflow.pid").read_text().split()[0])
    os.killpg(pid, signal.SIGKILL)  # the server and its uvicorn workers: its process group
    deadline = time.monotonic() + 30
    while _group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)

    r = stack.sh("status")
    assert r.returncode != 0
    lines = _status_lines(r.stdout)
    ml = lines["mlflow"]
    assert ml.split()[1] == "DOWN", ml
    assert f"http://127.0.0.1:{stack.ports['mlflow']}" in ml
    assert str(stack.state / "logs" / "mlflow.log") in ml, ml
    for name in set(SERVICES) - {"mlflow"}:
        assert lines[name].split()[1] == "up", lines[name]

    # readiness has a limit: too short a one fails `up` with one line naming the service
    r = stack.sh("up", RLFN_STACK_TIMEOUT="1")
    assert r.returncode != 0
    failed = [x for x in r.stderr.splitlines() if x.startswith("FAILED")]
    assert len(failed) == 1, r.stderr
    assert failed[0].startswith(f"FAILED mlflow: http://127.0.0.1:{stack.ports['mlflow']}/health "
                                "did not answer within 1 s; read "), failed[0]
    assert failed[0].endswith(str(stack.state / "logs" / "mlflow.log")), failed[0]

    r = stack.sh("up")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^mlflow\s+started", r.stdout, re.M), r.stdout
    assert re.search(r"^prefect\s+already up", r.stdout, re.M), r.stdout
    r = stack.sh("status")
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- rotate (last)
@pytest.mark.timeout(600)
def test_rotate_refuses_the_old_credentials_and_keeps_the_data(stack, monkeypatch, tmp_path):
    """``rotate``: the old values refused by PostgreSQL, MLflow and Prefect (each server's own
    answer), the old SSH client key by sshd and the old host key's pin by OpenSSH, the new ones
    let in, what was recorded before still there. Last of the module's stack tests: every
    client environment before it holds the old values."""
    import psycopg
    from mlflow.tracking import MlflowClient

    old, old_sec = stack.exports(), stack.secrets()
    client = MlflowClient(tracking_uri=old["MLFLOW_TRACKING_URI"])
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(k, old[k])
    run = client.create_run(client.create_experiment(f"rotate-{uuid.uuid4().hex[:8]}"))
    client.log_metric(run.info.run_id, "kept", 1.25)

    ssh = stack.state / "ssh"
    kept = tmp_path / "before"
    shutil.copytree(ssh, kept)  # the old key pair and the old host key's pin
    for args, says in (([], "name the secrets to rotate, or all"),
                       (["no_such"], "no secret 'no_such' in the stack"),
                       (["mlflow_webhook_key"], "mlflow_webhook_key is not rotatable"),
                       (["tls"], "tls: the stack listens on 127.0.0.1 only")):
        r = stack.sh("rotate", *args)
        assert r.returncode == 2 and f"error: rotate: {says}" in r.stderr, r.stderr
    assert stack.secrets() == old_sec  # refused: nothing changed

    names = ["pg_superuser_password", "db_password", "mlflow_admin_password", "prefect_password",
             "webhook_secret", "ssh_key", "ssh_host_key"]
    t = time.monotonic()
    r = stack.sh("rotate", *names, timeout=600)
    print(f"\nrotate ({time.monotonic() - t:.1f} s):\n{r.stdout}{r.stderr}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rotate: db_password changed in postgresql" in r.stdout, r.stdout
    assert "rotate: mlflow_admin_password changed in mlflow" in r.stdout, r.stdout
    assert f"stack: rotated {', '.join(names)} and restarted every service" in r.stdout
    assert "rotate: ssh_host_key removed (sshd's host key" in r.stdout, r.stdout
    sec = stack.secrets()
    assert all(sec[n] != old_sec[n] for n in names if n in old_sec), "a secret kept its value"
    assert {k: v for k, v in sec.items() if k not in names} == \
        {k: v for k, v in old_sec.items() if k not in names}
    for f in ("id_ed25519", "id_ed25519.pub", "ssh_host_ed25519_key.pub", "known_hosts"):
        assert (ssh / f).read_bytes() != (kept / f).read_bytes(), f"{f} kept its value"

    def login(key: Path, known_hosts: Path) -> subprocess.CompletedProcess:
        user = "root" if os.geteuid() == 0 else os.environ.get("USER", "")
        return subprocess.run(
            ["ssh", "-F", "/dev/null", "-p", str(stack.ports["ssh"]), "-i", str(key), "-o",
             "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
             "-o", f"UserKnownHostsFile={known_hosts}", "-o", "ConnectTimeout=10",
             f"{user}@127.0.0.1", "echo ok"], capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL)

    r = login(kept / "id_ed25519", ssh / "known_hosts")
    assert r.returncode == 255 and "Permission denied (publickey)" in r.stderr, r.stderr
    r = login(ssh / "id_ed25519", kept / "known_hosts")
    assert r.returncode == 255 and "Host key verification failed" in r.stderr, r.stderr
    r = login(ssh / "id_ed25519", ssh / "known_hosts")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    secrets_dir = stack.state / "secrets"
    assert stat.S_IMODE((secrets_dir / "stack.json").stat().st_mode) == 0o600
    assert not (secrets_dir / "rotating.json").exists()
    new = stack.exports()

    port = stack.ports["pg"]
    for user, key in (("rlfn", "db_password"), ("postgres", "pg_superuser_password")):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(host="127.0.0.1", port=port, user=user, password=old_sec[key],
                            dbname="postgres", connect_timeout=10)
        psycopg.connect(host="127.0.0.1", port=port, user=user, password=sec[key],
                        dbname="postgres", connect_timeout=10).close()
    uri = new["MLFLOW_TRACKING_URI"]
    search = f"{uri}/api/2.0/mlflow/experiments/search"
    assert http("POST", search, {"max_results": 1},
                auth=f"admin:{old['MLFLOW_TRACKING_PASSWORD']}")[0] == 401
    code, body = http("GET", f"{uri}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}",
                      auth=f"admin:{new['MLFLOW_TRACKING_PASSWORD']}")
    assert code == 200 and json.loads(body)["run"]["data"]["metrics"][0]["value"] == 1.25, body
    api = new["PREFECT_API_URL"]
    assert http("POST", f"{api}/flows/filter", {}, auth=old["PREFECT_API_AUTH_STRING"])[0] == 401
    assert http("POST", f"{api}/flows/filter", {}, auth=new["PREFECT_API_AUTH_STRING"])[0] == 200
    r = stack.sh("status")
    assert r.returncode == 0, r.stdout + r.stderr  # the worker, the webhook: on the new values


# --------------------------------------------------------------------------- the team's git
SEED = r"""
import sys, types
from stack import sshd
ctx = types.SimpleNamespace(project_dir=sys.argv[1], host="10.0.0.1", remote=True,
                            ports={"sshd": 52222})
print(sshd._git_repo(ctx))
"""


@pytest.mark.parametrize("detached", [False, True])
def test_the_team_repository_is_seeded_with_what_the_project_runs(tmp_path, detached):
    """``up --host``'s bare repository gets the project's branches and, as its HEAD, what the
    project has checked out; a detached checkout (a CI job's) becomes ``main`` (it used to
    seed nothing and fail ``up``)."""
    project = tmp_path / "project"
    project.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]

    def run(*args: str, cwd: Path = project) -> str:
        r = subprocess.run([*git, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    run("init", "-q", "-b", "main")
    run("commit", "-q", "--allow-empty", "-m", "one")
    run("checkout", "-q", "-b", "dev")
    run("commit", "-q", "--allow-empty", "-m", "two")
    if detached:
        run("checkout", "-q", "--detach")
        run("commit", "-q", "--allow-empty", "-m", "three (detached)")
    want = run("rev-parse", "HEAD")
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    r = subprocess.run([sys.executable, "-c", SEED, str(project)], capture_output=True,
                       text=True, timeout=120, cwd=ROOT,
                       env=clean_env(RLFN_STACK_DIR=str(state),
                                     PYTHONPATH=str(ROOT / "scripts")))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "seeded from" in r.stdout, r.stdout
    bare = state / "git" / "rlfn-pipeline.git"
    head = run("symbolic-ref", "HEAD", cwd=bare)
    assert head == ("refs/heads/main" if detached else "refs/heads/dev"), head
    assert run("rev-parse", "HEAD", cwd=bare) == want
    assert run("for-each-ref", "--format=%(refname)", cwd=bare).split() == \
        ["refs/heads/dev", "refs/heads/main"]
    # a second `up` keeps it as it is (seeded once)
    r = subprocess.run([sys.executable, "-c", SEED, str(project)], capture_output=True,
                       text=True, timeout=120, cwd=ROOT,
                       env=clean_env(RLFN_STACK_DIR=str(state),
                                     PYTHONPATH=str(ROOT / "scripts")))
    assert r.returncode == 0 and "kept" in r.stdout and "seeded" not in r.stdout, r.stdout
