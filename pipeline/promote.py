"""Stage `promote`: move the registry alias `champion` to the new model only if it is better.

The candidate is the last stage's registered version. Its figures (the gate metric from
``metrics/evaluate.json``, CPU runtime from ``metrics/profile.json``) are recorded on the
version, then ``pipeline.registry.promote`` decides under a lock: promoted only if it beats
the current champion by more than ``promote.margin`` and stays within
``promote.runtime_budget_ms``. The decision and both models' figures go to
``metrics/promote.json`` and onto the version's tags.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from prefect import flow, task

from pipeline._common import params, stage_run, tracking_uri, write_json
from pipeline.registry import log_and_register, promote as decide


@task(retries=2, retry_delay_seconds=5)
def candidate(models: Path, scale: int, name: str, figures: dict):
    """The stage-3 version (re-registered if this tracking store has never seen it)."""
    client = mlflow.MlflowClient()
    info_file = models / "stage3" / "mlflow.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    version = None
    if info.get("registered_model") == name:
        try:
            version = client.get_model_version(name, str(info["version"]))
        except mlflow.exceptions.MlflowException:
            version = None
    if version is None:
        version = log_and_register(models / "stage3" / "model.safetensors", scale,
                                   registered_name=name, tags={"rlfn.stage": "3"})
    for k, v in figures.items():
        client.set_model_version_tag(name, version.version, f"rlfn.figure.{k}", str(v))
    return version


@flow(name="rlfn-promote", flow_run_name="promote")
def promote() -> dict:
    prm = params()
    p, scale = prm["promote"], prm["train"]["scale"]
    name = p.get("registered_model") or f"rlfn-x{scale}"
    models = Path(prm.get("train_launch", {}).get("out", "models"))
    evaluation = json.loads(Path(prm["evaluate"]["out"]).read_text())
    prof = json.loads(Path(prm["profile"]["out"]).read_text())
    figures = {p["gate_metric"]: evaluation[p["gate_metric"]],
               "runtime_ms_cpu": prof["runtime_ms_cpu"], "params": prof["params"]}
    with stage_run("promote", prm, p):
        mlflow.set_tracking_uri(tracking_uri(prm))
        version = candidate(models, scale, name, figures)
        decision = decide(name, version.version, gate_metric=p["gate_metric"],
                          margin=float(p.get("margin", 0.0)),
                          runtime_budget_ms=p.get("runtime_budget_ms"))
        out = {"promoted": int(bool(decision["promoted"])), "decision": decision}
        write_json(p["out"], out)
        mlflow.log_metric("promoted", out["promoted"])
        mlflow.set_tags({"promotion.promoted": str(bool(decision["promoted"])),
                         "promotion.reason": decision["reason"]})
        print(f"promote: {'PROMOTED' if decision['promoted'] else 'kept the champion'} - "
              f"{decision['reason']}")
        return out


if __name__ == "__main__":
    promote()
