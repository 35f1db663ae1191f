"""Stage `train_stage@<k>`: one warm-start stage (``python -m pipeline.train --stage K``),
logged to MLflow and registered.

Stage ``k`` trains with ``train:`` plus ``train_stages.<k>`` (params.yaml) on the patch store
``patches.out``/x<scale>.arrow, starting from ``train_stages.<k>.init``: the previous stage's
weights (a warm start: weights only, fresh optimizer and schedule), or seeded weights for the
first stage. Outputs ``<train_launch.out>/stage<k>/``: weights, curves, crops, result.json,
config.yaml (the resolved training config) and mlflow.json (the run and the registered
model version); ``<train_launch.curves>/stage<k>.csv`` (a DVC plot). With
``train_launch.ddp: true`` the training runs under torchrun (``rlfn train`` on config.yaml,
the same function) and its curves are logged to MLflow afterwards.
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
import yaml
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipeline._common import log, main, stage_run, write_json
from pipeline.settings import Settings, load_settings
from pipeline.stage_config import stage_data, train_config
from rlfn.train.checkpoint import find_checkpoint
from rlfn.train.config import TrainConfig
from rlfn.train.engine import run_key, train

CONFIG_FILE = "config.yaml"


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


def _log_curves(curves: Path) -> None:
    with open(curves, newline="") as fh:
        for row in csv.DictReader(fh):
            mlflow.log_metrics({k: float(v) for k, v in row.items()
                                if k != "iteration" and v not in ("", None)},
                               step=int(row["iteration"]))


@task(cache_policy=NO_CACHE)  # DVC is the cache; inputs need not hash
def run_training(cfg: TrainConfig, out: Path, init: Path | None, ddp: bool, nproc: int) -> dict:
    if not ddp:
        return train(cfg, out, init=init,
                     on_log=lambda it, m: mlflow.log_metrics(m, step=it)).to_dict()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "rlfn", "train", "--config",
           str(out / CONFIG_FILE), "--out", str(out)]
    if init is not None:
        cmd += ["--init", str(init)]
    log.info(f"train: {' '.join(cmd)}")
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise RuntimeError(f"torchrun ({nproc} processes) failed with exit code {r.returncode}")
    _log_curves(out / "curves.csv")
    return json.loads((out / "result.json").read_text())


# the tracking server may be briefly unreachable
@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def register(weights: Path, scale: int, stage: str, result: dict, data: dict):
    from pipeline.mlflow_registry import log_and_register

    figures = {"val_psnr_y": result["final_psnr"]} if result.get("final_psnr") else {}
    return log_and_register(weights, scale, tags={"rlfn.stage": str(stage)}, figures=figures,
                            data=data)


@flow(name="rlfn-train", flow_run_name="train-stage{stage}")
def train_stage(stage: str, settings: Settings | None = None) -> dict:
    s = settings or load_settings()
    key = str(stage)
    cfg = train_config(s, key, {"patch_store": str(s.patches.store(s.scale))})
    st = s.train_stages[key]
    out, init = s.stage_dir(key), st.warm_start
    _fresh_out(out, run_key(cfg, init))
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=True))
    section = {"train": s.train, f"train_stages.{key}": st.model_dump()}
    with stage_run(f"train_stage@{key}", s, section) as run:
        mlflow.log_params({k: v for k, v in cfg.to_dict().items() if v is not None})
        mlflow.log_param("init", str(init) if init else "scratch")
        result = run_training(cfg, out, init, s.train_launch.ddp, s.train_launch.nproc_per_node)
        for name in ("curves.csv", "curves.png", "result.json", CONFIG_FILE):
            if (out / name).exists():
                mlflow.log_artifact(str(out / name))
        if (out / "crops").exists():
            mlflow.log_artifacts(str(out / "crops"), "crops")
        curves = Path(s.train_launch.curves) / f"stage{key}.csv"
        curves.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "curves.csv", curves)
        version = register(out / "model.safetensors", cfg.scale, key, result,
                           stage_data(s, key, cfg))
        write_json(out / "mlflow.json", {"run_id": run.info.run_id, "registered_model":
                                         version.name, "version": int(version.version)})
        return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", required=True, help="a key of params.yaml's train_stages")
    key = str(ap.parse_args().stage)
    sys.exit(main(train_stage, key, check=lambda s: train_config(s, key),
                  load_aware_threads=False))
