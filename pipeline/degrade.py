"""Stage `degrade`: the LR image of every usable manifest row, per scale (MATLAB-exact
bicubic), into ``degrade.out`` (incremental: only new or changed images are made)."""

from __future__ import annotations

import sys

import mlflow
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipeline.entry import log, main
from pipeline.settings import Settings, load_settings
from pipeline.tracking import stage_run
from rlfn.data.degrade import degrade as make_lr
from rlfn.data.degrade import items_from_manifest
from rlfn.data.manifest import read_manifest


@task(cache_policy=NO_CACHE)  # DVC is the cache; inputs need not hash
def run(manifest: str, scales: list[int], out: str, workers: int):
    items = items_from_manifest(read_manifest(manifest))
    return make_lr(items, scales, out, workers=workers)


@flow(name="rlfn-degrade", flow_run_name="degrade")
def degrade(settings: Settings | None = None) -> dict:
    s = settings or load_settings()
    g = s.degrade
    with stage_run("degrade", s, s.section("degrade")):
        r = run(s.data.manifest, g.scales, g.out, g.workers)
        log.info(f"degrade: {r.made} made, {r.reused} reused, {r.removed} removed, "
                 f"{len(r.errors)} failed")
        for e in r.errors:
            log.error(str(e))
        mlflow.log_params({"scales": ",".join(map(str, g.scales))})
        mlflow.log_metrics({"lr_made": r.made, "lr_reused": r.reused, "lr_removed": r.removed,
                            "lr_failed": len(r.errors)})
        return r.to_dict()


if __name__ == "__main__":
    sys.exit(main(degrade))
