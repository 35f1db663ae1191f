"""Run setup: where and as what a training stage runs, and the model it starts from.

* ``RunContext.create(cfg, out_dir, init)``: the process's rank in the run (``torchrun``'s
  ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), its device (``rlfn.device.parse_device``; under
  DDP on CUDA the local rank's GPU), the process group (gloo on CPU, nccl on CUDA), the
  torch threads and the run key (``run_key``). ``completed()`` is the "already complete"
  short-cut: the ``TrainResult`` of a finished run of the same key in ``out_dir``.
* ``initial_model(cfg, init)``: the seeded model, warm-started from ``init`` (weights only).
* ``prepare_run(ctx)``: that model with a fresh Adam, then, if ``out_dir`` holds a checkpoint
  of this run, the checkpoint's weights, optimizer state and RNG state instead; on the
  device, wrapped in DDP when there is more than one process. ``PreparedRun.start`` is the
  iteration it resumes from (0 for a new run); its model is exactly what the first step sees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..device import parse_device
from ..errors import ConfigError
from ..io import sha256_file
from ..models import RLFN, build_model
from ..threads import configure_threads
from ..weights import WeightsError, load_model
from .checkpoint import (CheckpointError, TrainState, find_checkpoint, load_checkpoint,
                         save_checkpoint)
from .config import TrainConfig
from .runlog import TrainResult, read_result

__all__ = ["RunContext", "PreparedRun", "run_key", "initial_model", "prepare_run"]


def run_key(cfg: TrainConfig, init: str | Path | None = None) -> str:
    """What determines a run's result: the config and, for a warm start, the init weights'
    bytes. A checkpoint or finished run with another key is not resumed."""
    key = cfg.digest()
    if init is not None:
        if not Path(init).exists():
            raise CheckpointError(init, "no such file (the warm-start weights)")
        key += "-" + sha256_file(init)[:16]
    return key


@dataclass
class RunContext:
    """One process's view of a training stage."""

    cfg: TrainConfig
    out_dir: Path
    init: str | Path | None  # as given (recorded as str(init))
    rank: int
    world: int
    local_rank: int
    device: torch.device
    digest: str

    @classmethod
    def create(cls, cfg: TrainConfig, out_dir: str | Path,
               init: str | Path | None = None) -> "RunContext":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        device = parse_device(cfg.device, "device")
        if world > 1 and device.type == "cuda":
            device = torch.device("cuda", local_rank)
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if cfg.batch_size % world:
            raise ConfigError("batch_size", f"{cfg.batch_size} is not divisible by the {world} "
                                            f"processes (WORLD_SIZE) that share each batch")
        # threads: 0 = the cores this process has (never the load: see rlfn.threads)
        configure_threads(cfg.threads, load_aware=False)
        return cls(cfg, Path(out_dir), init, rank, world, local_rank, device,
                   run_key(cfg, init))

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that validates, checkpoints and logs."""
        return self.rank == 0

    @property
    def per_rank_batch(self) -> int:
        return self.cfg.batch_size // self.world

    @property
    def provenance(self) -> dict:
        """What the weights files of this run record about it."""
        cfg = self.cfg
        return {"model": cfg.model, "scale": cfg.scale, "stage": cfg.stage,
                "config_digest": self.digest, "init": str(self.init) if self.init else None,
                "seed": cfg.seed}

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def completed(self) -> TrainResult | None:
        """The result of a finished run of this key in ``out_dir`` (then nothing is redone)."""
        done = read_result(self.out_dir)
        if done is None or done.get("config_digest") != self.digest:
            return None
        return TrainResult(self.out_dir, self.out_dir / "model.safetensors", done["iterations"],
                           done.get("final_psnr"), done.get("best_psnr"),
                           done.get("best_iteration"), 0.0, done["iterations"],
                           already_complete=True, world_size=done.get("world_size"),
                           per_rank_batch=done.get("per_rank_batch"))


def initial_model(cfg: TrainConfig, init: str | Path | None = None) -> RLFN:
    """The seeded model of ``cfg``; with ``init`` (a warm start), that file's weights."""
    torch.manual_seed(cfg.seed)
    model: RLFN = build_model(cfg.model, cfg.scale)
    if init is not None:
        try:
            prev = load_model(init, scale=cfg.scale)
        except WeightsError as e:
            raise CheckpointError(init, e.reason) from None
        if prev.config != model.config:
            raise CheckpointError(init, f"is a {prev.name} x{prev.scale} model; this run trains "
                                        f"{cfg.model} x{cfg.scale}")
        model.load_state_dict(prev.model.state_dict())
    return model


@dataclass
class PreparedRun:
    """The model (``net``: the same, DDP-wrapped when distributed), its optimizer and the
    run's state (iteration, best validation score) as the next step finds them."""

    model: RLFN
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    state: TrainState

    @property
    def start(self) -> int:
        return self.state.iteration

    def checkpoint(self, ctx: RunContext, it: int, seconds: float) -> Path:
        """Save the checkpoint of iteration ``it`` (rank 0 only)."""
        self.state.iteration = it
        self.state.extra = {"seconds": seconds}
        return save_checkpoint(ctx.out_dir, self.model, self.optimizer, self.state,
                               {**ctx.provenance, "iteration": it})


def prepare_run(ctx: RunContext) -> PreparedRun:
    """The model the run's first step starts from: seeded or warm-started, with a fresh
    optimizer, or restored from this run's checkpoint (see the module docstring)."""
    cfg = ctx.cfg
    model = initial_model(cfg, ctx.init)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                 eps=cfg.eps)
    state = TrainState(iteration=0, stage=cfg.stage, config_digest=ctx.digest)
    ckpt = find_checkpoint(ctx.out_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer)
        if state.config_digest != ctx.digest:
            raise CheckpointError(ckpt, f"was made with another configuration (digest "
                                        f"{state.config_digest}, this run {ctx.digest}); use a "
                                        f"new --out or delete the folder")
    model.to(ctx.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net: torch.nn.Module = model
    if ctx.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return PreparedRun(model, net, optimizer, state)
