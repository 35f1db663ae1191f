"""Run setup: where and as what a training stage runs, and the model it starts from.

* ``RunContext.create(cfg, out_dir, init)``: the process's rank in the run (``torchrun``'s
  ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), its device (``rlfn.device.parse_device``; under
  DDP on CUDA the local rank's GPU), the process group (gloo on CPU, nccl on CUDA), the
  torch threads and the run key (``run_key``). ``completed()`` is the "already complete"
  short-cut: the ``TrainResult`` of a finished run of the same key in ``out_dir``.
* Several hosts (``torchrun --nnodes N``): nothing is assumed shared but the network. Each
  host has its own copy of the project, its own data and its own ``out_dir``; rank 0's
  ``out_dir`` is the run's (checkpoints, result, weights). So what a rank would otherwise read
  from its own ``out_dir`` comes from rank 0 instead: whether the run is already complete
  (``completed``) and the checkpoint a run resumes from (``prepare_run``: its files are sent to
  every rank). At the start the ranks check that they train the same thing (the config but for
  the keys that may differ per host, ``HOST_LOCAL_KEYS``, and the warm start's bytes) and
  record where each runs (``RunContext.hosts``, written to ``result.json``).
* ``initial_model(cfg, init)``: the seeded model, warm-started from ``init`` (weights only).
* ``prepare_run(ctx)``: that model with a fresh Adam, then, if ``out_dir`` holds a checkpoint
  of this run, the checkpoint's weights, optimizer state and RNG state instead; on the
  device, wrapped in DDP when there is more than one process. ``PreparedRun.start`` is the
  iteration it resumes from (0 for a new run); its model is exactly what the first step sees.
"""

from __future__ import annotations

import atexit
import os
import socket
import tempfile
from dataclasses import dataclass, field
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

__all__ = ["RunContext", "PreparedRun", "run_key", "initial_model", "prepare_run",
           "HOST_LOCAL_KEYS", "host_identity"]

# Config keys that may differ between the hosts of one run: where each host keeps its data
# (paths of its own), and speed knobs that do not change the numbers on CPU (as in
# ``TrainConfig.digest``). Every other key must be the same on every rank.
HOST_LOCAL_KEYS = ("patch_store", "hr_dir", "val_hr_dir", "num_workers", "log_every",
                   "device", "threads")


def host_identity(rank: int, local_rank: int, address: bool = True) -> dict:
    """Where this rank runs, as ``result.json`` records it: ``hostname`` (the machine's name)
    and ``address``, the IPv4 address this rank reaches the run's store (``MASTER_ADDR``) from
    (a UDP socket's source address: nothing is sent), i.e. the host's address on the network
    the ranks share; ``None`` in a one-process run or if it cannot be told. Two ranks are on
    one host when both are equal (test hosts are network namespaces that may share a
    hostname; their addresses differ)."""
    found = None
    master = os.environ.get("MASTER_ADDR") if address else None
    if master:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((master, int(os.environ.get("MASTER_PORT") or 9)))
                found = s.getsockname()[0]
        except (OSError, ValueError):
            found = None
    return {"rank": rank, "local_rank": local_rank,
            "node_rank": int(os.environ.get("GROUP_RANK", "0")),
            "hostname": socket.gethostname(), "address": found}


def _portable_key(cfg: TrainConfig, init: str | Path | None) -> dict:
    """What every rank of one run must agree on (see ``HOST_LOCAL_KEYS``)."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in HOST_LOCAL_KEYS}
    d["init (sha256)"] = sha256_file(init) if init is not None else None
    return d


def _agree(mine: dict, rank: int, world: int) -> tuple[str, list[dict]]:
    """Gather each rank's portable key, run key and host; a ``ConfigError`` on every rank when
    any rank's portable key differs from rank 0's. Returns rank 0's run key (the run's: the
    others' may differ by their own paths) and the hosts, by rank."""
    got: list = [None] * world
    torch.distributed.all_gather_object(got, mine)
    hosts = [g["host"] for g in got]
    ref = got[0]["key"]
    for r, g in enumerate(got[1:], start=1):
        diff = sorted(k for k in set(ref) | set(g["key"]) if ref.get(k) != g["key"].get(k))
        if diff:
            def where(i: int) -> str:
                return f"rank {i} on {hosts[i]['hostname']} ({hosts[i]['address']})"
            shown = "; ".join(f"{k}: {ref.get(k)!r} ({where(0)}) vs {g['key'].get(k)!r} "
                              f"({where(r)})" for k in diff)
            raise ConfigError("distributed run", f"the ranks do not train the same stage: "
                                                 f"{shown}")
    return got[0]["digest"], hosts


def _end_process_group() -> None:
    """At exit of a rank that started the group (``rlfn train`` under torchrun): end it. Left
    to interpreter teardown, gloo's threads abort the process ("terminate called without an
    active exception", SIGABRT) often enough that torchrun failed complete reruns."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _from_rank0(value):
    """``value`` as rank 0 has it, on every rank (the others pass ``None``)."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


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
    hosts: list[dict] = field(default_factory=list)  # host_identity() of each rank, by rank

    @classmethod
    def create(cls, cfg: TrainConfig, out_dir: str | Path,
               init: str | Path | None = None) -> "RunContext":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        device = parse_device(cfg.device, "device")
        if world > 1 and device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)  # NCCL's object collectives use the current device
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
            atexit.register(_end_process_group)
        if cfg.batch_size % world:
            raise ConfigError("batch_size", f"{cfg.batch_size} is not divisible by the {world} "
                                            f"processes (WORLD_SIZE) that share each batch")
        # threads: 0 = the cores this process has (never the load: see rlfn.threads)
        configure_threads(cfg.threads, load_aware=False)
        digest = run_key(cfg, init)
        host = host_identity(rank, local_rank, address=world > 1)
        hosts = [host]
        if world > 1:
            digest, hosts = _agree({"key": _portable_key(cfg, init), "digest": digest,
                                    "host": host}, rank, world)
        return cls(cfg, Path(out_dir), init, rank, world, local_rank, device, digest, hosts)

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
        """The result of a finished run of this key in ``out_dir`` (then nothing is redone);
        under DDP rank 0's answer, on every rank (its ``out_dir`` is the run's)."""
        done = read_result(self.out_dir) if self.is_main else None
        if done is not None and done.get("config_digest") != self.digest:
            done = None
        if self.world > 1:
            done = _from_rank0(done)
        if done is None:
            return None
        return TrainResult(self.out_dir, self.out_dir / "model.safetensors", done["iterations"],
                           done.get("final_psnr"), done.get("best_psnr"),
                           done.get("best_iteration"), 0.0, done["iterations"],
                           already_complete=True, world_size=done.get("world_size"),
                           per_rank_batch=done.get("per_rank_batch"), hosts=done.get("hosts"))


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


def _resume(ctx: RunContext, ckpt: Path, model: RLFN,
            optimizer: torch.optim.Optimizer) -> TrainState:
    state = load_checkpoint(ckpt, model, optimizer)
    if state.config_digest != ctx.digest:
        raise CheckpointError(ckpt, f"was made with another configuration (digest "
                                    f"{state.config_digest}, this run {ctx.digest}); use a "
                                    f"new --out or delete the folder")
    return state


def _resume_from_rank0(ctx: RunContext, model: RLFN, optimizer: torch.optim.Optimizer,
                       state: TrainState) -> TrainState:
    """Under DDP: rank 0 resumes from its ``out_dir``'s checkpoint, if any, and sends the
    checkpoint's files to the other ranks, which resume from the same bytes (their own
    ``out_dir`` may be on another host, holding none). An unusable checkpoint is rank 0's
    error, raised on every rank."""
    payload = None
    if ctx.is_main:
        ckpt = find_checkpoint(ctx.out_dir)
        if ckpt is not None:
            try:
                state = _resume(ctx, ckpt, model, optimizer)
                payload = ("checkpoint", ckpt.name,
                           {f.name: f.read_bytes() for f in ckpt.iterdir() if f.is_file()})
            except CheckpointError as e:
                payload = ("error", e)
    payload = _from_rank0(payload)
    if payload is not None and payload[0] == "error":
        raise payload[1]
    if payload is not None and not ctx.is_main:
        with tempfile.TemporaryDirectory(prefix="rlfn-ckpt-") as tmp:
            folder = Path(tmp) / payload[1]
            folder.mkdir()
            for name, data in payload[2].items():
                (folder / name).write_bytes(data)
            state = _resume(ctx, folder, model, optimizer)
    return state


def prepare_run(ctx: RunContext) -> PreparedRun:
    """The model the run's first step starts from: seeded or warm-started, with a fresh
    optimizer, or restored from this run's checkpoint (see the module docstring)."""
    cfg = ctx.cfg
    model = initial_model(cfg, ctx.init)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                 eps=cfg.eps)
    state = TrainState(iteration=0, stage=cfg.stage, config_digest=ctx.digest)
    if ctx.world > 1:
        state = _resume_from_rank0(ctx, model, optimizer, state)
    else:
        ckpt = find_checkpoint(ctx.out_dir)
        if ckpt is not None:
            state = _resume(ctx, ckpt, model, optimizer)
    model.to(ctx.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net: torch.nn.Module = model
    if ctx.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return PreparedRun(model, net, optimizer, state)
