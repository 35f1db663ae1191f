"""The machine a figure was measured on, without importing torch (the bench scripts read it
before a virtual environment exists)."""

from __future__ import annotations

import platform

__all__ = ["cpu_model", "cpu_vendor"]


def _cpuinfo(key: str) -> str | None:
    """The first ``key`` line's value in /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_vendor() -> str:
    """The CPU's vendor as /proc/cpuinfo names it (``GenuineIntel``, ``AuthenticAMD``); ``""``
    where it does not say."""
    return _cpuinfo("vendor_id") or ""
