"""Chaos (issue 24), cases 4 and 3: the Prefect server, then the Prefect worker (with its flow
run, a host gone; then the worker process alone), SIGKILLed in the middle of real work,
against team mode's stack (scripts/stack.sh), no mocks.

Case 4, the Prefect server SIGKILLed while a stage runs. The data stages (``prepare``,
``degrade``, ``patches``) are reproduced against the stack: their flow runs are what was
recorded before the fault. Then ``dvc repro --single-item train_stage@1`` runs with failpoint
``train.step@2`` armed: the stage's flow run is RUNNING on the server, two iterations done. The
test SIGKILLs the Prefect server's process group there, by construction, and releases the
stage. Exactly: the stage either fails with one ``error:`` line naming the Prefect server, or
(its work done and recorded before the server's loss mattered) stands with one ``note:`` line
naming the server and saying so. It was a traceback and a failed stage, the work thrown away,
before this case. After ``stack.sh up`` every flow run recorded before the fault is still
there, as it was; a rerun of the same ``dvc repro`` leaves the stage up to date in ``dvc
status``. What became of the stage's own flow run (the server never heard its end) is printed.

Case 3, the worker SIGKILLed while it runs a ``repro`` deployment: the flow run, paused by
failpoint ``train.step@3`` inside ``train_stage@2`` (the checkpoint of iteration 2 written),
loses its worker and everything the worker ran (its process group and every process of the
flow run: a worker host gone). Exactly: the flow run does not stay RUNNING: the stack's
automation ``rlfn-crash-silent-flow-runs`` (its heartbeats stopped) marks it CRASHED, within
the automation's window plus a bound; after ``stack.sh up`` (the worker started again) a
rerun of the deployment completes, ``train_stage@2`` resumes from its checkpoint of
iteration 2, and ``dvc status`` is clean (no stage's outputs half-written). Its variant, the
worker process alone SIGKILLed (its flow run's processes left running, their output pipe's
reader gone): the flow run goes on and COMPLETES by itself, the restarted worker does not run
it again, ``dvc status`` is clean.

Marked ``chaos`` only: a stack of its own and four stages (minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time

import pytest

from chaosstack import (census, counts, lost_flow_runs, proc_state, restarted,
                        through_fault)
from faults import armed_env, release, wait_reached
from prereq import ROOT
from servers import _group_alive, processes_with_env, worker_under_keep
from teamstack import BIN, Stack, dvc, py, run, stack_up, why
from tinyproject import tiny_clone

pytestmark = pytest.mark.chaos

TIMES: dict[str, float] = {}
DATA = ("prepare", "degrade", "patches")
STAGE = "train_stage@1"
POINT, AT = "train.step", 2  # armed as train.step@2; its marker and release are train.step's


@pytest.fixture(scope="module")
def stack():
    with stack_up("rlfn-chaos-prefect-", prepare=tiny_clone, times=TIMES) as st:
        yield st


@pytest.mark.timeout(3600)  # the module's stack (1-6 min), three data stages, two of training
def test_prefect_server_killed_during_a_stage(stack):
    api = stack.client_env()["PREFECT_API_URL"]
    t = time.monotonic()
    dvc(stack, "repro", *DATA, timeout=900)
    TIMES["data stages"] = time.monotonic() - t
    before = census(stack)
    print(f"\nbefore the fault: {counts(before)}")
    assert sorted(fr[1] for fr in before["flow_runs"]) == \
        sorted(["rlfn-prepare", "rlfn-degrade", "rlfn-patches"]), before["flow_runs"]
    assert all(fr[3] == "COMPLETED" for fr in before["flow_runs"]), before["flow_runs"]

    running: list = []

    def fault() -> float:
        mid = census(stack)  # the stage's flow run, RUNNING on the server
        running[:] = [fr for fr in mid["flow_runs"] if fr[3] == "RUNNING"]
        assert [fr[1] for fr in running] == ["rlfn-train"], mid["flow_runs"]
        pid = int((stack.state / "run" / "prefect.pid").read_text().split()[0])
        os.killpg(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        while _group_alive(pid) and time.monotonic() < t_kill + 30:
            time.sleep(0.1)
        assert not _group_alive(pid), "the Prefect server survived SIGKILL"
        return t_kill

    held = through_fault(stack, ["repro", "--single-item", STAGE],
                         stack.state.parent / "failpoints-prefect-lost", f"{POINT}@{AT}", fault,
                         reach_s=600, finish_s=900)
    TIMES["fault: server killed -> stage exited"] = held.after_fault_s
    out, errors, lines = held.out, held.errors, held.lines
    if held.returncode != 0:  # failed: one line naming the server, nothing else
        assert len(errors) == 1, why(errors, out[-6000:])
        assert errors[0].startswith(f"error: Prefect server at {api}"), why(errors[0],
                                                                            out[-6000:])
    else:  # rode through: the work was done and recorded, one warning says the rest
        assert errors == [], why(errors, out[-6000:])
        stood = [x for x in lines if x.startswith(f"note: Prefect server at {api}: lost")]
        assert len(stood) == 1 and "was done and recorded before" in stood[0], \
            why(stood, out[-6000:])

    # the server back: what it recorded before the fault, as it was
    t = time.monotonic()
    restarted(stack, "prefect")
    TIMES["stack up after the kill"] = time.monotonic() - t
    after = census(stack)
    print(f"after the restart: {counts(after)}")
    assert lost_flow_runs(before["flow_runs"], after["flow_runs"]) == [], \
        why(before["flow_runs"], after["flow_runs"])
    assert after["studies"] == before["studies"]
    # no alias moved (before: no registered model, None; after: the stage's model, {})
    assert (after["aliases"] or {}) == (before["aliases"] or {}), after["aliases"]
    # the registry: what was there, and the stage's own version (registered before the end)
    assert after["versions"][:len(before["versions"])] == before["versions"], after["versions"]
    new = after["versions"][len(before["versions"]):]
    assert all(v[1] == "READY" for v in new), new  # nothing half-registered
    if held.returncode == 0:
        assert len(new) == 1, new  # the stage's version, once
    lost = [fr for fr in after["flow_runs"] if fr[0] == running[0][0]]
    print(f"the stage's own flow run after the restart: {lost}")

    # a rerun completes, and DVC has the stage up to date
    t = time.monotonic()
    rerun = dvc(stack, "repro", "--single-item", STAGE, timeout=900)
    TIMES["rerun of the stage"] = time.monotonic() - t
    assert f"{STAGE}: ready after" in rerun.stdout + rerun.stderr or held.returncode == 0, \
        rerun.stdout[-3000:] + rerun.stderr[-3000:]
    st = dvc(stack, "status", "--json", STAGE)
    assert st.stdout.strip() in ("{}", ""), st.stdout
    final = census(stack)
    done = [fr for fr in final["flow_runs"] if fr[1] == "rlfn-train" and fr[3] == "COMPLETED"]
    assert done or held.returncode == 0, final["flow_runs"]
    print("\n".join(f"{k}: {v:.1f} s" for k, v in TIMES.items()))


FLOW_RUN = r"""
import json, sys, time
from uuid import UUID
from prefect.client.orchestration import get_client
fid, want, limit = sys.argv[1], set(sys.argv[2].split(",")), float(sys.argv[3])
deadline = time.monotonic() + limit
with get_client(sync_client=True) as c:
    while True:
        fr = c.read_flow_run(UUID(fid))
        if (fr.state_type and fr.state_type.value in want) or time.monotonic() > deadline:
            break
        time.sleep(1)
print(json.dumps({"state": fr.state_type.value if fr.state_type else None,
                  "name": fr.state_name, "message": fr.state.message if fr.state else ""}))
"""


def _flow_run(stack: Stack, fid: str, want: str, limit_s: float) -> dict:
    """The flow run's state once its type is one of ``want`` (comma-separated), or after
    ``limit_s`` (a bound on waiting)."""
    return py(stack, FLOW_RUN, fid, want, str(limit_s), timeout=limit_s + 120)


def _deployment_run(stack: Stack, *args: str) -> str:
    r = run(stack, [str(BIN / "prefect"), "deployment", "run", "rlfn-repro/repro", *args],
            timeout=300)
    m = re.search(r"UUID: ([0-9a-f-]{36})", r.stdout)
    assert m, r.stdout + r.stderr
    return m.group(1)


@pytest.mark.timeout(3600)  # two repros from train_stage@2 on, and SILENT_S of silence
def test_worker_killed_during_a_repro(stack):
    sys.path.insert(0, str(ROOT / "scripts"))  # the stack's own figures (SILENT_S, ...)
    from stack import prefect_server

    point = "train.step"  # @3: the checkpoint of iteration 2 written
    fp = stack.state.parent / "failpoints-worker-lost"
    log = stack.state / "logs" / "worker.log"
    env = json.dumps(armed_env(fp, f"{point}@3"))
    fid = _deployment_run(stack, "--job-variable", f"env={env}")
    wait_reached(fp, point, None, limit_s=1500,
                 what=lambda: log.read_text(errors="replace")[-4000:])
    running = _flow_run(stack, fid, "RUNNING", 60)
    assert running["state"] == "RUNNING", running
    # the worker host gone: the worker's process group and every process of the flow run
    wpid = int((stack.state / "run" / "worker.pid").read_text().split()[0])
    os.killpg(wpid, signal.SIGKILL)
    t_kill = time.monotonic()
    procs = processes_with_env("PREFECT__FLOW_RUN_ID", fid)
    for pid in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print(f"\nkilled the worker's group ({wpid}) and the flow run's {len(procs)} processes")
    while (_group_alive(wpid) or processes_with_env("PREFECT__FLOW_RUN_ID", fid)) and \
            time.monotonic() < t_kill + 30:
        time.sleep(0.1)
    assert not processes_with_env("PREFECT__FLOW_RUN_ID", fid), "the flow run survived"
    assert procs, "the flow run had no process of its own to kill"

    # the automation ends it: silent for SILENT_S (after its last heartbeat), then CRASHED
    bound = prefect_server.SILENT_S + 2 * prefect_server.HEARTBEAT_S + 120
    ended = _flow_run(stack, fid, "CRASHED,COMPLETED,FAILED,CANCELLED", bound)
    TIMES["fault: worker killed -> flow run CRASHED"] = time.monotonic() - t_kill
    print(f"flow run {fid}: {ended} "
          f"{TIMES['fault: worker killed -> flow run CRASHED']:.1f} s after the kill")
    assert ended["state"] == "CRASHED", ended
    assert prefect_server.ZOMBIE in (ended["message"] or ""), ended

    # the worker back; a rerun completes, train_stage@2 from its checkpoint
    t = time.monotonic()
    restarted(stack, "worker")
    TIMES["stack up after the worker's kill"] = time.monotonic() - t
    t = time.monotonic()
    again = _deployment_run(stack)
    done = _flow_run(stack, again, "COMPLETED,FAILED,CRASHED,CANCELLED", 1800)
    TIMES["rerun of the repro"] = time.monotonic() - t
    assert done["state"] == "COMPLETED", why(done, log.read_text(errors="replace")[-6000:])
    result = json.loads((stack.clone / "models" / "stage2" / "result.json").read_text())
    assert result["resumed_from"] == 2, result
    st = dvc(stack, "status", "--json", "dvc.yaml")  # the pipeline (not experiments/)
    assert json.loads(st.stdout or "{}") == {}, st.stdout
    # the killed stage's MLflow run: KILLED by the rerun's first stage (its flow run CRASHED),
    # not RUNNING for ever (tracking.settle_orphans)
    runs = census(stack)["runs"]
    assert [r for r in runs if r[1] == "RUNNING"] == [], runs
    killed = [r[2] for r in runs if r[1] == "KILLED"]  # and its repro's parent run (no stage)
    assert "train_stage@2" in killed and set(killed) <= {"train_stage@2", None}, runs
    print("\n".join(f"{k}: {v:.1f} s" for k, v in TIMES.items()))


@pytest.mark.timeout(3600)  # a repro (from the module's state, or the whole tiny pipeline)
def test_worker_alone_killed_during_a_repro(stack):
    """Case 3 as the issue words it: the worker process alone SIGKILLed (the worker's host
    stays; the flow run's process, its child, is left running) while it runs a ``repro``
    deployment, held at failpoint ``train.step@3`` in the first training stage it reruns
    (``models/stage3`` removed first, so one does). The flow run's process then has no reader
    of its output (the worker held the pipe). Exactly: the flow run ends, and ends COMPLETED
    (its process rides through: Prefect's console logging meets the broken pipe and goes on,
    heartbeats and state changes go to the server, not through the worker); nobody ran it
    twice: the worker the stack's ``keep.py`` starts again (no ``up`` needed) does not take
    it; every stage's outputs are as ``dvc.lock`` says (``dvc status`` clean)."""
    point = "train.step"
    fp = stack.state.parent / "failpoints-worker-alone"
    log = stack.state / "logs" / "worker.log"
    shutil.rmtree(stack.clone / "models" / "stage3", ignore_errors=True)
    env = json.dumps(armed_env(fp, f"{point}@3"))
    fid = _deployment_run(stack, "--job-variable", f"env={env}")
    wait_reached(fp, point, None, limit_s=1500,
                 what=lambda: log.read_text(errors="replace")[-4000:])
    assert _flow_run(stack, fid, "RUNNING", 60)["state"] == "RUNNING"
    procs = processes_with_env("PREFECT__FLOW_RUN_ID", fid)
    assert procs, "the flow run has no process of its own"
    # the worker process: the child of the stack's keep.py (run/worker.pid) running
    # `prefect worker start`
    keeper, wpid = worker_under_keep(stack.state)
    assert wpid not in procs, (wpid, procs)
    os.kill(wpid, signal.SIGKILL)  # the worker only: its children stay
    t_kill = time.monotonic()
    while proc_state(wpid) not in "ZX" and time.monotonic() < t_kill + 30:
        time.sleep(0.1)
    left = processes_with_env("PREFECT__FLOW_RUN_ID", fid)
    print(f"\nkilled the worker ({wpid}); the flow run's processes left: {len(left)}")
    assert left, "the flow run's processes died with the worker"
    release(fp, point)

    ended = _flow_run(stack, fid, "COMPLETED,FAILED,CRASHED,CANCELLED", 1800)
    TIMES["worker alone killed -> flow run ended"] = time.monotonic() - t_kill
    print(f"flow run {fid}: {ended} "
          f"{TIMES['worker alone killed -> flow run ended']:.1f} s after the kill")
    assert ended["state"] == "COMPLETED", why(ended, log.read_text(errors="replace")[-6000:])
    _gone(fid, "the flow run's processes stay after it COMPLETED")

    # keep.py has started the worker again (no `up` needed): ONLINE on the pool
    deadline = time.monotonic() + 120  # a bound on waiting
    while stack.sh("status").returncode != 0:
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(2)
    assert re.search(r"keep: worker exited -9 after \d+ s; starting it again",
                     log.read_text(errors="replace")), log.read_text(errors="replace")[-3000:]
    TIMES["worker alone killed -> started again by keep.py, ONLINE"] = \
        time.monotonic() - t_kill
    time.sleep(10)  # ten polls of the new worker (RLFN_STACK_WORKER_POLL_S=1): none takes it
    again = _flow_run(stack, fid, "COMPLETED", 60)
    assert again["state"] == "COMPLETED", again
    assert not processes_with_env("PREFECT__FLOW_RUN_ID", fid), "the flow run started again"
    st = dvc(stack, "status", "--json", "dvc.yaml")
    assert json.loads(st.stdout or "{}") == {}, st.stdout
    assert (stack.clone / "models" / "stage3" / "model.safetensors").is_file()
    print("\n".join(f"{k}: {v:.1f} s" for k, v in TIMES.items()))



def _gone(fid: str, what: str, limit_s: float = 60) -> None:
    """Every process of flow run ``fid`` exits within ``limit_s`` (a bound on waiting)."""
    deadline = time.monotonic() + limit_s
    while processes_with_env("PREFECT__FLOW_RUN_ID", fid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_with_env("PREFECT__FLOW_RUN_ID", fid), what
