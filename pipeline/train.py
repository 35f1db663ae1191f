"""Stage `train_stage<k>`: one warm-start stage (``--stage K``), logged and registered.

Stage k>1 starts from ``models/stage<k-1>/model.safetensors`` with a fresh optimizer and
schedule. Outputs ``models/stage<k>/``: weights, curves, crops, result.json, and mlflow.json
(the run and the registered model version). With ``train_launch.ddp: true`` the training
runs under torchrun (``rlfn train``, the same function) and its curves are logged afterwards.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
from prefect import flow, task

from pipeline._common import params, stage_run, write_json
from rlfn.train.checkpoint import find_checkpoint
from rlfn.train.config import load_config
from rlfn.train.engine import run_key, train


def _fresh_out(out: Path, key: str) -> None:
    """DVC reruns this stage only when something it depends on changed, so a finished run in
    ``out`` is stale. An unfinished one (a crash) is resumed only if its checkpoint belongs
    to this exact run (same params and init weights); otherwise the stage starts over."""
    ck = find_checkpoint(out)
    stale = (out / "result.json").exists()
    stale |= ck is not None and json.loads((ck / "state.json").read_text()).get(
        "config_digest") != key
    if stale:
        shutil.rmtree(out)


@task
def run_training(cfg, out: Path, init: Path | None, launch: dict, params_file: str):
    if not launch.get("ddp"):
        return train(cfg, out, init=init,
                     on_log=lambda it, m: mlflow.log_metrics(m, step=it)).to_dict()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={launch.get('nproc_per_node', 2)}", "-m", "rlfn", "train",
           "--config", params_file, "--stage", str(cfg.stage), "--out", str(out),
           "--set", f"patch_store={cfg.patch_store}"]
    if init is not None:
        cmd += ["--init", str(init)]
    subprocess.run(cmd, check=True)
    with open(out / "curves.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            mlflow.log_metrics({k: float(v) for k, v in row.items()
                                if k != "iteration" and v not in ("", None)},
                               step=int(row["iteration"]))
    return json.loads((out / "result.json").read_text())


@task(retries=2, retry_delay_seconds=5)  # the tracking server may be briefly unreachable
def register(weights: Path, scale: int, stage: int, result: dict):
    from pipeline.registry import log_and_register

    figures = {"val_psnr_y": result["final_psnr"]} if result.get("final_psnr") else {}
    return log_and_register(weights, scale, tags={"rlfn.stage": str(stage)}, figures=figures)


@flow(name="rlfn-train", flow_run_name="train-stage{stage}")
def train_stage(stage: int, params_file: str = "params.yaml") -> dict:
    prm = params(params_file)
    launch = prm.get("train_launch", {})
    store = Path(prm["patches"]["out"]) / f"x{prm['train']['scale']}.arrow"
    cfg = load_config(params_file, {"patch_store": str(store)}, stage=stage)
    models = Path(launch.get("out", "models"))
    out = models / f"stage{stage}"
    init = models / f"stage{stage - 1}" / "model.safetensors" if stage > 1 else None
    _fresh_out(out, run_key(cfg, init))
    section = {"train": prm["train"], f"train_stage{stage}": prm.get(f"train_stage{stage}")}
    with stage_run(f"train_stage{stage}", prm, section) as run:
        mlflow.log_params({k: v for k, v in cfg.to_dict().items() if v is not None})
        mlflow.log_param("init", str(init) if init else "scratch")
        result = run_training(cfg, out, init, launch, params_file)
        for name in ("curves.csv", "curves.png", "result.json"):
            if (out / name).exists():
                mlflow.log_artifact(str(out / name))
        if (out / "crops").exists():
            mlflow.log_artifacts(str(out / "crops"), "crops")
        version = register(out / "model.safetensors", cfg.scale, stage, result)
        write_json(out / "mlflow.json", {"run_id": run.info.run_id, "registered_model":
                                         version.name, "version": int(version.version)})
        return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--stage", type=int, required=True, choices=(1, 2, 3))
    train_stage(ap.parse_args().stage)
