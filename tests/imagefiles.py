"""Makers of real bad and odd image files for the bad-input tests."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def rgb(h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    return np.clip(base + g.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def write_png16(path: Path, arr: np.ndarray) -> Path:
    """A 16-bit PNG (gray, RGB or RGBA) written by hand: PIL cannot write 16-bit RGB."""
    h, w, c = arr.shape
    color_type = {1: 0, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def make(kind: str, path: Path, h: int = 48, w: int = 40) -> Path:
    """Write one file of ``kind`` at ``path``; returns the path."""
    a = rgb(h, w)
    if kind == "good":
        Image.fromarray(a).save(path)
    elif kind == "truncated":
        Image.fromarray(a).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("definitely not a PNG\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "gray":
        Image.fromarray(a[..., 0]).save(path)
    elif kind == "palette":
        Image.fromarray(a).convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    elif kind == "rgba":
        Image.fromarray(np.dstack([a, np.full(a.shape[:2], 128, np.uint8)])).save(path)
    elif kind == "png16":
        write_png16(path, a.astype(np.uint16) * 257)
    elif kind == "gray16":
        Image.fromarray(a[..., 0].astype(np.uint16) * 257).save(path)
    elif kind == "cmyk":
        Image.fromarray(a).convert("CMYK").save(path, format="JPEG", quality=95)
    elif kind == "tiny":
        Image.fromarray(rgb(8, 8)).save(path)
    elif kind == "bomb":
        # 20000 x 20000 1-bit image: a few kB on disk, 400 MP decoded
        Image.new("1", (20000, 20000)).save(path)
    else:
        raise ValueError(kind)
    return path


def exif_rotated(path: Path, h: int = 30, w: int = 50, orientation: int = 6) -> Path:
    """A JPEG stored ``h`` x ``w`` whose EXIF orientation asks viewers to rotate it (6: 90
    degrees clockwise, so it is shown ``w`` x ``h``)."""
    im = Image.fromarray(rgb(h, w))
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, format="JPEG", exif=exif, quality=95)
    return path
