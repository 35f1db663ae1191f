"""Stage `prepare`: resolve the data sources and build (or update) the validated manifest."""

from __future__ import annotations

import mlflow
from prefect import flow, task

from pipeline._common import params, stage_run
from rlfn.data.manifest import build_manifest, summary_path
from rlfn.data.sources import resolve


@task(retries=2, retry_delay_seconds=5)  # downloads and archive reads: I/O worth a retry
def resolve_sources(sources: list, cache: str):
    return resolve(sources, cache)


@task
def make_manifest(resolved, out: str, min_size: int, workers: int):
    return build_manifest(resolved, out, min_size=min_size, workers=workers)


@flow(name="rlfn-prepare", flow_run_name="prepare")
def prepare() -> dict:
    prm = params()
    d = prm["data"]
    with stage_run("prepare", prm, d):
        summary = make_manifest(resolve_sources(d["sources"], d["cache"]), d["manifest"],
                                d["min_size"], d.get("workers", 2))
        for line in summary.lines():
            print(line)
        mlflow.log_params({"sources": len(d["sources"]), "min_size": d["min_size"]})
        mlflow.log_metrics({f"manifest_{k}": v for k, v in summary.counts.items()})
        mlflow.log_artifact(str(summary_path(d["manifest"])))
        if not summary.usable:
            raise SystemExit("prepare: no usable training image in the sources")
        return summary.to_dict()


if __name__ == "__main__":
    prepare()
