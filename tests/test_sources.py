"""Dataset sources: validation, verified/resumable downloads against a real local HTTP server,
safe unpacking, caching."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rlfn.data.sources import (DIV2K, ResolvedSource, Source, SourceError, download, resolve,
                               sha256_file, unpack)

TIMEOUT = 5.0


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, format="PNG")
    return buf.getvalue()


IMAGES = {"0001.png": _png((255, 0, 0)), "0002.png": _png((0, 128, 255))}


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


ZIP = _zip({f"imgs/{k}": v for k, v in IMAGES.items()})


# --- a real HTTP server --------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.routes[path] = (body, mode)``; mode is "range" (honours Range),
    "no-range" (always 200 with the full body) or "cut-once" (the first answer announces the
    full length, sends half and closes; later ones honour Range)."""

    server: _Server

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.requests.append((self.path, self.headers.get("Range")))
        if self.path not in srv.routes:
            self.send_error(404)
            return
        body, mode = srv.routes[self.path]
        if mode == "cut-once" and self.path not in srv.cut_done:
            srv.cut_done.add(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        rng = self.headers.get("Range")
        if rng and mode != "no-range":
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            start = 0
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, tuple[bytes, str]] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut_done: set[str] = set()
        self.lock = threading.Lock()

    def serve(self, path: str, body: bytes, mode: str = "range") -> str:
        self.routes[path] = (body, mode)
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


# --- downloads ---------------------------------------------------------------------------

def test_url_source_downloads_verifies_and_unpacks(server, cache):
    url = server.serve("/sets/data.zip", ZIP)
    [res] = resolve([{"kind": "url", "url": url, "sha256": _sha(ZIP), "subdir": "imgs",
                      "split": "train"}], cache, progress=False)
    assert res == ResolvedSource(name="data.zip", split="train", kind="url",
                                 path=cache / "unpacked" / _sha(ZIP) / "imgs")
    assert sorted(p.name for p in res.path.iterdir()) == sorted(IMAGES)
    for name, data in IMAGES.items():
        got = np.asarray(Image.open(res.path / name))
        want = np.asarray(Image.open(io.BytesIO(data)))
        np.testing.assert_array_equal(got, want)
    stored = cache / "downloads" / _sha(ZIP) / "data.zip"
    assert stored.read_bytes() == ZIP
    assert (stored.parent / "data.zip.ok").is_file()
    assert not (stored.parent / "data.zip.part").exists()


def test_wrong_sha256_names_url_and_both_hashes_and_leaves_nothing(server, cache):
    url = server.serve("/data.zip", ZIP)
    wrong = _sha(b"something else")
    with pytest.raises(SourceError) as err:
        download(url, wrong, cache, progress=False, timeout=TIMEOUT)
    msg = str(err.value)
    assert url in msg and wrong in msg and _sha(ZIP) in msg
    assert _files(cache) == []
    assert not (cache / "downloads" / wrong).exists()
    # Through resolve, the mismatch also stops before anything is unpacked.
    with pytest.raises(SourceError, match="sha256 mismatch"):
        resolve([{"kind": "url", "url": url, "sha256": wrong}], cache, progress=False)
    assert _files(cache) == [] and not (cache / "unpacked").exists()


def test_interrupted_download_resumes_with_range(server, cache):
    url = server.serve("/flaky.zip", ZIP, mode="cut-once")
    part = cache / "downloads" / _sha(ZIP) / "flaky.zip.part"
    with pytest.raises(SourceError, match="interrupted.*will resume"):
        download(url, _sha(ZIP), cache, timeout=TIMEOUT)
    half = len(ZIP) // 2
    assert part.stat().st_size == half
    assert not (part.parent / "flaky.zip").exists()

    path = download(url, _sha(ZIP), cache, timeout=TIMEOUT)  # with the progress bar on
    assert server.requests == [("/flaky.zip", None), ("/flaky.zip", f"bytes={half}-")]
    assert half > 0
    assert sha256_file(path) == _sha(ZIP)
    assert not part.exists()


def test_server_ignoring_range_restarts_cleanly(server, cache):
    url = server.serve("/norange.zip", ZIP, mode="no-range")
    part = cache / "downloads" / _sha(ZIP) / "norange.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes that must not be kept")
    path = download(url, _sha(ZIP), cache, progress=False, timeout=TIMEOUT)
    assert server.requests == [("/norange.zip", "bytes=33-")]
    assert path.read_bytes() == ZIP


@pytest.mark.parametrize("leftover, requests", [
    ("complete", [("/d.zip", f"bytes={len(ZIP)}-")]),
    ("too-long", [("/d.zip", f"bytes={len(ZIP) + 5}-"), ("/d.zip", None)]),
])
def test_range_not_satisfiable(server, cache, leftover, requests):
    # A .part as long as the file (e.g. a crash before the rename) is verified and kept;
    # a longer one is garbage and the download starts over.
    url = server.serve("/d.zip", ZIP)
    part = cache / "downloads" / _sha(ZIP) / "d.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(ZIP if leftover == "complete" else ZIP + b"extra")
    path = download(url, _sha(ZIP), cache, progress=False, timeout=TIMEOUT)
    assert server.requests == requests
    assert path.read_bytes() == ZIP


def test_cached_download_makes_no_request_and_unpack_is_reused(server, cache):
    url = server.serve("/data.zip", ZIP)
    declared = [{"kind": "url", "url": url, "sha256": _sha(ZIP), "subdir": "imgs"}]
    first = download(url, _sha(ZIP), cache, progress=False, timeout=TIMEOUT)
    assert download(url, _sha(ZIP), cache, progress=False, timeout=TIMEOUT) == first
    assert len(server.requests) == 1

    [res] = resolve(declared, cache, progress=False)
    sentinel = res.path / "sentinel"
    sentinel.write_text("unpacked once")
    assert resolve(declared, cache, progress=False) == [res]
    assert sentinel.read_text() == "unpacked once"
    assert len(server.requests) == 1


def test_damaged_cached_file_is_downloaded_again(server, cache):
    url = server.serve("/data.zip", ZIP)
    path = download(url, _sha(ZIP), cache, progress=False, timeout=TIMEOUT)
    path.write_bytes(ZIP[:-10])  # size no longer matches the .ok marker
    assert download(url, _sha(ZIP), cache, progress=False, timeout=TIMEOUT) == path
    assert path.read_bytes() == ZIP
    assert len(server.requests) == 2


def test_http_error_names_url_and_status(server, cache):
    url = server.serve("/exists.zip", ZIP).replace("exists", "missing")
    with pytest.raises(SourceError, match=re.escape(url) + ".*HTTP 404"):
        download(url, _sha(ZIP), cache, progress=False, timeout=TIMEOUT)
    assert _files(cache) == []


def test_download_that_is_not_an_archive_is_refused(server, cache):
    body = b"<html>not a zip</html>"
    url = server.serve("/page.zip", body)
    with pytest.raises(SourceError, match="not a zip or tar archive"):
        resolve([{"kind": "url", "url": url, "sha256": _sha(body)}], cache, progress=False)
    assert list((cache / "unpacked").iterdir()) == []


# --- archives ----------------------------------------------------------------------------

@pytest.mark.parametrize("suffix, mode", [(".tar", "w"), (".tar.gz", "w:gz"), (".tgz", "w:gz")])
def test_archive_source_tar(tmp_path, cache, suffix, mode):
    archive = _tar(tmp_path / f"set{suffix}", [(f"set/{k}", v) for k, v in IMAGES.items()]
                   + [_link("set/alias.png", "0001.png")], mode)
    [res] = resolve([{"kind": "archive", "path": str(archive), "subdir": "set",
                      "split": "valid"}], cache)
    assert (res.name, res.split, res.kind) == (f"set{suffix}", "valid", "archive")
    assert res.path == cache / "unpacked" / sha256_file(archive) / "set"
    assert {p.name: p.read_bytes() for p in res.path.iterdir()} == {
        **IMAGES, "alias.png": IMAGES["0001.png"]}
    assert [p.name for p in (cache / "unpacked").iterdir()] == [sha256_file(archive)]


@pytest.mark.parametrize("member", ["../evil.png", "/tmp/evil.png", "imgs/../../evil.png"])
def test_zip_slip_refused(tmp_path, cache, member):
    archive = tmp_path / "slip.zip"
    archive.write_bytes(_zip({"imgs/ok.png": IMAGES["0001.png"], member: b"x"}))
    with pytest.raises(SourceError) as err:
        unpack(archive, cache)
    assert str(archive) in str(err.value) and repr(member) in str(err.value)
    assert list((cache / "unpacked").iterdir()) == []
    assert not (tmp_path / "evil.png").exists()


@pytest.mark.parametrize("member", [
    ("../evil.png", b"x"),
    ("/tmp/rlfn-evil.png", b"x"),
    ("a/../../evil.png", b"x"),
    _link("up", "../.."),
    _link("sub/up", "../../outside"),
    _link("abs", "/etc"),
    _link("hard", "../outside", tarfile.LNKTYPE),
])
def test_tar_slip_refused(tmp_path, cache, member):
    archive = _tar(tmp_path / "slip.tar", [("imgs/ok.png", IMAGES["0001.png"]), member])
    name = member.name if isinstance(member, tarfile.TarInfo) else member[0]
    with pytest.raises(SourceError) as err:
        resolve([{"kind": "archive", "path": archive}], cache)
    assert str(archive) in str(err.value) and repr(name) in str(err.value)
    assert list((cache / "unpacked").iterdir()) == []
    assert not (tmp_path / "evil.png").exists() and not Path("/tmp/rlfn-evil.png").exists()


def test_tar_special_file_refused(tmp_path, cache):
    fifo = tarfile.TarInfo("imgs/pipe")
    fifo.type = tarfile.FIFOTYPE
    archive = _tar(tmp_path / "fifo.tar", [fifo])
    with pytest.raises(SourceError, match="'imgs/pipe': not a regular file"):
        unpack(archive, cache)


def test_unpack_twice_is_a_noop(tmp_path, cache):
    archive = tmp_path / "set.zip"
    archive.write_bytes(ZIP)
    first = unpack(archive, cache)
    (first / "imgs" / "0001.png").unlink()
    assert unpack(archive, cache) == first
    assert sorted(p.name for p in (first / "imgs").iterdir()) == ["0002.png"]


# --- folders, enabling, validation ---------------------------------------------------------

def test_folder_source_and_disabled_sources_skipped(tmp_path, server, cache):
    (tmp_path / "hr" / "x4").mkdir(parents=True)
    url = server.serve("/never.zip", ZIP)
    out = resolve([
        {"kind": "folder", "path": str(tmp_path / "hr"), "name": "mine", "split": "train"},
        {"kind": "url", "url": url, "sha256": _sha(ZIP), "enabled": False},
        {"kind": "archive", "path": str(tmp_path / "missing.zip"), "enabled": False},
        {"kind": "folder", "path": tmp_path / "hr", "subdir": "x4"},
    ], cache)
    assert out == [ResolvedSource("mine", "train", "folder", tmp_path / "hr"),
                   ResolvedSource("hr", None, "folder", tmp_path / "hr" / "x4")]
    assert server.requests == [] and not cache.exists()


@pytest.mark.parametrize("declared, fragment", [
    ({"kind": "folder", "path": "nope"}, "folder nope not found"),
    ({"kind": "archive", "path": "nope.zip"}, "archive nope.zip not found"),
    ({"kind": "folder", "path": ".", "subdir": "no_such_dir"}, "subdir 'no_such_dir' not found"),
])
def test_missing_local_data(tmp_path, monkeypatch, declared, fragment):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match=re.escape(fragment)):
        resolve([declared], tmp_path / "cache")


GOOD_SHA = "ab" * 32


@pytest.mark.parametrize("declared, fragment", [
    ({"kind": "ftp", "path": "x", "name": "s1"}, "'s1': unknown kind 'ftp'"),
    ({"path": "x", "name": "s1"}, "'s1': missing 'kind'"),
    ({"kind": "url", "sha256": GOOD_SHA, "name": "s1"}, "'s1': missing 'url'"),
    ({"kind": "url", "url": "http://h/s1.zip"}, "'s1.zip': sha256 unknown: set it in params"),
    ({"kind": "url", "url": "http://h/a.zip", "sha256": None}, "'a.zip': sha256 unknown"),
    ({"kind": "url", "url": "http://h/a.zip", "sha256": "abc123"}, "'a.zip': malformed sha256"),
    ({"kind": "url", "url": "http://h/a.zip", "sha256": "g" * 64}, "'a.zip': malformed sha256"),
    ({"kind": "url", "url": "http://h/a.zip", "sha256": GOOD_SHA, "enabled": False,
      "sha265": GOOD_SHA}, "'http://h/a.zip': unknown key(s) 'sha265'"),
    ({"kind": "url", "url": "ftp://h/a.zip", "sha256": GOOD_SHA}, "'a.zip': url 'ftp://h/a.zip'"),
    ({"kind": "folder", "path": "d", "url": "http://h/a.zip"}, "'d': 'url' does not apply"),
    ({"kind": "folder", "name": "s1"}, "'s1': missing 'path'"),
    ({"kind": "folder", "path": "", "name": "s1"}, "'s1': 'path' must be a non-empty string"),
    ({"kind": "folder", "path": "d", "subdir": "../up"}, "'d': unsafe subdir '../up'"),
    ({"kind": "folder", "path": "d", "subdir": "/abs"}, "'d': unsafe subdir '/abs'"),
    ({"kind": "folder", "path": "d", "enabled": "yes"}, "'d': 'enabled' must be true or false"),
    ({"kind": "folder", "path": "d", "split": 3}, "'d': 'split' must be a non-empty string"),
    (["kind", "folder"], "a source must be a mapping"),
])
def test_bad_source_dicts_rejected(declared, fragment, tmp_path):
    with pytest.raises(SourceError, match=re.escape(fragment)):
        Source.from_dict(declared)
    with pytest.raises(SourceError, match=re.escape(fragment)):
        resolve([declared], tmp_path / "cache")


def test_all_sources_validated_before_any_download(server, cache):
    url = server.serve("/data.zip", ZIP)
    with pytest.raises(SourceError, match="unknown kind"):
        resolve([{"kind": "url", "url": url, "sha256": _sha(ZIP)}, {"kind": "s3"}], cache)
    assert server.requests == []


def test_disabled_url_source_may_omit_sha256_and_sha_is_normalised():
    placeholder = Source.from_dict({"kind": "url", "url": "https://h/a.zip", "enabled": False})
    assert placeholder.sha256 is None
    src = Source.from_dict({"kind": "url", "url": "https://h/a.zip", "sha256": GOOD_SHA.upper()})
    assert src.sha256 == GOOD_SHA and src.label == "a.zip" and src.enabled


def test_div2k_definitions():
    assert DIV2K["train_hr"]["url"] == "http://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_train_HR.zip"
    assert DIV2K["valid_hr"]["url"] == "http://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_valid_HR.zip"
    for key, subdir, split in [("train_hr", "DIV2K_train_HR", "train"),
                               ("valid_hr", "DIV2K_valid_HR", "valid")]:
        src = Source.from_dict(DIV2K[key])
        assert (src.kind, src.subdir, src.split, src.enabled) == ("url", subdir, split, False)
        assert re.fullmatch(r"[0-9a-f]{64}", src.sha256)
        assert Source.from_dict({**DIV2K[key], "enabled": True}).enabled
    assert resolve(DIV2K.values(), "/nonexistent/cache") == []
