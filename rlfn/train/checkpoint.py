"""Training checkpoints without pickle: safetensors for tensors, JSON for the rest.

A checkpoint is a folder::

    checkpoint/
      model.safetensors       weights (+ architecture metadata, loadable by rlfn.weights)
      optimizer.safetensors   Adam moments and step counts, keyed "<param index>.<name>"
      rng.safetensors         torch RNG states (CPU, and CUDA when used)
      state.json              iteration, stage, config digest, optimizer hyper-parameters,
                              best validation score, and the sha256 of each file above

It is written to ``checkpoint.tmp/`` and swapped in with renames, so a crash at any moment
leaves either the previous or the new checkpoint complete (``checkpoint.old/`` is used if a
crash fell between the two renames). Loading runs no unpickling at all, and refuses a
checkpoint of another architecture or scale, or whose files do not match their recorded hash.
A full disk while writing is ``rlfn.io.NoSpaceError`` naming the checkpoint and the last
complete one (kept); the partial ``checkpoint.tmp/`` is removed, giving its space back.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import DataError
from ..io import NoSpaceError, is_no_space, sha256_file
from ..models import RLFN
from ..weights import WeightsError, infer_config, load_state_dict, save_model

__all__ = ["CheckpointError", "TrainState", "save_checkpoint", "load_checkpoint",
           "find_checkpoint"]

NAME = "checkpoint"


class CheckpointError(DataError, ValueError):
    """A checkpoint (or warm-start weights file) that cannot be used:
    ``CheckpointError(path, reason)``, printed as ``"<path>: <reason>"`` (exit 1)."""


@dataclass
class TrainState:
    iteration: int
    stage: int
    config_digest: str
    best_psnr: float = float("-inf")
    best_iteration: int = 0
    extra: dict[str, Any] | None = None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().to("cpu").contiguous()
    return tensors, sd["param_groups"]


def save_checkpoint(out_dir: str | Path, model: RLFN, optimizer: torch.optim.Optimizer,
                    state: TrainState, provenance: dict | None = None) -> Path:
    out_dir = Path(out_dir)
    final, tmp, old = out_dir / NAME, out_dir / f"{NAME}.tmp", out_dir / f"{NAME}.old"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write_tmp(tmp, model, optimizer, state, provenance)
    except Exception as e:
        if not is_no_space(e):
            raise
        # the partial folder goes (its space back); the complete checkpoint is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        last = find_checkpoint(out_dir)
        try:
            kept = (f"the last complete one, {last} (iteration "
                    f"{json.loads((last / 'state.json').read_text())['iteration']}), is intact"
                    if last is not None else "there is no earlier one")
        except (OSError, ValueError, KeyError):
            kept = f"the last complete one is {last}"
        raise NoSpaceError(final, f"no space left on device while writing the checkpoint of "
                                  f"iteration {state.iteration}; {kept}; free space and rerun "
                                  "to resume") from e
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(out_dir)
    if old.exists():
        shutil.rmtree(old)
    return final


def _write_tmp(tmp: Path, model: RLFN, optimizer: torch.optim.Optimizer, state: TrainState,
               provenance: dict | None) -> None:
    """The checkpoint's files in the folder ``tmp``, flushed to disk."""
    tmp.mkdir(parents=True)
    save_model(model, tmp / "model.safetensors", provenance)
    opt_tensors, groups = _optimizer_tensors(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    files = {f: sha256_file(tmp / f) for f in ("model.safetensors", "optimizer.safetensors",
                                           "rng.safetensors")}
    doc = {"iteration": state.iteration, "stage": state.stage,
           "config_digest": state.config_digest, "best_psnr": state.best_psnr,
           "best_iteration": state.best_iteration, "extra": state.extra or {},
           "param_groups": groups, "files": files}
    (tmp / "state.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)


def find_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint folder in ``out_dir``, if any."""
    out_dir = Path(out_dir)
    for name in (NAME, f"{NAME}.old"):
        p = out_dir / name
        if (p / "state.json").exists():
            return p
    return None


def load_checkpoint(path: str | Path, model: RLFN, optimizer: torch.optim.Optimizer,
                    restore_rng: bool = True) -> TrainState:
    """Restore model, optimizer and RNG from a checkpoint folder into existing objects."""
    path = Path(path)
    state_file = path / "state.json"
    try:
        doc = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(state_file, f"unreadable checkpoint state ({e})") from None
    for fname, digest in doc.get("files", {}).items():
        f = path / fname
        if not f.exists():
            raise CheckpointError(f, "missing from the checkpoint")
        if sha256_file(f) != digest:
            raise CheckpointError(f, "corrupted: its sha256 does not match the checkpoint record")
    weights = path / "model.safetensors"
    try:
        sd, _ = load_state_dict(weights)
        found = infer_config(sd, weights)
    except WeightsError as e:
        raise CheckpointError(weights, e.reason) from None
    want = model.config
    if type(found) is not type(want):
        raise CheckpointError(weights, "checkpoint of another architecture: "
                              f"{type(found).__name__} (this run: {type(want).__name__})")
    if found != want:
        diffs = [f"{k} {getattr(found, k)} (this run: {getattr(want, k)})"
                 for k in want.to_dict() if getattr(found, k) != getattr(want, k)]
        raise CheckpointError(weights, "checkpoint of another architecture or scale: "
                              + ", ".join(diffs))
    model.load_state_dict(sd)
    try:
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(path / "optimizer.safetensors", f"unreadable ({e})") from None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in opt_tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": doc["param_groups"]})
    if restore_rng:
        rng = load_file(str(path / "rng.safetensors"))
        torch.set_rng_state(rng["cpu"])
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    return TrainState(iteration=int(doc["iteration"]), stage=int(doc["stage"]),
                      config_digest=doc["config_digest"], best_psnr=float(doc["best_psnr"]),
                      best_iteration=int(doc["best_iteration"]), extra=doc.get("extra") or {})
