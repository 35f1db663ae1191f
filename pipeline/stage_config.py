"""A warm-start stage's training configuration: ``train:`` + ``train_stages.<k>`` (+ extra
keys such as the patch store) checked into an ``rlfn.train.config.TrainConfig``: the one way
the pipeline's stages (train, tune, ablate) build one. The merge itself is the library's
(``params_stage_config``), so ``rlfn train --config params.yaml --stage K`` is the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.settings import Settings
from rlfn.train.config import TrainConfig, params_stage_config

__all__ = ["train_config", "stage_data"]


def train_config(settings: Settings, key: str | int, extra: dict[str, Any] | None = None,
                 required: bool = True, extra_where: str = "--set") -> TrainConfig:
    """Stage ``key``'s config: ``train:`` + ``train_stages.<key>`` + ``extra``, merged by
    ``rlfn.train.config.params_stage_config`` (the same merge as ``rlfn train --config
    params.yaml --stage <key>``). ``required=False``: a stage not in ``train_stages`` is
    ``train:`` alone (the ablations' extra stages)."""
    stages = {k: st.model_dump() for k, st in settings.train_stages.items()}
    return params_stage_config(settings.train, stages, key, extra=extra,
                               where=settings.params_file, extra_where=extra_where,
                               required=required)


def stage_data(s: Settings, key: str, cfg: TrainConfig) -> dict[str, Path | None]:
    """What training stage ``key`` consumed, for the registered version's lineage (DVC md5s):
    the manifest the patch store was built from (also logged as the run's MLflow dataset),
    the patch store, the validation images and the weights it started from."""
    return {"manifest": Path(s.data.manifest), "patches": Path(s.patches.out),
            "val": Path(cfg.val_hr_dir) if cfg.val_hr_dir else None,
            "init": s.train_stages[key].warm_start}
