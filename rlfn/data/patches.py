"""The training-data patch store: HR/LR image pairs packed into one memory-mapped Arrow file.

Decoding a 2K PNG costs tens of milliseconds, but a training sample needs only a 256x256 crop
of it. :func:`build_patch_store` therefore decodes every pair once and packs the raw pixels
into an Apache Arrow IPC file; :class:`PatchStore` memory-maps that file, so a crop touches
only the pages it covers and opening the store reads no pixel data into RAM (the pages live in
the OS page cache, shared by all DataLoader workers).

Store format (``FORMAT``/``VERSION`` in the schema metadata), one row per *record*, which is
a whole image or, with ``sub_image``, one sub-image cut from it:

=========  ===============  ==============================================================
column     Arrow type       meaning
=========  ===============  ==============================================================
key        string           the pair's key (shared by all sub-images of one image)
y, x       int32            top-left corner of the record in the mod-cropped HR image
height     int32            HR height of the record (a multiple of ``scale``)
width      int32            HR width of the record (a multiple of ``scale``)
scale      int32            the downscaling factor (the same in every row)
hr         large_binary     HR pixels, uint8, row-major ``(height, width, 3)``
lr         large_binary     LR pixels, uint8, ``(height/scale, width/scale, 3)``
=========  ===============  ==============================================================

Rows are sorted by key, then by ``(y, x)``; each source image is one record batch. Beside the
``.arrow`` file, a JSON sidecar (same name, ``.json`` suffix) holds the summary
(:class:`StoreInfo`). The same pairs (in any order) give byte-identical files; both are written
atomically (temporary file + rename).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
from ..progress import progress as progress_bar

from rlfn.bicubic import downscale, modcrop
from rlfn.errors import DataError
from rlfn.io import atomic_target, atomic_write, read_image

__all__ = ["FORMAT", "VERSION", "SCHEMA", "StoreInfo", "PatchStore", "PatchStoreError",
           "build_patch_store", "sub_image_grid", "sidecar_path"]

FORMAT = "rlfn-patch-store"
VERSION = 1

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("y", pa.int32()),
    ("x", pa.int32()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("scale", pa.int32()),
    ("hr", pa.large_binary()),
    ("lr", pa.large_binary()),
])



class PatchStoreError(DataError, ValueError):
    """A patch store that cannot be opened: ``PatchStoreError(path, reason)``."""

@dataclass(frozen=True)
class StoreInfo:
    """What a store holds; written as its JSON sidecar and returned by the builder."""

    path: str  # the store's file name (not its directory: the sidecar moves with the store)
    format: str
    version: int
    scale: int
    sub_image: list[int] | None  # [size, step] in HR pixels, or None (whole images)
    images: int  # source image pairs
    records: int  # rows: whole images or sub-images
    min_record_hw: list[int]  # smallest record height and width (HR): bounds the patch size
    max_record_hw: list[int]
    hr_bytes: int  # pixel bytes stored
    lr_bytes: int
    file_bytes: int


def sidecar_path(store_path: str | Path) -> Path:
    """The JSON summary beside a store: ``x4.arrow`` -> ``x4.json``."""
    return Path(store_path).with_suffix(".json")


def sub_image_grid(length: int, size: int, step: int) -> list[int]:
    """Start offsets of windows of ``size`` every ``step`` over ``length`` pixels.

    The last window is aligned to the border, so the windows cover every pixel. A length
    shorter than ``size`` gives the single offset 0 (the record keeps the whole extent).
    """
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, step))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def _check_sub_image(sub_image, scale: int) -> tuple[int, int] | None:
    if sub_image is None:
        return None
    try:
        size, step = (int(v) for v in sub_image)
    except (TypeError, ValueError):
        raise ValueError(f"sub_image must be (size, step), got {sub_image!r}") from None
    if size <= 0 or step <= 0 or size % scale or step % scale:
        raise ValueError(f"sub_image (size={size}, step={step}) must be positive multiples of "
                         f"the scale {scale}")
    if step > size:
        raise ValueError(f"sub_image step {step} exceeds size {size}: pixels would be skipped")
    return size, step


def _read_pair(hr_path, lr_path, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """HR mod-cropped to the scale, and an LR of exactly HR/scale (made by bicubic if None)."""
    hr = np.ascontiguousarray(modcrop(read_image(hr_path)[0], scale))
    if lr_path is None:
        return hr, downscale(hr, scale)
    lr = read_image(lr_path)[0]
    want = (hr.shape[0] // scale, hr.shape[1] // scale)
    if lr.shape[:2] != want:
        raise ValueError(
            f"{lr_path}: LR is {lr.shape[1]}x{lr.shape[0]} but HR {hr_path} is "
            f"{hr.shape[1]}x{hr.shape[0]} after mod-crop to x{scale}, so the LR must be "
            f"{want[1]}x{want[0]} (width x height)")
    return hr, lr


def _image_batch(key: str, hr: np.ndarray, lr: np.ndarray, scale: int,
                 sub_image: tuple[int, int] | None) -> pa.RecordBatch:
    """One record batch: the whole pair, or its sub-images in raster order."""
    h, w = hr.shape[:2]
    if sub_image is None:
        boxes = [(0, 0, h, w)]
    else:
        size, step = sub_image
        boxes = [(y, x, min(size, h), min(size, w))
                 for y in sub_image_grid(h, size, step) for x in sub_image_grid(w, size, step)]
    s = scale
    hr_cuts = [np.ascontiguousarray(hr[y:y + bh, x:x + bw]).tobytes() for y, x, bh, bw in boxes]
    lr_cuts = [np.ascontiguousarray(lr[y // s:(y + bh) // s, x // s:(x + bw) // s]).tobytes()
               for y, x, bh, bw in boxes]
    n = len(boxes)
    return pa.record_batch([
        pa.array([key] * n, pa.string()),
        pa.array([b[0] for b in boxes], pa.int32()),
        pa.array([b[1] for b in boxes], pa.int32()),
        pa.array([b[2] for b in boxes], pa.int32()),
        pa.array([b[3] for b in boxes], pa.int32()),
        pa.array([scale] * n, pa.int32()),
        pa.array(hr_cuts, pa.large_binary()),
        pa.array(lr_cuts, pa.large_binary()),
    ], schema=SCHEMA)


def build_patch_store(pairs: Iterable, scale: int, out_path: str | Path,
                      sub_image: tuple[int, int] | None = None,
                      progress: bool = True) -> StoreInfo:
    """Pack HR/LR pairs into a memory-mappable Arrow file at ``out_path`` (+ JSON sidecar).

    ``pairs``: ``(key, hr_path, lr_path)`` triples with unique string keys, packed in key
    order (so the input order does not matter). The HR is read with ``rlfn.io.read_image`` and
    mod-cropped to ``scale``; the LR must then be exactly HR/scale in size (``ValueError``
    naming the file and both sizes otherwise). ``lr_path=None`` makes the LR from the HR with
    the MATLAB-exact ``rlfn.bicubic.downscale``.

    ``sub_image=(size, step)``: cut each HR into ``size``-pixel squares every ``step`` pixels
    (both multiples of ``scale``; the last row/column of squares is aligned to the border, so
    every pixel is kept), each with the LR cut from the full LR at ``/scale`` coordinates.
    Images are read one at a time; memory use is bounded by one image and its cuts.
    """
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    sub = _check_sub_image(sub_image, scale)
    out_path = Path(out_path)
    items = []
    for item in pairs:
        if len(item) != 3 or not isinstance(item[0], str) or not item[0]:
            raise ValueError(f"each pair must be (key: non-empty str, hr_path, lr_path), "
                             f"got {item!r}")
        items.append(item)
    if not items:
        raise ValueError("build_patch_store got no image pairs")
    items.sort(key=lambda it: it[0])
    dupes = sorted({a[0] for a, b in zip(items, items[1:]) if a[0] == b[0]})
    if dupes:
        raise ValueError(f"duplicate pair keys: {', '.join(dupes[:5])}")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "version": str(VERSION), "scale": str(scale),
            "sub_image": json.dumps(list(sub) if sub else None)}
    schema = SCHEMA.with_metadata(meta)
    records = hr_bytes = lr_bytes = 0
    min_hw, max_hw = [2**31, 2**31], [0, 0]
    with atomic_target(out_path) as tmp, pa.OSFile(str(tmp), "wb") as sink, \
            pa.ipc.new_file(sink, schema) as writer:
        for key, hr_path, lr_path in progress_bar(items, desc=f"packing {out_path.name}",
                                                  unit="img", enabled=progress):
            hr, lr = _read_pair(hr_path, lr_path, scale)
            batch = _image_batch(key, hr, lr, scale, sub)
            writer.write_batch(batch)
            hs, ws = batch.column("height").to_numpy(), batch.column("width").to_numpy()
            min_hw = [min(min_hw[0], int(hs.min())), min(min_hw[1], int(ws.min()))]
            max_hw = [max(max_hw[0], int(hs.max())), max(max_hw[1], int(ws.max()))]
            records += batch.num_rows
            hr_bytes += int((hs * ws).sum()) * 3
            lr_bytes += int((hs // scale * (ws // scale)).sum()) * 3

    info = StoreInfo(path=out_path.name, format=FORMAT, version=VERSION, scale=scale,
                     sub_image=list(sub) if sub else None, images=len(items), records=records,
                     min_record_hw=min_hw, max_record_hw=max_hw, hr_bytes=hr_bytes,
                     lr_bytes=lr_bytes, file_bytes=out_path.stat().st_size)
    atomic_write(sidecar_path(out_path), json.dumps(asdict(info), indent=2) + "\n")
    return info


def _int64s(parts: list[np.ndarray]) -> np.ndarray:
    """Per-batch integer columns joined into one int64 array (a copy, off the memory map)."""
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


class PatchStore:
    """Read-only, memory-mapped view of a store built by :func:`build_patch_store`.

    Opening reads the file footer and the small columns (key, y, x, height, width); the pixel
    columns stay in the memory map, and :meth:`hr` / :meth:`lr` return zero-copy, read-only
    numpy views into it. Not picklable: open one per process (``PatchDataset`` does this
    lazily in each DataLoader worker).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise PatchStoreError(self.path, "no such patch store (build it with "
                                             "build_patch_store: the patches stage)")
        self._mmap = pa.memory_map(str(self.path), "r")
        try:
            reader = pa.ipc.open_file(self._mmap)
        except pa.ArrowInvalid as e:
            self._mmap.close()
            raise PatchStoreError(self.path, f"not an Arrow IPC file ({e})") from None
        meta = {k.decode(): v.decode() for k, v in (reader.schema.metadata or {}).items()}
        if meta.get("format") != FORMAT or not reader.schema.equals(SCHEMA, check_metadata=False):
            self._mmap.close()
            raise PatchStoreError(self.path, f"not an {FORMAT} file")
        if int(meta["version"]) != VERSION:
            self._mmap.close()
            raise PatchStoreError(self.path, f"store version {meta['version']}, this code "
                                             f"reads version {VERSION}; rebuild the store")
        self.scale = int(meta["scale"])
        sub = json.loads(meta["sub_image"])
        self.sub_image = tuple(sub) if sub else None

        keys, ys, xs, hs, ws = [], [], [], [], []
        self._hr_data, self._lr_data = [], []  # per record batch: uint8 views of the mmap
        batch_of, hr_off, lr_off = [], [], []
        for b in range(reader.num_record_batches):
            batch = reader.get_batch(b)
            keys.extend(batch.column("key").to_pylist())
            for name, out in (("y", ys), ("x", xs), ("height", hs), ("width", ws)):
                out.append(batch.column(name).to_numpy())
            for name, data, off in (("hr", self._hr_data, hr_off), ("lr", self._lr_data, lr_off)):
                col = batch.column(name)
                _, offsets, values = col.buffers()
                data.append(np.frombuffer(values, dtype=np.uint8))
                off.append(np.frombuffer(offsets, dtype=np.int64)[col.offset:col.offset + len(col)])
            batch_of.append(np.full(batch.num_rows, b, dtype=np.int64))
        self.keys: list[str] = keys
        self.y, self.x, self.height, self.width = map(_int64s, (ys, xs, hs, ws))
        self._batch_of, self._hr_off, self._lr_off = map(_int64s, (batch_of, hr_off, lr_off))

    def __len__(self) -> int:
        return len(self.keys)

    def describe(self, i: int) -> str:
        """Human-readable name of record ``i`` for error messages."""
        where = f" (sub-image at y={self.y[i]}, x={self.x[i]})" if self.sub_image else ""
        return f"'{self.keys[i]}'{where}, {self.width[i]}x{self.height[i]} HR pixels"

    def hr(self, i: int) -> np.ndarray:
        """Record ``i``'s HR pixels, ``(height, width, 3)`` uint8, a read-only view."""
        h, w = int(self.height[i]), int(self.width[i])
        start = int(self._hr_off[i])
        return self._hr_data[self._batch_of[i]][start:start + h * w * 3].reshape(h, w, 3)

    def lr(self, i: int) -> np.ndarray:
        """Record ``i``'s LR pixels, ``(height/scale, width/scale, 3)`` uint8, a read-only view."""
        h, w = int(self.height[i]) // self.scale, int(self.width[i]) // self.scale
        start = int(self._lr_off[i])
        return self._lr_data[self._batch_of[i]][start:start + h * w * 3].reshape(h, w, 3)

    def close(self) -> None:
        """Drop the views and unmap the file."""
        self._hr_data, self._lr_data = [], []
        self._mmap.close()

    def __enter__(self) -> PatchStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce__(self):
        raise TypeError("PatchStore holds a memory map and cannot be pickled; open the store "
                        "in each process instead")
