"""What every bench result records about the machine it ran on (imported by the bench
scripts, which run with ``bench/`` first on ``sys.path``)."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine(**extra) -> dict:
    """CPU model, cores, Python, host name, and the ``extra`` versions given."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "host": platform.node(), **extra}
