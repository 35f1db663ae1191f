"""Chaos (issue 24), cases 2, 1 and 4 on the multi-host layout: the server host's PostgreSQL
restarted cleanly, then SIGKILLed, then its Prefect server SIGKILLed, while worker host ``w1``
does the work (tests/teamhosts.py:
the server host's stack off loopback over TLS, ``w1`` joined, a client host; no shared disk),
no mocks.

Case 2: from the client, 2 Optuna trials and a whole tiny ``rlfn-repro/repro`` run by ``w1``;
then ``stack.sh down`` and ``up`` on the server host. Exactly: the census the client takes
before (MLflow runs and metrics, versions, aliases, trials, flow runs) equals the one after;
a second repro dispatched from the client is taken by ``w1``'s worker, which outlived the
server's absence on its own host, and COMPLETES.

Case 1: ``w1``'s ``train_stage@3`` (its outputs removed, so the repro reruns it) held at
failpoint ``train.step@3``; the server host's PostgreSQL SIGKILLed (the postmaster and every
backend at once) and the stage released with the database down. Exactly: ``w1``'s worker log
holds the stage's one ``error:`` line saying the tracking server's database is not available
(read across hosts, through nginx); after ``up`` on the server (crash recovery) the flow run
ends (FAILED, or CRASHED by the automation: it could not record its end meanwhile; the test
says which) and everything the client counted before is there; a rerun dispatched again COMPLETES on
``w1`` with weights bit-identical to the undisturbed run's, registered once more, READY; no
MLflow run left RUNNING; ``dvc status`` clean on ``w1``.

Case 4: ``w1``'s ``train_stage@3`` (a repro dispatched from the client with ``targets``:
that stage alone) held at ``train.step@2``, the server host's Prefect server SIGKILLed (its
process group) and the stage released with the server dead. Exactly: ``w1``'s worker log holds
one line naming the Prefect server (the stage stands, its work done and recorded: ``note:``;
or it fails: ``error:``); after ``up`` on the server both flow runs the dead server last saw
RUNNING (the repro's and the stage's) end, within the automation's window and a bound (the
test prints which state, and when); every flow run, run, trial recorded before is there, the
champion unmoved, a standing stage's version registered once, READY, with the undisturbed
weights; a rerun dispatched again COMPLETES on ``w1`` (nothing left to do when the stage
stood), ``dvc status`` clean there, no MLflow run RUNNING.

``w1``'s worker polls every 10 s here (Prefect's default), so it outlives the outage. Found by
this case at the tests' usual 1 s: after 45 s of failed polls the worker exits (Prefect's
``critical_service_loop``) and the flow runs it started end with it; nothing started it again.
The stack now runs every worker under ``scripts/stack/keep.py`` (started again when it exits;
``tests/test_stack.py``).

Marked ``chaos`` only: three hosts, a stack, five repros and three faults (about 20 minutes).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time

import pytest

from chaosstack import (CENSUS, MODEL, STUDY, counts, kill_postgresql, lost_flow_runs,
                        one_more_version, settled)
from faults import armed_env, release, wait_reached
from prereq import ROOT
from servers import _group_alive
from teamhosts import Team, deploy_run, ok, team_on_hosts, wait_runs
from teamstack import why

pytestmark = pytest.mark.chaos

TIMES: dict[str, float] = {}
# a pipeline line in a worker's log: as the flow run's Prefect logger prints it
# ("12:00:00.000 | WARNING | rlfn.pipeline.dvcops - note: ..."), or bare (a failure's tail)
SAID = re.compile(r"(?:^|\| [\w.]+ - )((?:error|note): .*)$")


@pytest.fixture(scope="module")
def team():
    # w1's worker polls every 10 s (Prefect's default): it outlives a minute without the
    # server's database (it exits after 3 failed polls in 4 backoff rounds: 450 s at 10 s, 45 s
    # at the tests' usual 1 s; scripts/stack/keep.py starts it again then)
    with team_on_hosts(("w1",), join=("w1",), poll_s="10") as t:
        yield t


def _settled(t: Team) -> dict:
    return settled(lambda: t.client_py(CENSUS, MODEL))


def _srv(t: Team, *args: str, timeout: float = 900) -> str:
    r = t.srv.run(["bash", t.stack_sh, *args], timeout=timeout, **t.srv_env)
    return ok(r, f"server: stack.sh {' '.join(args)}")


def _repro_on_w1(t: Team, *args: str, limit: float = 2400) -> dict:
    fid = deploy_run(t, "rlfn-repro/repro", *args)
    done = wait_runs(t, [fid], limit)[fid]
    assert done["state"] == "COMPLETED", (done, t.logs())
    assert t.runner_of(fid) == ["w1"], t.logs()
    return done


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _up_after_the_fault(t: Team, service: str, label: str) -> float:
    """``up`` on the server host after a fault: it starts ``service`` again (not "already
    up"); timed as ``label``; the ``time.monotonic()`` it began."""
    tu = time.monotonic()
    up = _srv(t, "up", "--host", t.srv.addr)
    TIMES[label] = time.monotonic() - tu
    assert re.search(rf"^{service}\s+started", up, re.M), up
    return tu


def _ended(t: Team, ids: list[str]) -> dict:
    """The flow runs ``ids`` once each is final: waited for within the automation's window
    (``SILENT_S`` of no heartbeat) and a bound."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from stack import prefect_server

    return wait_runs(t, ids, prefect_server.SILENT_S + 2 * prefect_server.HEARTBEAT_S + 180)


def _stage3_undisturbed(t: Team) -> tuple:
    """``w1``'s ``train_stage@3`` weights (the pipeline run first when the test runs alone),
    their sha256, and the settled census before the fault."""
    weights = t.project("w1") / "models" / "stage3" / "model.safetensors"
    if not weights.exists():
        _repro_on_w1(t)
    undisturbed = _sha256(weights)
    before = _settled(t)
    print(f"\nbefore the kill: {counts(before)}")
    return weights, undisturbed, before


def _rerun_on_w1(t: Team, label: str, weights, undisturbed: str) -> dict:
    """A repro dispatched again, COMPLETED on ``w1`` (timed as ``label``): the undisturbed
    weights (bit-identical), ``dvc status`` clean there; the settled census after it."""
    tr = time.monotonic()
    _repro_on_w1(t)
    TIMES[label] = time.monotonic() - tr
    assert _sha256(weights) == undisturbed
    dvc = str(t.tools["w1"] / ".venv" / "bin" / "dvc")
    st = t.workers["w1"].run([dvc, "status", "--json", "dvc.yaml"], cwd=t.project("w1"),
                             timeout=300)
    assert json.loads(ok(st, "dvc status on w1") or "{}") == {}, st.stdout
    final = _settled(t)
    print(f"after the rerun: {counts(final)}")
    return final


@pytest.mark.timeout(2700)
def test_server_restarted_between_two_repros_on_a_worker_host(team: Team):
    t = team
    assert t.client_py(STUDY, "0", "2") == [0, 1]
    tr = time.monotonic()
    _repro_on_w1(t)
    TIMES["case 2: the first repro on w1"] = time.monotonic() - tr
    before = _settled(t)
    print(f"\nbefore down: {counts(before)}")
    assert before["versions"] and before["aliases"], counts(before)
    td = time.monotonic()
    _srv(t, "down", timeout=300)
    TIMES["case 2: server down"] = time.monotonic() - td
    _up_after_the_fault(t, "postgresql", "case 2: server up")
    after = _settled(t)
    print(f"after up: {counts(after)}")
    assert after == before, (counts(before), counts(after))
    tr = time.monotonic()
    _repro_on_w1(t)  # w1's worker, never restarted, takes it
    TIMES["case 2: the second repro on w1"] = time.monotonic() - tr
    print("\n".join(f"{k}: {v:.1f} s" for k, v in TIMES.items()))


@pytest.mark.timeout(2700)
def test_postgresql_killed_while_a_worker_hosts_stage_logs(team: Team):
    t = team
    w1 = t.workers["w1"]
    weights, undisturbed, before = _stage3_undisturbed(t)
    assert undisturbed in {v[3] for v in before["versions"]}, before["versions"]

    shutil.rmtree(weights.parent)  # the repro reruns train_stage@3 (and what follows it)
    fp = w1.home / "failpoints-pg"
    env = json.dumps(armed_env(fp, "train.step@3"))
    shutil.chown(fp, w1.user, w1.user)
    fid = deploy_run(t, "rlfn-repro/repro", "--job-variable", f"env={env}")
    wait_reached(fp, "train.step", None, limit_s=1500, what=t.logs)
    killed = kill_postgresql(t.state)
    t_kill = time.monotonic()
    print(f"killed the server host's PostgreSQL: {len(killed)} processes")
    release(fp, "train.step")
    # the stage gives up after the clients' retries: one error line, in w1's worker log
    log = t.wstate["w1"] / "logs" / "worker.log"
    deadline = time.monotonic() + 600  # a bound on waiting
    while not (errors := [x for x in log.read_text(errors="replace").splitlines()
                          if x.startswith("error:")]):
        assert time.monotonic() < deadline, t.logs()
        time.sleep(1)
    TIMES["case 1: PostgreSQL killed -> the stage's error line"] = time.monotonic() - t_kill
    time.sleep(5)  # the rest of what the stage printed
    errors = [x for x in log.read_text(errors="replace").splitlines() if x.startswith("error:")]
    print(f"w1's error lines: {errors}")
    assert len(set(errors)) == 1 and errors[0].startswith(
        f"error: MLflow tracking server at https://{t.srv.addr}:") and \
        "its database is not available" in errors[0], (errors, t.logs())

    # PostgreSQL back (crash recovery); the flow run, which could not record its end while
    # the database was down, ends: FAILED by its own process (the Prefect client's retries
    # outlasting the outage), or CRASHED by the automation
    tu = _up_after_the_fault(t, "postgresql", "case 1: server up (crash recovery)")
    ended = _ended(t, [fid])[fid]
    TIMES["case 1: up -> flow run ended"] = time.monotonic() - tu
    print(f"the held repro's flow run: {ended}")
    assert ended["state"] in ("FAILED", "CRASHED"), (ended, t.logs())
    after = t.client_py(CENSUS, MODEL)
    print(f"after up: {counts(after)}")
    assert after["versions"] == before["versions"] and after["aliases"] == before["aliases"]
    assert after["studies"] == before["studies"]
    assert set(map(str, before["runs"])) <= set(map(str, after["runs"]))
    assert lost_flow_runs(before["flow_runs"], after["flow_runs"]) == [], after["flow_runs"]

    final = _rerun_on_w1(t, "case 1: rerun on w1", weights, undisturbed)
    one_more_version(before, final, undisturbed)
    assert [r for r in final["runs"] if r[1] == "RUNNING"] == [], final["runs"]
    print("\n".join(f"{k}: {v:.1f} s" for k, v in TIMES.items()))


@pytest.mark.timeout(2700)
def test_prefect_server_killed_while_a_worker_hosts_stage_runs(team: Team):
    """Case 4 across hosts: the server host's Prefect server SIGKILLed (its process group)
    while ``w1``'s ``train_stage@3`` (the repro dispatched from the client, ``targets``: that
    stage only) is held at ``train.step@2``, then released with the server dead."""
    t = team
    w1 = t.workers["w1"]
    weights, undisturbed, before = _stage3_undisturbed(t)

    shutil.rmtree(weights.parent)  # the repro reruns train_stage@3
    log = t.wstate["w1"] / "logs" / "worker.log"
    start = log.stat().st_size  # case 1's lines, when it ran, are before this
    fp = w1.home / "failpoints-prefect"
    env = json.dumps(armed_env(fp, "train.step@2"))
    shutil.chown(fp, w1.user, w1.user)
    fid = deploy_run(t, "rlfn-repro/repro", "--params", json.dumps(
        {"targets": ["train_stage@3"]}), "--job-variable", f"env={env}")
    wait_reached(fp, "train.step", None, limit_s=1500, what=t.logs)
    mid = t.client_py(CENSUS, MODEL)  # the repro's and the stage's flow runs, RUNNING
    running = {fr[1]: fr[0] for fr in mid["flow_runs"] if fr[3] == "RUNNING"}
    assert sorted(running) == ["rlfn-repro", "rlfn-train"] and running["rlfn-repro"] == fid, \
        mid["flow_runs"]
    pid = int((t.state / "run" / "prefect.pid").read_text().split()[0])
    os.killpg(pid, signal.SIGKILL)
    t_kill = time.monotonic()
    while _group_alive(pid):
        assert time.monotonic() < t_kill + 30, "the Prefect server survived SIGKILL"
        time.sleep(0.1)
    release(fp, "train.step")

    # the stage's end, in w1's worker log (what it wrote since the dispatch): one line naming
    # the Prefect server (stood or failed)
    server = f"Prefect server at https://{t.srv.addr}:"

    def since() -> list[str]:
        with open(log, "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace").splitlines()

    def said() -> list[str]:  # the pipeline's error lines, and notes naming the server
        found = [m.group(1) for x in since() if (m := SAID.search(x))]
        return [x for x in found if x.startswith("error:") or x.startswith(f"note: {server}")]

    def story() -> str:  # what w1's worker logged since the dispatch, tracebacks' frames left out
        return "\n".join(x for x in since() if x[:1] not in (" ", "\t", "^"))[-20000:]

    deadline = time.monotonic() + 900  # a bound on waiting (Prefect's client retries)
    while not said():
        assert time.monotonic() < deadline, story()
        time.sleep(1)
    TIMES["case 4: Prefect server killed -> the stage's line"] = time.monotonic() - t_kill
    time.sleep(5)  # the rest of what the stage printed
    lines = said()
    print(f"w1's lines: {lines}")
    assert len(set(lines)) == 1, why(lines, story())
    stood = lines[0].startswith("note:")
    if stood:
        assert "was done and recorded before, so it stands" in lines[0], lines
    else:
        assert lines[0].startswith(f"error: {server}"), why(lines, story())

    tu = _up_after_the_fault(t, "prefect", "case 4: server up")
    # both flow runs the dead server last saw RUNNING end (the automation, or their process)
    ended = _ended(t, [fid, running["rlfn-train"]])
    TIMES["case 4: up -> both flow runs ended"] = time.monotonic() - tu
    print(f"the repro's and the stage's flow runs: {ended}")
    assert all(e["state"] in ("COMPLETED", "FAILED", "CRASHED") for e in ended.values()), \
        (ended, t.logs())
    after = t.client_py(CENSUS, MODEL)
    print(f"after up: {counts(after)}")
    assert lost_flow_runs(before["flow_runs"], after["flow_runs"]) == [], after["flow_runs"]
    assert after["studies"] == before["studies"] and after["aliases"] == before["aliases"]
    assert set(map(str, before["runs"])) <= set(map(str, after["runs"]))
    if stood:  # the stage's version, registered once, whole, before the end went unrecorded
        one_more_version(before, after, undisturbed)
    else:
        assert after["versions"][:len(before["versions"])] == before["versions"]

    final = _rerun_on_w1(t, "case 4: rerun on w1", weights, undisturbed)
    if stood:  # the rerun found the stage up to date: nothing more registered
        one_more_version(before, final, undisturbed)
    else:  # what the failed stage registered (if it got that far) and the rerun's, READY
        new = final["versions"][len(before["versions"]):]
        assert new and all(v[1] == "READY" for v in new) and new[-1][3] == undisturbed, new
    assert [r for r in final["runs"] if r[1] == "RUNNING"] == [], final["runs"]
    print("\n".join(f"{k}: {v:.1f} s" for k, v in TIMES.items()))
