"""DVC's hashes without DVC: :func:`dvc_md5` computes what DVC records in ``dvc.lock`` for a
path (``md5`` of a file's bytes; for a folder, the md5 of DVC's JSON listing of its files plus
``.dir``), without importing DVC (a stage runs inside ``dvc repro``, which holds the repository
lock). The training stages record these on a registered version
(``pipeline.mlflow_registry``); ``pipeline.lineage`` (``rlfn lineage``) reads them back and
compares them with a workspace.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["dvc_md5"]

# Folders DVC never hashes inside a tracked directory.
_SKIP_DIRS = {".git", ".dvc", ".hg"}
_CHUNK = 1 << 20


def _file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def dvc_md5(path: str | Path) -> str | None:
    """The md5 DVC 3 records for ``path`` (``dvc.lock``'s ``md5``), ``None`` when it does not
    exist. A folder: ``md5(json.dumps(sorted [{"md5", "relpath"}], sort_keys=True)) + ".dir"``
    over every file below it (``.git``/``.dvc`` folders left out, links followed as DVC does).
    ``.dvcignore`` patterns are not applied."""
    p = Path(path)
    if p.is_file():
        return _file_md5(p)
    if not p.is_dir():
        return None
    entries = []
    for root, dirs, files in os.walk(p):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        for f in files:
            full = Path(root) / f
            entries.append({"md5": _file_md5(full),
                            "relpath": full.relative_to(p).as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"
