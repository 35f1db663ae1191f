"""Flow ``rlfn-repro`` (deployment ``repro``): the whole pipeline, as ``dvc repro`` in the
project folder, run by a worker of the team's pool. The path to use from a Prefect server:
DVC decides what reruns, records it in ``dvc.lock``, and each stage's own flow run is recorded
beside this one. ``targets`` limits it to some stages (and what they need), ``force`` reruns
them anyway; ``push`` ends with ``dvc push`` to the default remote (team mode: ``stack``).

The single-stage deployments (``prepare`` ... ``promote``) run one stage's flow directly; run
outside ``dvc repro`` they end with ``dvc commit`` of their stage, so ``dvc status`` agrees
with what they wrote (``pipeline.tracking.stage_run``)."""

from __future__ import annotations

import sys

from prefect import flow

from pipeline.dvcops import run_dvc
from pipeline.entry import main

__all__ = ["repro", "run_dvc"]


@flow(name="rlfn-repro", flow_run_name="repro")
def repro(targets: list[str] | None = None, force: bool = False, push: bool = False) -> str:
    args = ["repro", *(["--force"] if force else []), *(targets or [])]
    out = run_dvc(args)
    if push:
        run_dvc(["push"])
    return out


if __name__ == "__main__":
    sys.exit(main(lambda settings=None: repro(sys.argv[1:] or None)))
