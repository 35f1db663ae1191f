"""A team on several hosts (issue 23, items 2, 4 and 5): hosts made by tests/hosts.py (each its
own network namespace, Unix user and home; no shared disk). The module's stack is brought up
once (fixture ``team``): the server host runs ``RLFN_STACK_WORKER=0 stack.sh up --host <its
address>`` (no worker of its own) on a clone made tiny (tinyproject's pipeline params, 4
training images, a tiny Optuna study) and writes the bundle; worker host ``w2`` joins (its own
clone of ``RLFN_GIT_URL``, a Prefect worker on ``rlfn-pool`` taking one flow run at a time); a
client host has the bundle's exports (``env --bundle``). Then, in this order (each later test
needs what the earlier ones left):

1. ``test_worker_host_joins``: bad input to ``join`` on ``w1`` (a bundle readable by others, a
   bad ``--pool``: one ``error:`` line, exit 2, nothing written); ``w1`` joins: its own clone at
   the team repository's HEAD, its DVC remote from the bundle, ``status`` up, ONLINE on the
   pool from the client over TLS; git over SSH and ``dvc push`` from ``w1`` reach the server;
   ``rlfn-repro/repro --param push=true`` dispatched from the client runs the whole tiny
   pipeline on a worker host (its log names the flow run) and pushes ``repro/<id>``; the client
   checks it out, ``dvc pull`` restores the worker's bytes, ``dvc status`` is clean, and the
   champion loads from the tracking server over TLS and upscales; tcpdump on the bridge from
   the join to the champion's check holds none of the stack's secrets (item 5).
2. ``test_two_worker_hosts_drain_one_study``: the client dispatches ``rlfn-tune/tune`` twice;
   each run is taken by a different worker host and reaches the first trial's step
   ``PAUSE_STEP`` (failpoint ``train.step``) before either is let go: both train trials of one
   study (the server's PostgreSQL over TLS, ``sslmode=verify-full``) at once, by construction.
   Exactly ``n_trials`` finished, none failed or left running, no draw repeated; each host's
   clone holds the trials it ran (disjoint, both non-empty, all of them); every trial a nested
   run on the tracking server under one stage run per host.
3. ``test_retrain_from_the_client_runs_on_a_worker_host``: the client branches off test 1's
   ``repro/<id>`` (its outputs already in the server's DVC remote) with only stage 3 longer,
   pushes it to ``RLFN_GIT_URL`` and runs ``bash scripts/retrain.sh <branch>``: a worker host
   pulls, reruns ``train_stage@3`` onward only and pushes ``retrain/<flow run id>``, whose
   parent is the branch, ``dvc.lock`` every stage (the ones before stage 3 as the parent's),
   ``reports/promotion.json`` the decision; the client clones it, ``dvc pull`` restores the
   outputs, ``dvc status`` is clean; the retrain's MLflow run names the branch.
4. ``test_down_stops_a_worker_host``: ``down`` on ``w1`` stops its worker (``status`` DOWN).

Marked ``stack``; ~15 min on 2 busy cores (measured beside a CI run: the stack 1 min, test 1 8
min with the whole tiny pipeline, the study 1 min, the retrain of stage 3 onward 4.5 min,
teardown 0.5 min); each test's timeout (a hang guard) is about four times that: CI runs it
beside the main phase.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from pathlib import Path

import pytest
import yaml

from hosts import capture, secrets_seen
from teamhosts import (CLIENT_EXPORTS, GIT_EXPORTS, WORKERS, Team, carry, deploy_run, ok,
                       team_on_hosts, wait_runs)
from teamstack import PYFUNC, TUNE_RUNS, eval_env, why
from tinyproject import DVC_STAGES

pytestmark = pytest.mark.stack

N_TRIALS = 4
PAUSE_STEP = 3  # the failpoint train.step@3: both hosts inside a trial, gated together
FP_DIR = "failpoints"  # relative: the flow run's working directory, the worker host's clone
CACHED = ("data/manifest.parquet", "data/lr", "data/patches", "models/stage1", "models/stage2",
          "models/stage3")  # outputs DVC caches (pushed by the worker host, pulled by the client)
BEFORE_STAGE3 = ("prepare", "degrade", "patches", "train_stage@1", "train_stage@2")
STAGE3_ITERATIONS = 8  # the retrained branch's only change (the tiny params train 4)

# the rollout flow runs of the champion's version (rlfn-serve/rollout), from the client, once
# one exists and every one is final (bounded)
ROLLOUTS = r"""
import json, sys, time
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
limit = float(sys.argv[1])
version = MlflowClient().get_model_version_by_alias("rlfn-x4", "champion").version
deadline = time.monotonic() + limit
with get_client(sync_client=True) as c:
    while True:
        frs = [fr for fr in c.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=["rollout"])))
            if str(fr.parameters.get("version")) == version]
        if frs and all(fr.state and fr.state.is_final() for fr in frs):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(2)
print(json.dumps({"version": version, "runs": {str(fr.id): {
    "state": fr.state_type.value if fr.state_type else None, "pool": fr.work_pool_name,
    "message": fr.state.message if fr.state else ""} for fr in frs}}))
"""


# the served endpoint from the client (RLFN_SERVE_URL over TLS, verified with RLFN_SERVE_CA):
# a 24x32 LR image upscaled by the serving version
SERVED = r"""
import base64, io, json, os, ssl, urllib.request
import numpy as np
from PIL import Image
img = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
buf = io.BytesIO(); Image.fromarray(img).save(buf, format="PNG")
body = json.dumps({"dataframe_records": [{"image": base64.b64encode(buf.getvalue()).decode()}]})
req = urllib.request.Request(os.environ["RLFN_SERVE_URL"] + "/invocations", data=body.encode(),
                             headers={"Content-Type": "application/json"})
ctx = ssl.create_default_context(cafile=os.environ["RLFN_SERVE_CA"])
with urllib.request.urlopen(req, timeout=240, context=ctx) as r:
    out = json.loads(r.read())["predictions"][0]
    png = base64.b64decode(out["image"] if isinstance(out, dict) else out)
    print(json.dumps({"status": r.status, "version": r.headers.get("X-Model-Version"),
                      "shape": list(np.asarray(Image.open(io.BytesIO(png))).shape)}))
"""


TUNE_STATE = r"""
import json, sys
import optuna
study = optuna.load_study(study_name=sys.argv[1], storage=sys.argv[2])
print(json.dumps([{"number": t.number, "state": t.state.name, "params": t.params,
                   "run": t.user_attrs.get("mlflow_run_id")} for t in study.get_trials()]))
"""


RETRAIN_RUNS = r"""
import json
from mlflow import MlflowClient
c = MlflowClient()
exp = c.get_experiment_by_name("rlfn")
runs = c.search_runs([exp.experiment_id], "tags.`rlfn.kind` = 'retrain'", max_results=100)
print(json.dumps([{"branch": r.data.tags.get("rlfn.retrain.branch"),
                   "stages": r.data.tags.get("rlfn.retrain.stages"),
                   "promoted": r.data.tags.get("promotion.promoted")} for r in runs]))
"""


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


@pytest.fixture(scope="module")
def team():
    def tiny_study(prm: dict) -> None:  # a random sampler with a seed, lr only, 8 iterations
        prm["tune"].update(study=study, n_trials=N_TRIALS, sampler={"name": "random", "seed": 3},
                           pruner={"name": "none"}, heartbeat_s=2, grace_s=30,
                           base={"iterations": 8, "val_every": 4, "checkpoint_every": 8,
                                 "lr_step": 8, "batch_size": 2, "patch_size": 64,
                                 "model": "rlfn_ntire", "num_workers": 0, "threads": 1,
                                 "log_every": 4, "val_max_images": 2},
                           space={"lr": {"type": "float", "low": 1e-3, "high": 4e-3,
                                         "log": True}})

    study = f"team-{uuid.uuid4().hex[:8]}"
    # w1 joins in test_worker_host_joins, after its bad input
    with team_on_hosts(("w1", "w2"), join=("w2",), params=tiny_study, study=study) as t:
        yield t


@pytest.mark.timeout(2400)  # the module's stack (setup, ~1 min) and the whole tiny pipeline (~8)
def test_worker_host_joins(team: Team):
    t = team
    srv, wrk, cli = t.srv, t.workers["w1"], t.cli
    wstate = t.wstate["w1"]
    # the server: a team repository seeded with the project's HEAD, no worker of its own
    assert "git repository made at ssh://" in t.up_out, t.up_out
    assert "\nworker " not in t.up_out, t.up_out  # RLFN_STACK_WORKER=0
    assert not (t.state / "run" / "worker.pid").exists()
    exports = eval_env(srv.run(["bash", t.stack_sh, "env"], **t.srv_env).stdout, GIT_EXPORTS)
    assert exports["RLFN_GIT_URL"] == t.git_url, exports
    assert ok(srv.run(["git", "rev-parse", "HEAD"], cwd=t.bare), "bare HEAD").strip() == t.head
    assert t.bundle["git"] == {"url": t.git_url}, t.bundle["git"]
    assert t.client["RLFN_GIT_URL"] == t.git_url
    assert t.client["PREFECT_API_URL"].startswith(f"https://{srv.addr}:")

    # bad input: one error line naming it, exit 2, nothing written
    carried = carry(srv.home / "team.bundle", wrk)
    client_dir = wrk.home / ".config" / "rlfn-stack" / srv.addr
    os.chmod(carried, 0o644)
    loose = t.wsh("w1", "join", str(carried))
    assert loose.returncode == 2 and loose.stderr.count("\n") == 1, loose.stderr
    assert loose.stderr.startswith(f"error: join {carried}: readable by others"), loose.stderr
    os.chmod(carried, 0o600)
    pool = t.wsh("w1", "join", str(carried), "--pool", "gpu pool")
    assert pool.returncode == 2 and pool.stderr.count("\n") == 1, pool.stderr
    assert pool.stderr.startswith("error: join --pool 'gpu pool'"), pool.stderr
    assert not wstate.exists() and not client_dir.exists(), \
        (list(wrk.home.iterdir()), loose.stderr)

    # from here to the champion on the client, every packet on the bridge is captured
    wire = contextlib.ExitStack()
    try:
        pcap = wire.enter_context(capture(t.net, t.net.base / "bridge.pcap"))
        t.join("w1")
        project = t.project("w1")
        joined = json.loads((wstate / "run" / "state.json").read_text())["joined"]
        assert joined["pool"] == "rlfn-pool" and joined["project_dir"] == str(project)
        worker_name = joined["worker"]
        assert wrk.addr in worker_name, worker_name
        origin = ok(wrk.run(["git", "remote", "get-url", "origin"], cwd=project), "origin")
        assert origin.strip() == t.git_url
        assert ok(wrk.run(["git", "rev-parse", "HEAD"], cwd=project), "HEAD").strip() == t.head
        local = (project / ".dvc" / "config.local").read_text()
        # the bundle's remote through its pinned route (DVC's own SSH client checks no host
        # key: test_stack_hosts)
        assert f"url = {t.client['RLFN_DVC_REMOTE']}" in local, local
        assert t.client["RLFN_DVC_REMOTE"].startswith(f"ssh://{t.srv.user}@rlfn-stack-"), t.client
        assert f"keyfile = {client_dir / 'id_ed25519'}" in local, local
        assert "remote = stack" in local, local
        st = t.wsh("w1", "status")
        assert st.returncode == 0, st.stdout + st.stderr
        assert st.stdout.startswith("worker      up    ") and worker_name in st.stdout, \
            st.stdout

        # both worker hosts, seen from the client through the server's Prefect API over TLS
        w = cli.run([t.py(), "-c", WORKERS, "rlfn-pool"], timeout=120, **t.cenv())
        workers = json.loads(ok(w, "workers").strip().splitlines()[-1])
        assert workers.get(worker_name) == "ONLINE", workers
        assert sorted(workers.values()) == ["ONLINE", "ONLINE"], workers

        # git over SSH from the worker host: a branch pushed to RLFN_GIT_URL ...
        wexp = eval_env(ok(wrk.run(["bash", str(t.tools["w1"] / "scripts" / "stack.sh"),
                                     "env", "--bundle", str(carried)]), "env"), CLIENT_EXPORTS)
        git_id = ["-c", "user.name=w", "-c", "user.email=w@localhost"]
        joined_ref = ok(wrk.run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=project),
                         "branch").strip()
        (project / "join-probe.txt").write_text(f"from {wrk.name}\n")
        os.chown(project / "join-probe.txt", wrk.uid, wrk.uid)
        for cmd in (["checkout", "-q", "-b", "join-probe"], ["add", "join-probe.txt"],
                    [*git_id, "commit", "-q", "-m", "a commit of the worker host"],
                    ["push", "-q", "origin", "join-probe"]):
            ok(wrk.run(["git", *cmd], cwd=project, timeout=120, **wexp), f"git {cmd}")
        pushed = ok(wrk.run(["git", "rev-parse", "HEAD"], cwd=project), "HEAD").strip()
        assert ok(srv.run(["git", "rev-parse", "refs/heads/join-probe"], cwd=t.bare),
                   "server's branch").strip() == pushed
        # ... is in the client host's own clone of RLFN_GIT_URL
        cclone = cli.home / "team-clone"
        ok(cli.run(["git", "clone", "-q", t.git_url, str(cclone)], timeout=300, **t.client),
            "client clone")
        assert ok(cli.run(["git", "rev-parse", "origin/join-probe"], cwd=cclone),
                   "client's branch").strip() == pushed
        # without the bundle's ssh config git cannot reach it (no key, no pinned host key)
        bare_env = {k: v for k, v in t.client.items() if k != "GIT_SSH_COMMAND"}
        refused = cli.run(["git", "ls-remote", t.git_url], timeout=120,
                          GIT_SSH_COMMAND="ssh -o BatchMode=yes", **bare_env)
        assert refused.returncode != 0, refused.stdout

        # dvc push from the worker host reaches the server host's remote
        dvc = str(t.tools["w1"] / ".venv" / "bin" / "dvc")
        blob = os.urandom(64).hex() + "\n"
        (project / "join-probe.bin").write_text(blob)
        os.chown(project / "join-probe.bin", wrk.uid, wrk.uid)
        ok(wrk.run([dvc, "add", "-q", "join-probe.bin"], cwd=project, timeout=300, **wexp),
            "dvc add")
        p = wrk.run([dvc, "push", "join-probe.bin.dvc"], cwd=project, timeout=300, **wexp)
        ok(p, "dvc push")
        md5 = yaml.safe_load((project / "join-probe.bin.dvc").read_text())["outs"][0]["md5"]
        stored = t.state / "dvc-remote" / "files" / "md5" / md5[:2] / md5[2:]
        assert stored.is_file() and stored.read_text() == blob, (stored, p.stdout)
        # the probes leave the worker's checkout as it joined: its branch, nothing changed.
        # Left on join-probe with dvc add's .gitignore edit, a repro there (CI: whichever host
        # won the run) trained a candidate from uncommitted files, refused by promote.
        for f in ("join-probe.bin", "join-probe.bin.dvc"):
            (project / f).unlink()
        for cmd in (["checkout", "-q", "--", ".gitignore"], ["checkout", "-q", joined_ref]):
            ok(wrk.run(["git", *cmd], cwd=project, timeout=120), f"git {cmd}")
        assert ok(wrk.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project),
                   "status") == "", \
            "the worker host's checkout is not as it joined"
        assert ok(wrk.run(["git", "rev-parse", "HEAD"], cwd=project), "HEAD").strip() == t.head

        # a deployment run from the client host, run by a worker host (the server runs none)
        prefect = str(t.cli_clone / ".venv" / "bin" / "prefect")
        run = cli.run([prefect, "deployment", "run", "rlfn-repro/repro", "--params",
                       json.dumps({"push": True}), "--watch",
                       "--watch-interval", "2", "--watch-timeout", "1800"],
                      timeout=1860, **t.cenv())
        out = run.stdout + run.stderr
        print(out[-3000:])
        m = re.search(r"UUID: ([0-9a-f-]{36})", out)
        assert m, out
        fid = m.group(1)
        fr = wait_runs(t, [fid], 60)[fid]
        assert fr["state"] == "COMPLETED", why(fr, out[-3000:], t.logs())
        assert fr["pool"] == "rlfn-pool", fr
        runner = t.runner_of(fid)
        assert len(runner) == 1, why(runner, t.logs())
        print(f"repro {fid} ran on {runner[0]}")
        ran_in = t.project(runner[0])
        lock = yaml.safe_load((ran_in / "dvc.lock").read_text())["stages"]
        assert set(DVC_STAGES) <= set(lock), sorted(lock)  # the worker host's clone
        branch = f"repro/{fid}"
        on_server = ok(srv.run(["git", "rev-parse", f"refs/heads/{branch}"], cwd=t.bare),
                        "the repro branch on the server").strip()
        # the client checks it out and pulls the worker's bytes of every cached output
        t.pull_on_client(branch, cclone)
        assert ok(cli.run(["git", "rev-parse", "HEAD"], cwd=cclone), "HEAD").strip() == \
            on_server
        for out_path in CACHED:
            a, b = ran_in / out_path, cclone / out_path
            files = sorted(x.relative_to(a) for x in a.rglob("*") if x.is_file()) \
                if a.is_dir() else [Path()]
            assert files, out_path
            for f in files:
                assert (b / f).read_bytes() == (a / f).read_bytes(), (out_path, f)
        t.repro = branch  # what test 3 retrains on top of
        # the champion, from the tracking server over TLS, upscales x4 on the client
        got = cli.run([t.py(), "-c", PYFUNC], cwd=cli.home, timeout=600, **t.cenv())
        assert json.loads(ok(got, "pyfunc").strip().splitlines()[-1]) == \
            {"shape": [80, 96, 3], "dtype": "uint8"}, got.stdout
        # the champion's rollout (triggered by the registry's webhook on the server) is the
        # server host's own rollout-worker's, never a worker host's (it had no stack secrets)
        got = cli.run([t.py(), "-c", ROLLOUTS, "600"], timeout=700, **t.cenv())
        rolls = json.loads(ok(got, "rollout runs").strip().splitlines()[-1])
        print("rollouts:", rolls)
        serve_logs = "".join(f"--- {log.name}:\n" + log.read_text(errors="replace")[-3000:]
                             for log in sorted((t.state / "logs").glob("serve-*.log")))
        assert rolls["runs"], why(rolls, t.logs())
        for rid, r in rolls["runs"].items():
            assert r["pool"] == "rlfn-serve", r
            assert t.runner_of(rid) == [], (rid, t.runner_of(rid))
        # and it served: the new version's server came up and passed the canary
        assert "COMPLETED" in {r["state"] for r in rolls["runs"].values()}, \
            (rolls, serve_logs)
        srv_log = t.state / "logs" / "rollout-worker.log"
        assert any(f"/runs/flow-run/{rid}" in srv_log.read_text(errors="replace")
                   for rid in rolls["runs"]), "the server's rollout-worker log names no rollout"
        # the served champion answers the client host through the endpoint's TLS end
        got = cli.run([t.py(), "-c", SERVED], cwd=cli.home, timeout=300, **t.cenv())
        served = json.loads(ok(got, "served").strip().splitlines()[-1])
        assert served == {"status": 200, "version": rolls["version"], "shape": [96, 128, 3]}, \
            (served, serve_logs)
    finally:
        wire.close()  # the capture's end (or, after a failure, tcpdump stopped)

    # nothing secret on the wire: the capture holds the run's traffic (more bytes than the
    # outputs the client pulled) and none of the secrets, plain or base64
    pulled = sum(f.stat().st_size for o in CACHED for f in
                 ((cclone / o).rglob("*") if (cclone / o).is_dir() else [cclone / o])
                 if f.is_file())
    assert pcap.stat().st_size > pulled > 0, (pcap.stat().st_size, pulled)
    secret = _secrets(t.state)
    assert len(secret) >= 5, sorted(secret)
    assert secrets_seen(pcap, secret) == [], "in clear on the bridge"


@pytest.mark.timeout(600)  # the study: two tune runs, 4 trials of 8 iterations (~1-1.5 min)
def test_two_worker_hosts_drain_one_study(team: Team):
    t = team
    t.both_joined()
    fp_env = json.dumps({"RLFN_FAILPOINTS": f"train.step@{PAUSE_STEP}",
                         "RLFN_FAILPOINT_DIR": FP_DIR, "RLFN_FAILPOINT_TIMEOUT_S": "240"})
    ids = [deploy_run(t, "rlfn-tune/tune", "--job-variable", f"env={fp_env}")
           for _ in range(2)]
    # both hosts inside a trial of the study at once: each paused at the failpoint
    markers = {n: t.project(n) / FP_DIR / "train.step.reached" for n in t.workers}
    deadline = time.monotonic() + 150  # a bound on waiting (each host's marker, as root)
    while not all(m.exists() for m in markers.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    waited = {n: m.exists() for n, m in markers.items()}
    if not all(waited.values()):
        states = wait_runs(t, ids, 1)
        pytest.fail(f"not both hosts at the failpoint: {waited}; flow runs {states}"
                    f"{t.logs()}")
    for n, h in t.workers.items():  # let both go on
        ok(h.run(["touch", str(t.project(n) / FP_DIR / "train.step.release")]), "release")
    states = wait_runs(t, ids, 450)
    assert all(s["state"] == "COMPLETED" for s in states.values()), why(states, t.logs())
    assert all(s["pool"] == "rlfn-pool" for s in states.values()), states
    # each run taken by another worker host (one flow run at a time each)
    runners = {i: t.runner_of(i) for i in ids}
    assert sorted(sum(runners.values(), [])) == sorted(t.workers), runners

    # the study, read from the client over TLS (verify-full against the bundle's CA)
    storage = t.client["RLFN_OPTUNA_STORAGE"]
    assert storage.startswith("postgresql") and f"@{t.srv.addr}:" in storage \
        and "sslmode=verify-full" in storage, storage.split("@")[-1]
    r = t.cli.run([t.py(), "-c", TUNE_STATE, t.study, storage], timeout=300, **t.cenv())
    trials = json.loads(ok(r, "the study").strip().splitlines()[-1])
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
    runs = json.loads(ok(r, "MLflow runs").strip().splitlines()[-1])
    stage_ids = {x["id"] for x in runs if x["kind"] == "stage"}
    trial_runs = {x["id"]: x for x in runs if x["kind"] == "trial" and x["study"] == t.study}
    assert set(trial_runs) == {x["run"] for x in trials}, (trial_runs, trials)
    assert all(x["parent"] in stage_ids and x["status"] == "FINISHED"
               for x in trial_runs.values()), runs
    assert len({x["parent"] for x in trial_runs.values()}) == 2, trial_runs


@pytest.mark.timeout(1200)  # stage 3 onward of the tiny pipeline on a worker host (~4.5 min)
def test_retrain_from_the_client_runs_on_a_worker_host(team: Team):
    t = team
    if t.repro is None:
        pytest.skip("needs the branch repro/<id> that test_worker_host_joins pushes and pulls "
                    "(it failed or did not run in this session: run the module whole)")
    t.both_joined()
    # the client's change on top of test 1's repro: stage 3 longer, nothing else
    src = t.cli.home / "retrain-src"
    ok(t.cli.run(["git", "clone", "-q", "-b", t.repro, t.git_url, str(src)], timeout=300,
                  **t.client), "clone of the repro branch")
    p = src / "params.yaml"
    prm = yaml.safe_load(p.read_text())
    prm["train_stages"]["3"]["iterations"] = STAGE3_ITERATIONS
    p.write_text(yaml.safe_dump(prm, sort_keys=False))
    ref = "stage3-longer"
    git_id = ["-c", "user.name=c", "-c", "user.email=c@localhost"]
    for cmd in ([*git_id, "commit", "-qam", "stage 3 longer"],
                ["push", "-q", "origin", f"HEAD:refs/heads/{ref}"]):
        ok(t.cli.run(["git", *cmd], cwd=src, timeout=120, **t.client), f"git {cmd}")
    base = ok(t.cli.run(["git", "rev-parse", "HEAD"], cwd=src), "HEAD").strip()

    summary = t.cli.home / "retrain-summary.md"
    r = t.cli.run(["bash", "scripts/retrain.sh", ref], cwd=t.cli_clone, timeout=1100,
                  RLFN_RETRAIN_SUMMARY=str(summary), **t.cenv())
    out = r.stdout + r.stderr
    print(out[-3000:])
    m = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert m, out
    fid = m.group(1)
    states = wait_runs(t, [fid], 60)
    assert r.returncode == 0 and states[fid]["state"] == "COMPLETED", why(states, out[-3000:],
                                                                          t.logs())
    assert states[fid]["pool"] == "rlfn-pool"
    assert len(t.runner_of(fid)) == 1, t.runner_of(fid)  # a worker host ran it
    md = summary.read_text()
    print(md)
    assert "train_stage@3" in md and "train_stage@1" not in md, md  # only stage 3 onward

    # the branch, pushed over SSH to the team's repository on the server host
    b = f"retrain/{fid}"
    git = lambda *a: t.srv.run(["git", *a], cwd=t.bare)  # noqa: E731
    tip = ok(git("rev-parse", f"refs/heads/{b}"), f"{b} on the server").strip()
    assert ok(git("rev-parse", f"{tip}^"), "parent").strip() == base
    lock_text = ok(git("show", f"{tip}:dvc.lock"), "dvc.lock")
    parent_lock = ok(git("show", f"{base}:dvc.lock"), "the parent's dvc.lock")
    assert lock_text != parent_lock
    lock = yaml.safe_load(lock_text)["stages"]
    assert set(DVC_STAGES) <= set(lock), sorted(lock)
    before = yaml.safe_load(parent_lock)["stages"]
    assert all(lock[s] == before[s] for s in BEFORE_STAGE3), \
        [s for s in BEFORE_STAGE3 if lock[s] != before[s]]  # not rerun
    assert lock["train_stage@3"] != before["train_stage@3"]
    promo = json.loads(ok(git("show", f"{tip}:reports/promotion.json"), "promotion.json"))
    assert "decision" in promo and "promoted" in promo, promo
    # its outputs are in the server's DVC remote (pushed by the worker host): the client's clone
    # of RLFN_GIT_URL at that branch, `dvc pull` from the bundle's remote, `dvc status` clean
    cclone = t.cli.home / "retrain-clone"
    t.pull_on_client(b, cclone)
    assert (cclone / "models" / "stage3" / "model.safetensors").is_file()
    # the retrain's MLflow run names the branch and the stages it reran (read from the client)
    r = t.cli.run([t.py(), "-c", RETRAIN_RUNS], timeout=300, **t.cenv())
    runs = json.loads(ok(r, "retrain runs").strip().splitlines()[-1])
    assert [x["branch"] for x in runs] == [b], runs
    reran = set(runs[0]["stages"].split(","))
    assert "train_stage@3" in reran and not reran & set(BEFORE_STAGE3), runs


@pytest.mark.timeout(600)  # with the module's teardown (~30 s): worker hosts, server, hosts
def test_down_stops_a_worker_host(team: Team):
    t = team
    t.both_joined()
    # a GPU host: w2 joined again on pool rlfn-gpu takes the *-gpu deployments; w1, on
    # rlfn-pool, does not
    j = t.join("w2", "--pool", "rlfn-gpu")
    assert "on pool rlfn-gpu" in j.stdout, j.stdout
    fid = deploy_run(t, "rlfn-repro/repro-gpu", "--params", '{"targets": ["prepare"]}')
    done = wait_runs(t, [fid], 600)[fid]
    assert done["state"] == "COMPLETED" and done["pool"] == "rlfn-gpu", (done, t.logs())
    assert t.runner_of(fid) == ["w2"], t.logs()
    d = t.wsh("w1", "down")
    assert d.returncode == 0 and "worker      stopped" in d.stdout, d.stdout + d.stderr
    st = t.wsh("w1", "status")
    assert st.returncode == 1 and "worker      DOWN" in st.stdout, st.stdout
