"""The training step: the lr of the iteration, the forward pass (bf16 autocast where it
helps), L1 plus the optional contrastive loss, backward and the Adam step; and the running
means of the losses between two curve rows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..device import bf16_trains_faster
from .config import TrainConfig
from .losses import ContrastiveLoss, bicubic_upsample
from .schedule import lr_at

__all__ = ["TrainStep", "StepLosses", "LossMeter", "use_bf16"]


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """``amp: bf16``, or ``amp: auto`` where bf16 trains faster (``rlfn.device.
    bf16_trains_faster``: CUDA, CPUs with AMX, AMD CPUs with AVX512-BF16; bench/train_step.py
    measured 1.79x over channels_last fp32 with AMX and 1.62x on an AMD EPYC, but 0.63x on a
    Xeon capped below AMX, where fp32 stays)."""
    return cfg.amp == "bf16" or (cfg.amp == "auto" and bf16_trains_faster(device))


@dataclass
class StepLosses:
    """One step's losses (detached, still on the device: no host sync) and its lr."""

    loss: torch.Tensor
    l1: torch.Tensor
    contrastive: torch.Tensor | None
    lr: float


class TrainStep:
    """``step(it_idx, lr_batch, hr_batch)`` trains iteration ``it_idx`` (0-based) in place."""

    def __init__(self, cfg: TrainConfig, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device):
        self.cfg, self.net, self.optimizer, self.device = cfg, net, optimizer, device
        self.contrastive: ContrastiveLoss | None = None
        if cfg.contrastive and cfg.contrastive_weight > 0:
            self.contrastive = ContrastiveLoss(cfg.contrastive_channels,
                                               cfg.contrastive_seed).to(device)
        self.bf16 = use_bf16(cfg, device)

    def __call__(self, it_idx: int, lr_b: torch.Tensor, hr_b: torch.Tensor) -> StepLosses:
        cfg = self.cfg
        lr_now = lr_at(cfg, it_idx)
        for g in self.optimizer.param_groups:
            g["lr"] = lr_now
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            sr = self.net(lr_b)
            l1 = F.l1_loss(sr.float(), hr_b)
            loss = l1
            c_loss = None
            if self.contrastive is not None:
                c_loss = self.contrastive(sr.float(), hr_b, bicubic_upsample(lr_b, cfg.scale))
                loss = l1 + cfg.contrastive_weight * c_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return StepLosses(loss.detach(), l1.detach(),
                          None if c_loss is None else c_loss.detach(), lr_now)


class LossMeter:
    """Running sums of the step losses (on the device), averaged and reset by ``take``."""

    def __init__(self, contrastive: bool):
        self.contrastive = contrastive
        self.reset()

    def reset(self) -> None:
        self.sums: dict = {"loss": 0.0, "l1": 0.0, "contrastive": 0.0}
        self.n = 0

    def add(self, s: StepLosses) -> None:
        self.sums["loss"] = self.sums["loss"] + s.loss
        self.sums["l1"] = self.sums["l1"] + s.l1
        if s.contrastive is not None:
            self.sums["contrastive"] = self.sums["contrastive"] + s.contrastive
        self.n += 1

    def take(self, it: int) -> dict:
        """The means since the last ``take`` (``contrastive``: "" when off); a non-finite
        loss is a ``FloatingPointError``."""
        n = max(self.n, 1)
        loss = float(self.sums["loss"]) / n
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} by iteration {it}; lower the lr")
        means = {"loss": loss, "l1": float(self.sums["l1"]) / n,
                 "contrastive": float(self.sums["contrastive"]) / n if self.contrastive else ""}
        self.reset()
        return means
