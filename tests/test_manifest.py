"""The Parquet manifest: every bad-input kind gets its row and reason, reruns read only what
changed and write identical bytes, exact duplicates are caught, and the `rlfn manifest` CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagefiles import exif_rotated, make, rgb
from rlfn.cli import main
from rlfn.data.manifest import (SCHEMA, ManifestError, build_manifest, read_manifest,
                                summary_path, usable)
from rlfn.data.sources import ResolvedSource

MIN = 16  # the "training crop" of these tests: 'tiny' (8x8) is below it, the rest above
# file name -> (status, reason or note substring)
EXPECTED = {
    "a/good.png": ("ok", None),
    "a/sub/copy_of_good.png": ("rejected", "exact duplicate of data/a/good.png"),
    "a/truncated.png": ("rejected", "truncated or corrupt image data"),
    "a/text.png": ("rejected", "not an image"),
    "a/empty.png": ("rejected", "empty file (0 bytes)"),
    "a/bomb.png": ("rejected", "decompression bomb"),
    "a/tiny.png": ("rejected", "image is 8x8 pixels, smaller than the minimum 16x16"),
    "a/gray.png": ("converted", "grayscale converted to RGB"),
    "a/palette.png": ("converted", "palette image converted to RGB"),
    "a/rgba.png": ("converted", "RGBA converted to RGB (alpha channel dropped)"),
    "a/png16.png": ("converted", "16-bit per channel converted to 8-bit"),
    "a/gray16.png": ("converted", "16-bit grayscale converted to 8-bit RGB"),
    "a/cmyk.jpg": ("converted", "CMYK converted to RGB"),
    "a/rotated.JPG": ("converted", "EXIF orientation 6 applied"),
}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A source folder with one file of every kind (made once: the bomb takes a moment)."""
    root = tmp_path_factory.mktemp("template") / "a"
    (root / "sub").mkdir(parents=True)
    for name in EXPECTED:
        stem = Path(name).stem
        if stem in ("copy_of_good", "rotated"):
            continue
        make(stem, root / Path(name).name)
    shutil.copy2(root / "good.png", root / "sub" / "copy_of_good.png")
    exif_rotated(root / "rotated.JPG", h=30, w=50)
    (root / "README.txt").write_text("not an image\n")
    return root


@pytest.fixture
def data(template, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the template at ``./data/a``, with the working directory at tmp_path."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(template, tmp_path / "data" / "a")
    return tmp_path / "data"


def _src(path: Path, name: str = "a", split: str | None = "train") -> ResolvedSource:
    return ResolvedSource(name=name, split=split, kind="folder", path=path)


def _build(sources, out="out/manifest.parquet", **kw):
    kw.setdefault("min_size", MIN)
    return build_manifest(sources, out, progress=False, workers=kw.pop("workers", 1), **kw)


def _rows(path="out/manifest.parquet") -> dict[str, dict]:
    return {r["path"]: r for r in read_manifest(path).to_pylist()}


def test_every_bad_input_gets_its_row_and_reason(data):
    s = _build([_src(data / "a")])
    rows = _rows()
    assert set(rows) == {f"data/{n}" for n in EXPECTED}
    for name, (status, text) in EXPECTED.items():
        row = rows[f"data/{name}"]
        assert row["status"] == status, (name, row)
        assert (row["source"], row["split"], row["relpath"]) == ("a", "train", name[2:])
        if status == "rejected":
            assert text in row["reason"], (name, row["reason"])
        elif status == "converted":
            assert row["reason"] is None and any(text in n for n in row["notes"]), (name, row)
        else:
            assert row["reason"] is None and row["notes"] == [], (name, row)
    assert s.counts == {"ok": 1, "converted": 7, "rejected": 6} and s.usable == 8
    assert s.read == 14 and s.reused == 0 and s.written
    assert s.skipped == [{"source": "a", "relpath": "README.txt",
                          "reason": "not an image file extension"}]


def test_row_facts(data):
    _build([_src(data / "a")])
    table = read_manifest("out/manifest.parquet")
    assert table.schema.equals(SCHEMA, check_metadata=False)
    assert table.schema.metadata[b"rlfn.manifest.min_size"] == str(MIN).encode()
    assert [(r["source"], r["relpath"]) for r in table.to_pylist()] == \
        sorted((r["source"], r["relpath"]) for r in table.to_pylist())
    rows = _rows()
    good = rows["data/a/good.png"]
    file = data / "a" / "good.png"
    assert good["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert (good["size_bytes"], good["mtime_ns"]) == (file.stat().st_size, file.stat().st_mtime_ns)
    assert (good["width"], good["height"], good["mode"], good["bit_depth"], good["format"]) == \
        (40, 48, "RGB", 8, "PNG")
    # width / height as used: the 50x30 stored JPEG is shown (and trained on) as 30x50
    rot = rows["data/a/rotated.JPG"]
    assert (rot["width"], rot["height"], rot["format"]) == (30, 50, "JPEG")
    assert rows["data/a/png16.png"]["bit_depth"] == 16
    assert rows["data/a/gray16.png"]["mode"] == "I;16"
    assert rows["data/a/cmyk.jpg"]["mode"] == "CMYK"
    assert rows["data/a/palette.png"]["mode"] == "P"
    # what could not be decoded has no size; what could but was refused keeps it
    assert rows["data/a/truncated.png"]["width"] is None
    assert rows["data/a/truncated.png"]["sha256"] is not None
    assert (rows["data/a/tiny.png"]["width"], rows["data/a/tiny.png"]["height"]) == (8, 8)
    assert rows["data/a/empty.png"]["sha256"] == hashlib.sha256(b"").hexdigest()
    ok = usable(table)
    assert sorted(ok["status"].to_pylist()) == ["converted"] * 7 + ["ok"]


def test_summary_file_lists_counts_and_every_rejection(data):
    s = _build([_src(data / "a")])
    assert s.summary_file == Path("out/manifest.summary.json") == summary_path(s.manifest)
    doc = json.loads(s.summary_file.read_text())
    assert doc["manifest"] == "manifest.parquet" and doc["min_size"] == MIN
    assert doc["counts"] == {"ok": 1, "converted": 7, "rejected": 6} and doc["total"] == 14
    assert doc["skipped_count"] == 1 and doc["skipped"][0]["relpath"] == "README.txt"
    assert [r["path"] for r in doc["rejected"]] == sorted(
        f"data/{n}" for n, (st, _) in EXPECTED.items() if st == "rejected")
    for r in doc["rejected"]:
        assert EXPECTED[r["path"][5:]][1] in r["reason"]
    assert doc["conversions"]["CMYK converted to RGB"] == 1
    assert "read" not in doc  # nothing about the run itself, so reruns give the same bytes


def test_unreadable_file_is_rejected_then_retried(data):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading a file")
    locked = data / "a" / "good.png"
    locked.chmod(0)
    try:
        _build([_src(data / "a")])
        row = _rows()["data/a/good.png"]
        assert row["status"] == "rejected" and "permission denied" in row["reason"]
        assert row["sha256"] is None
    finally:
        locked.chmod(0o644)
    # chmod keeps the mtime, so a file that could not be read is always read again
    s = _build([_src(data / "a")])
    assert s.read == 1 and _rows()["data/a/good.png"]["status"] == "ok"


def test_odd_file_system_entries(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "src"
    root.mkdir()
    make("good", root / "good.png")
    os.mkfifo(root / "pipe.png")  # opening it would block forever: must not be read
    (root / "dangling.png").symlink_to(root / "missing.png")
    (root / "link.png").symlink_to(root / "good.png")
    (root / "loop").symlink_to(root)  # a link to a folder: not followed
    open(os.path.join(os.fsencode(root), b"bad\xff.png"), "wb").close()
    s = _build([_src(root)])
    rows = {r["relpath"]: r for r in read_manifest("out/manifest.parquet").to_pylist()}
    assert rows["pipe.png"]["reason"] == "not a regular file"
    assert rows["dangling.png"]["reason"].startswith("cannot be accessed")
    assert rows["bad\\xff.png"]["reason"] == "file name is not valid UTF-8"
    assert rows["good.png"]["status"] == "ok"
    assert rows["link.png"]["duplicate_of"] == "src/good.png"
    assert s.skipped == [{"source": "a", "relpath": "loop",
                          "reason": "symbolic link to a folder (not followed)"}]


def test_rerun_reads_nothing_and_writes_identical_bytes(data):
    first = _build([_src(data / "a")])
    out, summ = Path("out/manifest.parquet"), Path("out/manifest.summary.json")
    before = (out.read_bytes(), summ.read_bytes(), out.stat().st_mtime_ns, summ.stat().st_mtime_ns)
    second = _build([_src(data / "a")])
    assert (second.read, second.reused, second.dropped, second.written) == (0, 14, 0, False)
    assert (out.read_bytes(), summ.read_bytes(), out.stat().st_mtime_ns,
            summ.stat().st_mtime_ns) == before  # not even rewritten
    assert second.counts == first.counts and second.rejected == first.rejected
    assert sorted(os.listdir("out")) == ["manifest.parquet", "manifest.summary.json"]


def test_touched_changed_and_deleted_files(data):
    _build([_src(data / "a")])
    old = _rows()
    gray = data / "a" / "gray.png"
    st = gray.stat()
    os.utime(gray, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    s = _build([_src(data / "a")])
    assert (s.read, s.reused, s.written) == (1, 13, True)
    assert _rows()["data/a/gray.png"]["mtime_ns"] == st.st_mtime_ns + 10**9

    make("good", data / "a" / "text.png", h=40)  # was not an image, now a good one
    s = _build([_src(data / "a")])
    assert s.read == 1
    row = _rows()["data/a/text.png"]
    assert row["status"] == "ok" and row["sha256"] != old["data/a/text.png"]["sha256"]

    (data / "a" / "truncated.png").unlink()
    s = _build([_src(data / "a")])
    assert (s.read, s.dropped) == (0, 1)
    assert "data/a/truncated.png" not in _rows() and s.counts["rejected"] == 4


def test_new_min_size_and_new_folder_need_no_reading(data, tmp_path, monkeypatch):
    _build([_src(data / "a")])
    s = _build([_src(data / "a")], min_size=45)
    assert s.read == 0
    rows = _rows()
    assert rows["data/a/gray.png"]["reason"] == \
        "image is 40x48 pixels, smaller than the minimum 45x45"
    assert rows["data/a/rotated.JPG"]["reason"].startswith("image is 30x50 pixels")
    # run from elsewhere: paths become absolute, nothing is read again
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = _build([_src(data / "a")], out=tmp_path / "out" / "manifest.parquet", min_size=45)
    assert s.read == 0 and s.written
    paths = [r["path"] for r in read_manifest(tmp_path / "out" / "manifest.parquet").to_pylist()]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in paths)


def test_duplicates_across_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for d in ("train", "valid"):
        (tmp_path / d).mkdir()
    make("good", tmp_path / "valid" / "0801.png")
    shutil.copy(tmp_path / "valid" / "0801.png", tmp_path / "train" / "0001.png")
    shutil.copy(tmp_path / "valid" / "0801.png", tmp_path / "train" / "0002.png")
    make("good", tmp_path / "train" / "0003.png", h=50)
    make("empty", tmp_path / "train" / "e1.png")
    make("empty", tmp_path / "train" / "e2.png")
    sources = [_src(tmp_path / "valid", "valid", "valid"), _src(tmp_path / "train", "train")]
    _build(sources)
    rows = _rows()
    # the first by (source, relpath) is kept, whatever order the sources were given in
    assert rows["train/0001.png"]["status"] == "ok"
    for dup in ("train/0002.png", "valid/0801.png"):
        assert rows[dup]["status"] == "rejected" and rows[dup]["duplicate_of"] == "train/0001.png"
        assert rows[dup]["reason"] == "exact duplicate of train/0001.png (same sha256)"
    assert rows["train/0003.png"]["status"] == "ok"
    # equal but refused files keep their own reason
    assert rows["train/e2.png"]["reason"] == "empty file (0 bytes)"
    assert rows["train/e2.png"]["duplicate_of"] is None
    # deleting the kept copy promotes the next one, without reading anything
    (tmp_path / "train" / "0001.png").unlink()
    s = _build(sources)
    rows = _rows()
    assert s.read == 0 and rows["train/0002.png"]["status"] == "ok"
    assert rows["valid/0801.png"]["duplicate_of"] == "train/0002.png"


def test_worker_processes_give_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "many"
    root.mkdir()
    from PIL import Image
    for i in range(40):  # above the size where a pool is used
        Image.fromarray(rgb(20, 20, seed=i)).save(root / f"{i:02d}.png")
    make("gray", root / "gray.png")
    make("truncated", root / "bad.png")
    one = _build([_src(root)], out="one.parquet", workers=1)
    two = _build([_src(root)], out="two.parquet", workers=2)
    assert one.read == two.read == 42
    assert Path("one.parquet").read_bytes() == Path("two.parquet").read_bytes()


def test_bad_previous_manifest_and_bad_arguments(data):
    Path("out").mkdir()
    pq.write_table(pa.table({"x": [1]}), "out/manifest.parquet")
    with pytest.raises(ManifestError, match="not an rlfn manifest"):
        read_manifest("out/manifest.parquet")
    with pytest.warns(UserWarning, match="every file will be read again"):
        s = _build([_src(data / "a")])
    assert s.read == 14 and read_manifest("out/manifest.parquet").num_rows == 14
    with pytest.raises(ManifestError, match="several sources named 'a'"):
        _build([_src(data / "a"), _src(data / "a" / "sub")])
    with pytest.raises(ManifestError, match="not found"):
        _build([_src(data / "missing")])
    with pytest.raises(ValueError, match="min_size"):
        _build([_src(data / "a")], min_size=0)


def test_manifest_inside_its_source_is_not_listed(data):
    out = data / "a" / "manifest.parquet"
    _build([_src(data / "a")], out=out)
    s = _build([_src(data / "a")], out=out)
    assert (s.read, s.written) == (0, False)
    assert [e["relpath"] for e in s.skipped] == ["README.txt"]


def test_cli_folders_archives_and_exit_codes(data, tmp_path, capsys):
    # a tar.gz of two good images, unpacked into --cache
    packed = tmp_path / "packed"
    packed.mkdir()
    make("good", packed / "p1.png", h=60)
    make("gray", packed / "p2.png", h=60)
    with tarfile.open(tmp_path / "extra.tar.gz", "w:gz") as tf:
        tf.add(packed, arcname="extra")
    argv = ["-q", "manifest", "data/a", "extra.tar.gz", "-o", "m.parquet", "--min-size", "16",
            "--split", "train", "--cache", "cache", "--workers", "1"]
    assert main(argv) == 0  # rejected files alone do not fail the run
    out, err = capsys.readouterr()
    assert "m.parquet: 16 files: 2 ok, 8 converted, 6 rejected; 1 skipped (not image files)" in out
    assert "read 16, reused 0, dropped 0; manifest written" in out
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 6 and "error: data/a/empty.png: empty file (0 bytes)" in errors
    rows = read_manifest("m.parquet").to_pylist()
    assert {r["split"] for r in rows} == {"train"}
    extra = [r for r in rows if r["source"] == "extra.tar.gz"]
    assert [r["relpath"] for r in extra] == ["extra/p1.png", "extra/p2.png"]
    assert all(r["path"].startswith("cache/unpacked/") for r in extra)
    summary = json.loads(Path("m.summary.json").read_text())
    assert summary["counts"] == {"ok": 2, "converted": 8, "rejected": 6}

    assert main(argv) == 0
    assert "read 0, reused 16, dropped 0; manifest unchanged" in capsys.readouterr().out

    bad = tmp_path / "bad"
    bad.mkdir()
    make("empty", bad / "e.png")
    make("text", bad / "t.jpg")
    assert main(["-q", "manifest", "bad", "-o", "bad.parquet"]) == 1  # nothing usable
    out, err = capsys.readouterr()
    assert "0 ok, 0 converted, 2 rejected" in out and err.count("error:") == 2
    assert read_manifest("bad.parquet").num_rows == 2  # still written, with the reasons

    assert main(["-q", "manifest", "nowhere", "-o", "x.parquet"]) == 1
    assert "error: nowhere: no such file or directory" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    assert main(["-q", "manifest", "notes.txt", "-o", "x.parquet", "--cache", "cache"]) == 1
    assert "not a zip or tar archive" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["manifest", "data/a", "-o", "x.parquet", "--min-size", "0"])
    assert e.value.code == 2

