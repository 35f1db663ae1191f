"""Inference backends, measured in one run: ms/image on the DIV2K test LR set, speed-up vs
eager fp32 on the same machine, and each backend's Set5 x4 PSNR delta against eager fp32.

    python bench/inference.py                       # RLFN x4 and the challenge model, CPU
    python bench/inference.py --device cuda         # every backend that runs on the GPU
    python bench/inference.py --max-images 0 --json bench/results/inference.json

The goal (issue 6): the fastest exact CPU backend >= 3x eager fp32 for RLFN and for the
challenge model; on a GPU the same against eager fp32 on that card. "exact" = within 0.01 dB
of eager on Set5 x4; "max diff" is the largest uint8 pixel difference on Set5.
The int8 goal (issue 15): within 0.05 dB of eager fp32 on Set5 and B100 x4 and >= 1.5x the
fastest exact fp32 backend, both timed in this run (the B100 column: ``--sets Set5 B100``,
the default). ``--pareto PREFIX`` draws PSNR vs ms per backend: PREFIX_<model>.png.
Backends that cannot run here (no GPU, package missing, no native bf16) are listed with why.

Batched throughput (issue 15): ``--batch 1 4 16`` also times each backend on batches of
same-size images (the most common size in ``--input-dir``: 339x510 for the DIV2K test LR
set) and reports images/s, output MP/s and the fraction of the memory-bandwidth roofline:
``rlfn.profile.traffic_bytes`` (input + weights + each conv's output written and read once +
output, per image; fp16/bf16 backends at 2 bytes an element) x images/s / peak bandwidth.
Peak: ``--peak-gbs``, else the GPU's datasheet figure (``rlfn.profile.PEAK_GBS``: H200 4800
GB/s), else (CPU, unknown GPU) a copy bandwidth measured in this run. ``--throughput-only``
skips the latency/PSNR table.

    python bench/inference.py --device cuda --batch 1 4 16 --sets Set5
    python bench/inference.py --models rlfn_ntire_x4.pth --backends eager channels_last \
        --batch 1 4 --throughput-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlfn.evaluate import evaluate_folder  # noqa: E402
from rlfn.backends import BACKENDS, check_backend, make_engine  # noqa: E402
from rlfn.engine import BackendError, psnr_label  # noqa: E402
from rlfn.io import list_images  # noqa: E402
from rlfn.io import read_image  # noqa: E402
from rlfn.profile import peak_bandwidth, profile_runtime, traffic_bytes  # noqa: E402
from rlfn.upscale import ModelUpscaler, to_tensor  # noqa: E402
from rlfn.weights import load_model  # noqa: E402

SHARED = Path(os.environ.get("RLFN_SHARED", ROOT.parent / "shared"))


def set5_outputs(engine, hr_dir: Path, lr_dir: Path) -> tuple[float, list[np.ndarray]]:
    outs: list[np.ndarray] = []
    rep = evaluate_folder(ModelUpscaler(engine), hr_dir, lr_dir,
                          on_image=lambda name, lr, sr, hr: outs.append(sr))
    if rep.errors:
        raise RuntimeError("; ".join(rep.errors))
    return rep.mean["psnr_y"], outs


def bench_model(weights: Path, backends: list[str], device: str, args) -> list[dict]:
    hr_dir = SHARED / "data" / "benchmarks" / "Set5" / "x4" / "HR"
    lr_dir = SHARED / "data" / "benchmarks" / "Set5" / "x4" / "LR"
    rows: list[dict] = []
    base_ms = base_psnr = base_out = base_b100 = None
    b100_dir = SHARED / "data" / "benchmarks" / "BSD100" / "x4"
    for name in backends:
        row = {"model": weights.name, "backend": name, "device": device}
        try:
            check_backend(name, device)
        except BackendError as e:
            row["skipped"] = str(e)
            rows.append(row)
            print(f"  {name:<14} skipped: {e}", flush=True)
            continue
        t0 = time.perf_counter()
        engine = make_engine(load_model(weights).model, name, device,
                             calibration=args.calibration)
        if args.throughput_only:
            row.update(setup_s=time.perf_counter() - t0)
            rows += throughput_rows(engine, weights, name, device, args)
            del engine
            continue
        psnr, outs = set5_outputs(engine, hr_dir, lr_dir)  # also warms every Set5 shape up
        setup_s = time.perf_counter() - t0
        b100 = None
        if "B100" in args.sets:
            rep = evaluate_folder(ModelUpscaler(engine), b100_dir / "HR", b100_dir / "LR")
            if rep.errors:
                raise RuntimeError("; ".join(rep.errors))
            b100 = rep.mean["psnr_y"]
        for _ in range(args.passes - 1):  # untimed passes: every image size seen once
            profile_runtime(engine, args.input_dir, args.max_images, args.warmup)
        rt = profile_runtime(engine, args.input_dir, args.max_images, args.warmup)
        if name == "eager":
            base_ms, base_psnr, base_out, base_b100 = rt["median_ms"], psnr, outs, b100
        delta = psnr - base_psnr
        maxdiff = max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(outs, base_out))
        row.update(ms=rt["median_ms"], mean_ms=rt["mean_ms"], stdev_ms=rt["stdev_ms"],
                   images=rt["images"], threads=rt["threads"], speedup=base_ms / rt["median_ms"],
                   psnr=psnr, psnr_delta=delta, label=psnr_label(delta), max_diff=maxdiff,
                   promised_exact=BACKENDS[name].exact, setup_s=setup_s,
                   peak_mb=rt.get("peak_gpu_mb", rt.get("peak_rss_mb")))
        if b100 is not None:
            row.update(psnr_b100=b100, b100_delta=b100 - base_b100)
        rows.append(row)
        more = f"  B100 {row['b100_delta']:+.4f} dB" if b100 is not None else ""
        print(f"  {name:<14} {row['ms']:9.1f} ms  x{row['speedup']:5.2f}  "
              f"{delta:+.4f} dB  maxdiff {maxdiff:2d}  {row['label']}{more}", flush=True)
        if args.batch:
            rows += throughput_rows(engine, weights, name, device, args)
        del engine
    return rows


# --------------------------------------------------------------------------- throughput
HALF = {"fp16", "cuda_graphs", "compile_graphs", "compile_fp16", "bf16", "compile_bf16",
        "openvino_bf16"}


def same_size_images(input_dir: str, count: int) -> list[np.ndarray]:
    """``count`` images of the most common size in ``input_dir`` (repeated if too few)."""
    from PIL import Image

    files = list_images([input_dir])
    sizes: dict[tuple, list] = {}
    for f in files:
        with Image.open(f) as im:
            sizes.setdefault(im.size, []).append(f)
    group = max(sizes.values(), key=len)
    group = group[:count]
    imgs = [read_image(f)[0] for f in group]
    return [imgs[i % len(imgs)] for i in range(count)]


_TRAFFIC: dict[tuple, dict] = {}


def traffic_per_image(weights: Path, h: int, w: int, dtype_bytes: int, batch: int) -> dict:
    key = (str(weights), h, w, dtype_bytes, batch)
    if key not in _TRAFFIC:
        _TRAFFIC[key] = traffic_bytes(load_model(weights).model, h, w, dtype_bytes, batch)
    return _TRAFFIC[key]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def throughput_rows(engine, weights: Path, name: str, device: str, args) -> list[dict]:
    """images/s at each of ``args.batch`` on same-size images, with the roofline fraction."""
    out = []
    imgs = same_size_images(args.input_dir, max(args.batch))
    h, w = imgs[0].shape[:2]
    dtype_bytes = 2 if name in HALF else 4
    for b in args.batch:
        x = torch.cat([to_tensor(im, device) for im in imgs[:b]])
        for _ in range(3):  # warm-up: compilation, CUDA graph warm-up + capture, cuDNN search
            engine(x)
        sync(device)
        reps = max(args.min_batches, -(-args.throughput_images // b))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            engine(x)
            sync(device)
            times.append(time.perf_counter() - t0)
        per_batch = float(np.median(times))
        ips = b / per_batch
        tr = traffic_per_image(weights, h, w, dtype_bytes, b)
        per_image = tr["total"] / b
        row = {"model": weights.name, "backend": name, "device": device, "kind": "throughput",
               "batch": b, "input_hw": [h, w], "batches_timed": reps,
               "ms_per_batch": per_batch * 1e3, "images_per_s": ips,
               "output_mp_per_s": ips * h * w * engine.scale**2 / 1e6,
               "traffic_mb_per_image": per_image / 1e6, "dtype_bytes": dtype_bytes,
               "achieved_gbs": per_image * ips / 1e9, "peak_gbs": args.peak[0],
               "roofline_fraction": per_image * ips / 1e9 / args.peak[0]}
        out.append(row)
        print(f"  {name:<14} batch {b:3d}: {ips:8.2f} img/s  {row['output_mp_per_s']:8.1f} MP/s  "
              f"{row['achieved_gbs']:8.1f} GB/s = {100 * row['roofline_fraction']:5.1f}% of "
              f"{args.peak[0]:.0f} GB/s", flush=True)
        del x
    return out


def throughput_table(rows: list[dict]) -> str:
    lines = ["| model | backend | batch | images/s | output MP/s | ms/batch | traffic MB/image | "
             "achieved GB/s | roofline |", "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['model']} | {r['backend']} | {r['batch']} | {r['images_per_s']:.2f} | "
                     f"{r['output_mp_per_s']:.1f} | {r['ms_per_batch']:.1f} | "
                     f"{r['traffic_mb_per_image']:.0f} | {r['achieved_gbs']:.1f} | "
                     f"{100 * r['roofline_fraction']:.1f}% |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    b100 = any("psnr_b100" in r for r in rows)
    head = ("| model | backend | ms/image (median) | mean ± sd | speed-up vs eager | "
            "Set5 x4 PSNR | delta vs eager | max pixel diff | label |"
            + (" B100 x4 PSNR | B100 delta |" if b100 else ""))
    lines = [head, "|" + "---|" * (11 if b100 else 9)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['backend']} | – | – | – | – | – | – | "
                         f"not run: {r['skipped']} |" + (" – | – |" if b100 else ""))
            continue
        lines.append(f"| {r['model']} | {r['backend']} | {r['ms']:.1f} | {r['mean_ms']:.1f} ± "
                     f"{r['stdev_ms']:.1f} | **{r['speedup']:.2f}x** | {r['psnr']:.4f} | "
                     f"{r['psnr_delta']:+.4f} dB | {r['max_diff']} | {r['label']} |"
                     + (f" {r['psnr_b100']:.4f} | {r['b100_delta']:+.4f} dB |"
                        if "psnr_b100" in r else " – | – |" if b100 else ""))
    return "\n".join(lines)


INT8_GOAL_DB, INT8_GOAL_SPEEDUP = 0.05, 1.5


def int8_goal(rows: list[dict]) -> str:
    """The int8 row against issue 15's goal, measured in this run."""
    q = next((r for r in rows if r["backend"] == "int8"), None)
    if q is None or "skipped" in q:
        return f"  int8: not run ({q['skipped'] if q else 'not asked for'})"
    exact = [r for r in rows if "skipped" not in r and r["promised_exact"]
             and r["label"] == "exact"]
    best = max(exact, key=lambda r: r["speedup"])
    ratio = best["ms"] / q["ms"]
    deltas = [q["psnr_delta"]] + ([q["b100_delta"]] if "b100_delta" in q else [])
    ok = ratio >= INT8_GOAL_SPEEDUP and all(abs(d) <= INT8_GOAL_DB for d in deltas)
    b100 = f", B100 {q['b100_delta']:+.4f} dB" if "b100_delta" in q else ", B100 not measured"
    return (f"  int8: {ratio:.2f}x the fastest exact fp32 backend ({best['backend']}, "
            f"{best['ms']:.1f} ms -> {q['ms']:.1f} ms); Set5 {q['psnr_delta']:+.4f} dB{b100} "
            f"vs eager fp32: {'meets' if ok else 'misses'} the goal (>= {INT8_GOAL_SPEEDUP}x, "
            f"within {INT8_GOAL_DB} dB)")


def pareto_chart(rows: list[dict], model: str, prefix: str, where: str) -> Path | None:
    from rlfn.pareto import plot_pareto

    pts = []
    for r in rows:
        if r["model"] != model or "skipped" in r:
            continue
        kind = "exact fp32" if r["promised_exact"] else r["backend"].split("_")[-1]
        pts.append({"label": r["backend"], "set": "Set5", "psnr_y": r["psnr"],
                    "runtime_ms": r["ms"], "kind": kind})
        if "psnr_b100" in r:
            pts.append({"label": r["backend"], "set": "B100", "psnr_y": r["psnr_b100"],
                        "runtime_ms": r["ms"], "kind": kind})
    return plot_pareto(pts, f"{prefix}_{Path(model).stem}.png",
                       title=f"{model} x4 backends: Y-PSNR vs ms/image ({where})",
                       runtime_label="ms / DIV2K test LR image (median)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["rlfn_x4.pth", "rlfn_ntire_x4.pth"],
                    help="weights files (names are looked up in ../shared/pretrained)")
    ap.add_argument("--backends", nargs="+", default=None, help="default: all for the device")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--input-dir", default=str(SHARED / "data" / "div2k_test_lr_x4"))
    ap.add_argument("--calibration", default=str(ROOT / "data" / "sample" / "train"),
                    help="int8 calibration data: a patch store .arrow or a folder of HR "
                         "training images (default: the embedded sample data/sample/train)")
    ap.add_argument("--max-images", type=int, default=20, help="0 = all 100")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--passes", type=int, default=1,
                    help="time the last of N passes over the images (2: every size warm)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--sets", nargs="+", default=["Set5", "B100"], choices=["Set5", "B100"],
                    help="PSNR sets (Set5 always; B100 adds a column)")
    ap.add_argument("--pareto", metavar="PREFIX",
                    help="draw PSNR vs ms per backend to PREFIX_<model>.png")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--batch", type=int, nargs="+", default=None, metavar="N",
                    help="also time batches of N same-size images (e.g. 1 4 16): images/s, "
                         "MP/s, roofline fraction")
    ap.add_argument("--throughput-only", action="store_true",
                    help="only the batched throughput (no latency/PSNR table)")
    ap.add_argument("--throughput-images", type=int, default=32,
                    help="images timed per batch size (at least --min-batches batches)")
    ap.add_argument("--min-batches", type=int, default=3)
    ap.add_argument("--peak-gbs", type=float, default=None,
                    help="peak memory bandwidth, GB/s (default: the GPU's datasheet figure, "
                         "e.g. H200 4800; CPU: a copy measured in this run)")
    args = ap.parse_args()
    if args.throughput_only and not args.batch:
        args.batch = [1, 4, 16]
    if args.batch and min(args.batch) < 1:
        ap.error("--batch sizes must be >= 1")
    if not SHARED.is_dir():
        print(f"bench/inference.py needs {SHARED} (Set5 and the DIV2K test LR images)")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    backends = args.backends or [b for b in BACKENDS if device.split(":")[0] in BACKENDS[b].devices]
    if "eager" not in backends:
        backends.insert(0, "eager")
    backends.remove("eager")
    backends.insert(0, "eager")
    where = (torch.cuda.get_device_name(device) if device.startswith("cuda") and
             torch.cuda.is_available() else f"{platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads")
    n = len(list_images([args.input_dir]))
    print(f"device: {device} ({where}); torch {torch.__version__}; timed on "
          f"{min(args.max_images or n, n)} of {n} images in {args.input_dir}", flush=True)
    args.peak = peak_bandwidth(device, args.peak_gbs) if args.batch else (0.0, "")
    if args.batch:
        print(f"roofline peak: {args.peak[0]:.1f} GB/s ({args.peak[1]})", flush=True)
    rows = []
    for m in args.models:
        weights = Path(m) if Path(m).exists() else SHARED / "pretrained" / m
        print(f"{weights.name}:", flush=True)
        rows += bench_model(weights, backends, device, args)
    tput = [r for r in rows if r.get("kind") == "throughput"]
    rows = [r for r in rows if r.get("kind") != "throughput"]
    print()
    if tput:
        print(throughput_table(tput))
        for m in args.models:
            mine = [r for r in tput if r["model"] == Path(m).name]
            if mine:
                best = max(mine, key=lambda r: r["roofline_fraction"])
                print(f"{Path(m).name}: best throughput {best['images_per_s']:.1f} img/s "
                      f"({best['backend']}, batch {best['batch']}) = "
                      f"{100 * best['roofline_fraction']:.1f}% of the bandwidth roofline "
                      f"({'meets' if best['roofline_fraction'] >= 0.25 else 'misses'} the "
                      f"25% goal)")
        print()
    if args.throughput_only:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(
                {"device": device, "where": where, "peak_gbs": args.peak[0],
                 "peak_source": args.peak[1], "rows": rows, "throughput": tput},
                indent=2) + "\n")
        return 0
    print(table(rows))
    for m in args.models:
        ok = [r for r in rows if r["model"] == Path(m).name and "skipped" not in r
              and r["label"] == "exact" and r["promised_exact"]]
        if ok:
            best = max(ok, key=lambda r: r["speedup"])
            print(f"{Path(m).name}: fastest exact (fp32) backend: {best['backend']} "
                  f"{best['speedup']:.2f}x eager fp32 "
                  f"({'meets' if best['speedup'] >= 3 else 'misses'} the 3x goal)")
        ok_psnr = [r for r in rows if r["model"] == Path(m).name and "skipped" not in r
                   and r["label"] == "exact"]
        if ok_psnr:
            best = max(ok_psnr, key=lambda r: r["speedup"])
            print(f"{Path(m).name}: fastest within 0.01 dB: {best['backend']} "
                  f"{best['speedup']:.2f}x")
        print(int8_goal([r for r in rows if r["model"] == Path(m).name]))
        if args.pareto:
            print(f"  Pareto chart: {pareto_chart(rows, Path(m).name, args.pareto, where)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": device, "where": where,
                                               "rows": rows, "throughput": tput,
                                               "peak_gbs": args.peak[0],
                                               "peak_source": args.peak[1]},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
