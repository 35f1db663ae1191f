"""Benchmark: our MATLAB-exact bicubic downscale vs PIL's bicubic (not exact), one run.

    .venv/bin/python bench/bicubic.py [--shared ../shared] [--repeat 3]

Prints, for the same images and scales: megapixels/s (of HR input) for ours and PIL, the
ratio, and how many of the 257 MATLAB-made reference LR files each reproduces bit-exactly.
Also times a batched NCHW call (64 HR crops of 256x256, the training-data use) and CUDA when
a GPU is present. Goal (foundation issue): ours >= PIL throughput while staying bit-exact.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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


def ours(img, scale):
    return imresize_array(img, 1 / scale)


def pil(img, scale):
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((w // scale, h // scale), Image.BICUBIC))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    shared = Path(args.shared)
    bench = shared / "data" / "benchmarks"
    if not bench.exists():
        sys.exit(f"reference data not found: {bench}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; PIL single-threaded")

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

    sets = {
        "benchmark HR (Set5+Set14+B100, x4 dirs)": sorted(bench.glob("*/x4/HR/*.png")),
        "DIV2K test images (510x339)": sorted((shared / "data" / "div2k_test_lr_x4").glob("*.png")),
    }
    print(f"\n{'images':<42} {'scale':>5} {'ours MP/s':>10} {'PIL MP/s':>9} {'ratio':>6}")
    for name, paths in sets.items():
        imgs = load(paths)
        for scale in (2, 4):
            crops = [np.ascontiguousarray(modcrop(i, scale)) for i in imgs]
            mp = sum(c.shape[0] * c.shape[1] for c in crops) / 1e6
            t_ours = time_it(lambda c: ours(c, scale), crops, args.repeat)
            t_pil = time_it(lambda c: pil(c, scale), crops, args.repeat)
            print(f"{name:<42} {'x%d' % scale:>5} {mp / t_ours:10.1f} {mp / t_pil:9.1f} "
                  f"{t_pil / t_ours:6.2f}")

    # a 2K-sized image (DIV2K HR size) tiled from a real photograph
    img = load(sets["DIV2K test images (510x339)"][:1])[0]
    big = np.ascontiguousarray(np.tile(img, (5, 4, 1))[:1356, :2040])
    mp = big.shape[0] * big.shape[1] / 1e6
    t_ours = time_it(lambda c: ours(c, 4), [big] * 3, args.repeat) / 3
    t_pil = time_it(lambda c: pil(c, 4), [big] * 3, args.repeat) / 3
    print(f"{'2040x1356 (DIV2K HR size)':<42} {'x4':>5} {mp / t_ours:10.1f} {mp / t_pil:9.1f} "
          f"{t_pil / t_ours:6.2f}")

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
    t_ours = time_it(lambda b: imresize(b, scale=1 / 4), [batch], args.repeat)
    t_pil = time_it(lambda c: pil(c, 4), crops, args.repeat)
    print(f"{'64x256x256 batch (NCHW, one call)':<42} {'x4':>5} {mp / t_ours:10.1f} "
          f"{mp / t_pil:9.1f} {t_pil / t_ours:6.2f}")
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


if __name__ == "__main__":
    main()
