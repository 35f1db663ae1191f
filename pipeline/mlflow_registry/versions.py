"""Model versions: figures as tags, logging and registering a model, reading versions back."""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from pipeline import tags as T
from pipeline.tags import DATA_PREFIX, FIGURE_PREFIX
from rlfn import failpoints

from .pyfunc import MODEL_CODE, _requirements, _signature, _stage_code, example_image

__all__ = ["log_and_register", "version_weights", "figure_tags", "figures_of", "git_state",
           "git_state_note",
           "FIGURE_PREFIX", "RUNTIME_FIGURE", "MODEL_ARTIFACT", "DATA_PREFIX"]

RUNTIME_FIGURE = "runtime_ms_cpu"
MODEL_ARTIFACT = "model"


def _client() -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow.get_tracking_uri(),
                        registry_uri=mlflow.get_registry_uri())


# --------------------------------------------------------------------------------------------
# Figures and tags


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"figure {name!r} must be a number, got a bool")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"figure {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"figure {name!r} must be finite, got {v}")
    return v


def figure_tags(figures: Mapping[str, Any] | None) -> dict[str, str]:
    """``{"mean_psnr_y": 30.1}`` -> ``{"rlfn.figure.mean_psnr_y": "30.1"}`` (finite numbers)."""
    return {f"{FIGURE_PREFIX}{k}": repr(_finite(k, v)) for k, v in (figures or {}).items()}


def figures_of(mv: ModelVersion) -> dict[str, float]:
    """The ``rlfn.figure.*`` tags of a model version, as floats (unparsable ones skipped)."""
    out: dict[str, float] = {}
    for k, v in (mv.tags or {}).items():
        if k.startswith(FIGURE_PREFIX):
            try:
                out[k[len(FIGURE_PREFIX):]] = float(v)
            except (TypeError, ValueError):
                pass
    return out


# --------------------------------------------------------------------------------------------
# Logging and registering


def _display(path: str | Path) -> str:
    """``path`` relative to the working directory when inside it (the project root, where
    stages run), else absolute: what a tag records and ``rlfn lineage`` compares."""
    p = Path(path)
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(p.resolve())


def _hash_data(data: Mapping[str, str | Path | None]) -> dict[str, dict[str, str]]:
    """``{name: path}`` -> ``{name: {"path", "md5"}}`` (DVC md5s); every path must exist."""
    from rlfn.lineage import dvc_md5

    out = {}
    for name, path in data.items():
        if path is None:
            continue
        if not str(name) or "/" in str(name):
            raise ValueError(f"data name {name!r}: expected a plain word (manifest, patches, ...)")
        md5 = dvc_md5(path)
        if md5 is None:
            raise FileNotFoundError(f"data {name!r}: {path} does not exist (nothing to hash)")
        out[str(name)] = {"path": _display(path), "md5": md5}
    return out


def _manifest_dataset(path: Path, digest: str):
    """The manifest (``rlfn.data.manifest``'s Parquet file) as an MLflow dataset (digest: its
    DVC md5) and its row counts (all, usable, rejected, per split)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    import mlflow.data

    try:
        table = pq.read_table(path)
        status = table["status"].to_pylist()
        splits = pc.value_counts(pc.fill_null(table["split"], "none")).to_pylist()
    except (OSError, KeyError, ValueError) as e:  # pyarrow's errors are OSError/ValueError
        raise ValueError(f"{path}: cannot read it as the manifest ({e})") from None
    counts = {"rows": len(status),
              "rows.usable": sum(s in ("ok", "converted") for s in status),
              "rows.rejected": sum(s == "rejected" for s in status)}
    for d in sorted(splits, key=lambda d: str(d["values"])):
        counts[f"rows.split.{d['values']}"] = int(d["counts"])
    if "notes" in table.column_names:  # list cells: joined, so MLflow can infer a schema
        notes = ["; ".join(n or []) for n in table["notes"].to_pylist()]
        table = table.drop(["notes"])
    else:
        notes = None
    df = table.to_pandas()
    if notes is not None:
        df["notes"] = notes
    with warnings.catch_warnings():
        # MLflow's own noise: a local path matches its local source class twice (registered
        # for "" and "file"), and a hint about integer columns (a manifest has no gaps)
        warnings.filterwarnings("ignore", message="The specified dataset source can be "
                                "interpreted in multiple ways")
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        dataset = mlflow.data.from_pandas(df, source=_display(path), name=path.stem,
                                          digest=digest)
        dataset.schema  # noqa: B018 - inferred (and warned about) here, not at log_input
    return dataset, counts


def _patch_counts(folder: Path, scale: int) -> dict[str, int]:
    """Images and records from the patch store's JSON sidecar (``x<scale>.json`` beside
    ``x<scale>.arrow``, ``rlfn.data.patches.StoreInfo``), when it is there."""
    import json

    side = folder / f"x{scale}.json" if folder.is_dir() else folder.with_suffix(".json")
    try:
        info = json.loads(side.read_text())
        return {"patches.images": int(info["images"]), "patches.records": int(info["records"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def git_state(tags: Mapping[str, str]) -> str:
    """A version's ``rlfn.git_state`` (``clean`` / ``outputs-only`` / ``dirty`` /
    ``unknown``); for a version registered before that tag, from ``rlfn.git_dirty``
    (``true`` -> ``dirty``: outputs and code were not told apart then)."""
    state = tags.get(T.V_GIT_STATE)
    if state:
        return state
    return {"true": "dirty", "false": "clean"}.get(tags.get(T.V_GIT_DIRTY, ""), "unknown")


def git_state_note(tags: Mapping[str, str]) -> str:
    """`` (clean)``, `` (outputs only: ...)``, `` (dirty: ...)``: what the commit means."""
    state = git_state(tags)
    if state == "clean":
        return " (clean)"
    if state == "outputs-only":
        return (" (outputs only: code and params are the commit's; only what the stages "
                "write differs)")
    if state == "dirty":
        changed = tags.get(T.V_GIT_CHANGED)
        return (" (dirty: code or params differ from it"
                + (f": {changed}" if changed else "") + ")")
    return ""


def _description(name: str, version_tags: Mapping[str, str], hashed: Mapping[str, dict],
                 counts: Mapping[str, int], figures: Mapping[str, str]) -> str:
    """A few Markdown lines for the MLflow UI: what, from which run, commit and data."""
    t = version_tags
    stage = t.get(T.V_DVC_STAGE) or t.get(T.V_STAGE) or "-"
    lines = [f"**{t[T.V_MODEL]} x{t[T.V_SCALE]}** from `{stage}`, run "
             f"`{t[T.V_RUN_ID]}`"
             + (f" of repro `{t[T.V_REPRO_ID]}` (parent run `{t[T.V_REPRO_RUN_ID]}`)"
                if t.get(T.V_REPRO_ID) else "") + ".",
             f"- commit `{t.get(T.V_GIT_COMMIT, 'unknown')}`" + git_state_note(t)
             + f"; params hash `{t.get(T.V_PARAMS_HASH, '-')}`"]
    if t.get(T.V_EXP_NAME):
        lines.append(f"- experiment `{t[T.V_EXP_NAME]}`"
                     + (f" (`{t[T.V_EXP_REF]}`)" if t.get(T.V_EXP_REF) else ""))
    for item, d in hashed.items():
        extra = ""
        if item == "manifest" and counts.get("rows") is not None:
            extra = (f" ({counts['rows']} rows: {counts.get('rows.usable', 0)} usable, "
                     f"{counts.get('rows.rejected', 0)} rejected)")
        elif item == "patches" and "patches.images" in counts:
            extra = (f" ({counts['patches.images']} images, {counts['patches.records']} "
                     "records)")
        lines.append(f"- {item}: `{d['path']}` md5 `{d['md5']}`{extra}")
    if figures:
        lines.append("- figures: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    lines.append(f"- lineage and workspace check: `rlfn lineage models:/{name}/<version>`")
    return "\n".join(lines)


def log_and_register(weights: str | Path, scale: int, *, registered_name: str | None = None,
                     tags: Mapping[str, Any] | None = None,
                     figures: Mapping[str, float] | None = None,
                     data: Mapping[str, str | Path | None] | None = None) -> ModelVersion:
    """Log ``weights`` (our safetensors) as an MLflow pyfunc in the active run and register it.

    Checks first (nothing is logged when these fail): an active run exists, the file is an RLFN
    of the given ``scale``, the figures are finite numbers, every ``data`` path exists.
    ``figures`` become the version's ``rlfn.figure.*`` tags (what ``promote`` compares);
    ``tags`` are added as given.

    Lineage: ``data`` (``{name: path}``, e.g. ``manifest``, ``patches``, ``val``, ``init``:
    what the stage consumed) and the weights themselves are recorded with their DVC md5s as
    ``rlfn.data.<name>.path``/``.md5``; the run's ``git_commit``, ``params_hash``,
    ``rlfn.repro_id``, parent run and ``dvc_stage`` (``pipeline.tracking.stage_run``'s tags)
    are copied as ``rlfn.git_commit`` (``rlfn.git_dirty``), ``rlfn.params_hash``,
    ``rlfn.repro_id``, ``rlfn.repro_run_id``, ``rlfn.dvc_stage``. A ``manifest`` is also
    logged as the run's MLflow dataset input (context ``training``; digest: its DVC md5;
    input tags: its row counts). The version is created with all its tags and a short
    description in one registry call: it never exists half-tagged.
    """
    from mlflow.exceptions import MlflowException

    from rlfn.io import sha256_file

    from rlfn.weights import load_model

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_and_register needs an active MLflow run (mlflow.start_run() or "
                           "pipeline.tracking.stage_run())")
    weights = Path(weights)
    loaded = load_model(weights, scale=int(scale))  # WeightsError names the file and reason
    name = registered_name or f"rlfn-x{int(scale)}"
    fig_tags = figure_tags(figures)
    hashed = _hash_data({**(data or {}), "weights": weights})
    client = _client()
    run_tags = client.get_run(run.info.run_id).data.tags
    commit = run_tags.get(T.GIT_COMMIT, "unknown")
    lineage = {
        T.V_GIT_COMMIT: commit,
        T.V_GIT_DIRTY: ("unknown" if commit == "unknown"
                        else "true" if commit.endswith("-dirty") else "false"),
        T.V_PARAMS_HASH: run_tags.get(T.PARAMS_HASH),
        T.V_REPRO_ID: run_tags.get(T.REPRO_ID),
        T.V_REPRO_RUN_ID: run_tags.get(T.PARENT_RUN),
        T.V_DVC_STAGE: run_tags.get(T.DVC_STAGE),
        T.V_GIT_STATE: run_tags.get(T.GIT_STATE),
        T.V_GIT_CHANGED: run_tags.get(T.GIT_CHANGED),
        T.V_EXP_NAME: run_tags.get(T.EXP_NAME),
        T.V_EXP_BASELINE: run_tags.get(T.EXP_BASELINE),
        T.V_EXP_REF: run_tags.get(T.EXP_REF),
    }
    version_tags = {
        T.V_SCALE: str(int(scale)),
        T.V_MODEL: loaded.name,
        T.V_WEIGHTS_SHA256: sha256_file(weights),
        T.V_RUN_ID: run.info.run_id,
        **{k: v for k, v in lineage.items() if v},
        **{f"{DATA_PREFIX}{k}.{f}": v for k, d in hashed.items() for f, v in d.items()},
        **fig_tags,
        **{str(k): str(v) for k, v in (tags or {}).items()},
    }
    counts: dict[str, int] = {}
    if data and data.get("patches") is not None:
        counts.update(_patch_counts(Path(data["patches"]), int(scale)))
    if data and data.get("manifest") is not None:
        dataset, rows = _manifest_dataset(Path(data["manifest"]), hashed["manifest"]["md5"])
        counts.update(rows)
        mlflow.log_input(dataset, context="training",
                         tags={f"{T.DATASET_PREFIX}{k}": str(v) for k, v in counts.items()})
    description = _description(name, version_tags, hashed, counts,
                               {k[len(FIGURE_PREFIX):]: v for k, v in fig_tags.items()})

    mlflow.log_artifact(str(weights), artifact_path="weights")
    failpoints.hit("register.weights_logged")  # where a fault test kills the server (else no-op)
    with tempfile.TemporaryDirectory(prefix="rlfn-pyfunc-") as tmp:
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(MODEL_CODE),  # models from code: nothing pickled
            artifacts={"weights": str(weights)},
            signature=_signature(),
            input_example=example_image(),
            pip_requirements=_requirements(),
            code_paths=_stage_code(Path(tmp)),
        )
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    return client.create_model_version(name, source=info.model_uri, run_id=run.info.run_id,
                                       tags=version_tags, description=description,
                                       model_id=info.model_id)


# --------------------------------------------------------------------------------------------
# Reading versions back


def version_weights(registered_name: str, dest: str | Path) -> list[dict[str, Any]]:
    """Every version of ``registered_name`` with its weights file downloaded under ``dest``:
    ``[{"version", "sha256", "path", "stage", "aliases"}]``, oldest first. A version whose
    weights cannot be fetched is reported with ``"error"`` instead of ``"path"``; no such
    registered model gives ``[]``."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        versions = client.search_model_versions(f"name = '{registered_name}'")
    except MlflowException:
        return []
    try:
        aliases = client.get_registered_model(registered_name).aliases or {}
    except MlflowException:
        aliases = {}
    by_version: dict[str, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(str(v), []).append(alias)
    out = []
    for mv in sorted(versions, key=lambda m: int(m.version)):
        tags = mv.tags or {}
        row = {"version": int(mv.version), "sha256": tags.get(T.V_WEIGHTS_SHA256),
               "stage": tags.get(T.V_STAGE), "aliases": by_version.get(str(mv.version), [])}
        try:
            target = Path(dest) / f"v{mv.version}"
            row["path"] = str(Path(mlflow.artifacts.download_artifacts(
                run_id=mv.run_id, artifact_path="weights/model.safetensors",
                dst_path=str(target))))
        except (MlflowException, OSError) as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        out.append(row)
    return out
