"""Benchmark: each hot path alone and with a training job on the same machine, under torch's
default threads (the baseline) and under ``rlfn.threads``' policy, in one run.

    .venv/bin/python bench/busy.py [--cases bicubic pil loader inference train]
                                   [--json bench/results/busy_cpu.json]

The second job is one training process (RLFN x4, Adam, L1, batch 8 x 128-pixel HR patches,
in a loop) started before the hot path and stopped after it; it reports its iterations/s
every half second, so the table shows what the hot path did to it too.

* ``torch``: what a process gets with no policy: torch's default pool (one thread per physical
  core) and libgomp's default waiting (spin, then sleep), in both processes;
* ``rlfn``: both processes as ``rlfn``/``pipeline`` start them: ``OMP_WAIT_POLICY=PASSIVE``;
  the training job's threads from its cores (not the load: training stays reproducible), the
  hot path's from its cores less those the training job keeps busy (``configure_threads``).

Each hot path does a fixed amount of work in a fresh process: ``alone`` is its time on the
otherwise quiet machine, ``busy`` with the training job; slowdown = busy / alone (on 2 cores
two jobs that share fairly give ~2x; a collapse gives 10-100x). ``train job`` is the training
job's slowdown while the hot path ran (its rate alone / its rate then).

Cases: ``bicubic`` MATLAB-exact x2 downscale of DIV2K test images (``rlfn.bicubic``), ``pil``
PIL's bicubic on the same (single-threaded: the reference), ``loader`` the trainer's
DataLoader (rlfn.train.data, batch 16 x 256 HR), ``inference`` eager RLFN x4 on 510x339 DIV2K
LR images, ``train`` RLFN x4 training steps (batch 8 x 128 HR).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RLFN_SHARED", ROOT.parent / "shared"))
CASES = ("bicubic", "pil", "loader", "inference", "train")
POLICIES = ("torch", "rlfn")
WAIT = {"policy": "PASSIVE"}  # the rlfn policy's OMP_WAIT_POLICY (--rlfn-wait)


# --------------------------------------------------------------------------- in the child
def _setup(policy: str, load_aware: bool) -> str:
    import torch

    if policy == "rlfn":
        from rlfn.threads import configure_threads

        return str(configure_threads(0, load_aware=load_aware))
    return f"{torch.get_num_threads()} threads (torch's default)"


def _images(n: int):
    import numpy as np
    from PIL import Image

    files = sorted((SHARED / "data" / "div2k_test_lr_x4").glob("*.png"))[:n]
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def _case(name: str, threads: str) -> dict:
    """Warm up, then time a fixed amount of work; returns the record."""
    import numpy as np
    import torch

    if name in ("bicubic", "pil"):
        from PIL import Image

        from rlfn.bicubic import downscale, modcrop

        imgs = [np.ascontiguousarray(modcrop(i, 2)) for i in _images(40)] * 5
        if name == "bicubic":
            def work():
                for i in imgs:
                    downscale(i, 2)
        else:
            def work():
                for i in imgs:
                    h, w = i.shape[:2]
                    Image.fromarray(i).resize((w // 2, h // 2), Image.BICUBIC)
        unit = (len(imgs), "images")
        reps = 2
    elif name == "loader":
        from rlfn.train.config import TrainConfig
        from rlfn.train.data import IterationBatches, open_training_data

        cfg = TrainConfig(model="rlfn", scale=4, batch_size=16, patch_size=256, num_workers=0,
                          hr_dir=str(ROOT / "data" / "sample" / "train"))
        ds = open_training_data(cfg, "/tmp/rlfn_bench_store", progress=False)
        start = [0]

        def work():
            for _ in IterationBatches(ds, cfg, start[0], start[0] + 10, torch.device("cpu")):
                pass
            start[0] += 10
        unit = (10, "batches")
        reps = 2
    elif name == "inference":
        from rlfn.models import build_model
        from rlfn.upscale import to_tensor

        model = build_model("rlfn", 4).eval()
        x = [to_tensor(i) for i in _images(2)]

        def work():
            with torch.inference_mode():
                for t in x:
                    model(t)
        unit = (2, "images")
        reps = 2
    elif name == "train":
        work = _train_step_fn()
        unit = (6, "steps")
        reps = 1
        inner = work

        def work():  # noqa: F811
            for _ in range(6):
                inner()
    else:
        raise SystemExit(f"unknown case {name!r}")
    work()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        work()
        ts.append(time.perf_counter() - t0)
    return {"case": name, "seconds": min(ts), "times": ts, "units": unit[0], "unit": unit[1],
            "threads": threads}


def _train_step_fn():
    import torch
    import torch.nn.functional as F

    from rlfn.models import build_model

    torch.manual_seed(0)
    model = build_model("rlfn", 4)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(8, 3, 32, 32, generator=g) * 255
    hr = torch.rand(8, 3, 128, 128, generator=g) * 255

    def step():
        loss = F.l1_loss(model(lr), hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _load_job(policy: str) -> None:
    """The second job: training steps forever, a rate line every ~0.5 s."""
    threads = _setup(policy, load_aware=False)
    print(json.dumps({"threads": threads}), flush=True)
    step = _train_step_fn()
    step()
    n, t0 = 0, time.perf_counter()
    while True:
        step()
        n += 1
        t = time.perf_counter()
        if t - t0 >= 0.5:
            print(json.dumps({"t": time.time(), "it_s": n / (t - t0)}), flush=True)
            n, t0 = 0, t


# --------------------------------------------------------------------------- the parent
def _env(policy: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "RLFN_THREADS", "RLFN_PROCESSES",
                        "MKL_NUM_THREADS", "GOMP_SPINCOUNT")}
    if policy == "rlfn" and WAIT["policy"].startswith("spin:"):  # GOMP's spin count instead
        env["OMP_WAIT_POLICY"] = ""  # set, so that rlfn/pipeline leave it (libgomp: default)
        env["GOMP_SPINCOUNT"] = WAIT["policy"][5:]
    elif policy == "rlfn" and WAIT["policy"]:
        env["OMP_WAIT_POLICY"] = WAIT["policy"]
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _child(args: list[str], policy: str) -> dict:
    r = subprocess.run([sys.executable, __file__, *args, "--policy", policy], env=_env(policy),
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bench/busy.py {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


class LoadJob:
    def __init__(self, policy: str):
        self.proc = subprocess.Popen([sys.executable, __file__, "--load", "--policy", policy],
                                     env=_env(policy), stdout=subprocess.PIPE, text=True)
        first = json.loads(self.proc.stdout.readline())
        self.threads = first["threads"]
        self.rates: list[tuple[float, float]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        while len(self.rates) < 4:  # warmed up: a few rate lines
            time.sleep(0.2)
            if self.proc.poll() is not None:
                raise SystemExit("the training job died")

    def _read(self) -> None:
        for line in self.proc.stdout:
            rec = json.loads(line)
            self.rates.append((rec["t"], rec["it_s"]))

    def rate(self, t0: float, t1: float) -> float | None:
        r = [v for t, v in self.rates if t0 <= t <= t1]
        return statistics.median(r) if r else None

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--json", default=None, metavar="PATH")
    ap.add_argument("--rlfn-wait", default="PASSIVE", metavar="PASSIVE|ACTIVE|''|spin:N",
                    help="OMP_WAIT_POLICY of the rlfn policy's processes ('' = libgomp's "
                         "default: spin a while, then sleep; spin:N = GOMP_SPINCOUNT=N)")
    ap.add_argument("--policy", default="torch", help=argparse.SUPPRESS)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    WAIT["policy"] = args.rlfn_wait
    if args.load:
        return _load_job(args.policy)
    if args.case:
        print(json.dumps(_case(args.case, _setup(args.policy, load_aware=True))))
        return
    if not (SHARED / "data" / "div2k_test_lr_x4").is_dir():
        raise SystemExit(f"reference data not found: {SHARED}/data/div2k_test_lr_x4 "
                         "(set RLFN_SHARED)")
    import PIL
    import torch

    from machine import machine as describe

    machine = describe(torch=torch.__version__, pillow=PIL.__version__,
                       loadavg_start=os.getloadavg())
    print(f"{machine['cpu']}, {machine['cores']} cores; torch {machine['torch']}, "
          f"Pillow {machine['pillow']}; load average at start {machine['loadavg_start']}",
          flush=True)
    rows = []
    for policy in args.policies:
        job = LoadJob(policy)  # the training job alone, for its reference rate
        time.sleep(4)
        t = time.time()
        job_alone = job.rate(t - 4, t)
        job.stop()
        print(f"[{policy}] training job alone: {job_alone:.2f} it/s ({job.threads})", flush=True)
        for case in args.cases:
            alone = _child(["--case", case], policy)
            job = LoadJob(policy)
            t0 = time.time()
            busy = _child(["--case", case], policy)
            t1 = time.time()
            job_rate = job.rate(t0, t1)
            job.stop()
            row = {"policy": policy, "case": case, "unit": alone["unit"],
                   "units": alone["units"], "alone_s": alone["seconds"],
                   "busy_s": busy["seconds"], "slowdown": busy["seconds"] / alone["seconds"],
                   "threads_alone": alone["threads"], "threads_busy": busy["threads"],
                   "train_job_alone_it_s": job_alone, "train_job_busy_it_s": job_rate,
                   "train_job_slowdown": (job_alone / job_rate) if job_rate else None,
                   "train_job_threads": job.threads}
            rows.append(row)
            print(f"[{policy}] {case:<10} alone {row['alone_s']:7.2f} s ({alone['threads']}); "
                  f"busy {row['busy_s']:7.2f} s ({busy['threads']}); slowdown "
                  f"{row['slowdown']:5.2f}x; training job {job_rate or 0:.2f} it/s "
                  f"(slowdown {row['train_job_slowdown'] or float('nan'):.2f}x)", flush=True)
    lines = [f"{'case':<10} | " + " | ".join(
        f"{p}: alone s, busy s, slowdown, train job slowdown" for p in args.policies)]
    for case in args.cases:
        cells = []
        for p in args.policies:
            r = next(x for x in rows if x["policy"] == p and x["case"] == case)
            cells.append(f"{r['alone_s']:.2f}, {r['busy_s']:.2f}, **{r['slowdown']:.2f}x**, "
                         f"{r['train_job_slowdown'] or float('nan'):.2f}x")
        lines.append(f"{case:<10} | " + " | ".join(cells))
    print("\n".join(lines))
    if "bicubic" in args.cases and "pil" in args.cases:
        for p in args.policies:
            b = next(x for x in rows if x["policy"] == p and x["case"] == "bicubic")
            q = next(x for x in rows if x["policy"] == p and x["case"] == "pil")
            print(f"[{p}] bicubic x2 vs PIL: alone {q['alone_s'] / b['alone_s']:.2f}x, busy "
                  f"{q['busy_s'] / b['busy_s']:.2f}x")
    machine["loadavg_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine, "rows": rows, "command": " ".join(
                [".venv/bin/python", "bench/busy.py", *sys.argv[1:]])}, indent=1) + "\n")
        Path(args.json).with_suffix(".txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
