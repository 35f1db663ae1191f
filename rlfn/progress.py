"""Progress that reads well where it is read: a tqdm bar in a terminal, plain log lines in a
log.

``progress(iterable=None, total=None, desc=..., unit=..., enabled=True, every_s=None,
every_pct=10, ...)`` is what the library uses instead of a bare ``tqdm(...)``. It returns a
:class:`Progress` with the tqdm methods the code uses: iteration, ``update(n)``,
``set_postfix(**figures)`` (the current figures: loss, lr, psnr, ...), ``close()``, ``n`` and
use as a context manager. The mode:

* ``bars``: a real tqdm bar on stderr (the default when ``sys.stderr.isatty()``).
* ``lines`` (the default otherwise: CI, ``dvc repro``'s captured output, a Prefect worker):
  one plain line at most every ``every_s`` seconds (default 10; ``RLFN_PROGRESS_EVERY``
  overrides it) or each time another ``every_pct`` percent is done, whichever comes first,
  plus a final line; never a carriage return. A line reads
  ``stage 3 train: 1250/2000 (62%) 4.4 it/s, eta 2m50s, loss 10.12, lr 5.0e-04, psnr 30.71``
  and the final one ``... 2000/2000 (100%) 4.4 it/s, elapsed 7m33s, ...``.
* ``off``: nothing. ``enabled=False`` (a ``progress=False`` argument, the CLI's ``-q``) is
  always off.

``RLFN_PROGRESS=bars|lines|off`` forces the mode (``auto``, the default, picks as above).

Where the lines go: each is an INFO record of the ``rlfn.progress`` logger (whose level is set
to INFO, unless someone set another, so that the lines do not depend on the level of
``rlfn`` or of the root logger). Through ``rlfn.log.setup()`` (every command's entry point,
``pipeline.entry.main``) it is a plain line on stderr; inside a Prefect flow run the same
record also reaches the flow run's log, through the handler Prefect puts on the ``rlfn``
logger (``PREFECT_LOGGING_EXTRA_LOGGERS=rlfn``); without ``setup()`` it reaches whatever
handlers the application configured. Where no handler at all would see it (a bare
``python -c "...train(...)"``: Python's last-resort handler drops INFO), the line is written
to stderr directly. The progress object only reads the clock: no RNG, no tensor, no device
synchronisation, so it cannot change a number.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator

from .log import get_logger

__all__ = ["progress", "progress_mode", "Progress", "ENV_MODE", "ENV_EVERY", "MODES"]

ENV_MODE = "RLFN_PROGRESS"
ENV_EVERY = "RLFN_PROGRESS_EVERY"
MODES = ("bars", "lines", "off")
DEFAULT_EVERY_S = 10.0

_log = get_logger("progress")
if _log.level == logging.NOTSET:
    _log.setLevel(logging.INFO)


def progress_mode() -> str:
    """``bars``, ``lines`` or ``off``: ``RLFN_PROGRESS`` when set (and not ``auto``), else
    ``bars`` on a terminal and ``lines`` elsewhere."""
    forced = os.environ.get(ENV_MODE, "").strip().lower()
    if forced in MODES:
        return forced
    try:
        tty = sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream
        tty = False
    return "bars" if tty else "lines"


def _every_s(every_s: float | None) -> float:
    env = os.environ.get(ENV_EVERY, "").strip()
    if env:
        try:
            return max(0.0, float(env))
        except ValueError:
            pass
    return DEFAULT_EVERY_S if every_s is None else max(0.0, float(every_s))


def progress(iterable: Iterable | None = None, total: float | None = None, desc: str = "",
             unit: str = "it", enabled: bool = True, every_s: float | None = None,
             every_pct: float = 10, initial: float = 0, unit_scale: bool = False,
             unit_divisor: int = 1000, leave: bool = True,
             clock: Callable[[], float] = time.monotonic) -> "Progress":
    """The progress of a loop (see the module docstring). ``total`` defaults to
    ``len(iterable)`` where it has one; ``initial`` is where a resumed count starts;
    ``unit_scale`` / ``unit_divisor`` as in tqdm (bytes: ``unit="B", unit_scale=True,
    unit_divisor=1024``); ``leave=False`` removes a bar once done (lines are kept);
    ``clock`` is for tests."""
    if total is None and iterable is not None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except (TypeError, AttributeError):
            total = None
    mode = progress_mode() if enabled else "off"
    if mode == "bars":
        return _Bar(iterable, total, desc, unit, initial, unit_scale, unit_divisor, leave)
    if mode == "lines":
        return _Lines(iterable, total, desc, unit, initial, unit_scale, unit_divisor,
                      _every_s(every_s), every_pct, clock)
    return Progress(iterable, total, initial)


class Progress:
    """The common interface; this base class is the ``off`` mode (counts, prints nothing)."""

    def __init__(self, iterable: Iterable | None, total: float | None, initial: float = 0):
        self.iterable, self.total, self.n = iterable, total, initial
        self.postfix: dict[str, Any] = {}
        self.closed = False

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this progress has no iterable; call update(n) instead")
        try:
            for x in self.iterable:
                yield x
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __bool__(self) -> bool:  # not its length
        return True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix(self, **figures: Any) -> None:
        """The figures shown after the count (replacing the previous ones), in order."""
        self.postfix = dict(figures)

    def close(self) -> None:
        self.closed = True


class _Bar(Progress):
    """A tqdm bar on stderr."""

    def __init__(self, iterable, total, desc, unit, initial, unit_scale, unit_divisor, leave):
        super().__init__(iterable, total, initial)
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=initial, desc=desc or None, unit=unit,
                         unit_scale=unit_scale, unit_divisor=unit_divisor, leave=leave,
                         file=sys.stderr, **_width(sys.stderr))

    def update(self, n: float = 1) -> None:
        super().update(n)
        self._bar.update(n)

    def set_postfix(self, **figures: Any) -> None:
        super().set_postfix(**figures)
        self._bar.set_postfix({k: _figure(v) for k, v in figures.items()})

    def close(self) -> None:
        if not self.closed:
            self._bar.close()
        super().close()


class _Lines(Progress):
    """Plain log lines: at most one every ``every_s`` seconds or ``every_pct`` percent."""

    def __init__(self, iterable, total, desc, unit, initial, unit_scale, unit_divisor,
                 every_s: float, every_pct: float, clock: Callable[[], float]):
        super().__init__(iterable, total, initial)
        self.desc, self.unit = desc, unit
        self.unit_scale, self.unit_divisor = unit_scale, unit_divisor
        self.every_s, self.every_pct, self._clock = every_s, every_pct, clock
        self.start = initial
        self._t0 = self._last_t = clock()
        self._last_n: float | None = None
        self._next_pct = self._pct_mark_after(self._pct(initial))

    # -- when
    def _pct(self, n: float) -> float | None:
        if not self.total or self.total <= 0:
            return None
        return 100.0 * n / self.total

    def _pct_mark_after(self, pct: float | None) -> float:
        if pct is None or not self.every_pct or self.every_pct <= 0:
            return math.inf
        return (math.floor(pct / self.every_pct + 1e-9) + 1) * self.every_pct

    def update(self, n: float = 1) -> None:
        super().update(n)
        if self.closed:
            return
        now = self._clock()
        pct = self._pct(self.n)
        if (pct is not None and pct >= self._next_pct - 1e-9) or now - self._last_t >= self.every_s:
            self._line(now)

    def close(self) -> None:
        if not self.closed and self.n != self._last_n and self.n > self.start:
            self._line(self._clock(), final=True)
        super().close()

    # -- what
    def _line(self, now: float, final: bool = False) -> None:
        self._last_t, self._last_n = now, self.n
        self._next_pct = self._pct_mark_after(self._pct(self.n))
        _emit(self.format(now, final=final or (self.total is not None and self.n >= self.total)))

    def _amount(self, n: float) -> str:
        """A count as tqdm writes it: ``1250``, or scaled with its unit (``1.25MB``)."""
        if self.unit_scale:
            from tqdm import tqdm

            return tqdm.format_sizeof(n, suffix=self.unit, divisor=self.unit_divisor)
        return f"{n:g}" if isinstance(n, float) else str(n)

    def format(self, now: float, final: bool = False) -> str:
        """The line for the count now (public for tests)."""
        elapsed = max(now - self._t0, 0.0)
        done = self.n - self.start
        parts = []
        if self.total:
            pct = self._pct(self.n) or 0.0
            count = f"{self._amount(self.n)}/{self._amount(self.total)}"
            parts.append(f"{count} ({math.floor(pct + 1e-9):.0f}%)")
        else:
            parts.append(self._amount(self.n) + ("," if self.unit_scale else f" {self.unit},"))
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        if rate is None:
            parts.append(f"? {self.unit}/s")
        elif self.unit_scale:
            parts.append(f"{self._amount(rate)}/s")
        elif rate >= 1:
            parts.append(f"{_num(rate)} {self.unit}/s")
        else:
            parts.append(f"{_num(1 / rate)} s/{self.unit}")
        head = " ".join(parts)
        tail = []
        if final:
            tail.append(f"elapsed {_duration(elapsed)}")
        elif rate and self.total and self.total > self.n:
            tail.append(f"eta {_duration((self.total - self.n) / rate)}")
        tail += [f"{k} {_figure(v)}" for k, v in self.postfix.items() if v is not None]
        return f"{self.desc}: " * bool(self.desc) + ", ".join([head, *tail])


def _width(stream) -> dict:
    """tqdm's size: the terminal's, following resizes; 80x24 where the terminal says it has
    no size (a pseudo-terminal nobody sized, where tqdm would hide its bar)."""
    try:
        cols, rows = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        cols = rows = 0
    if cols > 0 and rows > 0:
        return {"dynamic_ncols": True}
    return {"ncols": cols if cols > 0 else 80, "nrows": 24}


def _figure(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _duration(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _emit(line: str) -> None:
    """One progress line: an INFO record of ``rlfn.progress``, or, where no handler would
    see it, a line on stderr."""
    if _log.hasHandlers():
        _log.info(line)
        return
    stream = sys.stderr
    if stream is not None:
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass
