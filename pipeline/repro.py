"""Flow ``rlfn-repro`` (deployment ``repro``): the whole pipeline, as ``dvc repro`` in the
project folder, run by a worker of the team's pool. The path to use from a Prefect server:
DVC decides what reruns, records it in ``dvc.lock``, and each stage's own flow run is recorded
beside this one. ``targets`` limits it to some stages (and what they need), ``force`` reruns
them anyway; ``push`` ends with ``dvc push`` to the default remote (team mode: ``stack``).

The single-stage deployments (``prepare`` ... ``promote``) run one stage's flow directly; run
outside ``dvc repro`` they end with ``dvc commit`` of their stage, so ``dvc status`` agrees
with what they wrote (``pipeline._common.stage_run``)."""

from __future__ import annotations

import subprocess
import sys
import time

from prefect import flow

from pipeline._common import ROOT, log, main
from rlfn.errors import RLFNError

__all__ = ["repro", "run_dvc"]


class ReproError(RLFNError):
    exit_code = 1


def run_dvc(args: list[str], tail_lines: int = 40) -> str:
    """Run ``dvc ARGS`` in the project folder, its output line by line into the log; one
    ``ReproError`` with the last lines when it fails."""
    cmd = [sys.executable, "-m", "dvc", *args]
    log.info(f"repro: {' '.join(['dvc', *args])} (in {ROOT})")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        log.info(line)
    code = proc.wait()
    if code != 0:
        tail = "\n".join(lines[-tail_lines:])
        raise ReproError(f"dvc {' '.join(args)} (in {ROOT})", f"exit code {code}:\n{tail}")
    log.info(f"repro: dvc {args[0]} done in {time.monotonic() - t0:.0f} s")
    return "\n".join(lines)


@flow(name="rlfn-repro", flow_run_name="repro")
def repro(targets: list[str] | None = None, force: bool = False, push: bool = False) -> str:
    args = ["repro", *(["--force"] if force else []), *(targets or [])]
    out = run_dvc(args)
    if push:
        run_dvc(["push"])
    return out


if __name__ == "__main__":
    sys.exit(main(lambda settings=None: repro(sys.argv[1:] or None)))
