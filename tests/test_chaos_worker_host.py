"""Chaos (issue 24), case 3 on the multi-host layout: a worker host gone in the middle of a
``repro`` deployment run, against the team stack across hosts (tests/teamhosts.py: a server
host, worker hosts ``w1`` and ``w2``, a client; network namespaces, no shared disk), no mocks.

``w1`` alone is joined; the client dispatches ``rlfn-repro/repro``; ``w1`` takes it and is held
at failpoint ``train.step@3`` in the first training stage (its checkpoint of iteration 2 on
``w1``'s disk). Then the host goes: its cable is pulled (nothing it sends leaves, no FIN, no
RST) and every process of its user SIGKILLed, as at a power loss. Exactly:

- the repro's flow run and the training stage's own flow run do not stay RUNNING: the stack's
  automation ``rlfn-crash-silent-flow-runs`` marks both CRASHED (the server's detection: the
  worker died with its host);
- ``w2`` joins, the client dispatches the repro again, ``w2`` runs it and it COMPLETES: the
  work is redone from the remote and the team's repository, not from ``w1``'s disk (gone with
  it), and ``w2``'s ``dvc status`` is clean;
- what was recorded before the host went is there after (the Optuna trials the client
  recorded, the flow runs, the MLflow runs), and the training stage's MLflow run that ``w1``
  left RUNNING is KILLED (``pipeline.tracking.settle_orphans``, by ``w2``'s first stage:
  found by this case, it stayed RUNNING for ever before); the registry holds one version per
  training stage of ``w2``'s run, READY, and ``champion`` is the one its promotion report
  names.

Marked ``chaos`` only: four hosts, a stack, a partial and a whole tiny repro and the
automation's 300 s (about 12 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from chaosstack import CENSUS, MODEL, REGISTRY, STUDY, counts, lost_flow_runs
from faults import armed_env, wait_reached
from prereq import ROOT
from teamhosts import Team, deploy_run, ok, team_on_hosts, wait_runs

pytestmark = pytest.mark.chaos

TIMES: dict[str, float] = {}

# Every stage's MLflow run of the experiment: id, stage, status, its Prefect flow run.
STAGE_RUNS = r"""
import json, mlflow
from pipeline import tags as T
client = mlflow.MlflowClient()
exp = client.get_experiment_by_name("rlfn")
runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{T.KIND}` = 'stage'",
                          max_results=500) if exp else []
print(json.dumps([{"id": r.info.run_id, "stage": r.data.tags.get(T.DVC_STAGE),
                   "status": r.info.status, "flow_run": r.data.tags.get(T.FLOW_RUN)}
                  for r in runs]))
"""


@pytest.fixture(scope="module")
def team():
    with team_on_hosts(("w1", "w2"), join=("w1",)) as t:
        yield t


def _pids_of(user: str) -> list[int]:
    r = subprocess.run(["pgrep", "-u", user], capture_output=True, text=True, timeout=30)
    return [int(x) for x in r.stdout.split()]


@pytest.mark.timeout(3600)
def test_worker_host_gone_during_a_repro(team: Team):
    sys.path.insert(0, str(ROOT / "scripts"))  # the stack's own figures (SILENT_S, ...)
    from stack import prefect_server

    t = team
    w1, w2 = t.workers["w1"], t.workers["w2"]
    # something recorded before, to count: 2 Optuna trials from the client host
    assert t.client_py(STUDY, "0", "2") == [0, 1]
    before = t.client_py(CENSUS, MODEL)
    print(f"\nbefore the dispatch: {counts(before)}")
    fp = w1.home / "failpoints"
    env = json.dumps(armed_env(fp, "train.step@3"))
    os.chown(fp, w1.uid, w1.uid)
    fid = deploy_run(t, "rlfn-repro/repro", "--job-variable", f"env={env}")
    wait_reached(fp, "train.step", None, limit_s=1500, what=t.logs)
    assert t.runner_of(fid) == ["w1"], t.logs()
    held = [r for r in t.client_py(STAGE_RUNS) if r["status"] == "RUNNING"]
    assert len(held) == 1 and held[0]["stage"].startswith("train_stage@"), held
    held = held[0]
    assert held["flow_run"], held  # the stage's run names its own flow run

    # the host gone: its cable pulled first (a dead host sends nothing), then every process
    t.net.cut("w1")
    t_gone = time.monotonic()
    for _ in range(50):
        pids = _pids_of(w1.user)
        if not pids:
            break
        subprocess.run(["kill", "-KILL", *map(str, pids)], capture_output=True, timeout=30)
        time.sleep(0.2)
    assert not _pids_of(w1.user), f"processes of {w1.user} survived SIGKILL"
    print(f"w1 gone (cable pulled, every process of its user killed) in {held['stage']}")

    # the automation ends both flow runs: the repro's and the training stage's own
    bound = prefect_server.SILENT_S + 2 * prefect_server.HEARTBEAT_S + 180
    ended = wait_runs(t, [fid, held["flow_run"]], bound)
    TIMES["w1 gone -> both flow runs CRASHED"] = time.monotonic() - t_gone
    print(f"{ended}: {TIMES['w1 gone -> both flow runs CRASHED']:.1f} s after")
    for run_id, fr in ended.items():
        assert fr["state"] == "CRASHED" and prefect_server.ZOMBIE in (fr["message"] or ""), \
            (run_id, fr)

    # another worker host takes the rerun, from the remote and the team's repository
    tj = time.monotonic()
    t.join("w2")
    TIMES["join w2"] = time.monotonic() - tj
    t_again, wall_again = time.monotonic(), time.time()
    again = deploy_run(t, "rlfn-repro/repro")
    done = wait_runs(t, [again], 2400)[again]
    TIMES["rerun on w2"] = time.monotonic() - t_again
    assert done["state"] == "COMPLETED", (done, t.logs())
    assert t.runner_of(again) == ["w2"], t.logs()
    dvc = str(t.tools["w2"] / ".venv" / "bin" / "dvc")
    st = w2.run([dvc, "status", "--json", "dvc.yaml"], cwd=t.project("w2"), timeout=300)
    assert json.loads(ok(st, "dvc status on w2") or "{}") == {}, st.stdout

    # nothing counted before lost; w1's stage run ended KILLED; the registry whole
    after = t.client_py(CENSUS, MODEL)
    print(f"after: {counts(after)}")
    assert set(map(str, before["runs"])) <= set(map(str, after["runs"]))
    assert lost_flow_runs(before["flow_runs"], after["flow_runs"]) == [], after["flow_runs"]
    assert after["studies"] == before["studies"]
    runs = {r["id"]: r for r in t.client_py(STAGE_RUNS)}
    assert runs[held["id"]]["status"] == "KILLED", runs[held["id"]]
    assert [r for r in after["runs"] if r[1] == "RUNNING"] == [], after["runs"]
    reg = t.client_py(REGISTRY, MODEL)
    print(f"registry: {reg}")
    assert [(v[0], v[1], v[3]) for v in reg["versions"]] == [
        (1, "READY", "train_stage@1"), (2, "READY", "train_stage@2"),
        (3, "READY", "train_stage@3")], reg  # w2's stages: w1 was held before registering
    assert all(v[4] > wall_again for v in reg["versions"]), (wall_again, reg)
    promo = json.loads((t.project("w2") / "reports" / "promotion.json").read_text())["decision"]
    expected = promo["candidate_version"] if promo["promoted"] else promo["champion_version"]
    assert reg["aliases"] == {"champion": str(expected)}, (reg["aliases"], promo["reason"])
    print("\n".join(f"{k}: {v:.1f} s" for k, v in TIMES.items()))
