"""The training loop: the paper's recipe, warm starts, exact resume, DDP, curves and crops.

``train(config, out_dir, init=None)`` runs one stage into ``out_dir``:

* ``out_dir/model.safetensors``: the final weights (``best.safetensors``: best validation).
* ``out_dir/checkpoint/``: the last checkpoint (see ``checkpoint.py``); rerunning the same
  call resumes from it, and on CPU ends with weights bit-identical to an uninterrupted run
  (every batch is a pure function of (seed, iteration), the schedule a pure function of the
  iteration, and the optimizer state is restored exactly). A finished run is not redone.
* ``out_dir/curves.csv`` + ``curves.png`` (loss, validation PSNR, lr) and
  ``out_dir/crops/iter_XXXXXXX.png`` (bicubic | SR | HR) at each validation.
* ``out_dir/result.json``: what was trained, for how long, how well, and by how many
  processes (``world_size``, ``per_rank_batch``) on which hosts (``hosts``: each rank's
  hostname and address, see ``setup.host_identity``).

Warm start (stages 2 and 3): ``init`` is the previous stage's ``model.safetensors``; only the
weights are taken, with a fresh optimizer and a fresh schedule (the paper's point).

DDP: in a rank of a distributed run (``WORLD_SIZE`` > 1: started by ``launch.launch``, or
``torchrun``) each rank takes its share of every global batch (gloo on CPU, nccl on CUDA);
rank 0 alone validates, writes checkpoints and logs. ``launch.py`` is how a stage is started.
Across hosts (``torchrun --nnodes N``) nothing but the network is shared: each host has its own
data and ``out_dir``, and only rank 0's ``out_dir`` receives the run's files (see ``setup``).

The phases live in their own modules: ``setup`` (device, process group, run key, the
"already complete" short-cut, the seeded or warm-started model, resume from the checkpoint),
``step`` (the training step and the running loss means), ``validation`` (PSNR, crops, best
weights) and ``runlog`` (curves.csv, curves.png, result.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .. import failpoints
from ..progress import progress as progress_bar
from ..weights import save_model
from .config import TrainConfig
from .data import IterationBatches, open_training_data
from .runlog import RunLog, TrainResult, finite_or_none, plot_curves
from .setup import RunContext, prepare_run, run_key
from .step import LossMeter, TrainStep
from .validation import Validator

__all__ = ["train", "TrainResult", "plot_curves", "run_key"]


def train(cfg: TrainConfig, out_dir: str | Path, init: str | Path | None = None,
          progress: bool = True, on_log: Callable[[int, dict], None] | None = None,
          stop_after: int | None = None,
          on_validate: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train one stage (see the module docstring). ``on_log(iteration, metrics)`` receives the
    logged values (the pipeline sends them to MLflow). ``stop_after`` ends the run early after
    that many iterations of this call (tests), leaving a checkpoint to resume from.
    ``on_validate(iteration, val_psnr)`` is called by rank 0 after each validation (after
    ``on_log``, before that iteration's checkpoint); an exception it raises (Optuna pruning)
    propagates out of ``train`` with the last checkpoint and curves intact. Under DDP the
    other ranks are not told: the launcher stops them when rank 0 exits."""
    ctx = RunContext.create(cfg, out_dir, init)
    done = ctx.completed()
    if done is not None:
        return done
    out_dir, is_main = ctx.out_dir, ctx.is_main
    out_dir.mkdir(parents=True, exist_ok=True)
    run = prepare_run(ctx)
    step = TrainStep(cfg, run.net, run.optimizer, ctx.device)
    data = open_training_data(cfg, out_dir / "data", ctx.rank, ctx.world,
                              progress=progress and is_main)
    start = run.start
    end = cfg.iterations if stop_after is None else min(cfg.iterations, start + stop_after)
    batches = IterationBatches(data, cfg, start, end, ctx.device)
    log = RunLog(out_dir, start, is_main, float((run.state.extra or {}).get("seconds", 0.0)))
    validate = Validator(ctx, run)
    meter = LossMeter(contrastive=step.contrastive is not None)

    run.net.train()
    bar = progress_bar(total=cfg.iterations, initial=start, desc=f"stage {cfg.stage} train",
                       unit="it", enabled=progress and is_main)
    it = start
    for it_idx, (lr_b, hr_b) in zip(range(start, end), batches):
        failpoints.hit("train.step", it_idx)  # tests stop a run at a known step (off: a no-op)
        it = it_idx + 1
        losses = step(it_idx, lr_b, hr_b)
        meter.add(losses)
        val = None
        if it % cfg.val_every == 0 or it == cfg.iterations:
            val = validate(it)
        if it % cfg.log_every == 0 or it == cfg.iterations or val is not None:
            row = log.row(it, meter.take(it), losses.lr, val)
            if is_main:
                log.append(row)
                last = validate.last_psnr
                bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{losses.lr:.1e}",
                                **({"psnr": f"{last:.2f}"} if last is not None else {}))
                if on_log is not None:
                    on_log(it, {k: v for k, v in row.items() if v != "" and k != "iteration"})
        bar.update(1)  # after the row: a line shows this iteration's figures
        if val is not None and on_validate is not None:
            on_validate(it, val)
        if it % cfg.checkpoint_every == 0 or it == end:
            if is_main:
                run.checkpoint(ctx, it, log.seconds())
                log.write_curves()
            ctx.barrier()
    bar.close()

    result = TrainResult(out_dir, out_dir / "model.safetensors", it, validate.last_psnr,
                         finite_or_none(run.state.best_psnr), run.state.best_iteration or None,
                         log.seconds(), start, world_size=ctx.world,
                         per_rank_batch=ctx.per_rank_batch, hosts=ctx.hosts)
    if it < cfg.iterations:  # stopped early on purpose (stop_after): resumable
        result.weights = out_dir / "checkpoint" / "model.safetensors"
        result.best_psnr = result.best_iteration = None
        return result
    if is_main:
        save_model(run.model, result.weights, {**ctx.provenance, "iteration": it})
        log.finish(cfg, result, init, ctx.digest)
    ctx.barrier()
    return result
