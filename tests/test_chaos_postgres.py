"""Chaos (issue 24), PostgreSQL: the database every service keeps its state in, restarted
cleanly under real work, against team mode's stack (scripts/stack.sh), no mocks.

Case 2: ``stack.sh down`` then ``up`` between two repros. A whole tiny ``dvc repro`` against
the stack (MLflow runs and metrics, three registered versions, the ``champion`` alias, every
stage's Prefect flow run) and an Optuna study of three trials in the stack's PostgreSQL; the
census of everything the services hold (chaosstack.CENSUS); ``down`` (PostgreSQL stopped with
every service) and ``up``; the census again: equal, item for item. Then a second repro
(stage 3 retrained: a new run, version 4, a new flow run) and a fourth trial: the numbering
goes on from what was kept, and everything of the first census is still there.

Marked ``chaos`` only: the tiny repro alone takes minutes on 2 cores (``pytest -m chaos``).
"""

from __future__ import annotations

import re
import time

import pytest

from chaosstack import census, counts, restarted
from tinyproject import tiny_clone
from teamstack import dvc, py, stack_up
from tinyproject import DVC_STAGES

pytestmark = pytest.mark.chaos

TIMES: dict[str, float] = {}

STUDY = r'''
import json, os, sys
import optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(study_name="chaos-pg", load_if_exists=True,
                            storage=os.environ["RLFN_OPTUNA_STORAGE"],
                            sampler=optuna.samplers.RandomSampler(seed=int(sys.argv[1])))
study.optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.25) ** 2, n_trials=int(sys.argv[2]))
print(json.dumps([t.number for t in study.get_trials()]))
'''


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

    before = census(stack)
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
