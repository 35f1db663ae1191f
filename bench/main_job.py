"""Time the README's command 1 (setup + `dvc repro`) on a fresh clone, phase by phase.

    python bench/main_job.py [--repo .] [--dir /tmp/rlfn-main-job] [--reuse-venv]
                             [--no-shared] [--compare bench/results/main_job.json] [--stack]
                             [--isa AVX512_CORE_BF16] [--out FILE]

Clones ``--repo`` (its committed HEAD) into ``--dir``/main, beside a link ``--dir``/shared to
this checkout's ``../shared`` when there is one (as a fresh clone here has it: Urban100 and the
official weights then join evaluate and the Pareto chart; ``--no-shared`` leaves it out), runs
``bash scripts/setup.sh`` (the setup phase; ``--reuse-venv`` links this checkout's ``.venv``
instead, to time the pipeline alone), then ``dvc repro`` with the venv active, reading its
output as it comes: each stage's wall time from DVC's "Running stage" lines, and how much of
it went on start-up (interpreter, imports, Prefect, the MLflow run) from the stage's own
"ready after N s" line (``pipeline.tracking.stage_run``). Prints the phase table against the
15-minute target and writes it to ``bench/results/main_job.json`` (with the machine) unless
``--no-save``. Then, from another process, ``mlflow.pyfunc.load_model(
"models:/rlfn-x4@champion")`` upscales an image, and the sha256 of every stage's weights is
recorded; ``--compare FILE`` checks them against an earlier run's (a second fresh clone must
give bit-identical weights).
``--isa CAP`` caps the instruction set oneDNN (PyTorch's CPU convolutions, bf16 autocast)
dispatches to, through its own ``ONEDNN_MAX_CPU_ISA`` (for example ``AVX512_CORE_BF16``: the
instruction set of a machine with AVX-512 bf16 and VNNI but no AMX), for every stage and
the champion's check; the result records the ISA oneDNN reports and the convolution kernels
it picked, and goes to ``bench/results/main_job.<cap>.json``. A capped Intel CPU is not an
AMD EPYC of the same instruction set, though: bf16 autocast trains 0.63x of fp32 on the one
and 1.62x on the other (bench/results/train_step_cpu_amd_epyc.txt), so time a class on a
machine of that class (``--out``) where one can be had. (OpenVINO's CPU plugin has no such
switch: its points in the profile stage run on the full instruction set either way.)
``--stack``: team mode's command chain instead (issue 13's): ``bash scripts/stack.sh up``,
``eval "$(bash scripts/stack.sh env)"``, ``dvc repro && dvc push``, the champion loaded from the
tracking server, then ``stack.sh down``; written to ``bench/results/team_job.json``.
Nothing here is asserted: the figures are for people (and the next regression).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from machine import machine

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 15 * 60
RUNNING = re.compile(r"Running stage '([^']+)'")
READY = re.compile(r"(\S+): ready after ([\d.]+) s")
PSNR = re.compile(r"stage(\d+): Set5 ([\d.]+) dB")


def _fmt(s: float) -> str:
    return f"{int(s // 60)}:{s % 60:04.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=str(ROOT))
    ap.add_argument("--dir", default="/tmp/rlfn-main-job")
    ap.add_argument("--reuse-venv", action="store_true",
                    help="link this checkout's .venv instead of running setup")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--out", metavar="FILE",
                    help="the results file (default: bench/results/main_job[.<cap>].json; "
                         "another CPU class's run deserves a name of its own)")
    ap.add_argument("--no-shared", action="store_true",
                    help="do not link ../shared beside the clone")
    ap.add_argument("--compare", metavar="FILE",
                    help="an earlier results file: the weights must be bit-identical")
    ap.add_argument("--stack", action="store_true",
                    help="team mode: against scripts/stack.sh's services (own state, free ports)")
    ap.add_argument("--isa", metavar="CAP", type=str.upper,
                    help="cap oneDNN's instruction set (ONEDNN_MAX_CPU_ISA), e.g. "
                         "AVX512_CORE_BF16 for an AVX-512 machine without AMX")
    a = ap.parse_args(argv)
    if a.isa and not re.fullmatch(r"[A-Z0-9_]+", a.isa):
        ap.error(f"--isa: {a.isa!r} is not a oneDNN ISA name (e.g. AVX512_CORE_BF16, AVX2)")
    base = Path(a.dir)
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    work = base / "main"
    shared = (ROOT.parent / "shared").resolve()
    if not a.no_shared and shared.is_dir():
        (base / "shared").symlink_to(shared)
    phases: list[dict] = []
    t_all = time.monotonic()
    subprocess.run(["git", "clone", "-q", a.repo, str(work)], check=True)
    t0 = time.monotonic()
    if a.reuse_venv:
        (work / ".venv").symlink_to(ROOT / ".venv")
    else:
        subprocess.run(["bash", "scripts/setup.sh"], cwd=work, check=True)
    phases.append({"phase": "setup" + (" (venv reused)" if a.reuse_venv else ""),
                   "seconds": time.monotonic() - t0})
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PREFECT_", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"))}
    if a.isa:
        env["ONEDNN_MAX_CPU_ISA"] = a.isa
    venv_bin = work / ".venv" / "bin"
    env.update(PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(work / ".venv"),
               PYTHONPATH="")
    isa = _isa_ran(venv_bin / "python", env)
    print(f"oneDNN: {isa['isa']} (cap {a.isa or 'none'}); conv kernels {isa['conv']}", flush=True)
    if a.stack:
        env.update(_stack_up(work, base, env, phases))
    t0 = time.monotonic()
    proc = subprocess.Popen([str(venv_bin / "dvc"), "repro"], cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
    stage, started, ready, log = None, 0.0, {}, []
    for line in proc.stdout:
        log.append(line)
        now = time.monotonic()
        m = RUNNING.search(line)
        if m:
            if stage:
                phases.append({"phase": stage, "seconds": now - started,
                               "startup_s": ready.get(stage)})
            stage, started = m.group(1), now
            print(f"[{_fmt(now - t_all)}] {stage}", flush=True)
        m = READY.search(line)
        if m and stage:
            ready[stage] = float(m.group(2))
    rc = proc.wait()
    now = time.monotonic()
    if stage:
        phases.append({"phase": stage, "seconds": now - started, "startup_s": ready.get(stage)})
    repro_s, total_s = now - t0, now - t_all
    (work / "bench-main-job.log").write_text("".join(log))
    print(f"\n{'phase':<24} {'wall':>8} {'start-up':>9} {'work':>8}")
    for p in phases:
        su = p.get("startup_s")
        work_s = p["seconds"] - su if su is not None else None
        print(f"{p['phase']:<24} {_fmt(p['seconds']):>8} "
              f"{'' if su is None else _fmt(su):>9} {'' if work_s is None else _fmt(work_s):>8}")
    startup = sum(p.get("startup_s") or 0 for p in phases)
    print(f"{'dvc repro':<24} {_fmt(repro_s):>8} {_fmt(startup):>9}")
    print(f"{'total (clone to end)':<24} {_fmt(total_s):>8}   target {_fmt(TARGET_S)}: "
          f"{total_s / TARGET_S:.2f}x of it  (exit code {rc})")
    if a.stack and rc == 0:
        t0 = time.monotonic()
        rc = subprocess.run([str(venv_bin / "dvc"), "push"], cwd=work, env=env).returncode
        phases.append({"phase": "dvc push (stack)", "seconds": time.monotonic() - t0})
        print(f"dvc push: {_fmt(phases[-1]['seconds'])} (exit code {rc})")
    metrics = {}
    ev = work / "metrics" / "evaluate.json"
    if ev.exists():
        metrics = json.loads(ev.read_text())
        print(f"final model: {json.dumps(metrics)}")
    champion = _champion(work, env) if rc == 0 else "not checked (repro failed)"
    print(f"champion: {champion}")
    weights = {p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted((work / "models").glob("stage*/model.safetensors"))}
    for k, v in weights.items():
        print(f"{k} weights sha256 {v}")
    same = None
    if a.compare:
        before = json.loads(Path(a.compare).read_text()).get("weights_sha256", {})
        same = bool(before) and before == weights
        print(f"weights vs {a.compare}: {'bit-identical' if same else 'DIFFERENT'}")
        if not same:
            rc = rc or 1
    if a.stack:
        subprocess.run(["bash", "scripts/stack.sh", "down"], cwd=work, env=env)
    if not a.no_save:
        name = ("team_job" if a.stack else "main_job") + (f".{a.isa.lower()}" if a.isa else "")
        out = Path(a.out) if a.out else ROOT / "bench" / "results" / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": machine(), "isa": {"cap": a.isa, **isa}, "command": " ".join(
            [sys.executable, *sys.argv]), "exit_code": rc, "total_s": round(total_s, 1),
            "repro_s": round(repro_s, 1), "target_s": TARGET_S, "phases": [
                {k: (round(v, 1) if isinstance(v, float) else v) for k, v in p.items()}
                for p in phases], "metrics": metrics, "champion": champion,
            "weights_sha256": weights, "shared": (base / "shared").exists(),
            "compared_with": a.compare, "bit_identical": same}, indent=2) + "\n")
        print(f"wrote {out}")
    return rc


ISA_PROBE = """
import torch
x, conv = torch.randn(1, 16, 32, 32), torch.nn.Conv2d(16, 16, 3, padding=1)
with torch.no_grad():
    conv(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(x)
"""


def _isa_ran(python: Path, env: dict) -> dict:
    """What oneDNN dispatches to in this environment (its own verbose report): the ISA line
    and the convolution kernels it picks for fp32 and bf16 (``brg_conv_fwd:avx512_core_amx``
    on an AMX machine, ``...:avx512_core_bf16`` once capped)."""
    r = subprocess.run([str(python), "-c", ISA_PROBE], env={**env, "ONEDNN_VERBOSE": "1"},
                       capture_output=True, text=True, timeout=300)
    isa, conv = "unknown", []
    for line in r.stdout.splitlines():
        f = line.split(",")
        if len(f) > 4 and f[2:4] == ["info", "cpu"] and f[4].startswith("isa:"):
            isa = f[4][4:]
        elif len(f) > 5 and f[2:5] == ["primitive", "exec", "cpu"] and f[5] == "convolution":
            conv.append(f[6])
    return {"isa": isa, "conv": sorted(set(conv))}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stack_up(work: Path, base: Path, env: dict, phases: list) -> dict:
    """``bash scripts/stack.sh up`` (state under ``base``/stack, free ports), then its
    ``env`` exports as a dict."""
    env.update(RLFN_STACK_DIR=str(base / "stack"), RLFN_PROJECT_DIR=str(work),
               **{f"RLFN_STACK_{k}_PORT": str(_free_port())
                  for k in ("PG", "MLFLOW", "PREFECT", "SSH")})
    t0 = time.monotonic()
    subprocess.run(["bash", "scripts/stack.sh", "up"], cwd=work, env=env, check=True)
    phases.append({"phase": "stack up (cold)", "seconds": time.monotonic() - t0})
    out = subprocess.run(["bash", "scripts/stack.sh", "env"], cwd=work, env=env, check=True,
                         capture_output=True, text=True).stdout
    exports = {}
    for line in out.splitlines():
        m = re.match(r"export (\w+)=(.*)$", line.strip())
        if m:
            exports[m.group(1)] = subprocess.run(
                ["bash", "-c", f"printf %s {m.group(2)}"], capture_output=True,
                text=True).stdout
    print(f"stack up: {_fmt(phases[-1]['seconds'])}; exports: {sorted(exports)}")
    return exports


CHAMPION = """
import numpy as np, mlflow
m = mlflow.pyfunc.load_model("models:/rlfn-x4@champion")
lr = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
sr = np.asarray(m.predict(lr))
print(f"models:/rlfn-x4@champion (run {m.metadata.run_id[:8]}) upscaled {lr.shape} -> {sr.shape}")
"""


def _champion(work: Path, env: dict) -> str:
    """Load the champion in another process, as a user would, and upscale an image."""
    r = subprocess.run([str(work / ".venv" / "bin" / "python"), "-c", CHAMPION], cwd=work,
                       env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        return f"FAILED: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    return r.stdout.strip().splitlines()[-1]


if __name__ == "__main__":
    sys.exit(main())
