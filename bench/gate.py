"""Benchmark: does the promotion gate's runtime figure mean the same on a slower machine?

    .venv/bin/python bench/gate.py [--images N] [--size H W] [--json bench/results/gate_cpu.json]

Times the challenge model (the profile stage's reference), RLFN x4 and EDSR-baseline x4
(seeded weights) against the reference image by image, as the profile stage does
(``rlfn.profile.profile_runtime``, ``OMP_WAIT_POLICY=PASSIVE``), each condition in a fresh
process: 2 threads, 1 thread (a slower machine), and 1 thread beside a CPU-bound spinner (a
busy one). Prints each model's absolute median (ms) and ``runtime_rel`` per condition, the
1-thread/2-thread time ratio (how much slower the "slower machine" really was) and the gate's
decision at ``--budget`` (default 2.5). The decision, not the milliseconds, should be the same
in every column. This is a measurement, not a test: tests/test_promotion_gate.py checks the
same decisions on deterministic machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEASURE = """
import json, sys, torch
from rlfn.backends import make_engine
from rlfn.models import build_model
from rlfn.profile import profile_runtime

torch.set_num_threads(int(sys.argv[2]))
torch.manual_seed(0)
ref = make_engine(build_model("rlfn_ntire", 4).eval(), "eager", "cpu")
out = {}
for name in ("rlfn_ntire", "rlfn", "edsr_baseline"):
    torch.manual_seed(1)
    model = make_engine(build_model(name, 4).eval(), "eager", "cpu")
    r = profile_runtime(model, sys.argv[1], 0, 1, reference=ref)
    out[name] = {"runtime_rel": r["relative"], "runtime_ms_cpu": r["median_ms"]}
print(json.dumps(out))
"""

SPIN = "while True: pass"


def measure(images: Path, threads: int, busy: bool) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if busy else None
    try:
        r = subprocess.run([sys.executable, "-c", MEASURE, str(images), str(threads)], cwd=ROOT,
                           capture_output=True, text=True, env=env, timeout=1800)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, nargs=2, default=(144, 192), metavar=("H", "W"))
    ap.add_argument("--budget", type=float, default=2.5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import numpy as np

    from machine import machine
    from rlfn.io import write_png

    with tempfile.TemporaryDirectory(prefix="rlfn-gate-") as tmp:
        rng = np.random.default_rng(0)
        for i in range(args.images):
            write_png(Path(tmp) / f"{i}.png",
                      rng.integers(0, 256, (*args.size, 3), dtype=np.uint8))
        runs = {}
        for cond, threads, busy in (("2 threads", 2, False), ("1 thread", 1, False),
                                    ("1 thread + spinner", 1, True)):
            print(f"gate: timing at {cond} ...", file=sys.stderr, flush=True)
            runs[cond] = measure(Path(tmp), threads, busy)
    conds = list(runs)
    print(f"{'model':<16}" + "".join(f"{c + ' ms':>24}{'rel':>8}{'ok':>5}" for c in conds)
          + f"{'1t/2t time':>12}")
    for name in runs[conds[0]]:
        row = f"{name:<16}"
        for c in conds:
            f = runs[c][name]
            row += (f"{f['runtime_ms_cpu']:>24.1f}{f['runtime_rel']:>8.3f}"
                    f"{'yes' if f['runtime_rel'] <= args.budget else 'no':>5}")
        ratio = runs["1 thread"][name]["runtime_ms_cpu"] / runs["2 threads"][name]["runtime_ms_cpu"]
        print(row + f"{ratio:>12.2f}")
    same = all({n: f["runtime_rel"] <= args.budget for n, f in runs[c].items()}
               == {n: f["runtime_rel"] <= args.budget for n, f in runs[conds[0]].items()}
               for c in conds)
    print(f"budget runtime_rel <= {args.budget:g}: same decision in every condition: {same}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "budget": args.budget,
                                         "size": list(args.size), "images": args.images,
                                         "runs": runs, "same_decision": same}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
