"""``rlfn lineage``: a registered version read back from MLflow and checked against a workspace.

* :func:`lineage_report` reads a registered version (``models:/NAME@ALIAS``,
  ``models:/NAME/VERSION`` or ``NAME/VERSION``) and its run from MLflow, and checks each
  recorded data hash against the workspace (:func:`workspace_state`: ``present``, ``differs``
  or ``missing``, by ``rlfn.lineage.dvc_md5``, DVC's md5 computed without DVC). MLflow is
  imported only there. The tracking store is the stages' own: ``MLFLOW_TRACKING_URI``, else
  the SQLite store of the workspace's ``params.yaml`` (``pipeline.tracking.tracking_uri``, the
  one rule), which must exist.
* :func:`format_report`: the report as the lines ``rlfn lineage`` prints.

The ``rlfn`` command (``rlfn.cli.cmd_lineage``) imports this module when ``rlfn lineage``
runs: the library's one entry into ``pipeline`` (``tests/test_layering.py`` allows exactly
that import).

Tags written on a model version by ``pipeline.mlflow_registry.log_and_register`` and read
here:

* ``rlfn.data.<name>.path`` / ``rlfn.data.<name>.md5``: each input of the stage
  (``manifest``, ``patches``, ``val``, ``init``) and its output ``weights``, with its DVC md5.
* ``rlfn.git_commit`` (``-dirty`` appended when tracked files had changes),
  ``rlfn.git_dirty`` (``true``/``false``), ``rlfn.git_state`` (``clean`` / ``outputs-only``:
  only files the stages write differed, the code and params are the commit's / ``dirty``:
  code or params differed, ``rlfn.git_changed`` naming them), ``rlfn.params_hash``,
  ``rlfn.repro_id`` and ``rlfn.repro_run_id`` (the parent MLflow run of the ``dvc repro``),
  ``rlfn.dvc_stage``; from a ``dvc exp run``, ``rlfn.exp.name``, ``rlfn.exp.baseline`` and
  ``rlfn.exp.ref`` (the experiment's git ref); ``rlfn.git_committed``: the commit a ``dirty``
  version's code and params were found in when ``promote`` (under ``dvc repro``) moved it.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from pipeline import tags as T
from pipeline.settings import read_params
from pipeline.tracking import tracking_uri as stages_tracking_uri
from rlfn.errors import DataError, UsageError


def _git_state(tags: dict) -> str:
    from pipeline.mlflow_registry.versions import git_state

    return git_state(tags)


def _git_note(tags: dict) -> str:
    from pipeline.mlflow_registry.versions import git_state_note

    return git_state_note(tags)
from rlfn.lineage import dvc_md5

__all__ = ["workspace_state", "parse_model_ref", "default_tracking_uri", "lineage_report",
           "format_report"]



def workspace_state(path: str | Path, md5: str | None, root: str | Path = ".") -> str:
    """``present`` / ``differs`` / ``missing``: whether ``root/path`` holds the data hashed
    ``md5`` now (``unknown`` when nothing was recorded)."""
    if not md5:
        return "unknown"
    p = Path(root) / path
    if not p.exists():
        return "missing"
    return "present" if dvc_md5(p) == md5 else "differs"


# --------------------------------------------------------------------------------------------
# Reading a registered version back

_REF = re.compile(r"^(?:models:/)?(?P<name>[^@/]+?)(?:@(?P<alias>[^@/]+)|/(?P<version>\d+))$")


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``NAME/VERSION`` (or ``NAME@ALIAS``)
    -> ``(name, alias, version)``; a ``UsageError`` for anything else."""
    m = _REF.match(ref.strip())
    if not m:
        raise UsageError(ref, "expected models:/NAME@ALIAS, models:/NAME/VERSION or NAME/VERSION")
    return m.group("name"), m.group("alias"), m.group("version")


def default_tracking_uri(root: str | Path = ".") -> str:
    """The store the stages of the workspace ``root`` log to: ``MLFLOW_TRACKING_URI``, else
    the SQLite store its ``params.yaml`` names (``mlflow.db``), which must exist. The rule is
    ``pipeline.tracking.tracking_uri``'s, with ``root`` for the project folder."""
    root = Path(root)
    prm = read_params(root / "params.yaml") if (root / "params.yaml").is_file() else {}
    uri = stages_tracking_uri(prm, root=root)
    if uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise UsageError("MLFLOW_TRACKING_URI", f"not set, and there is no tracking store "
                                                    f"at {path} (run dvc repro, or point "
                                                    "MLFLOW_TRACKING_URI at the server)")
    return uri


def _check_local_store(uri: str) -> None:
    """MLflow would create an empty database for a ``sqlite:///`` path that does not exist:
    refuse it instead (a typo would otherwise look like an empty registry)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        if str(path) != ":memory:" and not path.is_file():
            raise UsageError(uri, "no such tracking store (the SQLite file does not exist)")


def _one_line(e: BaseException) -> str:
    text = getattr(e, "message", None) or str(e) or type(e).__name__
    return text.strip().splitlines()[0][:300]


def lineage_report(ref: str, root: str | Path = ".", tracking_uri: str | None = None
                   ) -> dict[str, Any]:
    """Everything ``rlfn lineage`` prints, as a dict: the version, its figures, its run and
    metrics, the commit, params hash, repro and each recorded data hash with its state in the
    workspace ``root``. Raises ``DataError`` (unknown model/alias/version) or ``UsageError``
    (bad reference, unreachable or missing tracking store)."""
    name, alias, version = parse_model_ref(ref)
    root = Path(root)
    uri = tracking_uri or default_tracking_uri(root)
    _check_local_store(uri)
    if importlib.util.find_spec("mlflow") is None:
        raise UsageError("lineage", "needs MLflow: pip install -e '.[pipeline]'")
    # An unreachable server: fail in seconds, not after MLflow's minutes of retries (unless
    # the caller set these itself).
    quick = {k: v for k, v in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"),
                                ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")) if k not in os.environ}
    os.environ.update(quick)
    try:
        return _report(name, alias, version, root, uri)
    finally:
        for k in quick:
            os.environ.pop(k, None)


def _report(name: str, alias: str | None, version: str | None, root: Path,
            uri: str) -> dict[str, Any]:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    what = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    try:
        mv = (client.get_model_version_by_alias(name, alias) if alias
              else client.get_model_version(name, version))
    except MlflowException as e:
        code = getattr(e, "error_code", "")
        if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            raise DataError(what, f"no such registered model, alias or version in {uri} "
                                  f"({_one_line(e)})") from None
        if "failed with exception" in str(e) or "Max retries" in str(e):
            raise UsageError(uri, "tracking server unreachable (connection failed: is it "
                                  "running, and is MLFLOW_TRACKING_URI right?)") from None
        raise UsageError(uri, f"tracking server error: {_one_line(e)}") from None
    except Exception as e:  # connection refused, DNS, timeouts: requests' and urllib3's own
        raise UsageError(uri, f"tracking store unreachable ({type(e).__name__}: "
                              f"{_one_line(e)})") from None
    tags = dict(mv.tags or {})
    aliases = []
    try:
        aliases = sorted(a for a, v in (client.get_registered_model(name).aliases or {}).items()
                         if str(v) == str(mv.version))
    except MlflowException:
        pass
    run: dict[str, Any] = {"id": mv.run_id}
    if mv.run_id:
        try:
            r = client.get_run(mv.run_id)
            run.update(name=r.info.run_name, status=r.info.status,
                       experiment_id=r.info.experiment_id,
                       metrics=dict(sorted(r.data.metrics.items())),
                       parent=r.data.tags.get("mlflow.parentRunId"),
                       inputs=[{"name": d.dataset.name, "digest": d.dataset.digest,
                                "source": d.dataset.source,
                                "tags": {t.key: t.value for t in d.tags}}
                               for d in (r.inputs.dataset_inputs if r.inputs else [])])
        except MlflowException as e:
            run["error"] = _one_line(e)
    data = {}
    for key, value in sorted(tags.items()):
        if key.startswith(T.DATA_PREFIX) and key.endswith(".path"):
            item = key[len(T.DATA_PREFIX):-len(".path")]
            md5 = tags.get(f"{T.DATA_PREFIX}{item}.md5")
            data[item] = {"path": value, "md5": md5,
                          "workspace": workspace_state(value, md5, root)}
    figures = {k[len(T.FIGURE_PREFIX):]: v for k, v in sorted(tags.items())
               if k.startswith(T.FIGURE_PREFIX)}
    return {
        "name": mv.name, "version": int(mv.version), "aliases": aliases,
        "description": mv.description or "", "tracking_uri": uri,
        "figures": figures, "run": run,
        "git_commit": tags.get(T.V_GIT_COMMIT), "git_dirty": tags.get(T.V_GIT_DIRTY),
        "git_state": _git_state(tags), "git_changed": tags.get(T.V_GIT_CHANGED),
        "git_committed": tags.get(T.V_GIT_COMMITTED),
        "experiment": {k: tags[t] for k, t in (("name", T.V_EXP_NAME),
                                               ("baseline", T.V_EXP_BASELINE),
                                               ("ref", T.V_EXP_REF)) if tags.get(t)},
        "params_hash": tags.get(T.V_PARAMS_HASH), "repro_id": tags.get(T.V_REPRO_ID),
        "repro_run_id": tags.get(T.V_REPRO_RUN_ID), "dvc_stage": tags.get(T.V_DVC_STAGE),
        "stage": tags.get(T.V_STAGE), "model": tags.get(T.V_MODEL),
        "scale": tags.get(T.V_SCALE), "weights_sha256": tags.get(T.V_WEIGHTS_SHA256),
        "data": data,
    }


def format_report(rep: dict[str, Any]) -> list[str]:
    """The report as lines of text (what ``rlfn lineage`` prints)."""
    def show(v: Any) -> str:
        return "-" if v in (None, "") else str(v)

    al = f" @{', @'.join(rep['aliases'])}" if rep["aliases"] else ""
    lines = [f"{rep['name']} version {rep['version']}{al}  ({show(rep['model'])} "
             f"x{show(rep['scale'])}, stage {show(rep['stage'])})"]
    run = rep["run"]
    lines.append(f"  run         {show(run.get('id'))} ({show(run.get('name'))}, "
                 f"{show(run.get('status'))})")
    lines.append(f"  repro       {show(rep['repro_id'])} (parent run "
                 f"{show(rep['repro_run_id'] or run.get('parent'))})")
    lines.append(f"  commit      {show(rep['git_commit'])}"
                 + _git_note({T.V_GIT_STATE: rep.get("git_state") or "",
                              T.V_GIT_DIRTY: str(rep.get("git_dirty") or ""),
                              T.V_GIT_CHANGED: rep.get("git_changed") or ""}))
    if rep.get("git_committed"):
        lines.append(f"  committed   {rep['git_committed']} (holds its code and params: "
                     "found when it was promoted)")
    exp = rep.get("experiment") or {}
    if exp:
        lines.append(f"  experiment  {exp['name']}"
                     + (f" (ref {exp['ref']}: dvc exp pull <remote> {exp['name']})"
                        if exp.get("ref") else ""))
    lines.append(f"  params hash {show(rep['params_hash'])}   dvc stage "
                 f"{show(rep['dvc_stage'])}")
    if rep["figures"]:
        lines.append("  figures     " + ", ".join(f"{k} {v}" for k, v in rep["figures"].items()))
    metrics = run.get("metrics") or {}
    if metrics:
        lines.append("  run metrics " + ", ".join(f"{k} {v:.6g}" for k, v in metrics.items()))
    for d in run.get("inputs") or []:
        t = d["tags"]
        counts = ", ".join(f"{k[len(T.DATASET_PREFIX):]} {v}" for k, v in sorted(t.items())
                           if k.startswith(f"{T.DATASET_PREFIX}rows"))
        lines.append(f"  dataset     {d['name']} digest {d['digest']}"
                     + (f" ({counts})" if counts else ""))
    if rep["data"]:
        width = max(len(k) for k in rep["data"])
        lines.append("  data        (DVC md5; workspace: present / differs / missing)")
        for item, d in rep["data"].items():
            lines.append(f"    {item:<{width}}  {d['workspace']:<8} {show(d['md5'])}  "
                         f"{d['path']}")
    else:
        lines.append("  data        no data hashes recorded on this version")
    return lines
