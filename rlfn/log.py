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


class _LineStart:
    """The process's stderr, remembering whether the last write ended a line. Another
    library's message written without its newline (Prefect's "Error logging to API" notice
    writes an exception's text alone) would otherwise run into the next ``error:`` line, and
    ``grep '^error:'`` would miss it; ``_StderrHandler`` starts a fresh line first."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self.at_line_start = True

    def write(self, s: str) -> int:
        n = self._stream.write(s)
        if s:
            self.at_line_start = s.endswith("\n")
        return n

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test's capture, a redirect), each
    record on a line of its own (``_LineStart``)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(sys.stderr, "at_line_start", True):
            sys.stderr.write("\n")
        super().emit(record)


def get_logger(name: str | None = None) -> logging.Logger:
    if not name or name == ROOT_NAME:
        return logging.getLogger(ROOT_NAME)
    if not name.startswith(ROOT_NAME + "."):
        name = f"{ROOT_NAME}.{name}"
    return logging.getLogger(name)


def setup(level: int = logging.INFO) -> logging.Logger:
    """Attach one plain stderr handler to the ``rlfn`` logger (idempotent); the process's
    stderr becomes a ``_LineStart`` (what it writes is unchanged)."""
    if sys.stderr is not None and sys.stderr is sys.__stderr__:
        sys.stderr = _LineStart(sys.stderr)
    log = logging.getLogger(ROOT_NAME)
    log.setLevel(level)
    if not any(getattr(h, "_rlfn_plain", False) for h in log.handlers):
        h = _StderrHandler()
        h.setFormatter(_Plain())
        h._rlfn_plain = True  # type: ignore[attr-defined]
        log.addHandler(h)
    log.propagate = False
    return log
