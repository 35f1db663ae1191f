"""Failpoints: named places in the code where a test, or a fault drill, stops a process at a
known point, so that a fault (a SIGKILL, a server killed) lands exactly there and not
wherever a race with a clock left it (the idea of FreeBSD's fail(9) and etcd's gofail).

Off unless the environment names them; then a point costs one dict lookup::

    RLFN_FAILPOINTS="train.step@13,register.weights_logged"   # NAME or NAME@VALUE, comma-separated
    RLFN_FAILPOINT_DIR=/some/dir                               # required with RLFN_FAILPOINTS

When the code reaches an armed point (``hit(NAME)``, or ``hit(NAME, VALUE)`` for ``NAME@VALUE``:
the training loop passes the iteration about to run), the process writes
``DIR/NAME.reached`` (its pid; written atomically) and waits until ``DIR/NAME.release``
exists, then disarms the point and goes on. The test waits for the marker, does its fault,
and releases the process or kills it. A point not released within
``RLFN_FAILPOINT_TIMEOUT_S`` (default 900 s) raises ``FailpointTimeout``: a forgotten test
never leaves a process waiting for ever.

The points (where they are):

* ``train.step@I`` (``rlfn.train.engine.train``): before the step of iteration index ``I``
  (``I`` iterations done), on every rank;
* ``register.weights_logged`` (``pipeline.mlflow_registry.versions.log_and_register``): the
  weights uploaded to the tracking server, the pyfunc and the version not yet;
* ``promote.locked`` (``pipeline.mlflow_registry.promotion.promote``): the promotion's lock
  held, nothing read or moved yet;
* ``promote.lease_busy`` (``pipeline.mlflow_registry.locks``): a promotion found the
  registry's lease held by another, live, and is about to wait for it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "RLFN_FAILPOINTS"
DIR_ENV = "RLFN_FAILPOINT_DIR"
TIMEOUT_ENV = "RLFN_FAILPOINT_TIMEOUT_S"

__all__ = ["hit", "FailpointTimeout", "ENV", "DIR_ENV", "TIMEOUT_ENV"]


class FailpointTimeout(RuntimeError):
    pass


def _parse(spec: str) -> dict[str, set[str | None]]:
    points: dict[str, set[str | None]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("@")
        points.setdefault(name, set()).add(value or None)
    return points


_ARMED: dict[str, set[str | None]] = _parse(os.environ.get(ENV, ""))


def hit(name: str, value: object = None) -> None:
    """Pause here if ``name`` (or ``name@value``) is armed (module docstring)."""
    if not _ARMED:
        return
    values = _ARMED.get(name)
    if not values:
        return
    key = None if value is None else str(value)
    if key not in values and None not in values:
        return
    values.discard(key if key in values else None)
    d = os.environ.get(DIR_ENV)
    if not d:
        raise RuntimeError(f"{ENV} is set but {DIR_ENV} is not: nowhere to say failpoint "
                           f"{name} was reached")
    folder = Path(d)
    folder.mkdir(parents=True, exist_ok=True)
    release = folder / f"{name}.release"
    from .io import atomic_write  # reached only when armed: rlfn.failpoints stays light

    atomic_write(folder / f"{name}.reached",
                 f"{os.getpid()} {name}{'' if key is None else '@' + key}\n")
    limit = float(os.environ.get(TIMEOUT_ENV, "900"))
    deadline = time.monotonic() + limit
    while not release.exists():
        if time.monotonic() > deadline:
            raise FailpointTimeout(f"failpoint {name}: not released within {limit:g} s "
                                   f"({release} never appeared)")
        time.sleep(0.02)
