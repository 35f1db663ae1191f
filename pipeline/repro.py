"""Flow ``rlfn-repro`` (deployment ``repro``): the whole pipeline, as ``dvc repro`` in the
project folder, run by a worker of the team's pool. The path to use from a Prefect server:
DVC decides what reruns, records it in ``dvc.lock``, and each stage's own flow run is recorded
beside this one. ``targets`` limits it to some stages (and what they need), ``force`` reruns
them anyway; ``push`` ends with ``dvc push`` to the default remote (team mode: ``stack``)
and, where the team has a git repository (``RLFN_GIT_URL``, team mode across hosts: ``stack.sh
bundle``), commits ``dvc.lock``, ``metrics/``, ``plots/``, ``reports/`` to the branch
``repro/<flow-run-id>`` there (as a retrain does; the project's own branch and files are left
as they are), so that ``git checkout repro/<id> && dvc pull`` restores the outputs anywhere.

The single-stage deployments (``prepare`` ... ``promote``) run one stage's flow directly; run
outside ``dvc repro`` they end with ``dvc commit`` of their stage, so ``dvc status`` agrees
with what they wrote (``pipeline.tracking.stage_run``)."""

from __future__ import annotations

import os
import sys

from prefect import flow

from pipeline.dvcops import ROOT, log, run_dvc
from pipeline.entry import main

__all__ = ["repro", "run_dvc"]


@flow(name="rlfn-repro", flow_run_name="repro")
def repro(targets: list[str] | None = None, force: bool = False, push: bool = False) -> str:
    args = ["repro", *(["--force"] if force else []), *(targets or [])]
    out = run_dvc(args)
    if push:
        run_dvc(["push"])
        url = os.environ.get("RLFN_GIT_URL", "")
        if url:
            from prefect.runtime import flow_run

            from pipeline.retrain import push_results

            rid = str(flow_run.id or f"local-{os.getpid()}")
            branch = f"repro/{rid}"
            what = " ".join(targets or []) or "all stages"
            commit = push_results(ROOT, url, branch,
                                  f"repro ({what}) by flow run {rid}\n\nforce: {force}\n")
            log.info(f"repro: {branch} ({commit[:12]}) pushed to {url}")
    return out


if __name__ == "__main__":
    sys.exit(main(lambda settings=None: repro(sys.argv[1:] or None)))
