"""Where a forward's time goes: a ``torch.profiler`` trace of N forwards of one backend.

    python bench/gpu_profile.py --device cuda --backend eager --out bench/results/prof
    python bench/gpu_profile.py --device cuda --backend compile_graphs --batch 4
    python bench/gpu_profile.py --model tiny --size 24x32 --forwards 2 --out /tmp/prof  # CPU

Summarised per forward (``profile_<backend>_b<batch>.json``; the Chrome trace, for
chrome://tracing or Perfetto, in ``trace_<backend>_b<batch>.json``):

* ``ops_per_forward``: on CUDA the GPU activities (kernels, memcpy/memset), on the CPU the
  operators called by the forward (the aten ops directly under it);
* ``busy_ms``: the union of those activities' intervals (the device is doing something),
  ``wall_ms``: the forward's wall time (synchronised), timed once without the profiler
  (``wall_ms``) and under it (``profiled_wall_ms``); ``gap_ms`` = profiled wall - busy: launch
  gaps and Python/dispatch overhead with the device idle, ``busy_fraction`` = busy / wall;
* ``top_ops``: the operators with the most self device time (CPU: self CPU time);
* ``achieved_gbs``: ``rlfn.profile.traffic_bytes`` (the unavoidable traffic of a forward)
  over busy time and over wall time, and as a fraction of the peak bandwidth (``--peak-gbs``;
  default the GPU's datasheet figure, e.g. H200 4800 GB/s; CPU: a copy measured here).

``--model tiny``: a small random RLFN (tests); else a weights file (looked up in
../shared/pretrained).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlfn.backends import make_engine  # noqa: E402
from rlfn.models.rlfn import RLFN  # noqa: E402
from rlfn.profile import peak_bandwidth, traffic_bytes  # noqa: E402

SHARED = Path(os.environ.get("RLFN_SHARED", ROOT.parent / "shared"))
HALF = {"fp16", "cuda_graphs", "compile_graphs", "compile_fp16", "bf16", "compile_bf16"}
MARK = "rlfn_forward"


def load(name: str) -> torch.nn.Module:
    if name == "tiny":
        torch.manual_seed(0)
        return RLFN(feature_channels=8, mid_channels=8, esa_channels=4, num_blocks=1).eval()
    from rlfn.weights import load_model

    path = Path(name) if Path(name).exists() else SHARED / "pretrained" / name
    return load_model(path).model


def union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length (ms) of the union of ``(start_us, end_us)`` intervals."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1e3


def _self_time_us(avg, cuda: bool) -> float:
    names = (("self_device_time_total", "self_cuda_time_total") if cuda
             else ("self_cpu_time_total",))
    for n in names:
        v = getattr(avg, n, None)
        if v is not None:
            return float(v)
    return 0.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_backend(model: torch.nn.Module, backend: str, device: torch.device, batch: int,
                    h: int, w: int, forwards: int, warmup: int, out_dir: Path,
                    peak_gbs: float | None = None) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    dtype_bytes = 2 if backend in HALF else 4
    traffic = traffic_bytes(model, h, w, dtype_bytes, batch)  # before the engine converts it
    engine = make_engine(model, backend, device)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, h, w, generator=g) * 255).round().to(device)
    for _ in range(warmup):
        engine(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(forwards):
        engine(x)
    sync(device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / forwards

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=False) as prof:
        t0 = time.perf_counter()
        for _ in range(forwards):
            with record_function(MARK):
                engine(x)
        sync(device)
        profiled_wall_ms = (time.perf_counter() - t0) * 1e3 / forwards
    tag = f"{backend}_b{batch}"
    trace = out_dir / f"trace_{tag}.json"
    prof.export_chrome_trace(str(trace))

    events = prof.events()
    if cuda:
        acts = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
        kind = "GPU activities (kernels, memcpy, memset)"
    else:
        acts = [e for e in events if e.cpu_parent is not None and e.cpu_parent.name == MARK]
        kind = "CPU operators directly under the forward"
    busy_ms = union_ms([(e.time_range.start, e.time_range.end) for e in acts]) / forwards
    avgs = sorted(prof.key_averages(), key=lambda a: _self_time_us(a, cuda), reverse=True)
    total_self = sum(_self_time_us(a, cuda) for a in avgs) or 1.0
    top = [{"name": a.key, "calls_per_forward": a.count / forwards,
            "self_ms_per_forward": _self_time_us(a, cuda) / 1e3 / forwards,
            "share": _self_time_us(a, cuda) / total_self}
           for a in avgs[:12] if _self_time_us(a, cuda) > 0 and a.key != MARK]
    bw_peak, peak_src = peak_bandwidth(device, peak_gbs, cpu_mbytes=128)
    busy_s = max(busy_ms, 1e-6) / 1e3
    summary = {
        "backend": backend, "device": str(device),
        **({"gpu": torch.cuda.get_device_name(device)} if cuda else
           {"threads": torch.get_num_threads()}),
        "torch": torch.__version__, "batch": batch, "input_hw": [h, w], "forwards": forwards,
        "activity_kind": kind, "ops_per_forward": len(acts) / forwards,
        "wall_ms": wall_ms, "profiled_wall_ms": profiled_wall_ms, "busy_ms": busy_ms,
        "gap_ms": max(profiled_wall_ms - busy_ms, 0.0),
        "busy_fraction": min(busy_ms / profiled_wall_ms, 1.0),
        "traffic_mb": traffic["total"] / 1e6, "dtype_bytes": dtype_bytes,
        "achieved_gbs_busy": traffic["total"] / busy_s / 1e9,
        "achieved_gbs_wall": traffic["total"] / (wall_ms / 1e3) / 1e9,
        "peak_gbs": bw_peak, "peak_source": peak_src,
        "roofline_fraction_wall": traffic["total"] / (wall_ms / 1e3) / 1e9 / bw_peak,
        "top_ops": top, "trace": str(trace)}
    (out_dir / f"profile_{tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def report(s: dict) -> str:
    lines = [f"{s['backend']} on {s.get('gpu', s['device'])}, batch {s['batch']} x "
             f"{s['input_hw'][0]}x{s['input_hw'][1]}, {s['forwards']} forwards:",
             f"  {s['ops_per_forward']:.0f} {s['activity_kind']} per forward",
             f"  wall {s['wall_ms']:.2f} ms (profiled {s['profiled_wall_ms']:.2f}), busy "
             f"{s['busy_ms']:.2f} ms = {100 * s['busy_fraction']:.0f}%, gaps "
             f"{s['gap_ms']:.2f} ms",
             f"  traffic {s['traffic_mb']:.0f} MB/forward: {s['achieved_gbs_busy']:.0f} GB/s "
             f"while busy, {s['achieved_gbs_wall']:.0f} GB/s over wall = "
             f"{100 * s['roofline_fraction_wall']:.1f}% of {s['peak_gbs']:.0f} GB/s "
             f"({s['peak_source']})", "  top operators (self time per forward):"]
    for t in s["top_ops"][:8]:
        lines.append(f"    {t['self_ms_per_forward']:8.3f} ms  {100 * t['share']:5.1f}%  "
                     f"x{t['calls_per_forward']:<5.0f} {t['name'][:70]}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="rlfn_ntire_x4.pth",
                    help="weights file (name in ../shared/pretrained) or 'tiny'")
    ap.add_argument("--backend", nargs="+", default=["eager"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", default="339x510", help="LR HxW (default: DIV2K test LR)")
    ap.add_argument("--forwards", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak-gbs", type=float, default=None)
    ap.add_argument("--out", default="bench/results/gpu_profile")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    for backend in args.backend:
        s = profile_backend(load(args.model), backend, device, args.batch, h, w,
                            args.forwards, args.warmup, out, args.peak_gbs)
        print(report(s), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
