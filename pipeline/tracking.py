"""MLflow for the stages: the one tracking-URI rule, the project's experiment, and each
stage's run (``stage_run``) nested under one parent run per ``dvc repro``, tagged with the
vocabulary of ``pipeline.tags``.

* ``tracking_uri()``: ``MLFLOW_TRACKING_URI`` when set (a real server), else the project's
  SQLite store ``sqlite:///mlflow.db`` with artefacts in ``mlartifacts/`` beside it.
* ``stage_run(stage, params)``: stages of one repro find their parent by the tag
  ``rlfn.repro_id``: ``RLFN_REPRO_ID`` when set, else the pid and start time of the ``dvc``
  process that launched the stage (so a plain ``dvc repro`` groups its stages), else a fresh
  id (a stage run by hand gets its own parent). Each stage run is tagged with the git commit,
  the DVC stage name and a hash of the params it read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from pipeline import tags as T
from pipeline.dvcops import ROOT, commit_stage, deployed_outside_dvc, dvc_ancestor
from pipeline.services import describe_failure
from pipeline.settings import MlflowSettings, Settings
from rlfn.errors import DataError
from rlfn.io import atomic_write
from rlfn.log import get_logger

__all__ = ["tracking_uri", "experiment_id", "stage_run", "work_done", "repro_id", "git_commit",
           "git_state",
           "dvc_outputs", "experiment", "changed_text", "GIT_STATES",
           "params_hash", "process_age_s", "flatten_numbers", "log_dict_metrics"]

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


def git_commit() -> str:
    """HEAD, with ``-dirty`` when any tracked file differs from it (outputs included: the
    historical ``git_commit`` tag; :func:`git_state` tells the two kinds of change apart)."""
    return git_state()["commit"]


GIT_STATES = ("clean", "outputs-only", "dirty", "unknown")
CHANGED_MAX = 20  # paths listed in rlfn.git_changed (then "... (+N more)")


def _git(args: list[str], root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, timeout=10)


def _yaml_text(text: str | None, what: str) -> dict:
    import yaml

    if not text:
        return {}
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DataError(what, f"not valid YAML ({str(e).splitlines()[0]})") from None
    return doc if isinstance(doc, dict) else {}


def _out_path(entry: Any) -> str | None:
    """An ``outs``/``metrics``/``plots`` entry of dvc.yaml or dvc.lock -> its path."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        if "path" in entry:  # dvc.lock: {path, md5, ...}
            return str(entry["path"])
        if len(entry) == 1:  # dvc.yaml: {path: {cache: false, ...}}
            return str(next(iter(entry)))
    return None


_VAR = re.compile(r"\$\{\s*([A-Za-z0-9_.@-]+)\s*\}")


def _lookup(ctx: dict, dotted: str) -> Any:
    cur: Any = ctx
    for part in dotted.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, dict) and part.isdigit() and int(part) in cur:
            cur = cur[int(part)]
        else:
            raise KeyError(dotted)
    return cur


def _interpolate(text: str, ctx: dict) -> str | None:
    """dvc.yaml's ``${a.b}`` from ``ctx`` (params and vars); None when one is not there."""
    try:
        return _VAR.sub(lambda m: str(_lookup(ctx, m.group(1))), text)
    except KeyError:
        return None


def _yaml_outs(spec: str, root: Path) -> tuple[set[str], dict[str, str]]:
    """The outputs a ``dvc.yaml`` declares (``${...}`` resolved from ``params.yaml`` and the
    file's ``vars`` files; ``foreach`` expanded) and each stage's ``wdir``."""
    import posixpath

    base = posixpath.dirname(spec)
    yml = _yaml_text((root / spec).read_text() if (root / spec).is_file() else "", spec)
    ctx: dict = {}
    for f in ["params.yaml", *[v for v in yml.get("vars") or [] if isinstance(v, str)]]:
        p = root / base / f.split(":", 1)[0] if f != "params.yaml" else root / base / f
        if p.is_file():
            ctx.update(_yaml_text(p.read_text(), str(p.relative_to(root))))
    for v in yml.get("vars") or []:
        if isinstance(v, dict):
            ctx.update(v)
    stages = yml.get("stages") if isinstance(yml.get("stages"), dict) else {}
    outs: set[str] = set()
    wdirs: dict[str, str] = {}
    for name, st in stages.items():
        if not isinstance(st, dict):
            continue
        body, items = st, [({}, str(name))]
        if "foreach" in st and isinstance(st.get("do"), dict):
            body = st["do"]
            over = st["foreach"]
            if isinstance(over, str):
                m = _VAR.fullmatch(over.strip())
                try:
                    over = _lookup(ctx, m.group(1)) if m else None
                except KeyError:
                    over = None
            if isinstance(over, dict):
                items = [({"key": k, "item": v}, f"{name}@{k}") for k, v in over.items()]
            elif isinstance(over, list):
                items = [({"item": v}, f"{name}@{i}") for i, v in enumerate(over)]
            else:
                items = []
        for extra, stage_name in items:
            c = {**ctx, **extra}
            wdir = _interpolate(str(body.get("wdir", ".")), c) or "."
            wdirs[stage_name.split("@", 1)[0]] = wdir
            for key in ("outs", "metrics", "plots"):
                for e in body.get(key) or []:
                    path = _out_path(e)
                    path = _interpolate(path, c) if path else None
                    if path:
                        outs.add(posixpath.normpath(posixpath.join(base, wdir, path)))
    return outs, wdirs


def dvc_outputs(root: str | Path = ROOT) -> set[str]:
    """The paths (relative to ``root``, POSIX) that the project's stages write, read from
    DVC's own files: every ``dvc.yaml`` git tracks, the ``outs``/``metrics``/``plots`` of each
    stage as ``dvc.yaml`` declares them (``${...}`` from ``params.yaml`` and its ``vars``,
    ``foreach`` expanded; one that cannot be resolved is left out) and as its ``dvc.lock``
    records them (the working tree's and HEAD's), each under the stage's ``wdir``; and the
    ``dvc.lock`` files themselves (``dvc repro`` rewrites them).
    A folder output covers everything under it. Raises ``DataError`` naming a file that is
    not valid YAML."""
    import posixpath

    top = _git(["rev-parse", "--show-toplevel"], Path(root)).stdout.strip()
    root = Path(top or root)  # git's paths are relative to the top of the work tree
    listed = _git(["ls-files", "--", "dvc.yaml", "*/dvc.yaml"], root)
    outs: set[str] = set()
    for spec in listed.stdout.split():
        base = posixpath.dirname(spec)
        lock = posixpath.join(base, "dvc.lock")
        outs.add(lock)
        declared, wdirs = _yaml_outs(spec, root)
        outs |= declared
        head = _git(["show", f"HEAD:{lock}"], root)
        texts = [((root / lock).read_text() if (root / lock).is_file() else "", lock),
                 (head.stdout if head.returncode == 0 else "", f"HEAD:{lock}")]
        for text, what in texts:
            locked = _yaml_text(text, what).get("stages") or {}
            for name, st in (locked.items() if isinstance(locked, dict) else ()):
                wdir = wdirs.get(str(name).split("@", 1)[0], ".")
                for e in (st.get("outs") or []) if isinstance(st, dict) else []:
                    path = _out_path(e)
                    if path:
                        outs.add(posixpath.normpath(posixpath.join(base, wdir, path)))
    return outs


def _is_output(path: str, outs: set[str]) -> bool:
    parts = path.split("/")
    return any("/".join(parts[:i]) in outs for i in range(1, len(parts) + 1))


def git_state(root: str | Path | None = None) -> dict[str, Any]:
    """Where the code a run uses stands against git: ``{"commit", "state", "changed"}``.

    ``state``: ``clean`` (no tracked file differs from HEAD), ``outputs-only`` (only paths
    that stages write differ: :func:`dvc_outputs`, e.g. ``dvc.lock`` and the metrics a
    ``dvc repro`` rewrites before its last stage runs), ``dirty`` (code, params or anything
    else tracked differs: what ran is in no commit), ``unknown`` (no git). ``changed``: those
    other paths, sorted. ``commit``: HEAD, ``-dirty`` appended on any difference (what the
    ``git_commit`` tag always said). Untracked files are not looked at. ``root``: the
    checkout (default: this code's, ``pipeline.dvcops.ROOT``)."""
    root = Path(root if root is not None else ROOT)
    try:
        head = _git(["rev-parse", "HEAD"], root)
        commit = head.stdout.strip()
        if head.returncode != 0 or not commit:
            return {"commit": "unknown", "state": "unknown", "changed": []}
        status = _git(["status", "--porcelain", "--untracked-files=no", "-z"], root)
        if status.returncode != 0:
            return {"commit": "unknown", "state": "unknown", "changed": []}
        paths = []
        entries = status.stdout.split("\0")
        i = 0
        while i < len(entries):
            e = entries[i]
            i += 1
            if len(e) < 4:
                continue
            paths.append(e[3:])
            if e[0] in "RC":  # a rename/copy: the entry after it is the source path
                paths.append(entries[i])
                i += 1
        if not paths:
            return {"commit": commit, "state": "clean", "changed": []}
        outs = dvc_outputs(root)
        changed = sorted({p for p in paths if not _is_output(p, outs)})
        return {"commit": commit + "-dirty", "state": "dirty" if changed else "outputs-only",
                "changed": changed}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "state": "unknown", "changed": []}


def changed_text(changed: list[str], limit: int = CHANGED_MAX) -> str:
    """``a, b, c`` (at most ``limit`` paths, then ``... (+N more)``): the tag's value."""
    shown = ", ".join(changed[:limit])
    return shown + (f", ... (+{len(changed) - limit} more)" if len(changed) > limit else "")


def experiment() -> dict[str, str]:
    """The ``dvc exp run`` this process belongs to (``{}`` outside one): DVC's own variables
    ``DVC_EXP_NAME`` and ``DVC_EXP_BASELINE_REV``, and the git ref DVC saves the experiment
    under, ``refs/exps/<baseline[:2]>/<baseline[2:]>/<name>`` (made when the run ends;
    ``dvc exp push`` or ``exp.auto_push`` sends it to a git remote)."""
    name = os.environ.get("DVC_EXP_NAME", "").strip()
    base = os.environ.get("DVC_EXP_BASELINE_REV", "").strip()
    if not name:
        return {}
    out = {"name": name}
    if base:
        out["baseline"] = base
        out["ref"] = f"refs/exps/{base[:2]}/{base[2:]}/{name}"
    return out


def params_hash(section: Any) -> str:
    return hashlib.sha256(json.dumps(section, sort_keys=True, default=str).encode()).hexdigest()[:16]


def repro_id() -> str:
    rid = os.environ.get("RLFN_REPRO_ID") or dvc_ancestor()
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
    gs = git_state()
    commit = gs["commit"]
    found = mlflow.search_runs([exp_id], filter_string=f"tags.`{T.REPRO_ID}` = '{rid}' and "
                               f"tags.`{T.KIND}` = 'repro'", max_results=1, output_format="list")
    if found:
        parent_id = found[0].info.run_id
    else:
        parent = mlflow.MlflowClient().create_run(
            exp_id, run_name=f"repro {rid}", tags={T.REPRO_ID: rid, T.KIND: "repro",
                                                   T.GIT_COMMIT: commit})
        parent_id = parent.info.run_id
    client = mlflow.MlflowClient()
    fid = _flow_run_id()
    settle_unterminated(client, mlflow.get_tracking_uri())
    settle_orphans(client, exp_id, mine=fid)
    tags = {T.REPRO_ID: rid, T.KIND: "stage", T.DVC_STAGE: stage,
            T.GIT_COMMIT: commit, T.PARAMS_HASH: params_hash(
                section if section is not None else
                prm.raw if isinstance(prm, Settings) else prm),
            T.PARENT_RUN: parent_id, T.GIT_STATE: gs["state"]}
    if gs["changed"]:
        tags[T.GIT_CHANGED] = changed_text(gs["changed"])
    if fid:
        tags[T.FLOW_RUN] = fid
    exp = experiment()
    tags.update({k: exp[f] for k, f in ((T.EXP_NAME, "name"), (T.EXP_BASELINE, "baseline"),
                                        (T.EXP_REF, "ref")) if f in exp})
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
        if deployed_outside_dvc():
            commit_stage(stage)
    finally:
        _terminate(client, run.info.run_id, status)
        _terminate(client, parent_id, "FINISHED" if status == "FINISHED" else "FAILED")
    global _DONE
    _DONE = f"{stage} (MLflow run {run.info.run_id} FINISHED)"


_LOST = False  # set once a server was lost mid-stage (after the clients' retries)
_DONE: str | None = None  # set once a stage's work is done and recorded (its run FINISHED)


def work_done() -> str | None:
    """The stage whose work this process finished and recorded (``stage_run`` left without an
    error and its MLflow run FINISHED), or None: what ``pipeline.entry`` needs to tell a
    Prefect server lost after the work (the stage stands) from one lost during it (it fails)."""
    return _DONE


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
        import mlflow

        _journal_append({"run_id": run_id, "status": status, "uri": mlflow.get_tracking_uri()})
        log.warning(f"MLflow run {run_id} left {status!r} unrecorded: the tracking server "
                    f"is unreachable ({type(e).__name__}); the next stage records it "
                    f"({UNTERMINATED})")


# A run whose end could not be recorded (the server was lost) is journaled here and recorded
# by the next stage that reaches the same server: no run stays RUNNING for ever.
UNTERMINATED = ROOT / ".rlfn" / "unterminated-runs.jsonl"


@contextlib.contextmanager
def _journal_locked() -> Iterator[None]:
    """The journal's lock (appends and the settling rewrite exclude each other)."""
    import fcntl

    UNTERMINATED.parent.mkdir(parents=True, exist_ok=True)
    with open(UNTERMINATED.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _journal_append(entry: dict) -> None:
    with _journal_locked(), open(UNTERMINATED, "a") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def settle_unterminated(client: Any, uri: str) -> list[str]:
    """Record the end of every journaled run of the server at ``uri`` (one that is still
    ``RUNNING`` there); keep the others' entries. Returns the run ids recorded."""
    if not UNTERMINATED.exists():
        return []
    with _journal_locked():
        return _settle(client, uri)


def _settle(client: Any, uri: str) -> list[str]:
    try:
        lines = UNTERMINATED.read_text().splitlines()
    except FileNotFoundError:
        return []
    done, keep = [], []
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue  # a torn last line of a process killed mid-append
        if e.get("uri") != uri:
            keep.append(line)
            continue
        try:
            if client.get_run(e["run_id"]).info.status == "RUNNING":
                client.set_terminated(e["run_id"], e["status"])
                done.append(e["run_id"])
        except Exception as err:  # noqa: BLE001 - a run deleted meanwhile, or the server again
            if "RESOURCE_DOES_NOT_EXIST" not in str(err):
                keep.append(line)
    if keep:
        atomic_write(UNTERMINATED, "".join(x + "\n" for x in keep))
    else:
        UNTERMINATED.unlink(missing_ok=True)
    for rid in done:
        log.info(f"MLflow run {rid}: its end, lost with the tracking server, recorded now")
    return done


def _flow_run_id() -> str | None:
    """The Prefect flow run this process runs (a stage's flow), else None."""
    try:
        from prefect.runtime import flow_run

        fid = flow_run.id
    except Exception:  # noqa: BLE001 - no flow run context
        return None
    return str(fid) if fid else None


ENDED = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
ORPHANS_MAX = 50  # RUNNING stage runs looked at per stage start (a bound on its cost)


def settle_orphans(client: Any, exp_id: str, mine: str | None = None) -> list[str]:
    """Mark ``KILLED`` each stage run of experiment ``exp_id`` still ``RUNNING`` whose Prefect
    flow run (tag ``rlfn.prefect.flow_run_id``) has ended: its process died without ending it
    (a worker host gone, a SIGKILL), and no journal of its own can (that is on the dead host's
    disk). Prefect's verdict is the one that holds across hosts (the stack's automation marks a
    silent flow run CRASHED). A flow run Prefect does not know (a temporary server's, local
    mode) or has not ended is left alone, as is everything when Prefect cannot be asked. The
    stage run's repro parent run, when still RUNNING, is marked too (the repro died with its
    stage). The run ids marked."""
    if not os.environ.get("PREFECT_API_URL"):
        return []
    try:
        running = client.search_runs(
            [exp_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{T.KIND}` = "
                                    "'stage'", max_results=ORPHANS_MAX)
    except Exception as e:  # noqa: BLE001 - the stage's own calls will say what is wrong
        log.debug(f"settle_orphans: search failed: {e}")
        return []
    by_flow = {r.data.tags[T.FLOW_RUN]: r for r in running if r.data.tags.get(T.FLOW_RUN)}
    by_flow.pop(mine or "", None)
    if not by_flow:
        return []
    from uuid import UUID

    from prefect.client.orchestration import get_client

    done = []
    try:
        with get_client(sync_client=True) as pc:
            for fid, run in by_flow.items():
                try:
                    fr = pc.read_flow_run(UUID(fid))
                except Exception:  # noqa: BLE001 - not this server's flow run
                    continue
                state = fr.state_type.value if fr.state_type else ""
                if state not in ENDED:
                    continue
                client.set_terminated(run.info.run_id, "KILLED")
                done.append(run.info.run_id)
                log.info(f"MLflow run {run.info.run_id} ({run.data.tags.get(T.DVC_STAGE)}): "
                         f"its flow run {fid} ended {state} without ending it (its process "
                         "is gone): marked KILLED")
                # its repro's parent run, left RUNNING when the dead stage was the repro's
                # first (a later stage's start does not reopen it: the repro died with it)
                parent = run.data.tags.get(T.PARENT_RUN)
                if parent and client.get_run(parent).info.status == "RUNNING":
                    client.set_terminated(parent, "KILLED")
                    done.append(parent)
    except Exception as e:  # noqa: BLE001 - Prefect unreachable: left for a later stage
        log.debug(f"settle_orphans: {e}")
    return done


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc; elsewhere since this module loaded)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start / ticks)
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _LOADED


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
