"""A warm-start stage's training configuration: ``train:`` + ``train_stages.<k>`` (+ extra
keys such as the patch store) checked into an ``rlfn.train.config.TrainConfig``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.settings import Settings
from rlfn.errors import ConfigError
from rlfn.train.config import TrainConfig, stage_config

__all__ = ["train_config", "stage_data"]


def train_config(settings: Settings, key: str, extra: dict[str, Any] | None = None
                 ) -> TrainConfig:
    key = str(key)
    if key not in settings.train_stages:
        raise ConfigError(f"{settings.params_file}: train_stages",
                          f"no stage {key!r}; defined: {', '.join(settings.stage_keys)}")
    return stage_config(settings.train, settings.train_stages[key].overrides, int(key),
                        extra=extra, where=settings.params_file,
                        stage_where=f"train_stages.{key}")


def stage_data(s: Settings, key: str, cfg: TrainConfig) -> dict[str, Path | None]:
    """What training stage ``key`` consumed, for the registered version's lineage (DVC md5s):
    the manifest the patch store was built from (also logged as the run's MLflow dataset),
    the patch store, the validation images and the weights it started from."""
    return {"manifest": Path(s.data.manifest), "patches": Path(s.patches.out),
            "val": Path(cfg.val_hr_dir) if cfg.val_hr_dir else None,
            "init": s.train_stages[key].warm_start}
