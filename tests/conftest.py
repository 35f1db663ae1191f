"""Shared fixtures. ``../shared`` (reference images and official weights) is optional locally
(tests that need it skip, saying why) but required under ``CI=true`` (they fail instead)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RLFN_SHARED", ROOT.parent / "shared"))


def _require_shared(path: Path) -> Path:
    if path.exists():
        return path
    msg = f"reference data not found at {path} (set RLFN_SHARED or put shared/ beside the repo)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {msg}", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def shared() -> Path:
    return _require_shared(SHARED)


@pytest.fixture(scope="session")
def benchmarks(shared) -> Path:
    return _require_shared(shared / "data" / "benchmarks")


@pytest.fixture(scope="session")
def pretrained(shared) -> Path:
    return _require_shared(shared / "pretrained")


@pytest.fixture(scope="session")
def reference_metrics(shared) -> dict:
    import json

    return json.loads(_require_shared(shared / "data" / "reference_metrics.json").read_text())
