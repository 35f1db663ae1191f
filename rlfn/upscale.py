"""Super-resolve images: whole, or in overlapping tiles when an image is too large for memory.

Batched mode (``upscale_batch``, ``upscale_files``; ``rlfn upscale --batch N``): whole images
of one size, and tiles of one size (of one image or of several), run N at a time through the
engine. Tiles keep their own ESA grid (a sequence of ``ESAGrid``, one per sample), and on the
CPU the eager engines make a batch's outputs bit-identical to unbatched runs (see
``rlfn.engine``), so batched PNGs equal unbatched ones byte for byte there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .bicubic import imresize_array
from .engine import Engine, as_engine
from .models.rlfn import ESA_STRIDE, RLFN, ESAGrid

__all__ = ["to_tensor", "to_uint8", "upscale_array", "upscale_batch", "upscale_files",
           "Upscaled", "tile_starts", "auto_tile", "ModelUpscaler", "BicubicUpscaler",
           "AUTO_TILE", "AUTO_TILE_PIXELS", "BATCH_WINDOW_PIXELS"]

# The auto-tile policy (``rlfn upscale --tile auto``, the registered pyfunc's ``tile=-1``):
# images over AUTO_TILE_PIXELS LR pixels (~2 GB of activations on a CPU) run in AUTO_TILE
# tiles; smaller ones whole.
AUTO_TILE_PIXELS = 1024 * 1024
AUTO_TILE = 512
# ``upscale_files`` reads ahead up to 4 x batch files, but no more than this many LR pixels
# (their SR outputs, 16x as many at x4, are held until written in order).
BATCH_WINDOW_PIXELS = 8 * 1024 * 1024


def auto_tile(height: int, width: int, can_tile: bool = True) -> int | None:
    """The tile size (LR pixels) the auto policy picks for an image, ``None`` for whole.
    Engines that cannot tile (``can_tile`` False: ONNX/OpenVINO/compiled graphs) run whole."""
    return AUTO_TILE if can_tile and height * width > AUTO_TILE_PIXELS else None


def to_tensor(img: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> float32 ``(1, 3, H, W)`` in [0, 255] (RLFN's pixel range).
    A read-only array (``np.asarray`` of a PIL image, a memory map) is copied first: torch
    cannot share it without a warning, and the copy is the uint8 image, a quarter of the
    float tensor made anyway."""
    img = np.ascontiguousarray(img)
    if not img.flags.writeable:
        img = img.copy()
    return torch.from_numpy(img).to(device).permute(2, 0, 1)[None].float()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float ``(1, 3, H, W)`` in [0, 255] -> uint8 ``(H, W, 3)``: clamp, round half to even."""
    return x[0].clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets (multiples of ``align``) of tiles of about ``tile`` pixels covering
    ``length``, neighbours overlapping by at least ``overlap``. The last tile runs to the end
    (up to ``align - 1`` pixels longer than ``tile``)."""
    if tile >= length:
        return [0]
    step = (tile - overlap) // align * align
    if step <= 0:
        raise ValueError(f"tile ({tile}) must exceed the overlap ({overlap}) by at least {align}")
    last = (length - tile) // align * align
    starts = list(range(0, last, step))
    starts.append(last)
    return starts


@torch.inference_mode()
def upscale_array(model: nn.Module | Engine, img: np.ndarray, tile: int | None = None,
                  overlap: int = 64, device: str | torch.device | None = None) -> np.ndarray:
    """Super-resolve one uint8 RGB image; returns uint8 ``(H*s, W*s, 3)``.

    ``model`` is a module (run eagerly, as it is) or an inference ``Engine`` (``rlfn.engine``).

    With ``tile`` (LR pixels), the image is processed in pieces of about ``tile x tile`` that
    overlap by at least ``overlap`` pixels; each output pixel is taken from the tile in which it
    lies farthest from a cut edge (the middle of the overlap), so no seams are blended. Tiles
    start on ESA's 6-pixel grid and ESA samples its mask on the whole image's grid
    (``ESAGrid``), so the result stays within a grey level of the untiled output.
    """
    engine = as_engine(model, device)
    device = engine.device
    scale = engine.scale
    h, w = img.shape[:2]
    if tile is None or (h <= tile and w <= tile):
        return to_uint8(engine(to_tensor(img, device)))
    align, pieces = _tile_plan(engine, h, w, tile, overlap)
    out = np.empty((h * scale, w * scale, 3), dtype=np.uint8)
    kwargs = {}
    for y0, y1, x0, x1, oy0, oy1, ox0, ox1 in pieces:
        if align > 1:
            kwargs["grid"] = ESAGrid(origin=(y0, x0), full_size=(h, w))
        sr = to_uint8(engine(to_tensor(img[y0:y1, x0:x1], device), **kwargs))
        out[oy0 * scale:oy1 * scale, ox0 * scale:ox1 * scale] = sr[
            (oy0 - y0) * scale:(oy1 - y0) * scale, (ox0 - x0) * scale:(ox1 - x0) * scale]
    return out


def _tile_plan(engine: Engine, h: int, w: int, tile: int, overlap: int
               ) -> tuple[int, list[tuple[int, ...]]]:
    """ESA's alignment and the tiles of an ``h x w`` image: (y0, y1, x0, x1) of each tile
    and (oy0, oy1, ox0, ox1), the part of the output it owns (cut mid-overlap)."""
    align = ESA_STRIDE if isinstance(engine.model, RLFN) else 1
    if align > 1 and not engine.supports_grid:
        raise ValueError(f"backend {engine.name!r} cannot run tiled (ESA's whole-image grid "
                         "needs eager PyTorch); run untiled or use eager, channels_last, bf16")
    min_tile = engine.min_input_size
    if tile < max(min_tile, 2 * overlap + 1):
        raise ValueError(f"tile size {tile} too small: needs > 2 x overlap ({overlap}) and "
                         f">= {min_tile}")
    ys, xs = tile_starts(h, tile, overlap, align), tile_starts(w, tile, overlap, align)

    def bounds(starts: list[int], length: int) -> list[tuple[int, int, int, int]]:
        # (tile start, tile end, owned start, owned end): cut in the middle of each overlap
        out = []
        for i, s in enumerate(starts):
            end = length if i == len(starts) - 1 else s + tile
            lo = 0 if i == 0 else (s + out[-1][1]) // 2
            out.append((s, end, lo, length))
            if i:
                out[-2] = out[-2][:3] + (lo,)
        return out

    return align, [(y0, y1, x0, x1, oy0, oy1, ox0, ox1)
                   for y0, y1, oy0, oy1 in bounds(ys, h) for x0, x1, ox0, ox1 in bounds(xs, w)]


@torch.inference_mode()
def upscale_batch(model: nn.Module | Engine, images: Sequence[np.ndarray],
                  tile: int | None | Sequence[int | None] = None, overlap: int = 64,
                  batch: int = 8, device: str | torch.device | None = None
                  ) -> list[np.ndarray]:
    """``upscale_array`` of each image, run ``batch`` pieces at a time: whole images grouped
    by size, tiles (``tile``: one size for all, or one per image; ``None``: whole) grouped by
    tile size across all ``images``. ``batch=1`` is ``upscale_array`` image by image.

    On the CPU with an eager engine (eager, channels_last, bf16) the results equal the
    unbatched ones bit for bit; elsewhere within the engine's own run-to-run rounding. Engines
    that cannot take an ESA grid (compiled, ONNX, CUDA graphs) batch whole images only.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    engine = as_engine(model, device)
    tiles = list(tile) if isinstance(tile, (list, tuple)) else [tile] * len(images)
    if len(tiles) != len(images):
        raise ValueError(f"{len(tiles)} tile sizes for {len(images)} images")
    if batch == 1:
        return [upscale_array(engine, im, tile=t, overlap=overlap)
                for im, t in zip(images, tiles)]
    device, scale = engine.device, engine.scale
    outs: list[np.ndarray] = []
    # pieces grouped by (height, width, tiled): (image index, tile, owned region, grid)
    groups: dict[tuple, list[tuple]] = {}
    for i, (img, t) in enumerate(zip(images, tiles)):
        h, w = img.shape[:2]
        outs.append(np.empty((h * scale, w * scale, 3), dtype=np.uint8))
        if t is None or (h <= t and w <= t):
            groups.setdefault((h, w, False), []).append((i, (0, h, 0, w), (0, h, 0, w), None))
            continue
        align, pieces = _tile_plan(engine, h, w, t, overlap)
        for y0, y1, x0, x1, oy0, oy1, ox0, ox1 in pieces:
            grid = ESAGrid(origin=(y0, x0), full_size=(h, w)) if align > 1 else None
            groups.setdefault((y1 - y0, x1 - x0, True), []).append(
                (i, (y0, y1, x0, x1), (oy0, oy1, ox0, ox1), grid))
    for members in groups.values():
        for k in range(0, len(members), batch):
            chunk = members[k:k + batch]
            x = torch.cat([to_tensor(images[i][y0:y1, x0:x1], device)
                           for i, (y0, y1, x0, x1), _, _ in chunk])
            grids = [g for *_, g in chunk]
            kwargs = {"grid": grids} if grids[0] is not None else {}
            sr_batch = engine(x, **kwargs)
            for n, (i, (y0, _, x0, _), (oy0, oy1, ox0, ox1), _) in enumerate(chunk):
                sr = to_uint8(sr_batch[n:n + 1])
                outs[i][oy0 * scale:oy1 * scale, ox0 * scale:ox1 * scale] = sr[
                    (oy0 - y0) * scale:(oy1 - y0) * scale, (ox0 - x0) * scale:(ox1 - x0) * scale]
            del sr_batch
    return outs


@dataclass
class Upscaled:
    """One file's result from ``upscale_files``: the SR image, or the ``error`` (an
    ``ImageError``) that stopped it; ``notes`` from reading it and from the tile policy."""

    path: Path
    sr: np.ndarray | None = None
    error: Exception | None = None
    notes: list[str] = field(default_factory=list)


def upscale_files(upscaler: "ModelUpscaler | BicubicUpscaler | Callable",
                  files: Iterable[Path], tile: int | str | None = None, overlap: int = 64,
                  batch: int = 1, window: int | None = None,
                  window_pixels: int = BATCH_WINDOW_PIXELS) -> Iterator[Upscaled]:
    """Read and super-resolve ``files``, yielding one ``Upscaled`` per file in their order
    (a file that cannot be read yields its error; the others go on).

    ``tile``: LR pixels, ``None``/0 for whole images, or ``"auto"`` (``auto_tile`` per image).
    ``batch``: with a model (a ``ModelUpscaler``), files are read ahead ``window`` at a time
    (default 4 x batch, at most ``window_pixels`` LR pixels) and run through
    ``upscale_batch``; ``batch=1`` reads, upscales and yields one file at a time. Anything
    else (bicubic) runs image by image.
    """
    from .io import ImageError, read_image

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    engine = getattr(upscaler, "engine", None)
    can_tile = engine.supports_grid if engine is not None else True
    min_size = getattr(upscaler, "min_input_size", 1)
    window = (1 if batch == 1 or engine is None else 4 * batch) if window is None else window

    def load(f: Path) -> tuple[Upscaled, np.ndarray | None, int | None]:
        res = Upscaled(Path(f))
        try:
            lr, info = read_image(f, min_size=min_size)
        except ImageError as e:
            res.error = e
            return res, None, None
        res.notes.extend(info.notes)
        t = tile
        if t == "auto":
            t = auto_tile(*lr.shape[:2], can_tile=can_tile)
            if not can_tile and lr.shape[0] * lr.shape[1] > AUTO_TILE_PIXELS:
                res.notes.append(f"backend {engine.name} runs untiled; a large image needs "
                                 "memory (eager or channels_last can tile)")
        return res, lr, None if t in (None, 0) else int(t)

    def run(pending: list) -> Iterator[Upscaled]:
        good = [(res, lr, t) for res, lr, t in pending if lr is not None]
        if engine is not None:
            srs = upscale_batch(engine, [lr for _, lr, _ in good], [t for *_, t in good],
                                overlap=overlap, batch=batch)
        else:
            srs = []
            for _, lr, t in good:
                if hasattr(upscaler, "tile"):
                    upscaler.tile = t
                srs.append(upscaler(lr))
        for (res, _, _), sr in zip(good, srs):
            res.sr = sr
        for res, _, _ in pending:
            yield res

    pending: list = []
    pixels = 0
    for f in files:
        item = load(f)
        pending.append(item)
        if item[1] is not None:
            pixels += item[1].shape[0] * item[1].shape[1]
        if len(pending) >= window or pixels >= window_pixels:
            yield from run(pending)
            pending, pixels = [], 0
    if pending:
        yield from run(pending)


class ModelUpscaler:
    """LR uint8 -> SR uint8 with a model or an inference engine (whole image, or tiled when
    ``tile`` is set)."""

    def __init__(self, model: nn.Module | Engine, tile: int | None = None, overlap: int = 64,
                 device: str | torch.device | None = None):
        self.engine = as_engine(model, device)
        self.model = self.engine.model
        self.scale = self.engine.scale
        self.min_input_size = self.engine.min_input_size
        self.tile = tile
        self.overlap = overlap

    def __call__(self, lr: np.ndarray) -> np.ndarray:
        return upscale_array(self.engine, lr, tile=self.tile, overlap=self.overlap)


class BicubicUpscaler:
    """LR uint8 -> MATLAB bicubic upscaling by ``scale`` (the baseline every SR paper reports)."""

    min_input_size = 1

    def __init__(self, scale: int):
        self.scale = int(scale)

    def __call__(self, lr: np.ndarray) -> np.ndarray:
        return imresize_array(lr, float(self.scale))
