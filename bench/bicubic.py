"""Benchmark: our MATLAB-exact bicubic downscale vs PIL's bicubic (not exact), one run.

    .venv/bin/python bench/bicubic.py [--shared ../shared] [--repeat 5] [--threads 2,1]
                                      [--json bench/results/bicubic_cpu.json]

Prints, for the same images and scales: megapixels/s (of HR input) for ours and PIL, the
ratio, and how many of the 257 MATLAB-made reference LR files each reproduces bit-exactly.
Also times a batched NCHW call (64 HR crops of 256x256, the training-data use) and CUDA when
a GPU is present. Goal (foundation issue, issue 15): ours >= PIL throughput while staying
bit-exact, x2 and x4. "ours" is the compiled path (``rlfn.bicubic_native``) where the machine
has a C compiler, else the NumPy/torch path; ``--numpy`` times the latter.

``--threads`` takes a comma-separated list of torch thread counts, one table each (default:
torch's default). PIL is single-threaded. Ours and PIL are timed interleaved (ours, PIL, ours,
PIL, ...) and each keeps its best repeat, so load from other processes hits both alike.
``--json`` also writes the rows and the machine (CPU model, cores, versions) to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import machine  # noqa: E402
from rlfn.bicubic import imresize, imresize_array, modcrop  # noqa: E402


def load(paths):
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def time_it(fn, items, repeat):
    fn(items[0])  # warm-up (weight tables, allocator)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        best = min(best, time.perf_counter() - t0)
    return best


def time_pair(fa, items_a, fb, items_b, repeat):
    """Best-of-``repeat`` times of two workloads, measured interleaved (a, b, a, b, ...)."""
    fa(items_a[0])
    fb(items_b[0])
    best_a = best_b = float("inf")
    for _ in range(repeat):
        for fn, items, which in ((fa, items_a, 0), (fb, items_b, 1)):
            t0 = time.perf_counter()
            for it in items:
                fn(it)
            t = time.perf_counter() - t0
            if which == 0:
                best_a = min(best_a, t)
            else:
                best_b = min(best_b, t)
    return best_a, best_b


def ours(img, scale):
    return imresize_array(img, 1 / scale)


def pil(img, scale):
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((w // scale, h // scale), Image.BICUBIC))


def speed_table(shared: Path, repeat: int) -> list[dict]:
    bench = shared / "data" / "benchmarks"
    sets = {
        "benchmark HR (Set5+Set14+B100, x4 dirs)": sorted(bench.glob("*/x4/HR/*.png")),
        "DIV2K test images (510x339)": sorted((shared / "data" / "div2k_test_lr_x4").glob("*.png")),
    }
    rows = []

    def row(name, scale, mp, t_ours, t_pil):
        rows.append({"images": name, "scale": scale, "ours_mp_s": round(mp / t_ours, 1),
                     "pil_mp_s": round(mp / t_pil, 1), "ratio": round(t_pil / t_ours, 2)})
        print(f"{name:<42} {'x%d' % scale:>5} {mp / t_ours:10.1f} {mp / t_pil:9.1f} "
              f"{t_pil / t_ours:6.2f}", flush=True)

    print(f"\n{'images':<42} {'scale':>5} {'ours MP/s':>10} {'PIL MP/s':>9} {'ratio':>6}")
    for name, paths in sets.items():
        imgs = load(paths)
        for scale in (2, 4):
            crops = [np.ascontiguousarray(modcrop(i, scale)) for i in imgs]
            mp = sum(c.shape[0] * c.shape[1] for c in crops) / 1e6
            t_ours, t_pil = time_pair(lambda c: ours(c, scale), crops,
                                      lambda c: pil(c, scale), crops, repeat)
            row(name, scale, mp, t_ours, t_pil)

    # a 2K-sized image (DIV2K HR size) tiled from a real photograph
    img = load(sets["DIV2K test images (510x339)"][:1])[0]
    big = np.ascontiguousarray(np.tile(img, (5, 4, 1))[:1356, :2040])
    mp = big.shape[0] * big.shape[1] / 1e6
    for scale in (2, 4):
        t_ours, t_pil = time_pair(lambda c: ours(c, scale), [big] * 3,
                                  lambda c: pil(c, scale), [big] * 3, repeat)
        row("2040x1356 (DIV2K HR size)", scale, mp, t_ours / 3, t_pil / 3)

    # batched: 64 crops of 256x256 in one NCHW call vs 64 PIL calls
    g = np.random.default_rng(0)
    crops = []
    pool = [i for i in imgs if min(i.shape[:2]) > 256]
    for _ in range(64):
        i = pool[g.integers(len(pool))]
        y, x = g.integers(0, i.shape[0] - 256), g.integers(0, i.shape[1] - 256)
        crops.append(i[y:y + 256, x:x + 256])
    batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    mp = 64 * 256 * 256 / 1e6
    for scale in (2, 4):
        t_ours, t_pil = time_pair(lambda b: imresize(b, scale=1 / scale), [batch],
                                  lambda c: pil(c, scale), crops, repeat)
        row("64x256x256 batch (NCHW, one call)", scale, mp, t_ours, t_pil)
    if torch.cuda.is_available():
        gb = batch.cuda()
        imresize(gb, scale=1 / 4)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            imresize(gb, scale=1 / 4)
        torch.cuda.synchronize()
        t = (time.perf_counter() - t0) / 10
        print(f"{'same batch on ' + torch.cuda.get_device_name():<42} {'x4':>5} {mp / t:10.1f}")
        rows.append({"images": "64x256x256 batch on " + torch.cuda.get_device_name(),
                     "scale": 4, "ours_mp_s": round(mp / t, 1)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", default=None,
                    help="comma-separated torch thread counts, one table each (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--no-exact", action="store_true", help="skip the 257-file exactness check")
    ap.add_argument("--numpy", action="store_true",
                    help="time the NumPy/torch path (no compiler, RLFN_NATIVE=0) instead of the "
                         "compiled one")
    args = ap.parse_args()
    if args.numpy:
        import rlfn.bicubic as bicubic

        bicubic._native = lambda *a: None  # the fallback, as on a machine without a compiler
    from rlfn import bicubic_native

    path = ("NumPy/torch (--numpy)" if args.numpy else "compiled (rlfn.bicubic_native)"
            if bicubic_native.available() else f"NumPy/torch ({bicubic_native.why_not()})")
    shared = Path(args.shared)
    bench = shared / "data" / "benchmarks"
    if not bench.exists():
        sys.exit(f"reference data not found: {bench}")
    threads = ([int(t) for t in args.threads.split(",")] if args.threads
               else [torch.get_num_threads()])
    import PIL

    info = machine(torch=torch.__version__, pil=PIL.__version__, numpy=np.__version__)
    print(f"{info['cpu']}, {info['cores']} cores; torch {info['torch']}, PIL {info['pil']} "
          f"(single-threaded); ours: {path}")

    result = {"machine": info, "repeat": args.repeat, "path": path, "tables": []}
    if not args.no_exact:
        # exactness on all reference files
        lr_files = sorted(bench.glob("*/x*/LR/*.png"))
        exact = {"ours": 0, "PIL": 0}
        for lr in lr_files:
            scale = int(lr.parent.parent.name[1:])
            hr = np.asarray(Image.open(lr.parent.parent / "HR" / lr.name).convert("RGB"))
            ref = np.asarray(Image.open(lr).convert("RGB"))
            exact["ours"] += np.array_equal(ours(hr, scale), ref)
            exact["PIL"] += np.array_equal(pil(hr, scale), ref)
        print(f"bit-exact vs MATLAB: ours {exact['ours']}/{len(lr_files)}, "
              f"PIL {exact['PIL']}/{len(lr_files)}")
        result["bit_exact"] = {"ours": exact["ours"], "pil": exact["PIL"], "files": len(lr_files)}

    for n in threads:
        torch.set_num_threads(n)
        print(f"\n== torch threads: {n} ==")
        result["tables"].append({"torch_threads": n, "rows": speed_table(shared, args.repeat)})
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
