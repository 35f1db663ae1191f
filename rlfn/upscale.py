"""Super-resolve images: whole, or in overlapping tiles when an image is too large for memory."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .bicubic import imresize_array
from .infer import Engine, as_engine
from .models.rlfn import ESA_STRIDE, RLFN, ESAGrid

__all__ = ["to_tensor", "to_uint8", "upscale_array", "tile_starts", "auto_tile",
           "ModelUpscaler", "BicubicUpscaler", "AUTO_TILE", "AUTO_TILE_PIXELS"]

# The auto-tile policy (``rlfn upscale --tile auto``, the registered pyfunc's ``tile=-1``):
# images over AUTO_TILE_PIXELS LR pixels (~2 GB of activations on a CPU) run in AUTO_TILE
# tiles; smaller ones whole.
AUTO_TILE_PIXELS = 1024 * 1024
AUTO_TILE = 512


def auto_tile(height: int, width: int, can_tile: bool = True) -> int | None:
    """The tile size (LR pixels) the auto policy picks for an image, ``None`` for whole.
    Engines that cannot tile (``can_tile`` False: ONNX/OpenVINO/compiled graphs) run whole."""
    return AUTO_TILE if can_tile and height * width > AUTO_TILE_PIXELS else None


def to_tensor(img: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> float32 ``(1, 3, H, W)`` in [0, 255] (RLFN's pixel range)."""
    return torch.from_numpy(np.ascontiguousarray(img)).to(device).permute(2, 0, 1)[None].float()


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

    ``model`` is a module (run eagerly, as it is) or an inference ``Engine`` (``rlfn.infer``).

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
    align = ESA_STRIDE if isinstance(engine.model, RLFN) else 1
    if align > 1 and not engine.supports_grid:
        raise ValueError(f"backend {engine.name!r} cannot run tiled (ESA's whole-image grid "
                         "needs eager PyTorch); run untiled or use eager, channels_last, bf16")
    min_tile = engine.min_input_size
    if tile < max(min_tile, 2 * overlap + 1):
        raise ValueError(f"tile size {tile} too small: needs > 2 x overlap ({overlap}) and "
                         f">= {min_tile}")
    out = np.empty((h * scale, w * scale, 3), dtype=np.uint8)
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

    kwargs = {}
    for y0, y1, oy0, oy1 in bounds(ys, h):
        for x0, x1, ox0, ox1 in bounds(xs, w):
            if align > 1:
                kwargs["grid"] = ESAGrid(origin=(y0, x0), full_size=(h, w))
            sr = to_uint8(engine(to_tensor(img[y0:y1, x0:x1], device), **kwargs))
            out[oy0 * scale:oy1 * scale, ox0 * scale:ox1 * scale] = sr[
                (oy0 - y0) * scale:(oy1 - y0) * scale, (ox0 - x0) * scale:(ox1 - x0) * scale]
    return out


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
