"""Where a dataset's HR images come from: local folders, local archives and verified downloads.

A dataset is declared (typically in a YAML params file) as a list of source dicts::

    - {kind: folder,  path: my_images, split: train}
    - {kind: archive, path: extra.tar.gz, subdir: extra, split: train}
    - {kind: url, url: https://host/set.zip, sha256: <64 hex digits>, name: set, split: valid}

Every source may also carry ``name`` (a label; defaults to the file or folder name), ``split``
(e.g. ``"train"`` / ``"valid"``), ``subdir`` (the folder inside it that holds the images) and
``enabled`` (default ``True``). :func:`resolve` turns the list into one local image folder
per enabled source. The contract:

* **Validation first.** Every source is checked (:meth:`Source.from_dict`) before anything is
  read or fetched, so a typo in the last source fails before a multi-GB download starts.
  Unknown keys or kinds, a missing ``url``, a malformed ``sha256`` or an unsafe ``subdir``
  raise :class:`SourceError` naming the source and the reason. An enabled URL source must
  carry its ``sha256``: nothing is ever downloaded unverified.
* **Downloads** (:func:`download`) stream to ``<cache>/downloads/<sha256>/<file>.part``. An
  interrupted transfer keeps the ``.part`` and the next call resumes it with an HTTP
  ``Range`` request (a server that answers 200 instead of 206 restarts it cleanly). The whole
  file's sha256 is checked before it is renamed into place; a mismatch deletes the data and
  raises. A ``.ok`` marker (holding the verified size) is written after verification, so a
  later call finds the file and makes no request.
* **Archives** (``.zip``, ``.tar``, ``.tar.gz``, ``.tgz``; recognised by content) are unpacked
  into ``<cache>/unpacked/<sha256-of-archive>/`` through a temporary folder renamed into place,
  so a crash never leaves a half-unpacked tree where a finished one is expected, and a second
  unpack is a no-op. Members with absolute paths, ``..`` components or links that could point
  outside the target are refused (zip-slip / tar-slip) before anything is written.

Relative ``path``\\ s are taken relative to the current directory. Only the standard library
and tqdm are used (no Prefect, DVC or MLflow), so this runs anywhere the library runs.
"""

from __future__ import annotations

import http.client
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, fields
from pathlib import Path, PureWindowsPath
from typing import Any, Iterable, Mapping

from ..progress import progress as progress_bar

from ..errors import DataError

from ..io import atomic_write, publish, sha256_file

__all__ = ["DIV2K", "KINDS", "ResolvedSource", "Source", "SourceError", "download", "resolve",
           "sha256_file", "unpack"]

KINDS = ("folder", "archive", "url")

# The official DIV2K HR sets (Agustsson & Timofte, NTIRE 2017). The hashes and sizes
# (3,530,603,713 and 448,993,893 bytes) are the ones TensorFlow Datasets records for these
# files (tensorflow_datasets/url_checksums/div2k.txt). Disabled by default: enable them in
# params (e.g. ``{**DIV2K["train_hr"], "enabled": True}``) to download ~4 GB.
DIV2K: dict[str, dict[str, Any]] = {
    "train_hr": {
        "kind": "url",
        "name": "DIV2K_train_HR",
        "url": "http://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_train_HR.zip",
        "sha256": "9d0b9c463f6e35b6c62cc6a930ee2224f670b34c1df841a57670f9acf0f6c335",
        "subdir": "DIV2K_train_HR",
        "split": "train",
        "enabled": False,
    },
    "valid_hr": {
        "kind": "url",
        "name": "DIV2K_valid_HR",
        "url": "http://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_valid_HR.zip",
        "sha256": "20dd31fd84d777bc1cf5d6b7654a3f569c0aec74458ae094122ad1d0489900fc",
        "subdir": "DIV2K_valid_HR",
        "split": "valid",
        "enabled": False,
    },
}

_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_USER_AGENT = "rlfn-pipeline/0.1 (+urllib)"
# Which of the kind-specific fields each kind takes; the others must stay unset.
_KIND_FIELDS = {"folder": {"path"}, "archive": {"path"}, "url": {"url", "sha256"}}
# tarfile's "data" filter (Python >= 3.11.4) adds its own checks on top of ours.
_TAR_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


class SourceError(DataError, RuntimeError):
    """A source that cannot be used: bad declaration, failed download, unsafe archive, ...
    (``SourceError(where, reason)`` or ``SourceError(message)``)."""


def _unsafe_path(name: str) -> str | None:
    """Why the archive-relative path ``name`` could escape its target folder (None: safe)."""
    if not name:
        return "empty path"
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        return "absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "'..' in path"
    return None


def _url_filename(url: str) -> str:
    """A safe local file name for ``url`` (its last path component, sanitised)."""
    base = posixpath.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    return re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".") or "download"


@dataclass(frozen=True)
class Source:
    """One declared source of HR images. Build it with :meth:`from_dict` from params.

    ``path`` is used by the ``folder`` and ``archive`` kinds, ``url`` and ``sha256`` by the
    ``url`` kind. Construction validates the fields and raises :class:`SourceError`.
    """

    kind: str
    path: Path | None = None
    url: str | None = None
    sha256: str | None = None
    name: str | None = None
    split: str | None = None
    subdir: str | None = None
    enabled: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.path, (str, os.PathLike)) and os.fspath(self.path):
            object.__setattr__(self, "path", Path(self.path))
        if isinstance(self.sha256, str):
            object.__setattr__(self, "sha256", self.sha256.strip().lower())
        reason = self._problem()
        if reason:
            raise SourceError(f"source {self.label!r}: {reason}")

    def _problem(self) -> str | None:
        if self.kind not in KINDS:
            return f"unknown kind {self.kind!r} (expected one of {', '.join(KINDS)})"
        for field in ("path", "url", "sha256"):
            if field not in _KIND_FIELDS[self.kind] and getattr(self, field) is not None:
                return f"{field!r} does not apply to a {self.kind} source"
        for field in ("name", "split", "subdir"):
            value = getattr(self, field)
            if value is not None and not (isinstance(value, str) and value):
                return f"{field!r} must be a non-empty string, got {value!r}"
        if not isinstance(self.enabled, bool):
            return f"'enabled' must be true or false, got {self.enabled!r}"
        if self.subdir is not None and (why := _unsafe_path(self.subdir)):
            return f"unsafe subdir {self.subdir!r}: {why}"
        if self.kind != "url":
            if self.path is None:
                return f"missing 'path' for a {self.kind} source"
            if not isinstance(self.path, Path):
                return f"'path' must be a non-empty string, got {self.path!r}"
            return None
        if not isinstance(self.url, str) or not self.url:
            return "missing 'url'"
        if urllib.parse.urlsplit(self.url).scheme not in ("http", "https"):
            return f"url {self.url!r} is not http(s)"
        if self.sha256 is None:
            return "sha256 unknown: set it in params before enabling" if self.enabled else None
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            return f"malformed sha256 {self.sha256!r}: expected 64 hex digits"
        return None

    @property
    def label(self) -> str:
        """The source's name, or its file / folder name when none was given."""
        if self.name:
            return self.name
        if self.kind == "url" and isinstance(self.url, str) and self.url:
            return _url_filename(self.url)
        if self.kind != "url" and isinstance(self.path, Path) and self.path.name:
            return self.path.name
        return f"<{self.kind} source>"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Source:
        """Validate one source dict (as read from params); raises :class:`SourceError`."""
        if not isinstance(d, Mapping):
            raise SourceError(f"a source must be a mapping, got {type(d).__name__}: {d!r}")
        label = str(d.get("name") or d.get("url") or d.get("path") or dict(d))
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - known):
            raise SourceError(f"source {label!r}: unknown key(s) {', '.join(map(repr, unknown))}"
                              f" (expected some of {', '.join(sorted(known))})")
        if "kind" not in d:
            raise SourceError(f"source {label!r}: missing 'kind' ({', '.join(KINDS)})")
        return cls(**d)


@dataclass(frozen=True)
class ResolvedSource:
    """An enabled source made local: ``path`` is the folder that holds its images."""

    name: str
    split: str | None
    kind: str
    path: Path


def _write_marker(marker: Path, size: int) -> None:
    atomic_write(marker, f"{size}\n")


def _cached(final: Path, marker: Path, sha256: str) -> bool:
    """Whether ``final`` is a verified copy; a stale or unverified one is deleted."""
    if not final.is_file():
        return False
    size = final.stat().st_size
    if marker.is_file() and marker.read_text().strip() == str(size):
        return True
    # No marker (a crash between rename and marker) or a size change: the hash decides.
    if sha256_file(final) == sha256:
        _write_marker(marker, size)
        return True
    final.unlink()
    marker.unlink(missing_ok=True)
    return False


def _interrupted(url: str, part: Path, have: int, total: int | None, cause: object) -> SourceError:
    of = f" of {total}" if total is not None else ""
    return SourceError(f"download of {url} was interrupted after {have}{of} bytes ({cause}); "
                       f"the partial data is kept in {part} and the download will resume "
                       "when run again")


def _fetch(url: str, part: Path, sha256: str, timeout: float, progress: bool) -> None:
    """Bring ``part`` to the full file, resuming what is there; the caller verifies it."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            # Range not satisfiable: the .part is already complete, or longer than the file.
            if sha256_file(part) == sha256:
                return
            part.unlink()
            return _fetch(url, part, sha256, timeout, progress)
        raise SourceError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise SourceError(f"cannot download {url}: {getattr(e, 'reason', e)}") from None

    with resp:
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if offset and resp.status == 206:
            content_range = resp.headers.get("Content-Range", "")
            match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", content_range.strip())
            if not match or int(match.group(1)) != offset:
                # A range we did not ask for: drop the partial data and start over.
                resp.close()
                part.unlink()
                return _fetch(url, part, sha256, timeout, progress)
            total = int(match.group(2)) if match.group(2) != "*" else None
        elif resp.status == 200:
            offset = 0  # a full body (the server ignored Range): restart the file cleanly
            total = length
        else:
            raise SourceError(f"cannot download {url}: unexpected HTTP {resp.status}")
        if total is None and length is not None:
            total = offset + length

        received = 0
        with open(part, "ab" if offset else "wb") as f, \
                progress_bar(total=total, initial=offset, unit="B", unit_scale=True,
                             unit_divisor=1024, desc=part.name.removesuffix(".part"),
                             enabled=progress) as bar:
            while True:
                try:
                    chunk = resp.read(_CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    raise _interrupted(url, part, offset + received, total, e) from None
                if not chunk:
                    break
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if length is not None and received < length:
            raise _interrupted(url, part, offset + received, total, "connection closed early")


def download(url: str, sha256: str, cache_dir: str | Path, progress: bool = True,
             timeout: float = 60.0) -> Path:
    """Download ``url`` into ``<cache_dir>/downloads/<sha256>/`` and return the verified file.

    A verified file already in the cache is returned without any request. Otherwise the data
    streams into a ``.part`` file (resumed with ``Range`` if one is there), its sha256 is
    checked, and only then is it renamed into place and marked verified. A hash mismatch
    deletes the download and raises :class:`SourceError` naming the URL and both hashes; a
    cut connection keeps the ``.part`` and raises :class:`SourceError` saying it will resume.
    ``timeout`` (seconds) applies to connecting and to each read.
    """
    digest = sha256.strip().lower() if isinstance(sha256, str) else sha256
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise SourceError(f"cannot download {url}: malformed sha256 {sha256!r}")
    folder = Path(cache_dir) / "downloads" / digest
    final = folder / _url_filename(url)
    marker = final.with_name(final.name + ".ok")
    if _cached(final, marker, digest):
        return final

    folder.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    _fetch(url, part, digest, timeout, progress)
    actual = sha256_file(part)
    if actual != digest:
        part.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()
        raise SourceError(f"sha256 mismatch for {url}: expected {digest}, got {actual}; "
                          "the downloaded data was deleted")
    publish(part, final)
    _write_marker(marker, final.stat().st_size)
    return final


def _check_zip(archive: Path, zf: zipfile.ZipFile) -> None:
    for info in zf.infolist():
        if why := _unsafe_path(info.filename):
            raise SourceError(f"{archive}: refusing member {info.filename!r}: {why}")


def _check_tar(archive: Path, tf: tarfile.TarFile) -> None:
    for m in tf.getmembers():
        why = _unsafe_path(m.name)
        if why is None and (m.issym() or m.islnk()):
            # A link target with no '..' and no root can only point at or below the link's
            # own folder, so no chain of such links can leave the target folder. (Stricter
            # than needed for links that climb and come back down; image sets have none.)
            if link_why := _unsafe_path(m.linkname):
                why = f"link to {m.linkname!r} may escape the target folder ({link_why})"
        elif why is None and not (m.isfile() or m.isdir()):
            why = "not a regular file, folder or link"
        if why:
            raise SourceError(f"{archive}: refusing member {m.name!r}: {why}")


def unpack(archive: str | Path, cache_dir: str | Path, sha256: str | None = None) -> Path:
    """Unpack a zip / tar(.gz) archive into ``<cache_dir>/unpacked/<sha256>/`` and return it.

    ``sha256`` is the archive's hash when already known (it is computed otherwise). An
    existing unpacked folder is returned as is. Unsafe members raise :class:`SourceError`
    naming the archive and the member, and nothing is left behind.
    """
    archive = Path(archive)
    digest = sha256 or sha256_file(archive)
    root = Path(cache_dir) / "unpacked"
    target = root / digest
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.", suffix=".tmp", dir=root))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                _check_zip(archive, zf)
                zf.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                _check_tar(archive, tf)
                tf.extractall(tmp, **_TAR_FILTER)
        else:
            raise SourceError(f"{archive}: not a zip or tar archive")
        os.rename(tmp, target)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SourceError(f"{archive}: cannot unpack: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _local(src: Source, cache_dir: Path, progress: bool) -> Path:
    """The folder holding ``src``'s files before ``subdir`` is applied."""
    if src.kind == "folder":
        if not src.path.is_dir():
            raise SourceError(f"source {src.label!r}: folder {src.path} not found")
        return src.path
    if src.kind == "archive":
        if not src.path.is_file():
            raise SourceError(f"source {src.label!r}: archive {src.path} not found")
        return unpack(src.path, cache_dir)
    file = download(src.url, src.sha256, cache_dir, progress=progress)
    return unpack(file, cache_dir, sha256=src.sha256)


def resolve(sources: Iterable[Mapping[str, Any] | Source], cache_dir: str | Path,
            progress: bool = True) -> list[ResolvedSource]:
    """One local image folder per enabled source, in order; disabled sources are skipped.

    All sources are validated before any is fetched. Downloads and unpacked archives live
    under ``cache_dir`` and are reused by later calls.
    """
    parsed = [s if isinstance(s, Source) else Source.from_dict(s) for s in sources]
    cache_dir = Path(cache_dir)
    out = []
    for src in parsed:
        if not src.enabled:
            continue
        root = _local(src, cache_dir, progress)
        folder = root / src.subdir if src.subdir else root
        if not folder.is_dir():
            raise SourceError(f"source {src.label!r}: subdir {src.subdir!r} not found in {root}")
        out.append(ResolvedSource(name=src.label, split=src.split, kind=src.kind, path=folder))
    return out
