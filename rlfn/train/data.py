"""Feeding the trainer: the patch store (built from ``hr_dir`` when none is given) and the
batches of iterations ``start .. end``, each a pure function of (seed, iteration)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from ..data.dataset import PatchDataset
from ..data.patches import build_patch_store
from ..errors import DataError
from ..io import ImageError, atomic_write, list_images, read_image
from .config import TrainConfig

__all__ = ["open_training_data", "IterationBatches", "store_from_folder", "TrainDataError"]


class TrainDataError(DataError, ValueError):
    """Training or validation images that cannot be used: ``TrainDataError(folder, reason)``
    (exit 1; a ``ValueError`` too, as these errors always were)."""


def store_from_folder(hr_dir: str | Path, scale: int, min_size: int, data_dir: str | Path,
                      progress: bool = True) -> Path:
    """A patch store of every usable image in ``hr_dir`` (LR by MATLAB-exact bicubic), cached
    in ``data_dir`` and rebuilt only when the folder's files change. Unusable images are
    reported on stderr and left out."""
    hr_dir, data_dir = Path(hr_dir), Path(data_dir)
    if not hr_dir.is_dir():
        raise TrainDataError(hr_dir, "not a directory (hr_dir: the HR training images)")
    files = list_images([hr_dir])
    sig = hashlib.sha256(json.dumps(
        [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files] + [scale, min_size]
    ).encode()).hexdigest()
    store = data_dir / f"x{scale}.arrow"
    stamp = data_dir / f"x{scale}.source.json"
    if store.exists() and stamp.exists() and json.loads(stamp.read_text()).get("sig") == sig:
        return store
    pairs, skipped = [], []
    for f in files:
        try:
            read_image(f, min_size=min_size)
            pairs.append((f.stem, f, None))  # LR made by our bicubic
        except ImageError as e:
            skipped.append(str(e))
    for msg in skipped:
        print(f"warning: skipped {msg}", file=sys.stderr)
    if not pairs:
        raise TrainDataError(hr_dir, "no usable training images (hr_dir"
                             + (f"; {len(skipped)} skipped)" if skipped else ")"))
    data_dir.mkdir(parents=True, exist_ok=True)
    build_patch_store(pairs, scale, store, progress=progress)
    atomic_write(stamp, json.dumps({"sig": sig, "hr_dir": str(hr_dir), "images": len(pairs),
                                    "skipped": skipped}, indent=1))
    return store


def open_training_data(cfg: TrainConfig, data_dir: str | Path, rank: int = 0, world: int = 1,
                       progress: bool = True) -> PatchDataset:
    store = (Path(cfg.patch_store) if cfg.patch_store else
             store_from_folder(cfg.hr_dir, cfg.scale, cfg.patch_size, data_dir, progress))
    return PatchDataset(store, cfg.patch_size, cfg.scale, seed=cfg.seed, augment=cfg.augment,
                        samples_per_epoch=cfg.batch_size * cfg.epoch_iterations, rank=rank,
                        world_size=world)


class IterationBatches:
    """``(lr, hr)`` batches for iterations ``start .. end - 1`` on ``device``.

    Iteration ``it`` is batch ``it % epoch_iterations`` of epoch ``it // epoch_iterations``,
    so a resumed run gets exactly the batches the uninterrupted one would have. Worker
    processes load and augment ahead of the training step (``num_workers``, prefetching).
    """

    def __init__(self, data: PatchDataset, cfg: TrainConfig, start: int, end: int,
                 device: torch.device):
        self.data, self.cfg, self.start, self.end, self.device = data, cfg, start, end, device

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        cfg, ds = self.cfg, self.data
        per_epoch = ds.steps_per_epoch(cfg.batch_size)
        it = self.start
        pin = self.device.type == "cuda"
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        while it < self.end:
            epoch, step = divmod(it, per_epoch)
            ds.set_epoch(epoch)
            sampler = ds.batch_sampler(cfg.batch_size, start_step=step)
            sampler = sampler[: self.end - it]
            loader = DataLoader(ds, batch_sampler=sampler, num_workers=cfg.num_workers,
                                pin_memory=pin,
                                prefetch_factor=4 if cfg.num_workers > 0 else None)
            for lr, hr in loader:
                yield (lr.to(self.device, non_blocking=pin, memory_format=fmt),
                       hr.to(self.device, non_blocking=pin))
                it += 1
