"""read_image: every bad or odd input kind gets a conversion that is reported, or an error
naming the file and the reason."""

from __future__ import annotations

import os

import numpy as np
import pytest

from imagefiles import make, rgb
from rlfn.errors import DataError
from rlfn.io import (ImageError, NoSpaceError, atomic_target, atomic_write, is_no_space,
                     list_images, read_image, write_png)

CONVERTED = {"gray": "grayscale", "palette": "palette", "rgba": "alpha", "png16": "16-bit",
             "gray16": "16-bit", "cmyk": "CMYK"}
REJECTED = {"truncated": "truncated", "text": "not an image", "empty": "empty",
            "bomb": "decompression bomb"}


@pytest.mark.parametrize("kind", sorted(CONVERTED))
def test_converted_kinds_are_rgb8_and_reported(tmp_path, kind):
    p = make(kind, tmp_path / f"{kind}.{'jpg' if kind == 'cmyk' else 'png'}")
    arr, info = read_image(p)
    assert arr.dtype == np.uint8 and arr.shape == (48, 40, 3)
    assert any(CONVERTED[kind] in n for n in info.notes), info.notes
    if kind in ("png16", "gray16", "gray"):  # made from the same 8-bit picture: values survive
        ref = rgb()
        want = ref[..., :1].repeat(3, axis=2) if kind != "png16" else ref
        assert np.array_equal(arr, want)


@pytest.mark.parametrize("kind", sorted(REJECTED))
def test_rejected_kinds_name_file_and_reason(tmp_path, kind):
    p = make(kind, tmp_path / f"{kind}.png")
    with pytest.raises(ImageError) as ei:
        read_image(p)
    msg = str(ei.value)
    assert msg.startswith(str(p)) and REJECTED[kind] in msg and "\n" not in msg


def test_missing_directory_tiny_and_unreadable(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="directory"):
        read_image(tmp_path)
    with pytest.raises(ImageError, match="8x8 pixels, smaller than the minimum 15x15"):
        read_image(make("tiny", tmp_path / "tiny.png"), min_size=15)
    p = make("good", tmp_path / "locked.png")
    os.chmod(p, 0)
    try:
        if os.access(p, os.R_OK):  # root reads anything; the check is then meaningless
            pytest.skip("running as root: permission bits do not stop reads")
        with pytest.raises(ImageError, match="permission denied"):
            read_image(p)
    finally:
        os.chmod(p, 0o644)


def test_exif_rotation_applied(tmp_path):
    from PIL import Image

    a = rgb(30, 50)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif, quality=95)
    arr, info = read_image(p)
    assert arr.shape == (50, 30, 3)
    assert any("EXIF orientation 6" in n for n in info.notes)


def test_write_png_is_atomic_and_round_trips(tmp_path):
    a = rgb()
    p = write_png(tmp_path / "sub" / "x.png", a)
    back, info = read_image(p)
    assert np.array_equal(back, a) and info.notes == []
    assert [q.name for q in p.parent.iterdir()] == ["x.png"]  # no temp file left


def test_list_images(tmp_path):
    make("good", tmp_path / "b.png")
    make("good", tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("x")
    errs = []
    files = list_images([tmp_path, tmp_path / "missing.png"], errs)
    assert [f.name for f in files] == ["a.png", "b.png"]
    assert len(errs) == 1 and "missing.png" in str(errs[0])


def test_atomic_write_publishes_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "report.json"
    assert atomic_write(path, "one\n") == path  # the folder is made
    assert path.read_text() == "one\n"
    atomic_write(path, b"two")
    atomic_write(path, lambda f: f.write(b"three"))  # a writer gets the binary file
    assert path.read_bytes() == b"three"
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it
    atomic_write(tmp_path / "secret", "x", mode=0o600)
    assert (tmp_path / "secret").stat().st_mode & 0o077 == 0

    def half(f):
        f.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, half)
    assert path.read_bytes() == b"three"  # the old file kept
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]  # no temp left


def test_a_full_disk_is_one_error_naming_the_file(tmp_path):
    """ENOSPC while publishing: NoSpaceError (a DataError, still an OSError) naming the path,
    the old file kept, no temp left. The real full disk: test_chaos_disk.py."""
    import errno

    path = tmp_path / "w.bin"
    atomic_write(path, b"old")

    def full(f):
        f.write(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(NoSpaceError) as e:
        atomic_write(path, full)
    assert isinstance(e.value, DataError) and isinstance(e.value, OSError)
    assert e.value.errno == errno.ENOSPC
    assert str(e.value).startswith(f"{path}: no space left on device"), str(e.value)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bin"]
    with pytest.raises(NoSpaceError, match="no space left on device"):
        with atomic_target(path) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bin"]
    assert is_no_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_no_space(RuntimeError("Error while serializing: I/O error: No space left on "
                                    "device (os error 28)"))
    assert not is_no_space(OSError(errno.EACCES, "Permission denied"))
    with pytest.raises(PermissionError):  # other errors pass as they were
        atomic_write(path, lambda f: (_ for _ in ()).throw(PermissionError("no")))


def test_atomic_target_for_writers_that_want_a_name(tmp_path):
    path = tmp_path / "model.bin"
    with atomic_target(path) as tmp:
        assert tmp.parent == tmp_path and tmp != path and not path.exists()
        tmp.write_bytes(b"built")
    assert path.read_bytes() == b"built"
    with pytest.raises(ValueError):
        with atomic_target(path) as tmp:
            tmp.write_bytes(b"half")
            raise ValueError("compiler failed")
    assert path.read_bytes() == b"built"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]

