"""LR generation: each usable HR image of a manifest, mod-cropped and downscaled by the
project's MATLAB-exact bicubic, for every scale.

Output layout (``out_dir``)::

    x2/<key>.png  x3/<key>.png  x4/<key>.png   LR images (RGB8 PNG)
    index.json                                 key -> HR path, sha256, split; scales

``key`` is the image's ``source/relpath`` made into one safe file name (see :func:`image_key`).
The run is incremental: an LR file is (re)made only when it is missing or its HR's sha256
changed since the index was written; LR files of images no longer in the manifest are
removed, so the folder always mirrors the manifest (what DVC tracks). It is deterministic:
the same HR gives the same PNG bytes on every run. Work is spread over a process pool.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from ..progress import progress as progress_bar

from ..bicubic import downscale
from ..io import ImageError, atomic_write, read_image, write_png
from ..threads import configure_threads

__all__ = ["DegradeItem", "DegradeSummary", "image_key", "items_from_manifest", "degrade",
           "lr_path", "load_index"]

INDEX = "index.json"


def image_key(source: str, relpath: str) -> str:
    """A unique, file-system-safe name for ``source/relpath`` (no extension)."""
    stem = relpath.rsplit(".", 1)[0] if "." in relpath.rsplit("/", 1)[-1] else relpath
    raw = f"{source}/{stem}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw.replace("/", "__"))


@dataclass(frozen=True)
class DegradeItem:
    key: str
    hr_path: str
    sha256: str
    split: str | None = None


@dataclass
class DegradeSummary:
    made: int = 0
    reused: int = 0
    removed: int = 0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(vars(self))


def items_from_manifest(table: pa.Table, split: str | None = None) -> list[DegradeItem]:
    """Usable rows (status ok/converted) of a manifest table, optionally of one split."""
    items = []
    for r in table.to_pylist():
        if r["status"] not in ("ok", "converted"):
            continue
        if split is not None and r.get("split") != split:
            continue
        items.append(DegradeItem(image_key(r["source"], r["relpath"]), r["path"], r["sha256"],
                                 r.get("split")))
    keys = [i.key for i in items]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[0]
        raise ValueError(f"two manifest rows map to the same LR name {dup!r}; rename one")
    return items


def lr_path(out_dir: str | Path, scale: int, key: str) -> Path:
    return Path(out_dir) / f"x{scale}" / f"{key}.png"


def load_index(out_dir: str | Path) -> dict:
    p = Path(out_dir) / INDEX
    return json.loads(p.read_text()) if p.exists() else {"scales": [], "images": {}}


def _init_worker(workers: int) -> None:
    """A pool worker's share of the cores: ``workers`` processes split them (rlfn.threads)."""
    os.environ["RLFN_PROCESSES"] = str(workers)
    configure_threads(0, load_aware=False)


def _make(args: tuple[str, str, list[int], str]) -> str | None:
    """Worker: read one HR, write its LR for each scale. Returns an error message or None."""
    hr_path, key, scales, out_dir = args
    try:
        hr, _ = read_image(hr_path, min_size=max(scales))
        for s in scales:
            write_png(lr_path(out_dir, s, key), downscale(hr, s))
    except ImageError as e:
        return str(e)
    return None


def degrade(items: list[DegradeItem], scales: list[int], out_dir: str | Path, workers: int = 2,
            progress: bool = True) -> DegradeSummary:
    """Make (or update) the LR images of ``items`` for ``scales`` under ``out_dir``."""
    out_dir = Path(out_dir)
    scales = sorted({int(s) for s in scales})
    if not scales or any(s not in (2, 3, 4) for s in scales):
        raise ValueError(f"scales must be among 2, 3, 4; got {scales}")
    old = load_index(out_dir)
    old_images = old.get("images", {}) if old.get("scales") == scales else {}
    summary = DegradeSummary()
    todo = []
    for it in items:
        prev = old_images.get(it.key)
        fresh = (prev is not None and prev.get("sha256") == it.sha256
                 and all(lr_path(out_dir, s, it.key).exists() for s in scales))
        if fresh:
            summary.reused += 1
        else:
            todo.append((it.hr_path, it.key, scales, str(out_dir)))
    for s in scales:
        (out_dir / f"x{s}").mkdir(parents=True, exist_ok=True)
    results: list[str | None] = []
    if todo:
        if workers > 1 and len(todo) > 1:
            # spawn, not fork: a forked child of a process whose torch thread pool has run
            # can deadlock in OpenMP
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                     initializer=_init_worker, initargs=(workers,)) as pool:
                results = list(progress_bar(pool.map(_make, todo, chunksize=1),
                                            total=len(todo), desc="degrade", unit="img",
                                            enabled=progress))
        else:
            results = [_make(t) for t in progress_bar(todo, desc="degrade", unit="img",
                                                       enabled=progress)]
    summary.made = sum(r is None for r in results)
    summary.errors = [r for r in results if r is not None]
    failed = {t[1] for t, r in zip(todo, results) if r is not None}
    keep = {it.key for it in items if it.key not in failed}
    # remove LR files of images that left the manifest (or of scales no longer asked for)
    for sub in out_dir.glob("x*"):
        if not sub.is_dir():
            continue
        wanted_scale = sub.name[1:].isdigit() and int(sub.name[1:]) in scales
        for f in sub.glob("*.png"):
            if not wanted_scale or f.stem not in keep:
                f.unlink()
                summary.removed += 1
        if not wanted_scale and not any(sub.iterdir()):
            sub.rmdir()
    index = {"scales": scales,
             "images": {it.key: {"hr": it.hr_path, "sha256": it.sha256, "split": it.split}
                        for it in sorted(items, key=lambda i: i.key) if it.key in keep}}
    atomic_write(out_dir / INDEX, json.dumps(index, indent=1, sort_keys=True) + "\n")
    return summary
