"""The one way a training stage is started: ``launch(cfg, out_dir, init, nproc)``, for the
pipeline's training stages (``pipeline/train.py``) and ``rlfn train`` alike.

* ``nproc`` 1: ``engine.train`` in this process (exactly what the engine does alone).
* ``nproc`` > 1: ``nproc`` local processes (DDP: gloo on CPU, nccl on CUDA) started by torch's
  elastic launch API (``torch.distributed.launcher.api.elastic_launch``, the engine behind
  ``torchrun --standalone``: a c10d rendezvous on a port it picks, no restarts; the ranks'
  store on 127.0.0.1 too, never the hostname's address, which may not resolve). The
  ``TrainConfig`` is handed to every rank as data (pickled), never written and re-read. Like
  torchrun, ``OMP_NUM_THREADS`` is 1 in each rank unless it is set.

Either way ``on_log(iteration, metrics)`` receives rank 0's logged rows in this process while
the run goes on (from the ranks through a queue, on a thread of this process: a caller that
logs to MLflow names its run), and the result is rank 0's ``TrainResult``. A rank that fails
makes ``launch`` raise that rank's own exception (a ``ConfigError``, a ``CheckpointError``,
...), as the one-process run would; a rank that dies without one (a signal, out of memory)
is a :class:`LaunchError` naming the rank and its exit code. No traceback from the ranks or
the launcher is printed: a command reports one ``error:`` line.

Already inside a distributed run (``WORLD_SIZE`` set, e.g. ``torchrun ... rlfn train``), the
process trains as its rank: ``engine.train`` reads the rank from the environment. That is how
a stage runs across hosts: ``torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d
--rdzv-endpoint ADDR:PORT --local-addr THIS_HOST_ADDR -m rlfn train ...`` on each host (see
``setup``: no shared disk is assumed; README, "Scale out").
"""

from __future__ import annotations

import logging
import os
import pickle
import queue as queue_mod
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import ConfigError, RLFNError
from .config import TrainConfig
from .engine import train
from .runlog import TrainResult

__all__ = ["launch", "LaunchError"]


class LaunchError(RLFNError, RuntimeError):
    """The training processes failed without an error of their own (exit 1)."""


def launch(cfg: TrainConfig, out_dir: str | Path, init: str | Path | None = None,
           nproc: int = 1, progress: bool = True,
           on_log: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train one stage on ``nproc`` local processes (see the module docstring)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError("nproc_per_node", f"must be a positive integer, got {nproc!r}")
    if nproc == 1 or "WORLD_SIZE" in os.environ:
        return train(cfg, out_dir, init=init, progress=progress, on_log=on_log)
    return _launch_ranks(cfg, Path(out_dir), init, nproc, progress, on_log)


# ------------------------------------------------------------------ the ranks
def _worker(cfg: TrainConfig, out_dir: str, init: str | None, progress: bool, events: Any,
            send_logs: bool) -> TrainResult:
    """One rank (a process the launcher started): train, send rank 0's rows and any error."""
    import sys

    from ..log import setup as setup_logging

    setup_logging()  # a fresh interpreter: rank 0's progress lines reach stderr, as in-process
    rank = int(os.environ.get("RANK", "0"))
    on_log = (lambda it, m: events.put(("log", it, m))) if send_logs else None
    try:
        return train(cfg, out_dir, init=init, progress=progress, on_log=on_log)
    except BaseException as e:  # noqa: BLE001 - reported to the launching process, then exit
        events.put(("error", rank, _portable(e)))
        sys.exit(getattr(e, "exit_code", 1) if isinstance(e, RLFNError) else 1)


def _portable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling (the launching process raises it), else a LaunchError
    that says what it was."""
    try:
        back = pickle.loads(pickle.dumps(e))
        if str(back) == str(e):
            return e
    except Exception:  # noqa: BLE001
        pass
    return LaunchError(f"{type(e).__name__}: {e}")


@contextmanager
def _quiet_launcher() -> Iterator[None]:
    """The elastic agent logs each failure (with a traceback table) and each rank it stops;
    the error is raised here instead (one line from the command). Its loggers each carry a
    level of their own, so each is switched off while the ranks run."""
    import importlib

    for mod in ("c10d_rendezvous_backend", "dynamic_rendezvous"):  # their loggers, now
        importlib.import_module(f"torch.distributed.elastic.rendezvous.{mod}")

    loggers = [lg for name, lg in logging.root.manager.loggerDict.items()
               if name.startswith(("torch.distributed", "torch.multiprocessing"))
               and isinstance(lg, logging.Logger)
               and not lg.disabled]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg in loggers:
            lg.disabled = False


@contextmanager
def _rank_threads(nproc: int) -> Iterator[None]:
    """torchrun's rule: each of several ranks gets ``OMP_NUM_THREADS=1`` unless it is set."""
    if "OMP_NUM_THREADS" in os.environ or nproc == 1:
        yield
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)


def _launch_ranks(cfg: TrainConfig, out_dir: Path, init: str | Path | None, nproc: int,
                  progress: bool, on_log: Callable[[int, dict], None] | None) -> TrainResult:
    import multiprocessing

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    events = multiprocessing.get_context("spawn").Queue()
    errors: list[tuple[int, BaseException]] = []
    done = threading.Event()

    def pump() -> None:  # rank 0's rows to on_log as they come; the ranks' errors kept
        while True:
            try:
                item = events.get(timeout=0.2)
            except queue_mod.Empty:
                if done.is_set():
                    return
                continue
            if item[0] == "log" and on_log is not None:
                on_log(item[1], item[2])
            elif item[0] == "error":
                errors.append((item[1], item[2]))

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          run_id=f"rlfn-{uuid.uuid4().hex}", rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", local_addr="127.0.0.1",
                          max_restarts=0, start_method="spawn")
    reader = threading.Thread(target=pump, name="rlfn-launch-events", daemon=True)
    reader.start()
    failed: ChildFailedError | None = None
    try:
        with _rank_threads(nproc), _quiet_launcher():
            results = elastic_launch(config, _worker)(
                cfg, str(out_dir), None if init is None else str(init), progress, events,
                on_log is not None)
    except ChildFailedError as e:
        failed = e
    finally:
        done.set()
        reader.join()
    if failed is not None:
        if errors:
            raise min(errors, key=lambda x: x[0])[1]
        rank, info = failed.get_first_failure()
        raise LaunchError(out_dir, f"training process {rank} of {nproc} failed with exit code "
                                   f"{info.exitcode}") from None
    return results[0]
