"""Stage `profile`: parameters, CPU runtime and peak memory of the final model."""

from __future__ import annotations

from pathlib import Path

import mlflow
import torch
from prefect import flow, task

from pipeline._common import params, stage_run, write_json
from rlfn.profile import profile_runtime
from rlfn.weights import load_model


@task
def measure(weights: Path, scale: int, p: dict) -> dict:
    if p.get("threads"):
        torch.set_num_threads(int(p["threads"]))
    model = load_model(weights, scale=scale).model
    return profile_runtime(model, p["input_dir"], p.get("max_images", 0), p.get("warmup", 2))


@flow(name="rlfn-profile", flow_run_name="profile")
def profile() -> dict:
    prm = params()
    p, scale = prm["profile"], prm["train"]["scale"]
    models = Path(prm.get("train_launch", {}).get("out", "models"))
    with stage_run("profile", prm, p):
        r = measure(models / "stage3" / "model.safetensors", scale, p)
        out = {"params": r["params"], "runtime_ms_cpu": round(r["median_ms"], 3),
               "runtime_ms_cpu_mean": round(r["mean_ms"], 3),
               "runtime_ms_cpu_stdev": round(r["stdev_ms"], 3), "threads": r["threads"],
               "images": r["images"], "input_hw": r["input_hw"],
               "peak_rss_mb": round(r["peak_rss_mb"], 1)}
        write_json(p["out"], out)
        mlflow.log_metrics({k: v for k, v in out.items() if isinstance(v, (int, float))})
        print(f"profile: {out['params']:,} params, {out['runtime_ms_cpu']:.1f} ms/image (CPU, "
              f"{out['threads']} threads, median of {out['images']}), peak RSS "
              f"{out['peak_rss_mb']:.0f} MB")
        return out


if __name__ == "__main__":
    profile()
