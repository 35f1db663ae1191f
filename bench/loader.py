"""Benchmark: training samples/s and memory of the patch-store loader vs decoding PNGs, one run.

    .venv/bin/python bench/loader.py [--shared ../shared] [--sizes 25 50 100]
                                     [--samples 3000] [--patch 192] [--workers 0]

HR: the first N photographs of ``../shared/data/div2k_test_lr_x4`` (~510x339); LR: their
MATLAB-bicubic x4 downscale (``rlfn.bicubic.downscale``), written as PNGs to a temp dir. For
each N the pairs are packed into a store (whole images, no sub-images), and both loaders
produce the same ``--samples`` (lr, hr) float32 pairs of ``--patch`` HR pixels: the crop
sequence (image, position, augmentation) is ``PatchDataset.crop_params`` of epoch 0, and the
outputs' digests are compared, so the two do the same work.

* ours: ``PatchDataset`` over the memory-mapped store (draws its crops itself);
* png: for every sample, decode the HR and LR PNGs (``rlfn.io.read_image``), mod-crop,
  crop and augment.

Each (loader, N) runs in a fresh subprocess so its peak RSS (``getrusage``) is its own. RSS
counts the store pages the memory map has touched (page cache, shared between workers and
reclaimable); ``anon`` is the process's private memory (``RssAnon``, sampled every batch),
the part that would grow if images were held in RAM. Goal: ours >= 5x png, memory flat in N.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> dict[str, float]:
    """Current RssAnon / RssFile of this process from /proc (0 where unavailable)."""
    out = {"RssAnon": 0.0, "RssFile": 0.0}
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            name, _, value = line.partition(":")
            if name in out:
                out[name] = int(value.split()[0]) / 1024
    return out


def child(args) -> None:
    """Produce the samples with one loader; print throughput, digest and memory as JSON."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from rlfn.bicubic import modcrop
    from rlfn.data.dataset import Crop, PatchDataset, dihedral
    from rlfn.io import read_image

    spec = json.loads(Path(args.child_spec).read_text())
    patch, scale = spec["patch"], spec["scale"]

    class PngCrops(Dataset):
        """The plain loader: decode both PNGs for every sample, then crop and augment."""

        def __len__(self):
            return len(spec["crops"])

        def __getitem__(self, i):
            c = Crop(*spec["crops"][i])
            hr_path, lr_path = spec["files"][spec["keys"][c.record]]
            hr = modcrop(read_image(hr_path)[0], scale)[c.y:c.y + patch, c.x:c.x + patch]
            lr = read_image(lr_path)[0][c.y // scale:(c.y + patch) // scale,
                                        c.x // scale:(c.x + patch) // scale]
            return tuple(torch.from_numpy(np.array(dihedral(a, c.aug).transpose(2, 0, 1),
                                                   dtype=np.float32)) for a in (lr, hr))

    if args.child == "ours":
        ds = PatchDataset(spec["store"], patch, scale, seed=spec["seed"],
                          samples_per_epoch=len(spec["crops"]))
    else:
        ds = PngCrops()
    start_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    loader = DataLoader(ds, batch_size=16, num_workers=args.workers)
    digest, anon, seconds = hashlib.sha256(), 0.0, 0.0
    batches = iter(loader)
    while True:  # time only the loader; hashing the samples costs about as much as ours
        t0 = time.perf_counter()
        batch = next(batches, None)
        seconds += time.perf_counter() - t0
        if batch is None:
            break
        for t in batch:
            digest.update(t.numpy().tobytes())
        anon = max(anon, rss_mb()["RssAnon"])
    peak = max(resource.getrusage(who).ru_maxrss for who in
               (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024
    print(json.dumps({"rate": len(ds) / seconds, "digest": digest.hexdigest(),
                      "start_mb": start_mb, "peak_mb": peak, "anon_mb": anon,
                      "file_mb": rss_mb()["RssFile"]}))


def prepare(hr_files: list[Path], tmp: Path) -> dict[str, list[str]]:
    """LR PNGs by MATLAB-bicubic x4 for each HR; returns key -> [hr path, lr path]."""
    from rlfn.bicubic import downscale
    from rlfn.io import read_image, write_png

    files = {}
    for p in hr_files:
        lr = tmp / "lr" / p.name
        write_png(lr, downscale(read_image(p)[0], 4))
        files[p.stem] = [str(p), str(lr)]
    return files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100])
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--patch", type=int, default=192, help="HR patch (the smallest image is 228 "
                    "pixels high after mod-crop, so the paper's 256 does not fit)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for both loaders")
    ap.add_argument("--child", choices=["ours", "png"], help=argparse.SUPPRESS)
    ap.add_argument("--child-spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    import torch

    from rlfn.data.dataset import PatchDataset
    from rlfn.data.patches import PatchStore, build_patch_store

    hr_files = sorted((Path(args.shared) / "data" / "div2k_test_lr_x4").glob("*.png"))
    if len(hr_files) < max(args.sizes):
        sys.exit(f"need {max(args.sizes)} images in {args.shared}/data/div2k_test_lr_x4, "
                 f"found {len(hr_files)}")
    print(f"torch {torch.__version__}; {args.samples} samples of {args.patch}px HR "
          f"(x4), DataLoader batch 16, {args.workers} workers; each row a fresh process")
    rows = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        files = prepare(hr_files[:max(args.sizes)], tmp)
        for n in args.sizes:
            keys = sorted(files)[:n]
            store = tmp / f"store{n}.arrow"
            t0 = time.perf_counter()
            info = build_patch_store([(k, *files[k]) for k in keys], 4, store, progress=False)
            build_s = time.perf_counter() - t0
            with PatchStore(store) as s:
                assert s.keys == keys
            ds = PatchDataset(store, args.patch, 4, seed=0, samples_per_epoch=args.samples)
            spec = {"store": str(store), "patch": args.patch, "scale": 4, "seed": 0,
                    "keys": keys, "files": files,
                    "crops": [list(ds.crop_params(0, p)) for p in range(args.samples)]}
            spec_path = tmp / f"spec{n}.json"
            spec_path.write_text(json.dumps(spec))
            res = {}
            for name in ("ours", "png"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", name, "--child-spec", str(spec_path),
                     "--workers", str(args.workers)],
                    check=True, capture_output=True, text=True).stdout
                res[name] = json.loads(out.strip().splitlines()[-1])
            if res["ours"]["digest"] != res["png"]["digest"]:
                sys.exit(f"N={n}: the two loaders produced different samples")
            rows.append((n, info.file_bytes / 2**20, build_s, res))

    print(f"\n{'images':>6} {'store MB':>8} {'build s':>7} | {'loader':<5} {'samples/s':>9} "
          f"{'peak RSS MB':>11} {'(at start)':>10} {'anon MB':>8} {'file MB':>8} | "
          f"{'speed-up':>8}")
    for n, mb, build_s, res in rows:
        for name in ("ours", "png"):
            r = res[name]
            ratio = (f"{res['ours']['rate'] / res['png']['rate']:7.1f}x" if name == "ours"
                     else "")
            print(f"{n:>6} {mb:8.1f} {build_s:7.2f} | {name:<5} {r['rate']:9.0f} "
                  f"{r['peak_mb']:11.0f} {r['start_mb']:10.0f} {r['anon_mb']:8.0f} "
                  f"{r['file_mb']:8.0f} | {ratio:>8}")
    print("identical samples from both loaders (sha256 of every batch): yes")


if __name__ == "__main__":
    main()
