"""Benchmark: training iterations/s of our step vs a plain eager step, same model and batch.

    .venv/bin/python bench/train_step.py [--model rlfn] [--batch 16] [--patch 128] [--steps 20]

"plain": NCHW float32, the textbook loop. "channels_last fp32": the layout alone. "ours": what
rlfn.train.engine does by default (channels_last; bf16 autocast on CUDA and on CPUs with
native bf16, see rlfn.device.bf16_native). Run on a CUDA machine to
get the GPU table (the card is named). One run, same machine, alternating order.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rlfn.models import build_model  # noqa: E402
from rlfn.device import bf16_native  # noqa: E402


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
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} x{args.scale}, batch {args.batch}, HR patch {args.patch}, {name}")
    g = torch.Generator().manual_seed(0)
    lr = (torch.rand(args.batch, 3, args.patch // args.scale, args.patch // args.scale,
                     generator=g) * 255).to(device)
    hr = (torch.rand(args.batch, 3, args.patch, args.patch, generator=g) * 255).to(device)
    bf16 = bf16_native(device)
    variants = {"plain (NCHW fp32)": (False, False),
                "channels_last fp32": (True, False),
                f"ours (channels_last{', bf16 autocast' if bf16 else ''})": (True, bf16)}
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


if __name__ == "__main__":
    main()
