"""Chaos (issue 24), PostgreSQL: the database every service keeps its state in, restarted
cleanly, and SIGKILLed under real work, against team mode's stack (scripts/stack.sh), no mocks.

Case 2: ``stack.sh down`` then ``up`` between two repros. A whole tiny ``dvc repro`` against
the stack (MLflow runs and metrics, three registered versions, the ``champion`` alias, every
stage's Prefect flow run) and an Optuna study of three trials in the stack's PostgreSQL; the
census of everything the services hold (chaosstack.CENSUS); ``down`` (PostgreSQL stopped with
every service) and ``up``; the census again: equal, item for item. Then a second repro
(stage 3 retrained: a new run, version 4, a new flow run) and a fourth trial: the numbering
goes on from what was kept, and everything of the first census is still there.

Case 1: PostgreSQL SIGKILLed (the postmaster and every process it started, at once) while
``train_stage@3`` trains and logs to the tracking server. The stage is held by failpoint
``train.step@3`` (its checkpoint of iteration 2 written, its MLflow run and Prefect flow run
open), the database killed there, by construction, and the stage released with the database
still down: its next logged row meets the MLflow server answering 503 (its database gone),
through the client's retries. Exactly: the stage fails with one ``error:`` line that says the
server's database is not available (MLflow's answer carries the driver's error, which names
PostgreSQL's address); a stage started meanwhile is refused before any work, naming the
database too. After ``stack.sh
up`` (PostgreSQL's crash recovery) everything the census counted before the kill is there as
it was; a rerun of ``dvc repro`` completes, and the stage's weights are bit-identical to the
undisturbed run's (resumed from its checkpoint, or retrained: both deterministic on CPU); the
killed stage's MLflow run is not left RUNNING; no version half-registered, the champion
unmoved; ``dvc status`` clean.

Marked ``chaos`` only: the tiny repro alone takes minutes on 2 cores (``pytest -m chaos``).
"""

from __future__ import annotations

import hashlib
import json
import re
import time

import pytest

from chaosstack import (STUDY, census, counts, kill_postgresql, lost_flow_runs,
                        one_more_version, restarted, settled, through_fault)
from teamstack import dvc, py, stack_up, why
from tinyproject import DVC_STAGES, tiny_clone

pytestmark = pytest.mark.chaos

TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def stack():
    with stack_up("rlfn-chaos-pg-", prepare=tiny_clone, times=TIMES) as st:
        yield st


@pytest.mark.timeout(2400)
def test_postgresql_restarted_cleanly_between_two_repros(stack):
    t = time.monotonic()
    out = dvc(stack, "repro", timeout=1800)
    TIMES["first dvc repro"] = time.monotonic() - t
    for stage in DVC_STAGES:
        assert f"{stage}: ready after" in out.stdout + out.stderr, stage
    assert py(stack, STUDY, "0", "3") == [0, 1, 2]

    before = settled(lambda: census(stack))  # the champion's rollout ended: nothing changes it meanwhile
    print(f"\nbefore the restart: {counts(before)}")
    # what the first repro must have left (else the comparison below proves little)
    assert [v[:2] for v in before["versions"]] == [[1, "READY"], [2, "READY"], [3, "READY"]]
    assert before["aliases"] == {"champion": "3"}, before["aliases"]
    assert len(before["flow_runs"]) >= len(DVC_STAGES), before["flow_runs"]
    assert all(fr[3] == "COMPLETED" for fr in before["flow_runs"]), before["flow_runs"]
    assert len(before["runs"]) > len(DVC_STAGES)  # the stages' runs and the repro's parent
    assert sum(len(r[3]) for r in before["runs"]) > 0
    assert [t[:2] for t in before["studies"]["chaos-pg"]] == \
        [[0, "COMPLETE"], [1, "COMPLETE"], [2, "COMPLETE"]]

    # the fault: every service down (PostgreSQL last), then up again
    t = time.monotonic()
    d = stack.sh("down")
    TIMES["stack down"] = time.monotonic() - t
    assert d.returncode == 0, d.stdout + d.stderr
    assert re.search(r"^postgresql\s+stopped", d.stdout, re.M), d.stdout
    st = stack.sh("status")
    assert st.returncode != 0 and re.search(r"^postgresql\s+DOWN", st.stdout, re.M), st.stdout
    t = time.monotonic()
    restarted(stack, "postgresql")
    TIMES["stack up after down (recovery)"] = time.monotonic() - t

    after = census(stack)
    print(f"after the restart: {counts(after)}")
    for key in ("runs", "versions", "aliases", "studies", "flow_runs"):
        assert after[key] == before[key], key
    assert after == before

    # the second repro, on the restarted stack: numbering goes on from what was kept
    t = time.monotonic()
    dvc(stack, "repro", "--force", "--single-item", "train_stage@3", timeout=1200)
    TIMES["second repro (train_stage@3)"] = time.monotonic() - t
    assert py(stack, STUDY, "1", "1") == [0, 1, 2, 3]
    final = census(stack)
    print(f"after the second repro: {counts(final)}")
    assert [v[:2] for v in final["versions"]] == \
        [v[:2] for v in before["versions"]] + [[4, "READY"]]
    assert final["versions"][:3] == before["versions"]
    assert final["aliases"] == before["aliases"]  # promote did not run: the champion stays
    assert set(map(str, before["runs"])) <= set(map(str, final["runs"]))
    new_runs = [r for r in final["runs"] if str(r) not in set(map(str, before["runs"]))]
    assert "train_stage@3" in {r[2] for r in new_runs}, new_runs
    assert set(map(str, before["flow_runs"])) <= set(map(str, final["flow_runs"]))
    new_flows = [f for f in final["flow_runs"] if str(f) not in set(map(str, before["flow_runs"]))]
    assert [(f[2], f[3]) for f in new_flows] == [("train-stage3", "COMPLETED")], new_flows
    assert final["studies"]["chaos-pg"][:3] == before["studies"]["chaos-pg"]
    print("\n".join(f"{k}: {v:.1f} s" for k, v in TIMES.items()))


CHECK = r'''
import json
from pipeline.services import ServiceError, check_services
try:
    print(json.dumps({"ok": check_services()}))
except ServiceError as e:
    print(json.dumps({"refused": str(e)}))
'''


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(3600)
def test_postgresql_killed_while_a_stage_logs(stack):
    weights = stack.clone / "models" / "stage3" / "model.safetensors"
    t = time.monotonic()
    dvc(stack, "repro", timeout=1800)  # the whole tiny pipeline (up to date after case 2)
    TIMES["case 1: repro before the fault"] = time.monotonic() - t
    undisturbed = _sha256(weights)
    py(stack, STUDY, "2", "2")
    before = census(stack)
    print(f"\nbefore the kill: {counts(before)}")
    assert before["aliases"] and "champion" in before["aliases"], before["aliases"]
    assert undisturbed in {v[3] for v in before["versions"]}, before["versions"]

    pg = str(stack.ports["pg"])

    def fault() -> float:
        mid = census(stack)  # the stage's run and flow run open on the servers
        assert [fr[1] for fr in mid["flow_runs"] if fr[3] == "RUNNING"] == ["rlfn-train"], \
            mid["flow_runs"]
        killed = kill_postgresql(stack.state)
        t_kill = time.monotonic()
        print(f"killed PostgreSQL: {len(killed)} processes")
        # a stage started now is refused before any work, naming the database
        refused = py(stack, CHECK)
        assert "refused" in refused and "its database is not available" in \
            refused["refused"], refused
        print(f"a stage's check meanwhile: {refused['refused']}")
        return t_kill

    held = through_fault(stack, ["repro", "--force", "--single-item", "train_stage@3"],
                         stack.state.parent / "failpoints-pg-killed", "train.step@3", fault)
    TIMES["case 1: fault: PostgreSQL killed -> stage exited"] = held.after_fault_s
    out, errors = held.out, held.errors
    assert held.returncode != 0, why("the stage rode through a database that stayed down",
                                     out[-6000:])
    assert len(errors) == 1, why(errors, out[-6000:])
    assert "its database is not available" in errors[0], why(errors[0], out[-6000:])
    print(f"the error line names PostgreSQL's port {pg}: {pg in errors[0]}; a traceback "
          f"printed (Prefect's own logger, case 4): {'Traceback' in out}")

    # PostgreSQL back (crash recovery): what the services held before the kill, as it was
    t = time.monotonic()
    restarted(stack, "postgresql")
    TIMES["case 1: stack up after the kill"] = time.monotonic() - t
    after = census(stack)
    print(f"after the restart: {counts(after)}")
    assert after["versions"] == before["versions"], why(before["versions"], after["versions"])
    assert after["aliases"] == before["aliases"]
    assert after["studies"] == before["studies"]
    assert set(map(str, before["runs"])) <= set(map(str, after["runs"])), \
        why(before["runs"], after["runs"])
    assert lost_flow_runs(before["flow_runs"], after["flow_runs"]) == [], \
        why(before["flow_runs"], after["flow_runs"])

    # a rerun completes; the weights are the undisturbed run's
    t = time.monotonic()
    dvc(stack, "repro", timeout=1800)
    TIMES["case 1: rerun"] = time.monotonic() - t
    assert _sha256(weights) == undisturbed
    result = json.loads((weights.parent / "result.json").read_text())
    print(f"the rerun's train_stage@3: resumed_from {result.get('resumed_from')}")
    st = dvc(stack, "status", "--json", "dvc.yaml")
    assert json.loads(st.stdout or "{}") == {}, st.stdout
    final = census(stack)
    print(f"after the rerun: {counts(final)}")
    one_more_version(before, final, undisturbed)
    new_runs = [r for r in final["runs"] if str(r) not in set(map(str, before["runs"]))]
    stage3 = [r[1] for r in new_runs if r[2] == "train_stage@3"]
    assert "RUNNING" not in stage3 and "FINISHED" in stage3, new_runs  # the killed one ended
    assert set(map(str, before["runs"])) <= set(map(str, final["runs"]))
    assert final["studies"] == before["studies"]
    print("\n".join(f"{k}: {v:.1f} s" for k, v in TIMES.items()))
