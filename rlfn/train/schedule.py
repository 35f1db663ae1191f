"""The learning-rate schedule as a pure function of the iteration (so resume needs no state)."""

from __future__ import annotations

from .config import TrainConfig

__all__ = ["lr_at"]


def lr_at(cfg: TrainConfig, iteration: int) -> float:
    """The learning rate at ``iteration`` (0-based).

    * ``lr_schedule: step``: ``lr * lr_gamma ** (iteration // lr_step)`` (the paper: 5e-4
      halved every 2e5 iterations). A warm-started stage starts it afresh.
    * ``lr_schedule: cyclic``: the same step decay on the iteration within its cycle,
      ``iteration % lr_cycle``: the lr restarts at ``lr`` every ``lr_cycle`` iterations.
    """
    if cfg.lr_schedule == "step":
        t = iteration
    elif cfg.lr_schedule == "cyclic":
        if cfg.lr_cycle < 1:
            raise ValueError(f"lr_schedule cyclic needs lr_cycle >= 1, got {cfg.lr_cycle}")
        t = iteration % cfg.lr_cycle
    else:
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}")
    return cfg.lr * cfg.lr_gamma ** (t // cfg.lr_step)
