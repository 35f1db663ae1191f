"""Benchmark: training iterations/s of our step vs a plain eager step, same model and batch.

    .venv/bin/python bench/train_step.py [--model rlfn] [--batch 16] [--patch 128] [--steps 20]

"plain": NCHW float32, the textbook loop. "channels_last fp32": the layout alone. "ours": what
rlfn.train.engine does by default (channels_last; bf16 autocast where it trains faster: CUDA,
CPUs with AMX, AMD CPUs with AVX512-BF16, see rlfn.device.bf16_trains_faster); where bf16 runs natively the table
also has channels_last bf16 autocast, chosen or not. ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``
in the environment caps oneDNN below AMX (the class of CPUs without it). Run on a CUDA machine to
get the GPU table (the card is named). One run, same machine, alternating order.

    .venv/bin/python bench/train_step.py --data --batch 64 --patch 256 [--warmup 3 --steps 8]
        [--workers N] [--store-dir /tmp/rlfn_bench_store] [--out bench/results/train_step_cpu.json]

``--data``: the data path. (a) "ours" step on a fixed in-memory batch vs (b) the full step:
next batch from rlfn.train.data.IterationBatches (the trainer's DataLoader, TrainConfig's
num_workers, prefetching, pin_memory + non_blocking copy on CUDA) + the same step, alternating;
(c) the loader alone. Store built from data/sample/train by store_from_folder (cached). Goal:
(b)/(a) >= 0.90. Reports the best-of ratio too (robust to other load on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rlfn.models import build_model  # noqa: E402
from rlfn.device import (ISA_CAP_ENV, bf16_native, bf16_trains_faster,  # noqa: E402
                         cpu_amx_usable)


def make_step(model, opt, channels_last: bool, bf16: bool, device):
    def step(lr, hr):
        if channels_last:
            lr = lr.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            sr = model(lr)
            loss = F.l1_loss(sr.float(), hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="rlfn")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--patch", type=int, default=128, help="HR patch size")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", action="store_true",
                    help="full step (project DataLoader + copy + step) vs model-only step")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workers", type=int, default=None, help="default: TrainConfig's")
    ap.add_argument("--store-dir", default="/tmp/rlfn_bench_store")
    ap.add_argument("--out", default=None, help="write JSON results here (--data)")
    args = ap.parse_args()
    if args.data:
        return data_mode(args)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} x{args.scale}, batch {args.batch}, HR patch {args.patch}, {name}")
    g = torch.Generator().manual_seed(0)
    lr = (torch.rand(args.batch, 3, args.patch // args.scale, args.patch // args.scale,
                     generator=g) * 255).to(device)
    hr = (torch.rand(args.batch, 3, args.patch, args.patch, generator=g) * 255).to(device)
    ours = bf16_trains_faster(device)  # amp: auto (rlfn.train.step.use_bf16)
    isa = next((os.environ[k] for k in ISA_CAP_ENV if os.environ.get(k)), None)
    print(f"bf16: {'native' if bf16_native(device) else 'not native'}"
          f"{f', AMX {cpu_amx_usable()}' if device.type == 'cpu' else ''}"
          f"{f' (oneDNN capped to {isa})' if isa else ''}; amp auto picks "
          f"{'bf16' if ours else 'fp32'}")
    variants = {"plain (NCHW fp32)": (False, False),
                "channels_last fp32": (True, False)}
    if bf16_native(device):  # both ways wherever bf16 runs: what auto chose against the other
        variants["channels_last, bf16 autocast"] = (True, True)
    variants[f"ours (channels_last{', bf16 autocast' if ours else ' fp32'})"] = (True, ours)
    steps = {}
    for label, (cl, bf16) in variants.items():
        torch.manual_seed(0)
        m = build_model(args.model, args.scale).to(device)
        if cl:
            m = m.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(m.parameters(), lr=5e-4)
        steps[label] = make_step(m, opt, cl, bf16, device)
    times = {k: [] for k in steps}
    for label, step in steps.items():  # warm-up
        for _ in range(3):
            step(lr, hr)
    for _ in range(args.steps):  # interleaved, so drift hits every variant alike
        for label, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(lr, hr)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[label].append(time.perf_counter() - t0)
    base = statistics.median(times[next(iter(times))])
    print(f"{'variant':<40} {'it/s':>7} {'ms/it':>8} {'speed-up':>9}")
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"{label:<40} {1 / med:7.2f} {med * 1000:8.1f} {base / med:8.2f}x")


def data_mode(args) -> None:
    """(a) model-only "ours" step on a fixed in-memory batch; (b) the full step: next batch
    from rlfn.train.data.IterationBatches (the trainer's DataLoader, workers, pinning,
    non_blocking copy) + the same step; (c) the loader alone. Alternating (a)/(b)."""
    import json
    import platform
    from rlfn.train.config import TrainConfig
    from rlfn.train.data import IterationBatches, open_training_data
    device = torch.device(args.device)
    load0 = os.getloadavg()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, " \
        f"{torch.get_num_threads()} torch threads"
    cfg = TrainConfig(model=args.model, scale=args.scale, batch_size=args.batch,
                      patch_size=args.patch,
                      hr_dir=str(Path(__file__).resolve().parents[1] / "data/sample/train"))
    if args.workers is not None:
        cfg.num_workers = args.workers
    ds = open_training_data(cfg, args.store_dir, progress=False)
    bf16 = bf16_trains_faster(device)
    torch.manual_seed(0)
    m = build_model(args.model, args.scale).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(m.parameters(), lr=5e-4)
    step = make_step(m, opt, True, bf16, device)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    n = args.warmup + args.steps
    print(f"{args.model} x{args.scale}, batch {args.batch}, HR patch {args.patch}, {name}, "
          f"workers {cfg.num_workers}, bf16 {bf16}", flush=True)
    # (c) the data path alone
    it = iter(IterationBatches(ds, cfg, 0, n + 1, device))
    tl = []
    for i in range(n):
        ta = time.perf_counter()
        lr_b, hr_b = next(it)
        sync()
        tl.append(time.perf_counter() - ta)
    loader_bps = args.steps / sum(tl[args.warmup:])
    print(f"loader alone: {loader_bps:.2f} batches/s (first batch {tl[0]:.2f} s)", flush=True)
    fixed = (lr_b.clone(), hr_b.clone())
    batches = iter(IterationBatches(ds, cfg, 1000, 1000 + n + 1, device))
    ta_, tb_ = [], []
    for i in range(n):
        order = ("a", "b") if i % 2 == 0 else ("b", "a")
        for k in order:
            sync()
            t = time.perf_counter()
            if k == "a":
                step(*fixed)
            else:
                lr_b, hr_b = next(batches)
                step(lr_b, hr_b)
            sync()
            dt = time.perf_counter() - t
            if i >= args.warmup:
                (ta_ if k == "a" else tb_).append(dt)
        print(f"  step {i + 1}/{n}{' (warm-up)' if i < args.warmup else ''}: "
              f"done", flush=True)
    a = args.batch / statistics.median(ta_)
    b = args.batch / statistics.median(tb_)
    ratio = b / a
    best_ratio = min(ta_) / min(tb_)  # best-of: robust to interference on a shared machine
    hours = 1e6 / (b / args.batch) / 3600
    load1 = os.getloadavg()
    res = {"machine": name, "torch": torch.__version__, "device": str(device),
           "model": args.model, "scale": args.scale, "batch": args.batch,
           "hr_patch": args.patch, "num_workers": cfg.num_workers, "bf16": bf16,
           "warmup": args.warmup, "steps": args.steps,
           "model_only_samples_s": a, "model_only_it_s": a / args.batch,
           "full_samples_s": b, "full_it_s": b / args.batch, "ratio": ratio, "ratio_best_of": best_ratio,
           "goal_90pct_met": ratio >= 0.9, "loader_alone_batches_s": loader_bps,
           "loader_alone_samples_s": loader_bps * args.batch,
           "hours_per_1e6_iterations_full": hours,
           "step_times_model_only_s": ta_, "step_times_full_s": tb_,
           "loadavg_before": load0, "loadavg_after": load1,
           "command": " ".join([".venv/bin/python"] + sys.argv)}
    lines = [f"{res['machine']}, torch {res['torch']}, {args.model} x{args.scale}, batch "
             f"{args.batch} x HR {args.patch}, workers {cfg.num_workers}, bf16 {bf16}",
             f"{'path':<34} {'samples/s':>10} {'it/s':>8}",
             f"{'(a) model only (in-memory batch)':<34} {a:10.2f} {a / args.batch:8.4f}",
             f"{'(b) full step (loader+copy+step)':<34} {b:10.2f} {b / args.batch:8.4f}",
             f"{'(c) loader alone':<34} {loader_bps * args.batch:10.2f} {loader_bps:8.4f}",
             f"ratio (b)/(a) = {ratio:.3f} (goal >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'})",
             f"ratio of best-of step times = {best_ratio:.3f} (robust to other load)",
             f"1e6 iterations per stage at (b): {hours:.1f} h",
             f"load average before {load0}, after {load1}", f"command: {res['command']}"]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
        Path(args.out).with_suffix(".txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
