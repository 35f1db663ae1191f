"""Stage `evaluate`: Y-PSNR/SSIM of every stage's model and of bicubic on the validation sets.

``metrics/evaluate.json``: the final (last-stage) model, keyed ``x<scale>/<set>/<metric>``,
plus ``mean_psnr_y`` over the sets (the promotion gate). ``metrics/evaluate_stages.json``:
the same per stage and for bicubic. ``plots/psnr_by_stage.csv``: a DVC plot.
"""

from __future__ import annotations

import csv
from pathlib import Path

import mlflow
from prefect import flow, task

from pipeline._common import log_dict_metrics, params, stage_run, write_json
from rlfn.evaluate import evaluate_folder
from rlfn.upscale import BicubicUpscaler, ModelUpscaler
from rlfn.weights import load_model

STAGES = (1, 2, 3)


@task
def score(upscaler, sets: dict[str, str]) -> dict:
    out = {}
    for name, hr_dir in sets.items():
        rep = evaluate_folder(upscaler, hr_dir, progress=True, desc=name)
        if rep.errors:
            raise RuntimeError(f"evaluate {name}: " + "; ".join(rep.errors))
        out[name] = {k: round(v, 6) for k, v in rep.mean.items()}
    return out


def _mean_psnr(by_set: dict) -> float:
    return round(sum(v["psnr_y"] for v in by_set.values()) / len(by_set), 6)


@flow(name="rlfn-evaluate", flow_run_name="evaluate")
def evaluate() -> dict:
    prm = params()
    e, scale = prm["evaluate"], prm["train"]["scale"]
    models = Path(prm.get("train_launch", {}).get("out", "models"))
    with stage_run("evaluate", prm, e):
        results = {"bicubic": {f"x{scale}": score(BicubicUpscaler(scale), e["sets"])}}
        for k in STAGES:
            model = load_model(models / f"stage{k}" / "model.safetensors", scale=scale).model
            results[f"stage{k}"] = {f"x{scale}": score(ModelUpscaler(model), e["sets"])}
        for name, res in results.items():
            res["mean_psnr_y"] = _mean_psnr(res[f"x{scale}"])
        final = results[f"stage{STAGES[-1]}"]
        write_json(e["out"], final)
        write_json(Path(e["out"]).with_name("evaluate_stages.json"), results)
        plot = Path("plots/psnr_by_stage.csv")
        plot.parent.mkdir(parents=True, exist_ok=True)
        with open(plot, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["model", "set", "psnr_y", "ssim_y"])
            for name, res in results.items():
                for set_name, m in res[f"x{scale}"].items():
                    w.writerow([name, set_name, m["psnr_y"], m["ssim_y"]])
        log_dict_metrics("", {n: r for n, r in results.items()})
        mlflow.log_artifact(str(plot))
        for name, res in results.items():
            print(f"{name:>8}: " + ", ".join(f"{s} {m['psnr_y']:.3f} dB / {m['ssim_y']:.4f}"
                                             for s, m in res[f"x{scale}"].items()))
        return results


if __name__ == "__main__":
    evaluate()
