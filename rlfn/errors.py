"""The library's one error contract.

Every error the library raises on purpose is an :class:`RLFNError`: it carries ``where`` (the
file, folder, key or option at fault) and ``reason`` (what is wrong with it), and prints as
``"<where>: <reason>"``. Its ``exit_code`` is what a command exits with when it stops on it:

* :class:`ConfigError` (exit **2**): bad usage or configuration, a key or option whose value
  cannot be used (an unknown backend, a scale that is not 2/3/4, a params key out of range).
* :class:`DataError` (exit **1**): bad data, an input file that cannot be used (a truncated
  image, a weights file of another architecture, a corrupt manifest or checkpoint).

Commands (``rlfn ...``, ``python -m pipeline.<stage>``) print ``error: <message>`` on stderr
and exit with the code (``rlfn.errors.exit_code``); the library and the flows only raise.
Subclasses keep the builtin base they always had (``ValueError`` or ``RuntimeError``) so
callers that caught those still do.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["RLFNError", "ConfigError", "DataError", "UsageError", "exit_code", "EXIT_DATA",
           "EXIT_USAGE"]

EXIT_DATA = 1
EXIT_USAGE = 2


class RLFNError(Exception):
    """``RLFNError(where, reason)``, or ``RLFNError(message)`` when no single file or key is
    at fault (then ``where`` is ``None``)."""

    exit_code = EXIT_DATA

    def __init__(self, where: str | Path | None, reason: str | None = None):
        if reason is None:
            where, reason = None, str(where)
        self.where = None if where is None else str(where)
        self.reason = reason
        super().__init__(reason if self.where is None else f"{self.where}: {reason}")

    @property
    def path(self) -> str | None:  # the name the file errors always used
        return self.where


class ConfigError(RLFNError, ValueError):
    """A setting, key or option that cannot be used (exit 2)."""

    exit_code = EXIT_USAGE


class UsageError(ConfigError):
    """A command-line usage error (exit 2)."""


class DataError(RLFNError):
    """Input data that cannot be used: names the file and the reason (exit 1)."""

    exit_code = EXIT_DATA


def exit_code(exc: BaseException) -> int:
    """The exit code a command ends with on ``exc``: the error's own for an
    :class:`RLFNError`, 1 otherwise."""
    return int(getattr(exc, "exit_code", EXIT_DATA)) if isinstance(exc, RLFNError) else EXIT_DATA
