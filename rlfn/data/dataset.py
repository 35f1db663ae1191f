"""Random HR/LR training patches from a patch store, reproducible sample by sample.

:class:`PatchDataset` is a map-style ``torch.utils.data.Dataset`` over a store built by
:func:`rlfn.data.patches.build_patch_store`. Every sample is a **pure function** of
``(seed, epoch, position)``, where ``position`` in ``[0, samples_per_epoch)`` is the sample's
place in the epoch's *global* (all-ranks) order; equivalently of the global sample index
``epoch * samples_per_epoch + position``:

* which record (image or sub-image): epoch ``e`` walks shuffled passes over the records; pass
  ``r = position // n_records`` is a permutation drawn from ``(seed, e, r)``, so every record
  is seen equally often;
* where the crop is and which of the 8 flips/rotations: drawn from a Philox counter-based
  generator keyed by ``seed`` with the counter ``(0, position, epoch, 0)``.

No global RNG state is used, so results do not depend on DataLoader workers, their seeding or
the order in which samples are fetched.

Ranks (DDP): rank ``r`` of ``world_size`` ``W`` owns positions ``r, r + W, r + 2W, ...``; its
item ``i`` is position ``i * W + r``. With a per-rank batch of ``B / W`` (``B`` the global
batch), rank ``r``'s batch ``k`` holds positions ``k*B + r, k*B + W + r, ...``: the ranks'
batches are disjoint and together are exactly batch ``k`` of a single process with batch
``B``.

Exact resume at global iteration ``it`` with global batch ``B`` (no replay)::

    ds = PatchDataset(store, 256, 4, seed=seed, rank=rank, world_size=world)
    epoch, step = divmod(it, ds.steps_per_epoch(B))
    while training:
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_sampler=ds.batch_sampler(B, start_step=step),
                            num_workers=8, pin_memory=True)
        for lr, hr in loader: ...
        epoch, step = epoch + 1, 0

The epoch travels to the workers when the loader's iterator starts, so do not use
``persistent_workers=True`` (its workers would keep the first epoch). The memory map is opened
lazily in each process that reads samples and is never pickled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from rlfn.data.patches import PatchStore

__all__ = ["Crop", "PatchDataset", "dihedral"]

# Philox counter word 3 tells the two kinds of draws apart.
_ITEM_STREAM, _PERM_STREAM = 0, 1
_PERM_CACHE = 4  # permutations kept per process (epochs/passes in flight)


class Crop(NamedTuple):
    """Where one sample comes from: record index, HR top-left corner, augmentation 0..7.

    ``y`` and ``x`` are multiples of the scale; the LR crop starts at ``(y/scale, x/scale)``.
    """

    record: int
    y: int
    x: int
    aug: int


def dihedral(img: np.ndarray, aug: int) -> np.ndarray:
    """Apply one of the 8 flips/rotations to an ``(H, W, ...)`` array (a view, no copy).

    Bit 0 flips left-right, bit 1 flips up-down, bit 2 then transposes (swaps H and W); the
    8 combinations are the 8 distinct symmetries of the square.
    """
    if aug & 1:
        img = img[:, ::-1]
    if aug & 2:
        img = img[::-1]
    if aug & 4:
        img = img.swapaxes(0, 1)
    return img


def _chw_float(img: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` (any strides) -> float32 ``(3, H, W)`` in [0, 255], one copy."""
    return torch.from_numpy(np.array(img.transpose(2, 0, 1), dtype=np.float32))


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class PatchDataset(Dataset):
    """Aligned random ``(lr, hr)`` crops from a patch store.

    Each item is a pair of float32 tensors in [0, 255]: ``lr`` of shape
    ``(3, patch_size/scale, patch_size/scale)`` and ``hr`` of ``(3, patch_size, patch_size)``.
    ``patch_size`` is the HR crop size; it must be divisible by ``scale`` and fit inside every
    record of the store (``ValueError`` naming the first image that is too small otherwise).
    ``samples_per_epoch`` defaults to the number of records. ``len(dataset)`` is this rank's
    share, ``samples_per_epoch // world_size`` (the last ``samples_per_epoch % world_size``
    positions of an epoch are left out).
    """

    def __init__(self, store_path: str | Path, patch_size: int, scale: int, seed: int = 0,
                 augment: bool = True, samples_per_epoch: int | None = None, rank: int = 0,
                 world_size: int = 1):
        self.store_path = Path(store_path)
        self.patch_size = _positive_int("patch_size", patch_size)
        self.scale = _positive_int("scale", scale)
        if self.patch_size % self.scale:
            raise ValueError(f"patch_size {patch_size} is not divisible by the scale {scale}: "
                             f"the LR patch would not be aligned with the HR patch")
        if isinstance(seed, bool) or int(seed) != seed or not 0 <= seed < 2**128:
            raise ValueError(f"seed must be an integer in [0, 2**128), got {seed!r}")
        self.seed = int(seed)
        self.augment = bool(augment)
        self.world_size = _positive_int("world_size", world_size)
        if isinstance(rank, bool) or int(rank) != rank or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank!r}")
        self.rank = int(rank)

        with PatchStore(self.store_path) as store:
            if store.scale != self.scale:
                raise ValueError(f"{self.store_path} was built for x{store.scale}, not "
                                 f"x{self.scale}")
            if len(store) == 0:
                raise ValueError(f"{self.store_path} holds no images")
            too_small = np.flatnonzero(np.minimum(store.height, store.width) < self.patch_size)
            if too_small.size:
                raise ValueError(
                    f"patch_size {self.patch_size} does not fit image "
                    f"{store.describe(int(too_small[0]))} in {self.store_path} "
                    f"({too_small.size} of {len(store)} records are too small)")
            self._height = store.height.copy()
            self._width = store.width.copy()
        self.num_records = len(self._height)
        self.samples_per_epoch = (self.num_records if samples_per_epoch is None
                                  else _positive_int("samples_per_epoch", samples_per_epoch))
        self.epoch = 0
        self._store: PatchStore | None = None  # opened lazily, per process
        self._store_pid: int | None = None
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_store"], state["_store_pid"], state["_perms"] = None, None, {}
        return state

    def _open(self) -> PatchStore:
        if self._store is None or self._store_pid != os.getpid():
            self._store = PatchStore(self.store_path)
            self._store_pid = os.getpid()
        return self._store

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that ``dataset[i]`` draws from (call before building the loader)."""
        if isinstance(epoch, bool) or int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch // self.world_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's item ``i`` of the current epoch: position ``i * world_size + rank``."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        return self.sample(self.epoch, i * self.world_size + self.rank)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full global batches of ``batch_size`` (all ranks together) in one epoch."""
        return self.samples_per_epoch // self._check_batch(batch_size)

    def batch_sampler(self, batch_size: int, start_step: int = 0) -> list[list[int]]:
        """This rank's item indices for global batches ``start_step ..`` of the current epoch.

        ``batch_size`` is the global batch (divisible by ``world_size``); each list holds the
        ``batch_size / world_size`` items of this rank. Pass it to
        ``DataLoader(batch_sampler=...)``; ``start_step`` resumes mid-epoch without replay.
        """
        local = self._check_batch(batch_size) // self.world_size
        steps = self.steps_per_epoch(batch_size)
        if not 0 <= start_step <= steps:
            raise ValueError(f"start_step must be in [0, {steps}], got {start_step}")
        return [list(range(k * local, (k + 1) * local)) for k in range(start_step, steps)]

    def _check_batch(self, batch_size: int) -> int:
        batch_size = _positive_int("batch_size", batch_size)
        if batch_size % self.world_size:
            raise ValueError(f"global batch_size {batch_size} is not divisible by world_size "
                             f"{self.world_size}")
        return batch_size

    def _permutation(self, epoch: int, rnd: int) -> np.ndarray:
        perm = self._perms.get((epoch, rnd))
        if perm is None:
            if len(self._perms) >= _PERM_CACHE:
                self._perms.clear()
            g = np.random.Generator(np.random.Philox(
                key=self.seed, counter=np.array([0, rnd, epoch, _PERM_STREAM], np.uint64)))
            perm = self._perms[(epoch, rnd)] = g.permutation(self.num_records)
        return perm

    def crop_params(self, epoch: int, position: int) -> Crop:
        """Record, HR corner and augmentation: a pure function of (seed, epoch, position)."""
        if not 0 <= position < self.samples_per_epoch:
            raise IndexError(f"position {position} out of range [0, {self.samples_per_epoch})")
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        rnd, j = divmod(int(position), self.num_records)
        record = int(self._permutation(int(epoch), rnd)[j])
        g = np.random.Generator(np.random.Philox(
            key=self.seed, counter=np.array([0, position, epoch, _ITEM_STREAM], np.uint64)))
        s, lp = self.scale, self.patch_size // self.scale
        ly = int(g.integers(self._height[record] // s - lp + 1))
        lx = int(g.integers(self._width[record] // s - lp + 1))
        aug = int(g.integers(8))
        return Crop(record, ly * s, lx * s, aug if self.augment else 0)

    def sample(self, epoch: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(lr, hr)`` pair at ``position`` of ``epoch`` in the global order (any rank)."""
        c = self.crop_params(epoch, position)
        store = self._open()
        p, s = self.patch_size, self.scale
        hr = store.hr(c.record)[c.y:c.y + p, c.x:c.x + p]
        lr = store.lr(c.record)[c.y // s:(c.y + p) // s, c.x // s:(c.x + p) // s]
        return _chw_float(dihedral(lr, c.aug)), _chw_float(dihedral(hr, c.aug))
