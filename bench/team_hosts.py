"""Benchmark (issue 23 item 7): the README's runbook "a team on several hosts" followed
command by command on hosts made of network namespaces, timed, beside the same pipeline in
single-host team mode, in the same run. Root (network namespaces, per-host Unix users):

    sudo nice -n 19 .venv/bin/python bench/team_hosts.py [--json bench/results/team_hosts_cpu.json]
                                                         [--no-single] [--repro-timeout 2700]

The hosts are those of the tests (tests/hosts.py: one network namespace on a bridge, one Unix
user and home each, no shared disk; ``install_project`` stands in for each host's ``git clone``
+ ``bash scripts/setup.sh``). The pipeline is the **tiny** one of the tests
(tests/tinyproject.py ``tiny_clone``: the tiny params, 4 training images, committed on the
server's clone before ``up``, so the team repository is seeded with it): a repro takes minutes,
not the real pipeline's ~15. Ports: the stack's port variables set to free ports below the
kernel's ephemeral range (tests/teamstack.py ``stack_ports``; runbook step 1 names them), as the
tests do; every other setting is the runbook's default (Prefect's worker polls every 10 s).

Multi-host, in the runbook's order (server, w1 = a worker host, client = a person's laptop):

* server: ``RLFN_STACK_WORKER=0 bash scripts/stack.sh up --host ADDR`` (cold), ``bash
  scripts/stack.sh bundle team.bundle``; the bundle copied (owner-only) to w1 and client;
* w1: ``bash scripts/stack.sh join ~/team.bundle``, ``status``;
* client: ``eval "$(bash scripts/stack.sh env --bundle ~/team.bundle)"``, ``git clone
  "$RLFN_GIT_URL"``, ``prefect deployment run rlfn-repro/repro --param push=true --watch``; then
  ``git fetch && git checkout repro/<id>``, the DVC remote from the bundle (``dvc remote add
  --local -d stack "$RLFN_DVC_REMOTE"``: its pinned route), ``dvc pull``, ``dvc status dvc.yaml`` (clean) and the
  champion ``models:/rlfn-x4@champion`` loaded from the tracking server over TLS upscales an
  image; then ``down`` on w1 and on the server.

Single host ("solo", another namespace, after the multi-host stack is down): ``bash
scripts/stack.sh up`` (loopback, with its own worker), ``eval "$(bash scripts/stack.sh env)"``,
the same ``prefect deployment run rlfn-repro/repro --param push=true --watch`` (the same
deployment, taken by the host's own worker), ``down``.

Per stage: each stage's Prefect flow run (``prepare`` ... ``promote``, started by the repro's
``dvc repro``) between the repro flow run's start and end: its start and end as Prefect records
them. Bytes between hosts: each host's ``/sys/class/net/eth0/statistics/{tx,rx}_bytes`` in its
namespace, polled every 1 s by one small process per host, attributed to the stage whose flow
run was running (sample at or before its start to sample at or before its end; 1-s
resolution); the gaps (the worker taking the run, ``dvc push`` + git push after ``promote``) and
the client's pull have rows of their own (tx is what a host sent; rx can include frames the
bridge floods to every port; the longest interval between two samples is recorded: a poller on a
loaded machine is not woken every second). The machine's load average is recorded at each
repro's start and end: the two repros run one after the other, and are comparable only where
those are alike. torchrun across two hosts vs one: read from
bench/results/torchrun_hosts_cpu.json (bench/torchrun_hosts.py; not rerun here). Everything is
torn down at the end (the hosts context: namespaces, users, homes, processes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from machine import machine  # noqa: E402

TORCHRUN_JSON = ROOT / "bench" / "results" / "torchrun_hosts_cpu.json"
TORCHRUN_CMD = ("sudo nice -n 19 .venv/bin/python bench/torchrun_hosts.py --iterations 60 "
                "--repeats 3 --json bench/results/torchrun_hosts_cpu.json")
STAGE_RUNS = ["prepare", "degrade", "patches", "train-stage1", "train-stage2", "train-stage3",
              "evaluate", "pareto_official", "profile", "promote"]
POLL_LIMIT = 3 * 3600  # samples (1 s each): a poller ends by itself after 3 h

POLL = r"""
import json, sys, time
d = "/sys/class/net/eth0/statistics/"
for _ in range(int(sys.argv[1])):
    with open(d + "tx_bytes") as t, open(d + "rx_bytes") as r:
        print(json.dumps([time.time(), int(t.read()), int(r.read())]), flush=True)
    time.sleep(1)
"""

FLOW_RUNS = r"""
import asyncio, json
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as c:
        flows = {f.id: f.name for f in await c.read_flows(limit=200)}
        runs = await c.read_flow_runs(limit=200)
        ts = lambda d: d.timestamp() if d else None
        print(json.dumps([{"id": str(r.id), "flow": flows.get(r.flow_id), "name": r.name,
                           "state": r.state_type.value if r.state_type else None,
                           "start": ts(r.start_time), "end": ts(r.end_time),
                           "created": ts(r.created), "pool": r.work_pool_name,
                           "message": (r.state.message or "")[:300] if r.state else ""}
                          for r in runs]))

asyncio.run(main())
"""

CHAMPION = r"""
import json
import numpy as np
import mlflow
m = mlflow.pyfunc.load_model("models:/rlfn-x4@champion")
lr = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
sr = np.asarray(m.predict(lr))
print(json.dumps({"uri": mlflow.get_tracking_uri(), "run": m.metadata.run_id,
                  "in": list(lr.shape), "out": list(sr.shape)}))
"""



def runbook_laptop() -> list[str]:
    """The shell commands of the README runbook's step 5 ("Running work from a laptop"), its
    code block as written (comments dropped, a continued line joined to its command): the
    benchmark runs these, so the README and what was measured cannot drift apart."""
    text = (ROOT / "README.md").read_text()
    sec = text[text.index("5. **Running work from a laptop:**"):
               text.index("6. **Rotating a credential:**")]
    block = textwrap.dedent(sec.split("```bash\n", 1)[1].split("```", 1)[0])
    cmds: list[str] = []
    for line in block.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and cmds:
            cmds[-1] += "\n" + line
        else:
            cmds.append(line)
    if not (len(cmds) >= 4 and cmds[0].startswith("eval ") and "git clone" in cmds[1]
            and cmds[2].startswith("prefect deployment run rlfn-repro/repro")
            and "--watch" in cmds[2] and cmds[3].startswith("git fetch")):
        raise SystemExit(f"error: README.md's runbook step 5 is not the expected env / clone / "
                         f"deployment run --watch / git fetch ...: {cmds}")
    return cmds


T0 = time.monotonic()


def say(msg: str) -> None:
    s = time.monotonic() - T0
    print(f"[{int(s // 60):3d}:{s % 60:04.1f}] {msg}", flush=True)


class StepFailed(RuntimeError):
    pass


def step(h, script: str, what: str, timeout: float, cwd: Path | None = None, show: int = 25,
         progress=None, **env: str) -> tuple[float, str]:
    """``bash -c script`` on host ``h`` as its user, its output streamed (the first ``show``
    lines printed, indented); ``(seconds, output)``. StepFailed on a non-zero exit, killed
    (the whole process group) past ``timeout``. ``progress``: a function whose line is
    printed every 60 s while the command runs."""
    say(f"{h.name}$ {what}")
    t0 = time.monotonic()
    p = h.popen(["bash", "-c", script], cwd=cwd, **env)
    lines: list[str] = []

    def read() -> None:
        for line in p.stdout:
            lines.append(line)
            if len(lines) <= show:
                print(f"    | {line.rstrip()[:160]}", flush=True)

    th = threading.Thread(target=read, daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                rc = p.wait(timeout=max(0.1, min(60.0, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    raise
                if progress is not None:
                    say(f"  ... {progress()}")
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        p.wait()
        rc = None
    th.join(timeout=10)
    took = time.monotonic() - t0
    out = "".join(lines)
    if rc != 0:
        raise StepFailed(f"{h.name}: {what}: {'timed out' if rc is None else f'exit {rc}'} "
                         f"after {took:.0f} s\n{out[-3000:]}")
    say(f"  done in {took:.1f} s")
    return took, out


class Meter:
    """eth0's byte counters of each host, polled every 1 s in its namespace (root)."""

    def __init__(self, hosts_: list) -> None:
        self.samples: dict[str, list[tuple[float, int, int]]] = {h.name: [] for h in hosts_}
        self.procs = []
        for h in hosts_:
            p = subprocess.Popen(["ip", "netns", "exec", h.ns, "/usr/bin/python3", "-u", "-c",
                                  POLL, str(POLL_LIMIT)], stdout=subprocess.PIPE, text=True,
                                 start_new_session=True)
            self.procs.append(p)
            threading.Thread(target=self._read, args=(h.name, p), daemon=True).start()

    def _read(self, name: str, p) -> None:
        for line in p.stdout:
            self.samples[name].append(tuple(json.loads(line)))

    def at(self, name: str, t: float) -> tuple[int, int]:
        """(tx, rx) of the last sample at or before ``t`` (the first one before any)."""
        s = self.samples[name]
        best = s[0]
        for x in s:
            if x[0] <= t:
                best = x
            else:
                break
        return best[1], best[2]

    def between(self, a: float, b: float) -> dict[str, dict[str, int]]:
        out = {}
        for n in self.samples:
            (tx0, rx0), (tx1, rx1) = self.at(n, a), self.at(n, b)
            out[n] = {"tx": tx1 - tx0, "rx": rx1 - rx0}
        return out

    def worst_gap(self) -> dict[str, float]:
        """Each host's longest interval between two samples (s): the attribution's real
        resolution (a poller on a loaded machine is not woken every second)."""
        return {n: max((b[0] - a[0] for a, b in zip(s, s[1:])), default=0.0)
                for n, s in self.samples.items()}

    def since(self, t: float) -> str:
        """MB each host sent/received since ``t`` (a progress line)."""
        return "MB tx/rx since dispatch: " + ", ".join(
            f"{n} {v['tx'] / 1e6:.1f}/{v['rx'] / 1e6:.1f}"
            for n, v in self.between(t, time.time()).items())

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def carry(src: Path, h) -> Path:
    """The bundle copied to host ``h``'s home, its user's, 0600 (a file copy as between people
    who trust each other: the runbook's step 3)."""
    dst = h.home / "team.bundle"
    shutil.copy(src, dst)
    os.chown(dst, h.uid, h.uid)
    os.chmod(dst, 0o600)
    return dst


def flow_runs(h, shell: str, **env: str) -> list[dict]:
    """Every flow run on the Prefect server ``shell``'s exports point at (read on ``h``)."""
    _, out = step(h, shell + f"python -c {sh_quote(FLOW_RUNS)}", "read the flow runs",
                  300, show=0, **env)
    return json.loads(out.strip().splitlines()[-1])


def sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def repro_stages(runs: list[dict], fid: str) -> tuple[dict, list[dict], list[dict]]:
    """The repro flow run ``fid``, its stages' flow runs (in order of start) and the others."""
    rep = next(r for r in runs if r["id"] == fid)
    lo, hi = rep["start"] or 0, rep["end"] or time.time()
    stages = sorted((r for r in runs if r["name"] in STAGE_RUNS and r["start"]
                     and lo - 1 <= r["start"] <= hi + 1), key=lambda r: r["start"])
    others = [r for r in runs if r["id"] != fid and r not in stages]
    return rep, stages, others


def gap_rows(rep: dict, stages: list[dict], t_dispatch: float, meter=None) -> list[dict]:
    """The repro's time outside its stages' flow runs, as rows: before the flow run runs,
    before its first stage, between stages (DVC's own work: hashing, lock, checks) and after
    the last one (``dvc push``, the git push of ``repro/<id>``), with the bytes then."""
    if not stages:
        return []
    spans = {"(dispatch -> repro flow running)": [(t_dispatch, rep["start"])],
             "(repro running -> first stage)": [(rep["start"], stages[0]["start"])],
             "(between stages: dvc itself)": [(a["end"], b["start"])
                                              for a, b in zip(stages, stages[1:])],
             "(last stage -> end: dvc/git push)": [(stages[-1]["end"], rep["end"])]}
    rows = []
    for what, iv in spans.items():
        row = {"what": what, "seconds": sum(b - a for a, b in iv)}
        if meter is not None:
            tot: dict = {}
            for a, b in iv:
                for h, v in meter.between(a, b).items():
                    t = tot.setdefault(h, {"tx": 0, "rx": 0})
                    t["tx"] += v["tx"]
                    t["rx"] += v["rx"]
            row["bytes"] = tot
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, metavar="FILE")
    ap.add_argument("--no-single", action="store_true",
                    help="leave out the single-host team-mode run")
    ap.add_argument("--repro-timeout", type=float, default=2700,
                    help="seconds a dispatched repro may take (a hang guard; default 2700)")
    args = ap.parse_args()
    import pytest  # tests/prereq.py's skip: here a plain exit with the reason

    from hosts import hosts, install_project
    from teamstack import prerequisites, stack_ports
    from tinyproject import tiny_clone

    rb = runbook_laptop()  # before any host is made: a README that changed shape stops here
    try:
        prerequisites(off_loopback=True)
        ctx = hosts("server", "w1", "client", "solo")
        net = ctx.__enter__()
    except pytest.skip.Exception as e:
        print(f"skipped: {e}", file=sys.stderr)
        return 2
    say("hosts server, w1, client, solo: namespaces on one bridge, a user and home each")
    res: dict = {"pipeline": "tiny (tests/tinyproject.py tiny_clone: tiny params, 4 training "
                             "images), not the real ~15-min pipeline",
                 "multi": {}, "single": {}}
    meter = None
    srv, w1, cli, solo = (net.hosts[n] for n in ("server", "w1", "client", "solo"))
    ok = False
    try:
        # --- setup: each host's clone + setup.sh (the tests' shortcut: install_project)
        t0 = time.monotonic()
        clones = {n: install_project(net.hosts[n], ROOT) for n in ("server", "w1", "client")}
        tiny_clone(clones["server"], wrap=srv.argv)
        res["multi"]["install_s"] = time.monotonic() - t0
        say(f"installed the project on server, w1, client ({res['multi']['install_s']:.0f} s; "
            "the server's clone made tiny and committed)")
        ports, port_env = stack_ports()
        res["ports"] = ports
        res["commands"] = {"server": ["RLFN_STACK_WORKER=0 bash scripts/stack.sh up --host ADDR",
                                      "bash scripts/stack.sh bundle team.bundle"],
                           "worker": ["bash scripts/stack.sh join ~/team.bundle",
                                      "bash scripts/stack.sh status"],
                           "single host": ["bash scripts/stack.sh up", 'eval "$(bash '
                                           'scripts/stack.sh env)"', "prefect deployment run "
                                           "rlfn-repro/repro --param push=true --watch"],
                           "ports": f"the stack's port variables: {port_env}"}
        meter = Meter([srv, w1, cli])
        m = res["multi"]

        # --- server: up, bundle (runbook steps 2-3)
        m["up_s"], up_out = step(
            srv, f"RLFN_STACK_WORKER=0 bash scripts/stack.sh up --host {srv.addr}",
            f"RLFN_STACK_WORKER=0 bash scripts/stack.sh up --host {srv.addr}", 900,
            cwd=clones["server"], show=40, **port_env)
        m["bundle_s"], _ = step(srv, "bash scripts/stack.sh bundle team.bundle",
                                "bash scripts/stack.sh bundle team.bundle", 120,
                                cwd=clones["server"], **port_env)
        bundle = clones["server"] / "team.bundle"
        for h in (w1, cli):
            carry(bundle, h)
        say("bundle copied to w1 and client (~/team.bundle, 0600)")

        # --- worker host: join (runbook step 4)
        m["join_s"] = {}
        m["join_s"]["w1"], _ = step(w1, "bash scripts/stack.sh join ~/team.bundle",
                                    "bash scripts/stack.sh join ~/team.bundle", 900,
                                    cwd=clones["w1"], show=40)
        step(w1, "bash scripts/stack.sh status", "bash scripts/stack.sh status", 120,
             cwd=clones["w1"])

        # --- the person's laptop: the README's step 5, its own lines (runbook_laptop)
        res["runbook_step5"] = rb
        shell = f"set -euo pipefail; cd ~/rlfn-pipeline; {rb[0]}; "
        m["client_env_clone_s"], _ = step(cli, shell + rb[1], f"{rb[0]}; {rb[1]}", 300)
        in_team = shell + "cd ~/team/rlfn-pipeline; "
        t_dispatch = time.time()
        res["load"] = {"multi-host repro, start": os.getloadavg()}
        m["repro_dispatched_s"], out = step(
            cli, in_team + rb[2].replace("--watch", "--watch --watch-interval 10 --watch-timeout "
                                         f"{int(args.repro_timeout)}", 1),
            rb[2] + " (the tiny pipeline; --watch bounded)", args.repro_timeout + 120, show=12,
            progress=lambda: meter.since(t_dispatch))
        t_done = time.time()
        res["load"]["multi-host repro, end"] = os.getloadavg()
        fid = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
        m["flow_run"] = fid
        runs = flow_runs(cli, shell)
        rep, stages, others = repro_stages(runs, fid)
        if rep["state"] != "COMPLETED":
            raise StepFailed(f"repro {fid}: {rep['state']}")
        m["repro"] = {"state": rep["state"], "pool": rep["pool"],
                      "queued_to_start_s": rep["start"] - rep["created"],
                      "flow_run_s": rep["end"] - rep["start"],
                      "dispatch_to_completed_s": t_done - t_dispatch}
        m["stages"] = [{"stage": r["name"], "seconds": r["end"] - r["start"],
                        "state": r["state"], "bytes": meter.between(r["start"], r["end"])}
                       for r in stages]
        m["other_flow_runs"] = [{k: r[k] for k in ("flow", "name", "state", "pool", "message")}
                                for r in others]
        m["gaps"] = gap_rows(rep, stages, t_dispatch, meter)
        m["repro_bytes"] = meter.between(t_dispatch, t_done)

        # --- the results on the laptop (runbook step 5, second half). First as the README's
        # runbook had it before this benchmark (no DVC remote on the fresh clone: its default
        # is the project's `local` one), recorded, not fatal
        try:
            step(cli, in_team + f"git fetch && git checkout repro/{fid} && dvc pull",
                 f"(the runbook before: git fetch && git checkout repro/{fid} && dvc pull)",
                 600, show=8)
            m["old_runbook_pull"] = "exit 0"
        except StepFailed as e:
            m["old_runbook_pull"] = str(e).splitlines()[0] + ": " + " | ".join(
                ln for ln in str(e).splitlines()[1:] if "ERROR" in ln or "error" in ln)[:600]
            say(f"  as expected without a DVC remote: {m['old_runbook_pull'][:200]}")
        rest = "\n".join(rb[3:]).replace("<id>", fid).replace("ADDR", srv.addr)
        a = time.time()
        m["pull_s"], st = step(cli, in_team + rest, " && ".join(rb[3:]), 900, show=15)
        m["pull_bytes"] = meter.between(a, time.time())
        m["dvc_status"] = st.strip().splitlines()[-1]
        if "up to date" not in m["dvc_status"]:
            raise StepFailed(f"dvc status dvc.yaml on the client: {st[-2000:]}")
        _, st_all = step(cli, in_team + "dvc status || true",
                         "dvc status (every dvc.yaml, experiments/ too)", 300, show=10)
        m["dvc_status_all"] = st_all.strip()
        a = time.time()
        m["champion_s"], ch = step(
            cli, in_team + f"python -c {sh_quote(CHAMPION)}",
            "python: mlflow.pyfunc.load_model('models:/rlfn-x4@champion').predict(48x64)", 600,
            show=2)
        m["champion"] = json.loads(ch.strip().splitlines()[-1])
        m["champion_bytes"] = meter.between(a, time.time())

        # --- down: the worker host, then the server
        m["sample_worst_gap_s"] = meter.worst_gap()
        m["down_w1_s"], _ = step(w1, "bash scripts/stack.sh down", "bash scripts/stack.sh down",
                                 300, cwd=clones["w1"])
        m["down_server_s"], _ = step(srv, "bash scripts/stack.sh down",
                                     "bash scripts/stack.sh down", 300, cwd=clones["server"],
                                     **port_env)
        meter.stop()

        # --- single-host team mode on "solo": the same tiny project, its own worker
        if not args.no_single:
            s = res["single"]
            t0 = time.monotonic()
            sclone = install_project(solo, ROOT)
            tiny_clone(sclone, wrap=solo.argv)
            s["install_s"] = time.monotonic() - t0
            s["up_s"], _ = step(solo, "bash scripts/stack.sh up", "bash scripts/stack.sh up "
                                "(loopback, its own worker)", 900, cwd=sclone, show=40,
                                **port_env)
            shell = ('set -euo pipefail; cd ~/rlfn-pipeline; eval "$(bash scripts/stack.sh '
                     'env)"; . .venv/bin/activate; ')
            t_dispatch = time.time()
            res["load"]["one-host repro, start"] = os.getloadavg()
            s["repro_dispatched_s"], out = step(
                solo, shell + "prefect deployment run rlfn-repro/repro --param push=true "
                f"--watch --watch-interval 10 --watch-timeout {int(args.repro_timeout)}",
                "prefect deployment run rlfn-repro/repro --param push=true --watch",
                args.repro_timeout + 120, cwd=sclone, show=12,
                progress=lambda: f"{time.time() - t_dispatch:.0f} s since dispatch",
                **port_env)
            t_done = time.time()
            res["load"]["one-host repro, end"] = os.getloadavg()
            sfid = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
            runs = flow_runs(solo, shell, **port_env)
            rep, stages, others = repro_stages(runs, sfid)
            if rep["state"] != "COMPLETED":
                raise StepFailed(f"single-host repro {sfid}: {rep['state']}")
            s["flow_run"] = sfid
            s["repro"] = {"state": rep["state"], "pool": rep["pool"],
                          "queued_to_start_s": rep["start"] - rep["created"],
                          "flow_run_s": rep["end"] - rep["start"],
                          "dispatch_to_completed_s": t_done - t_dispatch}
            s["stages"] = [{"stage": r["name"], "seconds": r["end"] - r["start"],
                            "state": r["state"]} for r in stages]
            s["gaps"] = gap_rows(rep, stages, t_dispatch)
            s["other_flow_runs"] = [{k: r[k] for k in ("flow", "name", "state", "pool",
                                                       "message")} for r in others]
            s["down_s"], _ = step(solo, "bash scripts/stack.sh down",
                                  "bash scripts/stack.sh down", 300, cwd=sclone, **port_env)
        ok = True
    except Exception as e:  # noqa: BLE001 - reported with what was measured, then torn down
        import traceback

        traceback.print_exc()
        res["failed"] = f"{type(e).__name__}: {e}"[:4000]
    finally:
        if meter is not None:
            meter.stop()
        say("tearing the hosts down (processes, namespaces, users, homes)")
        try:
            ctx.__exit__(None, None, None)
        except AssertionError as e:
            print(f"teardown: {e}", file=sys.stderr)
            ok = False
            res["teardown"] = str(e)
    report(res, args)
    return 0 if ok else 1


def _b(d: dict | None, host: str) -> str:
    if not d:
        return ""
    x = d[host]
    return f"{x['tx'] / 1e6:.2f}/{x['rx'] / 1e6:.2f}"


def report(res: dict, args) -> None:
    info = machine()
    tr = json.loads(TORCHRUN_JSON.read_text()) if TORCHRUN_JSON.is_file() else None
    m, s = res["multi"], res["single"]
    print(f"\nteam mode across hosts, the README runbook followed in namespaces; pipeline: "
          f"{res['pipeline']}")
    print(f"cpu: {info['cpu']}, {info['cores']} cores shared by every host (and whatever else "
          f"runs on the machine)")
    print(f"\n{'step':<44} {'seconds':>8}")
    rows = [("up_s", "server: RLFN_STACK_WORKER=0 up --host (cold)"),
            ("bundle_s", "server: bundle")]
    rows += [(("join_s", n), f"{n}: join") for n in m.get("join_s", {})]
    rows += [("client_env_clone_s", "client: env --bundle, activate, git clone"),
             ("pull_s", "client: fetch, checkout, dvc remote, pull"),
             ("champion_s", "client: champion over TLS, upscale"),
             ("down_w1_s", "w1: down"), ("down_server_s", "server: down")]
    for k, label in rows:
        v = m.get(k) if isinstance(k, str) else m[k[0]][k[1]]
        if v is not None:
            print(f"{label:<44} {v:8.1f}")
    for k, label in (("up_s", "solo: up (loopback, own worker, cold)"),
                     ("down_s", "solo: down")):
        if k in s:
            print(f"{label:<44} {s[k]:8.1f}")
    if "repro" in m:
        print(f"\n{'dvc repro (rlfn-repro/repro, push=true)':<40} {'multi-host':>10} "
              f"{'one host':>9}   MB tx/rx on eth0: {'server':>11} {'w1':>11} {'client':>11}")
        single = {r["stage"]: r["seconds"] for r in s.get("stages", [])}
        single.update({g["what"]: g["seconds"] for g in s.get("gaps", [])})
        gaps = m["gaps"]
        for r in gaps[:2] + [{**x, "what": x["stage"]} for x in m["stages"]] + gaps[2:]:
            one = single.get(r["what"])
            print(f"{r['what']:<40} {r['seconds']:10.1f} "
                  f"{'' if one is None else f'{one:9.1f}':>9}   {'':17}"
                  + "".join(f" {_b(r.get('bytes'), h):>11}" for h in ("server", "w1", "client")))
        sr = s.get("repro", {})
        for k, label in (("queued_to_start_s", "repro flow run: created -> running"),
                         ("flow_run_s", "repro flow run: running -> completed"),
                         ("dispatch_to_completed_s", "dispatch -> COMPLETED (client's watch)")):
            one = sr.get(k)
            print(f"{label:<40} {m['repro'][k]:10.1f} "
                  f"{'' if one is None else f'{one:9.1f}':>9}")
        for k, label in (("repro_bytes", "dispatch -> COMPLETED, all bytes"),
                         ("pull_bytes", "client: fetch ... dvc pull, bytes"),
                         ("champion_bytes", "client: champion, bytes")):
            if k in m:
                print(f"{label:<40} {'':>10} {'':>9}   {'':17}"
                      + "".join(f" {_b(m[k], h):>11}" for h in ("server", "w1", "client")))
        print("bytes: each host's eth0 counters in its namespace, polled every 1 s, attributed "
              "to the stage whose Prefect flow run was running (1-s resolution"
              + (f"; longest gap between samples {max(m['sample_worst_gap_s'].values()):.1f} s"
                 if m.get("sample_worst_gap_s") else "") + "); rx can include frames the "
              "bridge floods to every port: tx is what a host sent")
    if res.get("load"):
        print("load average (1, 5, 15 min) on the machine: " + "; ".join(
            f"{k} {' '.join(f'{x:.1f}' for x in v)}" for k, v in res["load"].items())
            + ": the two repros are comparable only where these are alike")
    if "champion" in m:
        c = m["champion"]
        print(f"champion: models:/rlfn-x4@champion from {c['uri']} upscaled {c['in']} -> "
              f"{c['out']}; dvc status dvc.yaml: {m['dvc_status']!r}")
    if tr:
        med = tr["median_it_s"]
        print(f"torchrun (bench/results/torchrun_hosts_cpu.json, {tr['machine']['cpu']}, "
              f"{tr['machine']['cores']} cores; `{TORCHRUN_CMD}`): two hosts "
              f"{med['two hosts']:.2f} it/s, one host two ranks (torchrun --standalone) "
              f"{med['one host, torchrun']:.2f} it/s, (rlfn train --nproc-per-node 2) "
              f"{med['one host']:.2f} it/s; {tr['bridge_bytes_per_iteration'] / 1e6:.2f} MB "
              f"on the bridge per iteration")
    if "failed" in res:
        print(f"FAILED: {res['failed'][:600]}")
    if args.json:
        doc = {"machine": info, "command": " ".join([sys.executable, *sys.argv]),
               **res, "torchrun": None if tr is None else {
                   "file": str(TORCHRUN_JSON.relative_to(ROOT)), "command": TORCHRUN_CMD,
                   "machine": tr["machine"], "median_it_s": tr["median_it_s"],
                   "bridge_bytes_per_iteration": tr["bridge_bytes_per_iteration"]}}
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
