"""Stage `evaluate`: Y-PSNR/SSIM of every stage's model and of bicubic on ``evaluate.sets``.

``evaluate.out`` (metrics/evaluate.json): the last stage's model, keyed
``x<scale>/<set>/<metric>``, plus ``mean_psnr_y`` over the sets (the promotion gate).
``evaluate.stages_out`` (metrics/evaluate_stages.json): the same per stage and for bicubic.
``evaluate.plot`` (plots/psnr_by_stage.csv): a DVC plot.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import mlflow
from prefect import flow, task

from pipeline._common import log, log_dict_metrics, main, stage_run, write_json
from pipeline.settings import Settings, load_settings
from rlfn.errors import DataError
from rlfn.evaluate import evaluate_folder
from rlfn.upscale import BicubicUpscaler, ModelUpscaler
from rlfn.weights import load_model


@task
def score(upscaler, sets: dict[str, str]) -> dict:
    out = {}
    for name, hr_dir in sets.items():
        rep = evaluate_folder(upscaler, hr_dir, progress=True, desc=name)
        if rep.errors:
            raise DataError(hr_dir, f"evaluate {name}: " + "; ".join(rep.errors))
        out[name] = {k: round(v, 6) for k, v in rep.mean.items()}
    return out


def _mean_psnr(by_set: dict) -> float:
    return round(sum(v["psnr_y"] for v in by_set.values()) / len(by_set), 6)


def _write_plot(path: Path, results: dict, scale: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "set", "psnr_y", "ssim_y"])
        for name, res in results.items():
            for set_name, m in res[f"x{scale}"].items():
                w.writerow([name, set_name, m["psnr_y"], m["ssim_y"]])


@flow(name="rlfn-evaluate", flow_run_name="evaluate")
def evaluate(settings: Settings | None = None) -> dict:
    s = settings or load_settings()
    e, scale = s.evaluate, s.scale
    with stage_run("evaluate", s, s.section("evaluate")):
        results = {"bicubic": {f"x{scale}": score(BicubicUpscaler(scale), e.sets)}}
        for k in s.stage_keys:
            model = load_model(s.stage_weights(k), scale=scale).model
            results[f"stage{k}"] = {f"x{scale}": score(ModelUpscaler(model), e.sets)}
        for res in results.values():
            res["mean_psnr_y"] = _mean_psnr(res[f"x{scale}"])
        write_json(e.out, results[f"stage{s.last_stage}"])
        write_json(e.stages_out, results)
        _write_plot(Path(e.plot), results, scale)
        log_dict_metrics("", results)
        mlflow.log_artifact(e.plot)
        for name, res in results.items():
            log.info(f"{name:>8}: " + ", ".join(f"{n} {m['psnr_y']:.3f} dB / {m['ssim_y']:.4f}"
                                                for n, m in res[f"x{scale}"].items()))
        return results


if __name__ == "__main__":
    sys.exit(main(evaluate))
