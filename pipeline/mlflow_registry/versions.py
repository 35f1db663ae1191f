"""Model versions: figures as tags, logging and registering a model, reading versions back."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from .pyfunc import RLFNPyfunc, _requirements, _signature, _stage_code, example_image

__all__ = ["log_and_register", "version_weights", "figure_tags", "figures_of",
           "FIGURE_PREFIX", "RUNTIME_FIGURE", "MODEL_ARTIFACT"]

FIGURE_PREFIX = "rlfn.figure."
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


def log_and_register(weights: str | Path, scale: int, *, registered_name: str | None = None,
                     tags: Mapping[str, Any] | None = None,
                     figures: Mapping[str, float] | None = None) -> ModelVersion:
    """Log ``weights`` (our safetensors) as an MLflow pyfunc in the active run and register it.

    Checks first (nothing is logged when these fail): an active run exists, the file is an RLFN
    of the given ``scale``, the figures are finite numbers. ``figures`` become the version's
    ``rlfn.figure.*`` tags (what ``promote`` compares); ``tags`` are added as given.
    """
    from rlfn.io import sha256_file
    from rlfn.weights import load_model

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_and_register needs an active MLflow run (mlflow.start_run() or "
                           "pipeline._common.stage_run())")
    weights = Path(weights)
    loaded = load_model(weights, scale=int(scale))  # WeightsError names the file and reason
    name = registered_name or f"rlfn-x{int(scale)}"
    version_tags = {
        "rlfn.scale": str(int(scale)),
        "rlfn.model": loaded.name,
        "rlfn.weights_sha256": sha256_file(weights),
        "rlfn.run_id": run.info.run_id,
        **figure_tags(figures),
        **{str(k): str(v) for k, v in (tags or {}).items()},
    }
    mlflow.log_artifact(str(weights), artifact_path="weights")
    with tempfile.TemporaryDirectory(prefix="rlfn-pyfunc-") as tmp:
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=RLFNPyfunc(),
            artifacts={"weights": str(weights)},
            signature=_signature(),
            input_example=example_image(),
            pip_requirements=_requirements(),
            code_paths=_stage_code(Path(tmp)),
        )
    return mlflow.register_model(info.model_uri, name, tags=version_tags)


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
        row = {"version": int(mv.version), "sha256": tags.get("rlfn.weights_sha256"),
               "stage": tags.get("rlfn.stage"), "aliases": by_version.get(str(mv.version), [])}
        try:
            target = Path(dest) / f"v{mv.version}"
            row["path"] = str(Path(mlflow.artifacts.download_artifacts(
                run_id=mv.run_id, artifact_path="weights/model.safetensors",
                dst_path=str(target))))
        except (MlflowException, OSError) as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        out.append(row)
    return out
