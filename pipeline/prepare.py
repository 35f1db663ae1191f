"""Stage `prepare`: resolve the data sources and build (or update) the validated manifest
(``data.manifest`` and its ``.summary.json``)."""

from __future__ import annotations

import sys

import mlflow
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipeline.entry import log, main
from pipeline.settings import Settings, load_settings
from pipeline.tracking import stage_run
from rlfn.data.manifest import build_manifest, summary_path
from rlfn.data.sources import Source, SourceError, resolve
from rlfn.errors import ConfigError, DataError


def check_sources(s: Settings) -> list[Source]:
    """``data.sources`` as checked ``Source``s; a bad declaration names its index."""
    out = []
    for i, d in enumerate(s.data.sources):
        try:
            out.append(Source.from_dict(d))
        except (SourceError, TypeError, ValueError) as e:
            raise ConfigError(f"{s.params_file}: data.sources[{i}]", str(e)) from None
    return out


# downloads and archive reads: I/O worth a retry
@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def resolve_sources(sources: list, cache: str):
    return resolve(sources, cache)


@task(cache_policy=NO_CACHE)  # DVC is the cache; inputs need not hash
def make_manifest(resolved, out: str, min_size: int, workers: int):
    return build_manifest(resolved, out, min_size=min_size, workers=workers)


@flow(name="rlfn-prepare", flow_run_name="prepare")
def prepare(settings: Settings | None = None) -> dict:
    s = settings or load_settings()
    d = s.data
    sources = check_sources(s)
    with stage_run("prepare", s, s.section("data")):
        summary = make_manifest(resolve_sources(sources, d.cache), d.manifest, d.min_size,
                                d.workers)
        for line in summary.lines():
            log.info(line)
        mlflow.log_params({"sources": len(d.sources), "min_size": d.min_size})
        mlflow.log_metrics({f"manifest_{k}": v for k, v in summary.counts.items()})
        mlflow.log_artifact(str(summary_path(d.manifest)))
        if not summary.usable:
            raise DataError(d.manifest, "no usable training image in the sources "
                                        "(every file was rejected: see the lines above)")
        return summary.to_dict()


if __name__ == "__main__":
    sys.exit(main(prepare, check=check_sources))
