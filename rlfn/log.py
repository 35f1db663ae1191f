"""One logger for the library and the pipeline: ``logging.getLogger("rlfn")`` and children.

``get_logger(__name__)`` gives a child of it (``rlfn.train.engine``, ``pipeline.train`` is
mapped to ``rlfn.pipeline.train``). ``setup()`` (called by the commands' entry points) sends
it to stderr as plain lines: ``note: ...`` for warnings, ``error: ...`` for errors and the
message alone for info, which is what the CLI always printed. Inside a Prefect flow run the
same records also reach Prefect (``PREFECT_LOGGING_EXTRA_LOGGERS=rlfn``, set by
``pipeline/__init__.py``).
"""

from __future__ import annotations

import logging
import sys

__all__ = ["ROOT_NAME", "get_logger", "setup"]

ROOT_NAME = "rlfn"


class _Plain(logging.Formatter):
    PREFIX = {logging.WARNING: "note: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}

    def format(self, record: logging.LogRecord) -> str:
        return self.PREFIX.get(record.levelno, "") + record.getMessage()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test's capture, a redirect)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def get_logger(name: str | None = None) -> logging.Logger:
    if not name or name == ROOT_NAME:
        return logging.getLogger(ROOT_NAME)
    if not name.startswith(ROOT_NAME + "."):
        name = f"{ROOT_NAME}.{name}"
    return logging.getLogger(name)


def setup(level: int = logging.INFO) -> logging.Logger:
    """Attach one plain stderr handler to the ``rlfn`` logger (idempotent)."""
    log = logging.getLogger(ROOT_NAME)
    log.setLevel(level)
    if not any(getattr(h, "_rlfn_plain", False) for h in log.handlers):
        h = _StderrHandler()
        h.setFormatter(_Plain())
        h._rlfn_plain = True  # type: ignore[attr-defined]
        log.addHandler(h)
    log.propagate = False
    return log
