"""Stage `evaluate`: Y-PSNR/SSIM of the last stage's model on the benchmark sets, and of
every stage's model and bicubic on the stage sets.

``evaluate.out`` (metrics/evaluate.json): the last stage's model on ``evaluate.sets`` (and
on each of ``evaluate.optional_sets`` whose folder exists), keyed ``x<scale>/<set>/<metric>``,
plus ``mean_psnr_y`` over ``evaluate.sets`` (the promotion gate's figure).
``evaluate.stages_out`` (metrics/evaluate_stages.json): ``<model>/<set>/{psnr_y, ssim_y}`` of
bicubic and every stage on ``evaluate.stage_sets``. ``evaluate.plot``
(plots/psnr_by_stage.csv): a DVC plot of both. Models run through ``evaluate.backend``, an
exact inference backend (``rlfn.backends``: within 0.01 dB of eager fp32).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import mlflow
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipeline.entry import log, main
from pipeline.settings import Settings, load_settings
from pipeline.tracking import log_dict_metrics, stage_run
from rlfn.errors import DataError
from rlfn.evaluate import evaluate_folder
from rlfn.backends import check_backend, make_engine
from rlfn.io import write_json
from rlfn.upscale import BicubicUpscaler, ModelUpscaler
from rlfn.weights import load_model


@task(cache_policy=NO_CACHE)  # DVC is the cache; inputs need not hash
def score(upscaler, sets: dict[str, str]) -> dict:
    out = {}
    for name, hr_dir in sets.items():
        rep = evaluate_folder(upscaler, hr_dir, progress=True, desc=name)
        if rep.errors:
            raise DataError(hr_dir, f"evaluate {name}: " + "; ".join(rep.errors))
        out[name] = {k: round(v, 6) for k, v in rep.mean.items()}
    return out


def _model(weights: Path, scale: int, backend: str) -> ModelUpscaler:
    return ModelUpscaler(make_engine(load_model(weights, scale=scale).model, backend, "cpu"))


def _write_plot(path: Path, rows: list[tuple[str, str, dict]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "set", "psnr_y", "ssim_y"])
        for model, set_name, m in rows:
            w.writerow([model, set_name, m["psnr_y"], m["ssim_y"]])


def check(s: Settings) -> None:
    """The backend must be known, installed and exact; said before any work."""
    check_backend(s.evaluate.backend, "cpu", where=f"{s.params_file}: evaluate.backend",
                  exact_for="the metrics must not depend on the backend")


@flow(name="rlfn-evaluate", flow_run_name="evaluate")
def evaluate(settings: Settings | None = None) -> dict:
    s = settings or load_settings()
    check(s)
    e, scale = s.evaluate, s.scale
    sets = dict(e.sets)
    for name, hr in e.optional_sets.items():
        if Path(hr).is_dir():
            sets[name] = hr
        else:
            log.warning(f"evaluate: {name} ({hr}) not found; not scored")
    stage_sets = {n: e.sets[n] for n in e.stage_sets}
    with stage_run("evaluate", s, s.section("evaluate")):
        final = {f"x{scale}": score(_model(s.final_weights, scale, e.backend), sets)}
        final["mean_psnr_y"] = round(sum(final[f"x{scale}"][n]["psnr_y"] for n in e.sets)
                                     / len(e.sets), 6)
        stages = {"bicubic": score(BicubicUpscaler(scale), stage_sets)}
        for k in s.stage_keys:
            stages[f"stage{k}"] = (
                {n: final[f"x{scale}"][n] for n in stage_sets} if k == s.last_stage
                else score(_model(s.stage_weights(k), scale, e.backend), stage_sets))
        write_json(e.out, final)
        write_json(e.stages_out, stages)
        rows = [(name, n, m) for name, res in stages.items() for n, m in res.items()]
        rows += [(f"stage{s.last_stage}", n, m) for n, m in final[f"x{scale}"].items()
                 if n not in stage_sets]
        _write_plot(Path(e.plot), rows)
        log_dict_metrics("", {"final": final, **stages})
        mlflow.log_artifact(e.plot)
        for name, res in [*stages.items(), (f"stage{s.last_stage}", final[f"x{scale}"])]:
            log.info(f"{name:>8}: " + ", ".join(f"{n} {m['psnr_y']:.3f} dB / {m['ssim_y']:.4f}"
                                                for n, m in res.items()))
        log.info(f"evaluate: final model mean_psnr_y {final['mean_psnr_y']:.4f} over "
                 f"{', '.join(e.sets)}")
        return {"final": final, "stages": stages}


if __name__ == "__main__":
    sys.exit(main(evaluate, check=check))
