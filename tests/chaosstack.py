"""What the chaos tests (``-m chaos``, issue 24) share: a team stack whose clone is tiny
(test_pipeline's params, 4 training images, committed before ``up``), clients run in processes
of their own, and ``census``: everything the stack's services hold that a fault must not lose,
counted by asking each service (MLflow's runs and their metrics, the registry's versions and
aliases, every Optuna study's trials in PostgreSQL, Prefect's flow runs), so a case compares
one census before the fault with one after."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from faults import armed_env, pump_lines, release, wait_reached
from servers import children
from teamstack import BIN, Stack, py

MODEL = "rlfn-x4"

# One client process: every MLflow run of the experiment (status, latest metrics), the
# registered model's versions and aliases, every Optuna study's trials, every Prefect flow run.
CENSUS = r'''
import asyncio, json, os, sys
import optuna
from mlflow import MlflowClient
from prefect.client.orchestration import get_client

c = MlflowClient()
exp = c.get_experiment_by_name("rlfn")
runs = c.search_runs([exp.experiment_id], max_results=5000) if exp else []
name = sys.argv[1]
try:
    aliases = dict(c.get_registered_model(name).aliases or {})
except Exception:
    aliases = None
versions = sorted(([int(v.version), str(v.status), v.run_id,
                    (v.tags or {}).get("rlfn.weights_sha256")]
                   for v in c.search_model_versions(f"name = '{name}'")), key=lambda v: v[0])
optuna.logging.set_verbosity(optuna.logging.WARNING)
storage = os.environ["RLFN_OPTUNA_STORAGE"]
studies = {}
for s in optuna.get_all_study_summaries(storage=storage):
    st = optuna.load_study(study_name=s.study_name, storage=storage)
    studies[s.study_name] = sorted([t.number, t.state.name, t.params, t.values]
                                   for t in st.get_trials(deepcopy=False))

async def flow_runs():
    async with get_client() as client:
        flows = {f.id: f.name for f in await client.read_flows(limit=200)}
        out = []
        while True:
            page = await client.read_flow_runs(limit=200, offset=len(out))
            out += page
            if len(page) < 200:
                return sorted([str(r.id), flows.get(r.flow_id), r.name, r.state_type.value]
                              for r in out)

print(json.dumps({
    "runs": sorted([r.info.run_id, r.info.status, r.data.tags.get("dvc_stage"),
                    dict(sorted(r.data.metrics.items()))] for r in runs),
    "versions": versions, "aliases": aliases, "studies": studies,
    "flow_runs": asyncio.run(flow_runs())}))
'''


# One client process: the Optuna study ``chaos-pg`` in the stack's PostgreSQL, N more trials
# (argv: sampler seed, N); prints every trial's number.
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


# One client process: the registered model's (argv) versions [number, status, run, stage,
# created s] and aliases.
REGISTRY = r"""
import json, sys
from mlflow import MlflowClient
c = MlflowClient()
name = sys.argv[1]
vs = c.search_model_versions(f"name = '{name}'")
runs = {v.run_id: c.get_run(v.run_id).data.tags.get("dvc_stage") for v in vs}
print(json.dumps({"versions": sorted([int(v.version), str(v.status), v.run_id, runs[v.run_id],
                                      v.creation_timestamp / 1000] for v in vs),
                  "aliases": dict(c.get_registered_model(name).aliases or {}) if vs else {}}))
"""


def census(stack: Stack) -> dict:
    """Everything the services hold (module docstring), as plain JSON values."""
    return py(stack, CENSUS, MODEL)


def settled(read: Callable[[], dict], limit_s: float = 600) -> dict:
    """The census ``read()`` takes (``census`` of a stack, or the client host's ``CENSUS`` across
    hosts), once no flow run is still going: the champion's rollout, which the alias triggers
    on its own, runs for a minute after a repro ends, and a census taken meanwhile differs from
    any later one by that run's state. AssertionError naming the runs still going after
    ``limit_s`` (a bound on waiting)."""
    deadline = time.monotonic() + limit_s
    while True:
        c = read()
        going = [fr for fr in c["flow_runs"] if fr[3] not in FINAL]
        if not going:
            return c
        assert time.monotonic() < deadline, f"flow runs not final after {limit_s:g} s: {going}"
        time.sleep(5)


def counts(c: dict) -> dict:
    """The census in figures (for the report lines)."""
    return {"runs": len(c["runs"]), "metrics": sum(len(r[3]) for r in c["runs"]),
            "versions": len(c["versions"]), "aliases": c["aliases"],
            "trials": {k: len(v) for k, v in c["studies"].items()},
            "flow_runs": len(c["flow_runs"])}


def one_more_version(before: dict, after: dict, sha256: str) -> None:
    """Census ``after`` holds ``before``'s versions as they were and exactly one more, READY,
    with weights ``sha256`` (registered once, whole); the aliases unmoved (the same weights:
    the champion stays)."""
    assert after["versions"][:len(before["versions"])] == before["versions"], after["versions"]
    new = after["versions"][len(before["versions"]):]
    assert [(v[1], v[3]) for v in new] == [("READY", sha256)], new
    assert after["aliases"] == before["aliases"], (before["aliases"], after["aliases"])


FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def lost_flow_runs(before: list, after: list) -> list:
    """The flow runs of census ``before`` that census ``after`` lost: one in a final state must
    be there unchanged; one not yet final then (a rollout the champion's alias triggered, still
    at its canary) by its id, in whatever state it reached."""
    exact = set(map(str, after))
    ids = {fr[0] for fr in after}
    return [fr for fr in before
            if (str(fr) not in exact if fr[3] in FINAL else fr[0] not in ids)]


def restarted(stack: Stack, service: str) -> str:
    """``stack.sh up`` after a fault: it succeeds and starts ``service`` again (not "already
    up": a stale pid or a half-dead daemon would say that); its output."""
    r = stack.sh("up")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(rf"^{re.escape(service)}\s+started", r.stdout, re.M), r.stdout
    return r.stdout


def kill_postgresql(state: Path) -> list[int]:
    """SIGKILL the PostgreSQL of the stack whose state directory is ``state``: the postmaster
    (``postmaster.pid``) and every process it started (backends, checkpointer, WAL writer, ...)
    at once, as a crashed host leaves it: no shutdown checkpoint, the lock file stale. Returns the pids, all gone when it returns
    (AssertionError after 30 s otherwise: a bound on waiting)."""
    pid = int((state / "postgres" / "data" / "postmaster.pid").read_text().split()[0])
    family = [pid, *children(pid)]
    for p in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{p}").exists() and proc_state(p) != "Z" for p in family):
        assert time.monotonic() < deadline, f"PostgreSQL survived SIGKILL: {family}"
        time.sleep(0.05)
    return family


def proc_state(pid: int) -> str:
    """A process's state letter (``Z`` a zombie), ``X`` when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


@dataclass
class Held:
    """How a stage that ``through_fault`` held ended: its exit code, every line it printed, and
    the seconds from the fault to its exit."""

    returncode: int
    lines: list[str]
    after_fault_s: float

    @property
    def out(self) -> str:
        return "\n".join(self.lines)

    @property
    def errors(self) -> list[str]:
        return [x for x in self.lines if x.startswith("error:")]


def through_fault(stack: Stack, dvc_args: list[str], fp: Path, point: str,
                  fault: Callable[[], float], reach_s: float = 900,
                  finish_s: float = 1200) -> Held:
    """``dvc DVC_ARGS`` in the stack's clone (a client's environment), held at failpoint
    ``point`` (``NAME@VALUE``; markers in ``fp``); there, ``fault()`` (it returns the
    ``time.monotonic()`` of the fault itself); then the stage released and waited for. If the
    test fails meanwhile, the stage is killed and its last lines printed. Prints the exit, the
    ``error:`` lines and the last lines."""
    name = point.split("@")[0]
    lines: list[str] = []
    stage = subprocess.Popen([str(BIN / "dvc"), *dvc_args], cwd=stack.clone,
                             env=stack.client_env(**armed_env(fp, point)),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    reader = pump_lines(stage, lines)
    try:
        wait_reached(fp, name, stage, limit_s=reach_s, what=lambda: "\n".join(lines[-60:]))
        t_fault = fault()
        release(fp, name)
        stage.wait(timeout=finish_s)
        reader.join(timeout=10)
        held = Held(stage.returncode, lines, time.monotonic() - t_fault)
    finally:
        if stage.poll() is None:
            os.killpg(stage.pid, signal.SIGKILL)
            stage.wait(timeout=30)
            print("\nthe stage, killed by the test; its last lines:\n" + "\n".join(lines[-80:]))
    print(f"stage exit {held.returncode}, {held.after_fault_s:.1f} s after the fault; error "
          "lines:\n" + "\n".join(held.errors) + "\n--- last lines:\n" + "\n".join(lines[-25:]))
    return held


class LoopbackCut:
    """On one host, the route to a server cut with iproute2's tools (what ``Net.cut`` is for
    the multi-host layout): ``lo``'s queue made an ``htb`` whose ``u32`` filter sends every
    packet addressed *to* ``port`` (a client's SYN, request or ACK) into a class whose queue
    holds nothing (``pfifo limit 0``: dropped), so a connect times out and an open connection
    hears nothing, nothing is refused; the server's answers (from the port) and every other
    port take the default class, unlimited. (This kernel has the ``u32`` classifier but no
    ``drop`` action module, nor ``prio`` or ``netem``.) ``cut()`` refuses a ``lo`` with a
    queue discipline of someone else's; ``mend()`` restores the default. Root only."""

    def __init__(self, port: int):
        self.port, self.on, self.mended_at = port, False, 0.0
        self._lock = threading.Lock()

    @staticmethod
    def _tc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30)
        assert not check or r.returncode == 0, f"tc {' '.join(args)}: {r.stderr.strip()}"
        return r

    def cut(self) -> float:
        """Cut; the ``time.monotonic()`` of the cut."""
        shown = self._tc("qdisc", "show", "dev", "lo").stdout
        assert "htb" not in shown and "pfifo " not in shown, f"lo has a qdisc already: {shown}"
        self._tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "10")
        self.on = True
        for c in ("10", "20"):
            self._tc("class", "add", "dev", "lo", "parent", "1:", "classid", f"1:{c}", "htb",
                     "rate", "100gbit", "quantum", "200000")
        self._tc("qdisc", "add", "dev", "lo", "parent", "1:20", "handle", "20:", "pfifo",
                 "limit", "0")
        self._tc("filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1",
                 "u32", "match", "ip", "dport", str(self.port), "0xffff", "flowid", "1:20")
        return time.monotonic()

    def mend(self) -> None:
        """Mend (the ``time.time()`` of it in ``mended_at``); a second call does nothing."""
        with self._lock:
            if self.on:
                self._tc("qdisc", "del", "dev", "lo", "root")
                self.on, self.mended_at = False, time.time()
