"""DVC from inside a stage: which ``dvc repro`` (if any) launched this process, ``dvc``
commands run by the pipeline itself (``run_dvc``), and ``dvc commit`` of a stage a Prefect
worker ran outside ``dvc repro`` (``commit_stage``)."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from rlfn.errors import RLFNError
from rlfn.log import get_logger

__all__ = ["ROOT", "dvc_ancestor", "deployed_outside_dvc", "commit_stage", "run_dvc",
           "experiment_stages"]

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS_DVC = ROOT / "experiments" / "dvc.yaml"
log = get_logger("pipeline")


@functools.lru_cache(maxsize=1)  # a process's ancestors do not change
def dvc_ancestor() -> str | None:
    """pid-starttime of the nearest ancestor process running ``dvc`` (Linux /proc)."""
    pid = os.getppid()
    for _ in range(8):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        words = [Path(c.decode(errors="replace")).name for c in cmd[:4] if c]
        if "dvc" in words:  # `dvc repro`, `python .../dvc repro`, `python -m dvc repro`
            return f"dvc-{pid}-{stat.rsplit(')', 1)[1].split()[19]}"
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        if pid <= 1:
            return None
    return None


@functools.lru_cache(maxsize=1)
def experiment_stages() -> frozenset[str]:
    """The stages ``experiments/dvc.yaml`` defines (read from it: ``tune``, ``ablate``)."""
    try:
        return frozenset((yaml.safe_load(EXPERIMENTS_DVC.read_text()) or {}).get("stages") or {})
    except (OSError, yaml.YAMLError):
        return frozenset()


def deployed_outside_dvc() -> bool:
    """A flow run of a deployment (a worker ran it) that no ``dvc repro`` launched."""
    rid = os.environ.get("RLFN_REPRO_ID", "")  # repro_id() sets a manual-... one itself
    if dvc_ancestor() or (rid and not rid.startswith("manual-")):
        return False
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return bool(ctx and ctx.flow_run and ctx.flow_run.deployment_id)


def commit_stage(stage: str) -> None:
    """``dvc commit -f STAGE``: record in ``dvc.lock`` what a stage run outside ``dvc repro``
    (by a Prefect worker) wrote, so that ``dvc status`` agrees with the workspace."""
    target = f"experiments/dvc.yaml:{stage}" if stage in experiment_stages() else stage
    try:
        run_dvc(["commit", "-f", target], echo=False)
    except RLFNError as e:
        missing = re.search(r"dependency '([^']+)' does not exist", e.reason)
        if missing:  # a stage that ran without an optional input (tune without the patches
            # store, on a worker host where the pipeline never ran): its work is done and kept
            # (the study, MLflow); dvc.lock cannot record it, and says nothing false either
            log.warning(f"{stage}: outputs not recorded in dvc.lock (dvc commit {target}): "
                        f"its dependency {missing.group(1)!r} is not in {ROOT}; the stage ran "
                        "without it")
            return
        raise RLFNError(f"dvc commit {target} (in {ROOT})",
                        f"the stage ran outside dvc repro and its outputs could not be "
                        f"recorded: {e.reason[-500:]}") from None
    log.info(f"{stage}: outputs recorded in dvc.lock (dvc commit {target}; run outside "
             "dvc repro)")


def run_dvc(args: list[str], cwd: str | Path = ROOT, tail_lines: int = 40,
            echo: bool = True) -> str:
    """Run ``dvc ARGS`` (this interpreter's DVC) in ``cwd``, its output line by line into the
    log when ``echo``; one ``RLFNError`` (exit 1) with the last lines when it fails. The
    stages it runs find this interpreter first on ``PATH``."""
    cmd = [sys.executable, "-m", "dvc", *args]
    env = {**os.environ, "PATH": os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    if echo:
        log.info(f"dvc {' '.join(args)} (in {cwd})")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, env=env, stdin=subprocess.DEVNULL)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        if echo:
            log.info(line)
    code = proc.wait()
    if code != 0:
        tail = "\n".join(lines[-tail_lines:])
        raise RLFNError(f"dvc {' '.join(args)} (in {cwd})", f"exit code {code}:\n{tail}")
    if echo:
        log.info(f"dvc {args[0]} done in {time.monotonic() - t0:.0f} s")
    return "\n".join(lines)
