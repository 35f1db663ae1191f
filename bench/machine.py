"""What every bench result records about the machine it ran on (imported by the bench
scripts, which run with ``bench/`` first on ``sys.path``)."""

from __future__ import annotations

import os
import platform

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # rlfn.machine: no torch needed
from rlfn.machine import cpu_model  # noqa: E402,F401 - the bench scripts import it from here


def machine(**extra) -> dict:
    """CPU model, cores, Python, host name, and the ``extra`` versions given."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "host": platform.node(), **extra}
