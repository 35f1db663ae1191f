"""The dataset manifest: one validated Parquet row per image file of the resolved sources.

:func:`build_manifest` walks every source folder (recursively), reads each image file with
:func:`rlfn.io.read_image` (so the bad-input rules are the project's everywhere), hashes it,
and writes one Parquet file with a row per file, plus a summary beside it. Training reads
:func:`usable` rows only. The contract:

* **Which files.** Every regular file whose extension is in :data:`rlfn.io.IMAGE_EXTENSIONS`
  (case-insensitive) gets a row, whatever its content. Other files (``README.txt``, ...) and
  symbolic links to folders (never followed, so a link loop cannot hang the walk) are *not*
  images: they get no row but are counted and listed, with the reason, as ``skipped`` in the
  summary. The manifest and its summary are never listed themselves. A folder that cannot be
  listed raises :class:`ManifestError`: a half-listed dataset would look complete.
* **Status.** ``ok``: read as RGB8 as is. ``converted``: read after conversions, listed in
  ``notes`` (grayscale, palette, RGBA, 16-bit, CMYK, EXIF orientation). ``rejected``, with the
  ``reason``: anything :func:`~rlfn.io.read_image` refuses (truncated, empty, not an image,
  unreadable, decompression bomb, ...; the reason is its message), a file that is not a regular
  file or whose name is not valid UTF-8, an image smaller than ``min_size`` on either side, and
  an exact duplicate: among the files not rejected otherwise, the first by row order with a
  given sha256 is kept and every later one is rejected with ``duplicate_of`` naming it (so a
  validation image also present in training data is caught, whichever split comes first). One
  bad file never stops the others; nothing is dropped without a row or a skipped entry.
* **Rows** are sorted by ``(source, relpath)`` (code-point order), so the file is the same
  whatever order the file system lists folders in.
* **Incremental.** A rerun re-reads (decodes and hashes) only files that are new or whose
  ``size_bytes`` or ``mtime_ns`` changed, plus files whose bytes could not be read last time
  (``sha256`` null, e.g. permission denied, which ``chmod`` fixes without touching mtime); every
  other row's file facts are reused from the previous manifest. Status, reason, ``path``,
  ``split`` and duplicates are recomputed every run, so a new ``min_size`` or a moved working
  directory needs no re-reading. Rows of deleted files disappear. The Parquet bytes depend only
  on the rows (fixed writer settings, no timestamps; the writer's ``created_by`` names the
  pyarrow version), and a file is replaced (temp file + atomic rename) only when its bytes
  change, so an unchanged dataset leaves both files untouched and DVC sees no change.

Schema (:data:`SCHEMA`; the file's schema metadata also holds ``rlfn.manifest.min_size``):

============== ============ =========================================================
column         type         meaning
============== ============ =========================================================
source         string       the source's name (:class:`~rlfn.data.sources.ResolvedSource`)
split          string|null  the source's split (``train``, ``valid``, ...)
relpath        string       path inside the source folder, ``/``-separated
path           string       how to open the file: relative to the working directory the
                            manifest was built in when the file is inside it, else absolute
status         string       ``ok`` / ``converted`` / ``rejected``
reason         string|null  why it was rejected (null unless rejected)
sha256         string|null  hex sha256 of the bytes (null when they could not be read)
size_bytes     int64|null   file size (null when the file could not be stat'ed)
mtime_ns       int64|null   modification time in ns (null likewise)
width          int32|null   width of the image as used, after EXIF orientation (null when
                            it could not be decoded)
height         int32|null   height likewise
mode           string|null  original PIL mode (``RGB``, ``L``, ``P``, ``RGBA``, ``CMYK``, ...)
bit_depth      int32|null   original bits per channel (8, 16, 1 for bilevel, ...)
format         string|null  file format as recognised by content (``PNG``, ``JPEG``, ...)
notes          list<string> conversions applied (e.g. "grayscale converted to RGB ...")
duplicate_of   string|null  ``path`` of the kept file with the same sha256
============== ============ =========================================================

The summary (``<name>.summary.json`` beside ``<name>.parquet``) holds the counts per status,
each rejected file with its reason, each skipped file with why, and how often each
conversion was applied; like the manifest, its bytes change only when its content does.

Standard library, pyarrow, Pillow/numpy (through :mod:`rlfn.io`) and tqdm only: no Prefect,
DVC or MLflow.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ..progress import progress as progress_bar

from ..errors import DataError
from ..io import IMAGE_EXTENSIONS, ImageError, atomic_write, read_image
from .sources import ResolvedSource, sha256_file

__all__ = ["MANIFEST_VERSION", "SCHEMA", "STATUSES", "ManifestError", "ManifestSummary",
           "build_manifest", "read_manifest", "summary_path", "usable"]

MANIFEST_VERSION = "1"
STATUSES = ("ok", "converted", "rejected")
SCHEMA = pa.schema([
    pa.field("source", pa.string(), nullable=False),
    pa.field("split", pa.string()),
    pa.field("relpath", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("sha256", pa.string()),
    pa.field("size_bytes", pa.int64()),
    pa.field("mtime_ns", pa.int64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("mode", pa.string()),
    pa.field("bit_depth", pa.int32()),
    pa.field("format", pa.string()),
    pa.field("notes", pa.list_(pa.string()), nullable=False),
    pa.field("duplicate_of", pa.string()),
], metadata={"rlfn.manifest.version": MANIFEST_VERSION})

# Fixed writer settings: the same rows always give the same bytes (for a given pyarrow).
_WRITE_OPTIONS: dict[str, Any] = {
    "version": "2.6", "data_page_version": "1.0", "compression": "zstd",
    "compression_level": 3, "use_dictionary": True, "write_statistics": True,
    "row_group_size": 1 << 20, "store_schema": True,
}
# The facts read from a file, as opposed to the verdict drawn from them each run.
_FACTS = ("sha256", "width", "height", "mode", "bit_depth", "format", "notes", "error")
# Below this many files to read, starting worker processes (each imports torch through the
# rlfn package, ~1 s) costs more than it saves.
_MIN_POOL_FILES = 32


class ManifestError(DataError, RuntimeError):
    """A manifest that cannot be built: clashing source names, a folder that cannot be listed."""


@dataclass
class ManifestSummary:
    """What :func:`build_manifest` found and did.

    ``counts``, ``rejected``, ``skipped`` and ``conversions`` describe the manifest (they are
    what :meth:`to_dict` writes to the summary file); ``read``, ``reused``, ``dropped`` and
    ``written`` describe this run: files decoded and hashed, rows reused from the previous
    manifest, rows of deleted files removed, and whether the Parquet file's bytes changed.
    """

    manifest: Path
    summary_file: Path
    min_size: int
    counts: dict[str, int]
    rejected: list[dict[str, str]]
    skipped: list[dict[str, str]]
    conversions: dict[str, int]
    read: int = 0
    reused: int = 0
    dropped: int = 0
    written: bool = False

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def usable(self) -> int:
        """How many rows training may use (``ok`` + ``converted``)."""
        return self.counts["ok"] + self.counts["converted"]

    def to_dict(self) -> dict[str, Any]:
        """The summary file's content: deterministic, nothing about this particular run."""
        return {"manifest": self.manifest.name, "min_size": self.min_size, "total": self.total,
                "counts": dict(self.counts), "skipped_count": len(self.skipped),
                "rejected": self.rejected, "skipped": self.skipped,
                "conversions": self.conversions}

    def lines(self) -> list[str]:
        """A human-readable report: counts, this run's work and the conversions applied (the
        rejected files, with their reasons, are in :attr:`rejected`)."""
        c = self.counts
        out = [f"{self.manifest}: {self.total} files: {c['ok']} ok, {c['converted']} converted, "
               f"{c['rejected']} rejected; {len(self.skipped)} skipped (not image files)",
               f"read {self.read}, reused {self.reused}, dropped {self.dropped}; manifest "
               + ("written" if self.written else "unchanged") + f"; summary in {self.summary_file}"]
        return out + [f"  {n} x {note}" for note, n in self.conversions.items()]


def summary_path(manifest: str | Path) -> Path:
    """Where the summary of ``manifest`` goes: ``x.parquet`` -> ``x.summary.json``."""
    manifest = Path(manifest)
    stem = manifest.stem if manifest.suffix == ".parquet" else manifest.name
    return manifest.with_name(stem + ".summary.json")


def read_manifest(path: str | Path) -> pa.Table:
    """The manifest at ``path`` as a pyarrow Table; raises :class:`ManifestError` when the file
    is not a manifest of this version (rebuild it with :func:`build_manifest`)."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise ManifestError(f"{path}: cannot read the manifest ({e})") from None
    version = (table.schema.metadata or {}).get(b"rlfn.manifest.version", b"").decode()
    if version != MANIFEST_VERSION or not table.schema.equals(SCHEMA, check_metadata=False):
        raise ManifestError(f"{path}: not an rlfn manifest version {MANIFEST_VERSION}")
    return table


def usable(table: pa.Table) -> pa.Table:
    """The rows training may use: status ``ok`` or ``converted``, in manifest order."""
    return table.filter(pc.is_in(table["status"], pa.array(["ok", "converted"])))


def _inspect(path: str) -> dict[str, Any]:
    """Decode and hash one file; the facts, with ``error`` the reason it cannot be used."""
    facts: dict[str, Any] = dict.fromkeys(_FACTS)
    facts["notes"] = []
    try:
        arr, info = read_image(path)
    except ImageError as e:
        facts["error"] = e.reason
    except Exception as e:  # a decoder bug on one odd file must not stop the others
        facts["error"] = f"unexpected error while reading ({type(e).__name__}: {e})"
    else:
        facts.update(height=arr.shape[0], width=arr.shape[1], mode=info.mode,
                     bit_depth=info.bit_depth, format=info.format, notes=list(info.notes))
    try:
        facts["sha256"] = sha256_file(path)
    except OSError as e:
        facts["error"] = facts["error"] or f"cannot be read ({e.strerror or e})"
    return facts


def _display_path(file: str, cwd: Path) -> str:
    """``file`` relative to ``cwd`` when inside it, else absolute; ``/``-separated."""
    absolute = Path(os.path.abspath(file))
    if absolute.is_relative_to(cwd):
        return absolute.relative_to(cwd).as_posix()
    return absolute.as_posix()


def _escape(text: str) -> str:
    """``text``, with any undecodable bytes of a file name (kept by Python as surrogates)
    shown as ``\\xNN`` escapes so that it can be stored and printed."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _refused(reason: str) -> dict[str, Any]:
    """The facts of a file refused before it is read."""
    return {**dict.fromkeys(_FACTS), "notes": [], "error": reason}


def _walk(src: ResolvedSource, exclude: set[str]) -> tuple[list[tuple[str, str]], list[dict]]:
    """Image files ``(relpath, file)`` under ``src.path`` and the skipped entries."""
    root = os.fspath(src.path)

    def fail(e: OSError) -> None:
        raise ManifestError(f"source {src.name!r}: cannot list folder {e.filename} "
                            f"({e.strerror or e})")

    if not os.path.isdir(root):
        raise ManifestError(f"source {src.name!r}: folder {root} not found")
    files, skipped = [], []

    def skip(full: str, reason: str) -> None:
        rel = _escape(os.path.relpath(full, root).replace(os.sep, "/"))
        skipped.append({"source": src.name, "relpath": rel, "reason": reason})

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        for name in dirnames:
            if os.path.islink(full := os.path.join(dirpath, name)):
                skip(full, "symbolic link to a folder (not followed)")
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.abspath(full) in exclude:
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                files.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
            else:
                skip(full, "not an image file extension")
    return files, skipped


def _previous(out_path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The rows of the existing manifest, keyed by ``(source, relpath)``."""
    if not out_path.exists():
        return {}
    try:
        table = read_manifest(out_path)
    except ManifestError as e:
        warnings.warn(f"{e}; every file will be read again", stacklevel=3)
        return {}
    return {(r["source"], r["relpath"]): r for r in table.to_pylist()}


def _facts_of_row(row: dict[str, Any]) -> dict[str, Any]:
    """A previous row's file facts. A file that could not be decoded has no width; its
    ``reason`` is then read_image's; any other rejection is re-decided from the facts."""
    facts = {k: row[k] for k in _FACTS if k != "error"}
    facts["error"] = row["reason"] if row["width"] is None else None
    return facts


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Atomically replace ``path`` by ``data`` unless it already holds exactly that."""
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    atomic_write(path, data)
    return True


def _read_all(files: list[str], workers: int, progress: bool) -> list[dict[str, Any]]:
    """:func:`_inspect` each file, in order; in ``workers`` processes when worth it."""
    bar = {"total": len(files), "desc": "manifest", "unit": "file", "enabled": progress}
    if workers <= 1 or len(files) < _MIN_POOL_FILES:
        return [_inspect(f) for f in progress_bar(files, **bar)]
    # spawn: forking a process that holds torch's thread pools is not safe.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        return list(progress_bar(ex.map(_inspect, files, chunksize=4), **bar))


def build_manifest(sources: list[ResolvedSource], out_path: str | Path, min_size: int = 1,
                   progress: bool = True, workers: int = 2) -> ManifestSummary:
    """Build or update the manifest of ``sources`` at ``out_path`` and its summary beside it.

    ``min_size``: images smaller than this on either side (e.g. the HR training crop) are
    rejected. ``workers``: processes decoding in parallel when many files must be read (the
    output does not depend on it). Raises :class:`ManifestError` for clashing source names or
    a missing / unlistable source folder; bad files never raise, they get rejected rows.
    """
    if not isinstance(min_size, int) or min_size < 1:
        raise ValueError(f"min_size must be a positive integer, got {min_size!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    names = Counter(s.name for s in sources)
    if clash := sorted(n for n, k in names.items() if k > 1):
        raise ManifestError(f"several sources named {', '.join(map(repr, clash))}: "
                            "rows are keyed by (source, relpath), so names must be unique")
    out_path = Path(out_path)
    summary_file = summary_path(out_path)
    cwd = Path.cwd()
    previous = _previous(out_path)

    # 1. List and stat; take the facts of unchanged files from the previous manifest.
    entries, skipped, reused = [], [], 0
    for src in sources:
        files, skip = _walk(src, {os.path.abspath(out_path), os.path.abspath(summary_file)})
        skipped += skip
        for rel, full in files:
            entry = {"source": src.name, "split": src.split, "relpath": _escape(rel),
                     "file": full, "size_bytes": None, "mtime_ns": None, "facts": None}
            entries.append(entry)
            if entry["relpath"] != rel:
                entry["facts"] = _refused("file name is not valid UTF-8")
                continue
            try:
                st = os.stat(full)
            except OSError as e:
                entry["facts"] = _refused(f"cannot be accessed ({e.strerror or e})")
                continue
            entry["size_bytes"], entry["mtime_ns"] = st.st_size, st.st_mtime_ns
            if not stat.S_ISREG(st.st_mode):
                entry["facts"] = _refused("not a regular file")
                continue
            old = previous.get((src.name, rel))
            if old and old["sha256"] is not None and \
                    (old["size_bytes"], old["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
                entry["facts"] = _facts_of_row(old)
                reused += 1
    entries.sort(key=lambda e: (e["source"], e["relpath"]))
    skipped.sort(key=lambda e: (e["source"], e["relpath"]))

    # 2. Read what is new or changed.
    todo = [e for e in entries if e["facts"] is None]
    for entry, facts in zip(todo, _read_all([e["file"] for e in todo], workers, progress)):
        entry["facts"] = facts

    # 3. Decide each row's status; the first of equal contents is kept.
    rows, first_of = [], {}
    for e in entries:
        f = e["facts"]
        path = _escape(_display_path(e["file"], cwd))
        row = {"source": e["source"], "split": e["split"], "relpath": e["relpath"],
               "path": path, "status": None, "reason": f["error"],
               "size_bytes": e["size_bytes"], "mtime_ns": e["mtime_ns"],
               **{k: f[k] for k in _FACTS if k != "error"}, "duplicate_of": None}
        if row["reason"] is None and min(f["width"], f["height"]) < min_size:
            row["reason"] = (f"image is {f['width']}x{f['height']} pixels, smaller than the "
                             f"minimum {min_size}x{min_size}")
        if row["reason"] is None:
            kept = first_of.setdefault(f["sha256"], path)
            if kept != path:
                row["duplicate_of"] = kept
                row["reason"] = f"exact duplicate of {kept} (same sha256)"
        row["status"] = "rejected" if row["reason"] else "converted" if f["notes"] else "ok"
        rows.append(row)

    # 4. Write the manifest and its summary, each only when its bytes change.
    schema = SCHEMA.with_metadata({**SCHEMA.metadata,
                                   b"rlfn.manifest.min_size": str(min_size).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink, **_WRITE_OPTIONS)
    written = _write_if_changed(out_path, sink.getvalue().to_pybytes())

    summary = ManifestSummary(
        manifest=out_path, summary_file=summary_file, min_size=min_size,
        counts={s: sum(r["status"] == s for r in rows) for s in STATUSES},
        rejected=[{"source": r["source"], "relpath": r["relpath"], "path": r["path"],
                   "reason": r["reason"]} for r in rows if r["status"] == "rejected"],
        skipped=skipped,
        conversions=dict(sorted(Counter(n for r in rows for n in r["notes"]).items())),
        read=len(todo), reused=reused,
        dropped=len(previous.keys() - {(r["source"], r["relpath"]) for r in rows}),
        written=written)
    _write_if_changed(summary_file, (json.dumps(summary.to_dict(), indent=2) + "\n").encode())
    return summary
