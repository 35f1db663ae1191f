"""Stage `train_stage@<k>`: one warm-start stage (``python -m pipeline.train --stage K``),
logged to MLflow and registered.

Stage ``k`` trains with ``train:`` plus ``train_stages.<k>`` (params.yaml) on the patch store
``patches.out``/x<scale>.arrow, starting from ``train_stages.<k>.init``: the previous stage's
weights (a warm start: weights only, fresh optimizer and schedule), or seeded weights for the
first stage. Outputs ``<train_launch.out>/stage<k>/``: weights, curves, crops, result.json,
config.yaml (the resolved training config, a record: ``rlfn train --config`` reruns it) and
mlflow.json (the run and the registered model version); ``<train_launch.curves>/stage<k>.csv``
(a DVC plot). The training is started by ``rlfn.train.launch`` (as ``rlfn train`` starts it):
in this process, or with ``train_launch.ddp: true`` on ``nproc_per_node`` local processes;
either way the curves are logged to the stage's MLflow run as they come.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import mlflow
import yaml
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipeline import tags as T
from pipeline.entry import log, main
from pipeline.settings import Settings, load_settings
from pipeline.stage_config import stage_data, train_config
from pipeline.tracking import stage_run
from rlfn.io import write_json
from rlfn.train.checkpoint import find_checkpoint
from rlfn.train.config import TrainConfig
from rlfn.train.launch import launch
from rlfn.train.setup import run_key

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


@task(cache_policy=NO_CACHE)  # DVC is the cache; inputs need not hash
def run_training(cfg: TrainConfig, out: Path, init: Path | None, nproc: int,
                 run_id: str) -> dict:
    """The stage's training (``rlfn.train.launch``); each logged row goes to the run
    ``run_id`` as it comes (named: rows may arrive on the launcher's thread)."""
    log.info(f"train: stage {cfg.stage} on {nproc} process{'es' if nproc > 1 else ''} -> {out}")
    return launch(cfg, out, init=init, nproc=nproc,
                  on_log=lambda it, m: mlflow.log_metrics(m, step=it, run_id=run_id)).to_dict()


# the tracking server may be briefly unreachable
@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def register(weights: Path, scale: int, stage: str, result: dict, data: dict):
    from pipeline.mlflow_registry import log_and_register

    figures = {"val_psnr_y": result["final_psnr"]} if result.get("final_psnr") else {}
    return log_and_register(weights, scale, tags={T.V_STAGE: str(stage)}, figures=figures,
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
        nproc = s.train_launch.nproc_per_node if s.train_launch.ddp else 1
        result = run_training(cfg, out, init, nproc, run.info.run_id)
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
