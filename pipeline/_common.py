"""Glue shared by every stage: MLflow runs and tags, the entry point. Written once, here.

* ``params()`` reads ``params.yaml`` (``RLFN_PARAMS`` overrides the path) as plain data; the
  stages use ``pipeline.settings.load_settings()`` (the same file, checked and typed).
* ``main(flow)``: every stage's ``__main__``: settings first (a bad one is one ``error:`` line,
  exit 2, before Prefect or MLflow start), then the flow; an ``RLFNError`` it raises is one
  ``error:`` line and its exit code (2 configuration, 1 data), anything else a traceback and 1.
* ``tracking_uri()``: ``MLFLOW_TRACKING_URI`` when set (a real server), else the project's
  SQLite store ``sqlite:///mlflow.db`` with artefacts in ``mlartifacts/`` beside it.
* ``stage_run(stage, params)``: a context manager giving the stage's MLflow run, nested under
  one parent run per ``dvc repro``. Stages of one repro find their parent by the tag
  ``rlfn.repro_id``: ``RLFN_REPRO_ID`` when set, else the pid and start time of the ``dvc``
  process that launched the stage (so a plain ``dvc repro`` groups its stages), else a fresh
  id (a stage run by hand gets its own parent). Each stage run is tagged with the git commit,
  the DVC stage name and a hash of the params it read.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.services import check_services, describe_failure
from pipeline.settings import MlflowSettings, Settings, load_settings
from pipeline.settings import read_params as params
from rlfn.errors import RLFNError
from rlfn.log import get_logger
from rlfn.log import setup as setup_logging
from rlfn.threads import configure_threads

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "params", "tracking_uri", "stage_run", "repro_id", "git_commit",
           "params_hash", "write_json", "log_dict_metrics", "flatten_numbers", "experiment_id", "main", "log", "run_dvc"]

log = get_logger("pipeline")
_LOADED = time.monotonic()


def _mlflow_section(prm: Any) -> MlflowSettings:
    """params' ``mlflow`` section (settings or a raw params mapping), defaults filled in."""
    if isinstance(prm, Settings):
        return prm.mlflow
    return MlflowSettings.model_validate(dict((prm or {}).get("mlflow") or {}))


def tracking_uri(prm: Any = None, root: str | Path = ".") -> str:
    """The one tracking-URI rule (the stages, ``rlfn lineage`` through ``pipeline.lineage``):
    ``MLFLOW_TRACKING_URI``, else the SQLite store ``mlflow.db`` of params (``prm``), a path
    relative to the project folder ``root`` (the working directory, where stages run)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    db = _mlflow_section(prm).db
    return f"sqlite:///{(Path(root) / db).resolve()}"


def main(flow: Callable[..., Any], *args: Any,
         check: Callable[[Settings], Any] | None = None, load_aware_threads: bool = True) -> int:
    """A stage's command line: check the settings (and ``check(settings)``, a stage's own
    checks that need no Prefect: backends, ...), run ``flow(settings, *args)``, map errors to
    the exit contract. The flow is called ``flow(*args, settings=settings)``. Returns the
    exit code: ``sys.exit(main(flow))``. torch's threads: ``rlfn.threads`` (training stages:
    ``load_aware_threads=False``)."""
    setup_logging()
    try:
        log.debug(f"torch: {configure_threads(0, load_aware=load_aware_threads)}")
        settings = load_settings()
        if check is not None:
            check(settings)
        check_services()  # team mode's servers: reachable and ours, before any work
        with _repro_prefect_server():
            flow(*args, settings=settings)
    except RLFNError as e:
        log.error(str(e))
        return e.exit_code
    except Exception as e:  # a server lost mid-stage: one line naming it, after the retries
        line = describe_failure(e)
        if line is None:
            raise
        log.error(line)
        return 1
    return 0


@contextlib.contextmanager
def _repro_prefect_server() -> Iterator[None]:
    """Under ``dvc repro`` without ``PREFECT_API_URL``: the stages of one repro share one
    Prefect server (``pipeline.repro_server``) instead of starting a temporary one each."""
    rid = None if os.environ.get("PREFECT_API_URL") else _dvc_ancestor()
    url = None
    if rid:
        from pipeline import repro_server

        url = repro_server.server_url(rid, int(rid.split("-")[1]))
    if not url:
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):
        yield


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=ROOT, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=ROOT, timeout=10).stdout
        return commit + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def params_hash(section: Any) -> str:
    return hashlib.sha256(json.dumps(section, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)  # a process's ancestors do not change
def _dvc_ancestor() -> str | None:
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


def repro_id() -> str:
    rid = os.environ.get("RLFN_REPRO_ID") or _dvc_ancestor()
    if not rid:
        rid = f"manual-{uuid.uuid4().hex[:12]}"
        os.environ["RLFN_REPRO_ID"] = rid  # later runs in this process share it
    return rid


def experiment_id(mlflow, prm: Any) -> str:
    """The id of the project's MLflow experiment (params.yaml's mlflow.experiment), created
    on first use (with a local artifact location when tracking to SQLite)."""
    m = _mlflow_section(prm)
    name = m.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri(prm).startswith("sqlite:"):
        art = Path(m.artifacts).resolve()
        location = art.as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another stage
        return mlflow.get_experiment_by_name(name).experiment_id


@contextlib.contextmanager
def stage_run(stage: str, prm: Any, section: Any = None) -> Iterator[Any]:
    """The stage's MLflow run (nested under the repro's parent run), tagged and ready."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(prm))
    exp_id = experiment_id(mlflow, prm)
    rid = repro_id()
    commit = git_commit()
    found = mlflow.search_runs([exp_id], filter_string=f"tags.`rlfn.repro_id` = '{rid}' and "
                               "tags.`rlfn.kind` = 'repro'", max_results=1, output_format="list")
    if found:
        parent_id = found[0].info.run_id
    else:
        parent = mlflow.MlflowClient().create_run(
            exp_id, run_name=f"repro {rid}", tags={"rlfn.repro_id": rid, "rlfn.kind": "repro",
                                                   "git_commit": commit})
        parent_id = parent.info.run_id
    client = mlflow.MlflowClient()
    tags = {"rlfn.repro_id": rid, "rlfn.kind": "stage", "dvc_stage": stage,
            "git_commit": commit, "params_hash": params_hash(
                section if section is not None else
                prm.raw if isinstance(prm, Settings) else prm),
            "mlflow.parentRunId": parent_id}
    run = client.create_run(exp_id, run_name=stage, tags=tags)
    status = "FAILED"
    startup = process_age_s()
    log.info(f"{stage}: ready after {startup:.1f} s (interpreter, imports, Prefect, MLflow)")
    t0 = time.monotonic()
    try:
        with mlflow.start_run(run_id=run.info.run_id):
            try:
                mlflow.log_metric("startup_s", round(startup, 2))
                yield run
            except BaseException as e:
                if describe_failure(e) is not None:  # a server lost, after the retries:
                    _fail_fast()                     # the clean-up below gives up at once
                raise
        status = "FINISHED"
        log.info(f"{stage}: work done in {time.monotonic() - t0:.1f} s")
        if _deployed_outside_dvc():
            commit_stage(stage)
    finally:
        _terminate(client, run.info.run_id, status)
        _terminate(client, parent_id, "FINISHED" if status == "FINISHED" else "FAILED")


_LOST = False  # set once a server was lost mid-stage (after the clients' retries)


def _fail_fast() -> None:
    """The tracking server is gone (its client already retried): later requests of this
    process (ending the runs) fail at once instead of retrying for another half minute each."""
    global _LOST
    _LOST = True
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"


def _terminate(client: Any, run_id: str, status: str) -> None:
    try:
        client.set_terminated(run_id, status)
    except Exception as e:
        if not _LOST:
            raise
        log.warning(f"MLflow run {run_id} left {status!r} unrecorded: the tracking server "
                    f"is unreachable ({type(e).__name__})")


EXPERIMENT_STAGES = {"tune", "ablate"}  # stages of experiments/dvc.yaml


def _deployed_outside_dvc() -> bool:
    """A flow run of a deployment (a worker ran it) that no ``dvc repro`` launched."""
    rid = os.environ.get("RLFN_REPRO_ID", "")  # repro_id() sets a manual-... one itself
    if _dvc_ancestor() or (rid and not rid.startswith("manual-")):
        return False
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return bool(ctx and ctx.flow_run and ctx.flow_run.deployment_id)


def commit_stage(stage: str) -> None:
    """``dvc commit -f STAGE``: record in ``dvc.lock`` what a stage run outside ``dvc repro``
    (by a Prefect worker) wrote, so that ``dvc status`` agrees with the workspace."""
    target = f"experiments/dvc.yaml:{stage}" if stage in EXPERIMENT_STAGES else stage
    try:
        run_dvc(["commit", "-f", target], echo=False)
    except RLFNError as e:
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


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc; elsewhere since this module loaded)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start / ticks)
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _LOADED


def write_json(path: str | Path, data: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return p


def flatten_numbers(nested: Any, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested dict (booleans and strings left out) as ``{"prefix.a.b": x}``."""
    flat: dict[str, float] = {}

    def walk(p: str, d: Any) -> None:
        if isinstance(d, dict):
            for k, v in d.items():
                walk(f"{p}.{k}" if p else str(k), v)
        elif isinstance(d, (int, float)) and not isinstance(d, bool):
            flat[p] = float(d)

    walk(prefix, nested)
    return flat


def log_dict_metrics(prefix: str, nested: dict, step: int | None = None) -> None:
    """Log a nested dict of numbers as MLflow metrics named ``prefix.a.b.c``."""
    import mlflow

    flat = flatten_numbers(nested, prefix)
    if flat:
        mlflow.log_metrics(flat, step=step)
