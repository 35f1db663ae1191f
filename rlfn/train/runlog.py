"""The run log of a training stage: ``curves.csv`` rows, ``curves.png`` and ``result.json``.

``RunLog`` keeps the curve rows (rank 0 only; a resumed run starts from the rows up to its
checkpoint) and the run's clock (seconds of this call plus those before the checkpoint it
resumed from), writes ``curves.csv`` at each checkpoint and, at the end, ``curves.csv``,
``curves.png`` and ``result.json``. ``TrainResult`` is what ``train`` returns.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import atomic_write
from .config import TrainConfig

__all__ = ["TrainResult", "RunLog", "CURVE_FIELDS", "plot_curves", "read_curves",
           "write_curves", "read_result", "finite_or_none"]

CURVE_FIELDS = ["iteration", "loss", "l1", "contrastive", "lr", "val_psnr", "seconds"]


@dataclass
class TrainResult:
    out_dir: Path
    weights: Path
    iterations: int
    final_psnr: float | None
    best_psnr: float | None
    best_iteration: int | None
    seconds: float
    resumed_from: int
    already_complete: bool = False
    world_size: int | None = None  # processes (DDP ranks) that trained; None: not recorded
    per_rank_batch: int | None = None  # batch_size // world_size
    hosts: list[dict] | None = None  # where each rank ran (setup.host_identity), by rank

    def to_dict(self) -> dict:
        d = dict(vars(self))
        d["out_dir"], d["weights"] = str(self.out_dir), str(self.weights)
        return d


def read_curves(path: Path, upto: int) -> list[dict]:
    """The rows of ``curves.csv`` up to iteration ``upto`` (those a checkpoint covers)."""
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if int(r["iteration"]) <= upto]


def write_curves(path: Path, rows: list[dict]) -> None:
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=CURVE_FIELDS)
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, text.getvalue())


def plot_curves(rows: list[dict], path: Path, title: str) -> Path | None:
    """loss / validation PSNR / lr against iteration, one PNG."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(int(r["iteration"]), float(r[key])) for r in rows if r.get(key) not in ("", None)]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, label in (("loss", "total"), ("l1", "L1"), ("contrastive", "contrastive")):
        x, y = series(key)
        if x:
            axes[0].plot(x, y, label=label)
    axes[0].set_yscale("log")
    axes[0].set_title("training loss")
    axes[0].legend()
    x, y = series("val_psnr")
    axes[1].plot(x, y, "o-")
    axes[1].set_title("validation Y-PSNR (dB)")
    x, y = series("lr")
    axes[2].plot(x, y)
    axes[2].set_yscale("log")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=90, format="png"))
    finally:
        plt.close(fig)
    return path


class RunLog:
    """Curve rows and the clock of one ``train`` call into ``out_dir``."""

    def __init__(self, out_dir: Path, start: int, is_main: bool, prior_seconds: float = 0.0):
        self.out_dir = out_dir
        self.curves_path = out_dir / "curves.csv"
        self.is_main = is_main
        self.rows: list[dict] = read_curves(self.curves_path, start) if is_main else []
        self.prior_seconds = prior_seconds
        self._t0 = time.perf_counter()

    def seconds(self) -> float:
        """Training time of the run so far, including the calls it resumed from."""
        return self.prior_seconds + time.perf_counter() - self._t0

    def row(self, it: int, means: dict[str, Any], lr: float, val: float | None) -> dict:
        """A curves.csv row for iteration ``it`` (``means``: ``LossMeter.take()``)."""
        return {"iteration": it, "loss": means["loss"], "l1": means["l1"],
                "contrastive": means["contrastive"], "lr": lr,
                "val_psnr": "" if val is None else val, "seconds": round(self.seconds(), 3)}

    def append(self, row: dict) -> None:
        self.rows.append(row)

    def write_curves(self) -> None:
        write_curves(self.curves_path, self.rows)

    def finish(self, cfg: TrainConfig, result: TrainResult, init: str | Path | None,
               digest: str) -> None:
        """The end of a finished run (rank 0): curves.csv, curves.png, result.json."""
        self.write_curves()
        plot_curves(self.rows, self.out_dir / "curves.png",
                    f"{cfg.model} x{cfg.scale}, stage {cfg.stage}")
        atomic_write(self.out_dir / "result.json", json.dumps({
            "model": cfg.model, "scale": cfg.scale, "stage": cfg.stage,
            "iterations": result.iterations, "init": str(init) if init else None,
            "config_digest": digest, "final_psnr": result.final_psnr,
            "best_psnr": result.best_psnr, "best_iteration": result.best_iteration,
            "seconds": round(result.seconds, 2), "resumed_from": result.resumed_from,
            "world_size": result.world_size, "per_rank_batch": result.per_rank_batch,
            "hosts": result.hosts, "config": cfg.to_dict()}, indent=2, sort_keys=True) + "\n")


def read_result(out_dir: Path) -> dict | None:
    """``result.json`` of a finished run in ``out_dir``, if any."""
    f = out_dir / "result.json"
    if not (out_dir / "model.safetensors").exists() or not f.exists():
        return None
    return json.loads(f.read_text())


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
