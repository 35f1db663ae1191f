"""Stage `patches`: pack HR/LR training pairs into a memory-mapped Arrow store per scale
(``patches.out``/x<scale>.arrow)."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipeline.entry import log, main
from pipeline.settings import Settings, load_settings
from pipeline.tracking import stage_run
from rlfn.data.degrade import items_from_manifest, lr_path
from rlfn.data.manifest import read_manifest
from rlfn.data.patches import build_patch_store


@task(cache_policy=NO_CACHE)  # DVC is the cache; inputs need not hash
def pack(manifest: str, lr_dir: str, scale: int, out: Path, sub_image):
    items = items_from_manifest(read_manifest(manifest), split="train")
    pairs = [(it.key, it.hr_path, lr_path(lr_dir, scale, it.key)) for it in items]
    return build_patch_store(pairs, scale, out, sub_image=tuple(sub_image) if sub_image else None)


@flow(name="rlfn-patches", flow_run_name="patches")
def patches(settings: Settings | None = None) -> None:
    s = settings or load_settings()
    with stage_run("patches", s, s.section("patches")):
        for scale in s.degrade.scales:
            info = pack(s.data.manifest, s.degrade.out, scale, s.patches.store(scale),
                        s.patches.sub_image)
            log.info(f"patches x{scale}: {info}")
            mlflow.log_metric(f"patch_records_x{scale}", getattr(info, "records", 0))


if __name__ == "__main__":
    sys.exit(main(patches))
