"""The learning-rate schedule as a pure function of the iteration (so resume needs no state)."""

from __future__ import annotations

from .config import TrainConfig

__all__ = ["lr_at"]


def lr_at(cfg: TrainConfig, iteration: int) -> float:
    """The learning rate at ``iteration`` (0-based): ``lr * lr_gamma ** (iteration // lr_step)``
    (the paper: 5e-4 halved every 2e5 iterations). A warm-started stage starts it afresh."""
    return cfg.lr * cfg.lr_gamma ** (iteration // cfg.lr_step)
