"""Chaos (issue 24), case 6: the network partitioned, in the multi-host layout
(tests/teamhosts.py: the server host's stack off loopback over TLS, worker host ``w1`` joined,
a client host; no shared disk, only the services' protocols between them), no mocks.

From the client, ``rlfn-repro/repro`` is dispatched and ``w1`` runs the whole tiny pipeline.
``train_stage@1`` is held at failpoint ``register.weights_logged`` (its weights uploaded to
the tracking server, its pyfunc and version not yet), then ``w1``'s cable is pulled
(``Net.cut``: its port on the bridge down, so what it sends is dropped and a connect times
out, nothing is refused) and the stage released into the partition; the link is mended
``PARTITION_S`` later. Exactly: the flow run COMPLETED (the clients' retries outlast a minute:
MLflow 5 tries of up to 30 s with backoff 2 to 16 s, ``pipeline/services.py``); stage 1's
version registered after the link came back, once; three versions, one per training stage's
run, each READY; the alias ``champion`` on the version the promotion report names, that
version READY; the worker on ``w1`` ONLINE again; nothing the client counted before the
dispatch lost (chaosstack.CENSUS, read from the client over TLS; 2 Optuna trials recorded
first, from the client); ``dvc status`` clean on
``w1``. The test prints how long the stage waited after the link came back.

On one host (single-host team mode, every service on 127.0.0.1), the same fault with the tools
the namespaces give: the route to the tracking server's port cut on ``lo`` (chaosstack.
LoopbackCut: iproute2's ``tc`` drops what is sent to that port, nothing refused) while a whole
tiny ``dvc repro`` is released from the same failpoint, mended ``PARTITION_S`` later (stage
``prepare`` and two Optuna trials recorded before, to count). The same exacts: the repro completes with no ``error:`` line, stage 1's version registered after the
route came back and once, three READY versions, the alias whole on the version the promotion
report names, nothing of the census lost, every stage's flow run COMPLETED, ``dvc status``
clean.

Marked ``chaos`` only: the hosts, the stack, the whole tiny pipeline and a minute of
partition, twice (``pytest -m chaos``; docs/chaos-status.md).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from chaosstack import (CENSUS, MODEL, REGISTRY, STUDY, LoopbackCut, census, counts,
                        lost_flow_runs, through_fault)
from teamhosts import WORKERS, Team, deploy_run, ok, team_on_hosts, wait_runs
from teamstack import dvc, py, stack_up, why
from tinyproject import FLOW_RUNS, tiny_clone

pytestmark = pytest.mark.chaos

PARTITION_S = 60  # the cable out: longer than one try's timeout, shorter than all the retries
FP = "register.weights_logged"
FP_DIR = "failpoints"  # relative: the flow run's working directory, the worker host's clone

def registry_whole(reg: dict, t_cut: float, t_mend: float, project: Path) -> None:
    """After the partition (``t_cut`` to ``t_mend``, ``time.time()``): one version per training
    stage's run, each READY, none duplicated by a retried request; stage 1's registered after
    the mend; the alias whole, on the version ``project``'s promotion report names."""
    print(f"registry: {reg}")
    versions = reg["versions"]
    assert [(v[0], v[1], v[3]) for v in versions] == [
        (1, "READY", "train_stage@1"), (2, "READY", "train_stage@2"),
        (3, "READY", "train_stage@3")], versions
    assert len({v[2] for v in versions}) == 3, versions
    print(f"stage 1's version registered {versions[0][4] - t_mend:.1f} s after the route came "
          f"back ({versions[0][4] - t_cut:.1f} s after the cut)")
    assert versions[0][4] > t_mend, why("registered during the partition?", versions, t_mend)
    promo = json.loads((project / "reports" / "promotion.json").read_text())["decision"]
    expected = promo["candidate_version"] if promo["promoted"] else promo["champion_version"]
    assert reg["aliases"] == {"champion": str(expected)}, (reg["aliases"], promo["reason"])


def nothing_lost(before: dict, after: dict, flows: list[str], dispatched: str = "") -> None:
    """Nothing of census ``before`` lost in ``after``, no MLflow run left RUNNING, and the new
    flow runs (but the ``dispatched`` one and the champion's rollouts, triggered by the alias
    on the server, going their own way) exactly ``flows``, each COMPLETED."""
    print(f"after: {counts(after)}")
    assert set(map(str, before["runs"])) <= set(map(str, after["runs"]))
    assert lost_flow_runs(before["flow_runs"], after["flow_runs"]) == [], after["flow_runs"]
    assert after["studies"] == before["studies"]
    assert [r for r in after["runs"] if r[1] == "RUNNING"] == [], after["runs"]
    new_flows = [f for f in after["flow_runs"] if f[1] != "rlfn-serve" and
                 str(f) not in set(map(str, before["flow_runs"]))]
    assert sorted(f[2] for f in new_flows if f[0] != dispatched) == sorted(flows), new_flows
    assert all(f[3] == "COMPLETED" for f in new_flows), new_flows


@pytest.fixture(scope="module")
def team():
    with team_on_hosts(("w1",), join=("w1",)) as t:
        yield t


@pytest.mark.timeout(2700)
def test_worker_host_partitioned_while_a_stage_registers(team: Team):
    t = team
    w = t.workers["w1"]
    project = t.project("w1")
    # something recorded before, to count: 2 Optuna trials from the client host (its
    # PostgreSQL over TLS)
    assert t.client_py(STUDY, "0", "2") == [0, 1]
    before = t.client_py(CENSUS, MODEL)
    assert before["studies"], counts(before)
    print(f"\nbefore the dispatch: {counts(before)}")
    fp_env = json.dumps({"RLFN_FAILPOINTS": FP, "RLFN_FAILPOINT_DIR": FP_DIR,
                         "RLFN_FAILPOINT_TIMEOUT_S": "1200"})
    fid = deploy_run(t, "rlfn-repro/repro", "--job-variable", f"env={fp_env}")
    marker = project / FP_DIR / f"{FP}.reached"
    deadline = time.monotonic() + 1500  # a bound on waiting: prepare to stage 1's weights
    while not marker.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"failpoint {FP} not reached: {wait_runs(t, [fid], 1)}{t.logs()}")
        time.sleep(1)
    stage_pid = int(marker.read_text().split()[0])
    mid = t.client_py(REGISTRY, MODEL)
    assert mid["versions"] == [], mid  # held before the version: nothing registered yet

    t.net.cut("w1")
    t_cut = time.time()
    try:
        (project / FP_DIR / f"{FP}.release").touch()  # into the partition
        time.sleep(PARTITION_S)  # the fault's length (a clock sets it; nothing asserts on it)
        alive = os.path.exists(f"/proc/{stage_pid}")
    finally:
        t.net.mend("w1")
    t_mend = time.time()
    print(f"w1 cut off for {t_mend - t_cut:.1f} s; the stage still waiting at the end: {alive}")

    states = wait_runs(t, [fid], 1800)
    logs = t.logs()
    assert states[fid]["state"] == "COMPLETED", why(states, logs)
    registry_whole(t.client_py(REGISTRY, MODEL), t_cut, t_mend, project)
    # the worker on w1 back on the pool
    workers = t.client_py(WORKERS, "rlfn-pool")
    assert list(workers.values()) == ["ONLINE"], workers
    # nothing counted before lost; every run ended
    nothing_lost(before, t.client_py(CENSUS, MODEL), FLOW_RUNS, fid)
    # the worker host's clone: every stage's outputs as its dvc.lock says
    dvc = str(t.tools["w1"] / ".venv" / "bin" / "dvc")
    st = w.run([dvc, "status", "--json", "dvc.yaml"], cwd=project, timeout=300)
    assert json.loads(ok(st, "dvc status") or "{}") == {}, st.stdout
    retried = [x for x in logs.splitlines() if "Retrying" in x or "Error logging" in x]
    print("what the clients said in the partition (the worker log's tail):\n" +
          "\n".join(retried[-10:]))


@pytest.fixture(scope="module")
def stack():
    with stack_up("rlfn-chaos-net-", prepare=tiny_clone) as st:
        yield st


@pytest.mark.timeout(2700)
def test_route_to_the_tracking_server_cut_on_one_host_while_a_stage_registers(stack, tmp_path):
    # something recorded before, to count: stage prepare's run and flow run, 2 Optuna trials
    dvc(stack, "repro", "prepare", timeout=900)
    assert py(stack, STUDY, "0", "2") == [0, 1]
    before = census(stack)
    print(f"\nbefore the repro: {counts(before)}")
    assert before["runs"] and before["flow_runs"] and before["studies"], counts(before)
    cut = LoopbackCut(stack.ports["mlflow"])
    timer: list[threading.Timer] = []
    at: dict[str, float] = {}

    def fault() -> float:
        mid = py(stack, REGISTRY, MODEL)
        assert mid["versions"] == [], mid  # held before the version: nothing registered yet
        t = cut.cut()
        at["cut"] = time.time()
        timer.append(threading.Timer(PARTITION_S, cut.mend))
        timer[0].start()
        return t

    try:
        held = through_fault(stack, ["repro"], tmp_path / "fp", FP, fault, finish_s=1800)
    finally:
        if timer:
            timer[0].cancel()
            timer[0].join()
        cut.mend()
    print(f"route cut for {cut.mended_at - at['cut']:.1f} s; the repro ended "
          f"{held.after_fault_s:.1f} s after the cut")
    assert held.returncode == 0 and held.errors == [], held.out[-4000:]
    registry_whole(py(stack, REGISTRY, MODEL), at["cut"], cut.mended_at, stack.clone)
    nothing_lost(before, census(stack), [f for f in FLOW_RUNS if f != "prepare"])
    st = dvc(stack, "status", "--json", "dvc.yaml", timeout=300)
    assert json.loads(st.stdout or "{}") == {}, st.stdout
    retried = [x for x in held.lines if "Retrying" in x or "retry" in x.lower()]
    print("what the client said in the cut:\n" + "\n".join(retried[-10:]))
