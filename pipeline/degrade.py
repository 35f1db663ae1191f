"""Stage `degrade`: the LR image of every usable manifest row, per scale (MATLAB bicubic)."""

from __future__ import annotations

import mlflow
from prefect import flow, task

from pipeline._common import params, stage_run
from rlfn.data.degrade import degrade as make_lr
from rlfn.data.degrade import items_from_manifest
from rlfn.data.manifest import read_manifest


@task
def run(manifest: str, scales: list[int], out: str, workers: int):
    items = items_from_manifest(read_manifest(manifest))
    return make_lr(items, scales, out, workers=workers)


@flow(name="rlfn-degrade", flow_run_name="degrade")
def degrade() -> dict:
    prm = params()
    g = prm["degrade"]
    with stage_run("degrade", prm, g):
        s = run(prm["data"]["manifest"], g["scales"], g["out"], g.get("workers", 2))
        print(f"degrade: {s.made} made, {s.reused} reused, {s.removed} removed, "
              f"{len(s.errors)} failed")
        for e in s.errors:
            print(f"error: {e}")
        mlflow.log_params({"scales": ",".join(map(str, g["scales"]))})
        mlflow.log_metrics({"lr_made": s.made, "lr_reused": s.reused, "lr_removed": s.removed,
                            "lr_failed": len(s.errors)})
        return s.to_dict()


if __name__ == "__main__":
    degrade()
