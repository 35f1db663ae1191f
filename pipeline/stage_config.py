"""A warm-start stage's training configuration: ``train:`` + ``train_stages.<k>`` (+ extra
keys such as the patch store) checked into an ``rlfn.train.config.TrainConfig``."""

from __future__ import annotations

from typing import Any

from pipeline.settings import Settings
from rlfn.errors import ConfigError
from rlfn.train.config import TrainConfig, stage_config

__all__ = ["train_config"]


def train_config(settings: Settings, key: str, extra: dict[str, Any] | None = None
                 ) -> TrainConfig:
    key = str(key)
    if key not in settings.train_stages:
        raise ConfigError(f"{settings.params_file}: train_stages",
                          f"no stage {key!r}; defined: {', '.join(settings.stage_keys)}")
    return stage_config(settings.train, settings.train_stages[key].overrides, int(key),
                        extra=extra, where=settings.params_file,
                        stage_where=f"train_stages.{key}")
