"""Image reading and writing with the project's bad-input rules.

``read_image`` returns an RGB uint8 HWC array or raises ``ImageError`` whose message names
the file and the reason. Inputs that can be used after a lossless-enough conversion
(grayscale, palette, RGBA, 16-bit, CMYK, EXIF-rotated) are converted and each conversion is
reported in ``ImageInfo.notes`` so callers can tell the user.

``atomic_write(path, data)`` publishes a file whole or not at all (every file the library
publishes goes through it): the data go to a temporary file in the same folder, are flushed
to disk (fsync), and the temporary file is renamed over ``path`` (``os.replace``, atomic on
one file system); on any error the temporary file is removed and ``path`` is left as it was.
``atomic_target(path)`` is the same for writers that want a file name (a compiler, an
exporter): it yields the temporary path and publishes it when the block ends without error.
A full disk (``ENOSPC``, or a quota: ``EDQUOT``) in either is ``NoSpaceError``: a DataError
(one ``error:`` line, exit 1) naming ``path`` and "no space left on device", still an OSError
for callers that catch those; ``is_no_space(e)`` tells one (an OSError, or safetensors'
error, which wraps the OS error in its message).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import secrets
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError

__all__ = ["ImageError", "ImageInfo", "read_image", "decode_image", "write_png", "write_json",
           "encode_png", "list_images", "sha256_file", "atomic_write", "atomic_target", "publish",
           "NoSpaceError", "is_no_space",
           "IMAGE_EXTENSIONS", "DEFAULT_MAX_PIXELS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# 8K x 8K: far above any SR benchmark or DIV2K image (2K), far below a decompression bomb.
DEFAULT_MAX_PIXELS = 8192 * 8192


class ImageError(DataError, ValueError):
    """An image that cannot be used: ``ImageError(path, reason)``."""


class NoSpaceError(DataError, OSError):
    """A file that could not be written because its file system is full:
    ``NoSpaceError(path, reason)``; ``errno`` is ``ENOSPC``."""

    def __init__(self, where, reason=None):
        super().__init__(where, reason)
        self.errno = errno.ENOSPC


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_no_space(e: BaseException) -> bool:
    """Whether ``e`` says a file system is full (ENOSPC or EDQUOT): an OSError with that errno,
    or another error carrying the OS's words (safetensors: "... (os error 28)")."""
    if isinstance(e, OSError):
        return e.errno in _NO_SPACE
    text = str(e)
    return any(f"os error {n})" in text for n in _NO_SPACE) or "No space left" in text


def _no_space(path: Path, e: BaseException) -> NoSpaceError:
    return NoSpaceError(path, f"no space left on device ({type(e).__name__}: "
                              f"{getattr(e, 'strerror', None) or e}); nothing was written "
                              "there: free space and rerun")


@dataclass
class ImageInfo:
    """What was read: original mode and bit depth, and every conversion applied."""

    path: str
    width: int
    height: int
    mode: str
    bit_depth: int
    format: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def converted(self) -> bool:
        return bool(self.notes)


def _png_bit_depth(head: bytes) -> int | None:
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) > 24:
        return head[24]
    return None


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_size: int = 1) -> tuple[np.ndarray, ImageInfo]:
    """Read an image as RGB uint8 ``(H, W, 3)``; raise ``ImageError`` when it cannot be used."""
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "no such file")
    if path.is_dir():
        raise ImageError(path, "is a directory, expected an image file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(26)
    except PermissionError:
        raise ImageError(path, "permission denied (file is not readable)") from None
    if size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    return _decode(path, str(path), head, max_pixels, min_size)


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_size: int = 1) -> tuple[np.ndarray, ImageInfo]:
    """``read_image`` for an encoded image held in memory (PNG, JPEG, ... bytes): the same
    checks and conversions; ``name`` stands for the file in messages."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(name, f"expected encoded image bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageError(name, "empty image (0 bytes)")
    return _decode(io.BytesIO(data), name, data[:26], max_pixels, min_size)


def _decode(source, name: str, head: bytes, max_pixels: int,
            min_size: int) -> tuple[np.ndarray, ImageInfo]:
    """Open ``source`` (a path or a binary file object) and convert it to RGB uint8."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(name, f"refused as a possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(name, "not an image (unrecognised or corrupt file format)") from None
    except OSError as e:
        raise ImageError(name, f"cannot be opened ({e})") from None
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise ImageError(name, f"refused as a possible decompression bomb: {w}x{h} = "
                                   f"{w * h:,} pixels exceeds the limit of {max_pixels:,}")
        mode = im.mode
        fmt = im.format
        bit_depth = {"I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32, "1": 1}.get(mode, 8)
        if fmt == "PNG":
            bit_depth = _png_bit_depth(head) or bit_depth
        info = ImageInfo(name, w, h, mode, bit_depth, fmt)
        try:
            im.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(name, f"truncated or corrupt image data ({e})") from None
        orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
        if orientation not in (None, 1):
            im = ImageOps.exif_transpose(im)
            info.notes.append(f"EXIF orientation {orientation} applied")
        arr = _to_rgb8(im, info)
    if arr.shape[0] < min_size or arr.shape[1] < min_size:
        raise ImageError(name, f"image is {arr.shape[1]}x{arr.shape[0]} pixels, smaller than the "
                               f"minimum {min_size}x{min_size}")
    return arr, info


def _to_rgb8(im: Image.Image, info: ImageInfo) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im).astype(np.float64)
        a = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
        info.notes.append(f"{info.bit_depth}-bit grayscale converted to 8-bit RGB")
        return np.repeat(a[:, :, None], 3, axis=2)
    if mode == "F":
        raise_mode = "32-bit float"
        raise ImageError(info.path, f"unsupported pixel format ({raise_mode})")
    if info.bit_depth == 16:
        info.notes.append("16-bit per channel converted to 8-bit")
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode in ("L", "1"):
        info.notes.append("grayscale converted to RGB (3 equal channels)")
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    if mode == "P":
        has_alpha = "transparency" in im.info
        info.notes.append("palette image converted to RGB"
                          + (" (transparency dropped)" if has_alpha else ""))
        return np.asarray(im.convert("RGBA" if has_alpha else "RGB"), dtype=np.uint8)[..., :3].copy()
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        info.notes.append(f"{mode} converted to RGB (alpha channel dropped)")
        return np.asarray(im.convert("RGBA"), dtype=np.uint8)[..., :3].copy()
    if mode == "CMYK":
        info.notes.append("CMYK converted to RGB")
    else:
        info.notes.append(f"{mode} converted to RGB")
    try:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (ValueError, OSError) as e:
        raise ImageError(info.path, f"unsupported pixel format {mode} ({e})") from None


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's contents."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def encode_png(arr: np.ndarray, compress_level: int = 6) -> bytes:
    """An RGB (or gray) uint8 array as PNG bytes: exactly what ``write_png`` writes (zlib
    level 6, Pillow's default). ``compress_level`` 1 is what the served model answers with:
    4-5x faster to encode (1.0 s -> 0.2 s for a 2040x1356 answer on these cores), ~20%
    larger; the same pixels either way."""
    if arr.dtype != np.uint8:
        raise TypeError(f"encode_png expects uint8, got {arr.dtype}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def write_png(path: str | Path, arr: np.ndarray) -> Path:
    """Write an RGB (or gray) uint8 array as PNG, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.dtype != np.uint8:
        raise TypeError(f"write_png expects uint8, got {arr.dtype}")
    return atomic_write(path, encode_png(arr))


def write_json(path: str | Path, data: object) -> Path:
    """Write ``data`` as indented, key-sorted JSON, atomically (``atomic_write``): a reader
    (DVC, a dashboard, the next stage) sees the old file or the new one, never half."""
    return atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def list_images(inputs, errors: list | None = None) -> list[Path]:
    """Expand files and folders into a sorted list of image paths.

    A missing input is appended to ``errors`` as an ``ImageError`` (or raised when ``errors`` is
    None); files named explicitly are kept whatever their extension, so that a bad file gets
    its own clear error later instead of being skipped silently.
    """
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir()
                              if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS))
        elif p.exists():
            out.append(p)
        else:
            err = ImageError(p, "no such file or directory")
            if errors is None:
                raise err
            errors.append(err)
    return out


# --------------------------------------------------------------------------- atomic writes
def publish(tmp: str | Path, path: str | Path) -> None:
    """Flush the finished file ``tmp`` to disk (fsync) and rename it over ``path`` (same
    folder: atomic). For a file built in place beside ``path`` (a resumable download)."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _temp_beside(path: Path, mode: int) -> tuple[int, Path]:
    """A new, empty temporary file in ``path``'s folder: (open descriptor, its path). Created
    with ``mode`` less the umask, as ``open`` would create ``path`` itself."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), tmp
        except FileExistsError:
            continue


def _new_temp(path: Path, mode: int) -> tuple[int, Path]:
    """``_temp_beside``, a full file system (no inode left) said as ``NoSpaceError``."""
    try:
        return _temp_beside(path, mode)
    except OSError as e:
        if is_no_space(e):
            raise _no_space(path, e) from e
        raise


@contextlib.contextmanager
def atomic_target(path: str | Path, *, mode: int = 0o666) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (an empty file) for a writer that wants a file
    name; when the block ends without error, the file is fsynced and renamed over ``path``.
    On an error it is removed. The folder is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp(path, mode)
    os.close(fd)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_no_space(e) and not isinstance(e, NoSpaceError):
            raise _no_space(path, e) from e
        raise


def atomic_write(path: str | Path, data: bytes | str | Callable, *,
                 mode: int = 0o666) -> Path:
    """Publish ``path`` whole or not at all; returns it. ``data``: bytes, a str (written as
    UTF-8), or a writer ``f(file)`` called with the temporary file open for binary writing.
    ``mode``: the new file's permissions before the umask (``0o600``: private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp(path, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_no_space(e) and not isinstance(e, NoSpaceError):
            raise _no_space(path, e) from e
        raise
    return path
