"""Prerequisites of the tests: where the project and ``../shared`` are, and rule 1 of the
suite (see conftest.py): a missing prerequisite skips locally and fails under ``CI=true``
(``unavailable``, ``require_module``, ``require_tool``, ``require_shared``). Test modules
import these from here; conftest.py builds its fixtures on them."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RLFN_SHARED", ROOT.parent / "shared"))


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def unavailable(msg: str) -> NoReturn:
    """A prerequisite is missing: skip with ``msg`` locally, fail with it under ``CI=true``."""
    if under_ci():
        pytest.fail(f"CI=true: {msg}", pytrace=False)
    pytest.skip(msg)


def require_shared(path: Path) -> Path:
    """``path`` under ``../shared``, or ``unavailable``."""
    if path.exists():
        return path
    unavailable(f"reference data not found at {path} (set RLFN_SHARED or put shared/ beside "
                "the repo)")


def require_module(name: str, extra: str = "infer") -> ModuleType:
    """``import name``, or ``unavailable`` naming the extra that provides it."""
    if importlib.util.find_spec(name) is None:
        unavailable(f"Python package {name!r} is not installed (it is in the [{extra}] extra: "
                    f"pip install -e '.[{extra}]')")
    return importlib.import_module(name)


def require_tool(name: str, extra: str = "dev") -> str:
    """The path of command ``name`` (this venv's first, then PATH), or ``unavailable``."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        unavailable(f"command {name!r} is not installed (it is in the [{extra}] extra: "
                    f"pip install -e '.[{extra}]')")
    return found
