"""The Pareto chart's points (Y-PSNR vs CPU runtime), shared by two stages: ``pareto_official``
(the official weights of ``profile.pareto.models``: scored once, the file reused by every later
repro until its inputs change) and ``profile`` (this project's models, and the official points
read back from that file).

A CNN's runtime depends on its architecture, backend and machine, not on its weights: each
(architecture, backend) is timed once per chart (``timed``), with a seeded model when no
weights of that architecture were timed yet. A recorded runtime is reused only on the machine
it was measured on (``rlfn.profile.timing_machine``: CPU model, threads, ISA cap); elsewhere
the architecture is timed again (seconds), while the scores, which no machine changes, are
reused as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.entry import log
from pipeline.settings import ParetoSettings, Settings
from rlfn.backends import make_engine
from rlfn.errors import DataError
from rlfn.evaluate import evaluate_folder
from rlfn.models import build_model
from rlfn.profile import profile_runtime
from rlfn.upscale import ModelUpscaler
from rlfn.weights import load_model

# what the official points depend on besides the weights (the file is stale when one differs)
OFFICIAL_KEYS = ("backend", "max_images", "warmup", "sets")


def available_sets(pp: ParetoSettings) -> dict[str, str]:
    """``pareto.sets`` whose folders exist (an absent one: a warning, no panel)."""
    sets = {}
    for name, hr in pp.sets.items():
        if Path(hr).is_dir():
            sets[name] = hr
        else:
            log.warning(f"profile: {name} ({hr}) not found; no {name} panel")
    return sets


def official_settings(s: Settings, sets: dict[str, str]) -> dict:
    """The settings an official point was made with (compared before one is reused)."""
    pp = s.profile.pareto
    return {"scale": s.scale, "input_dir": s.profile.input_dir, "sets": sets,
            **{k: getattr(pp, k) for k in OFFICIAL_KEYS if k != "sets"}}


def time_architecture(arch: str, scale: int, backend: str, pp: ParetoSettings,
                      input_dir: str) -> dict:
    """The runtime of ``arch`` with ``backend`` here (seeded weights: the time is the same)."""
    torch.manual_seed(0)
    engine = make_engine(build_model(arch, scale).eval(), backend, "cpu")
    return profile_runtime(engine, input_dir, pp.max_images, pp.warmup)


@task(cache_policy=NO_CACHE)  # DVC is the cache; inputs need not hash
def pareto_point(c: dict, scale: int, pp: ParetoSettings, input_dir: str, sets: dict,
                 timed: dict | None = None,
                 calibration: str | None = None) -> tuple[list[dict], dict, str]:
    """One model's rows (a row per set), its runtime and its architecture's name.
    ``timed`` ((architecture, backend) -> runtime) has the ones already timed in this chart
    (every stage and registered version of one architecture is timed once).
    ``c["backend"]``: another backend than ``pp.backend``. ``calibration``: the int8
    backend's calibration data (the patch store)."""
    loaded = load_model(c["path"], scale=scale)
    backend = c.get("backend") or pp.backend
    engine = make_engine(loaded.model, backend, "cpu", calibration=calibration)
    key = f"{loaded.name}/{backend}"
    rt = (timed or {}).get(key)
    if rt is None:
        rt = profile_runtime(engine, input_dir, pp.max_images, pp.warmup)
    rows = []
    for set_name, hr_dir in sets.items():
        rep = evaluate_folder(ModelUpscaler(engine), hr_dir, progress=True,
                              desc=f"{c['label']} {set_name}")
        if rep.errors:
            raise DataError(hr_dir, f"pareto {c['label']} on {set_name}: "
                                    + "; ".join(rep.errors))
        rows.append({"label": c["label"], "kind": c["kind"], "set": set_name,
                     "psnr_y": round(rep.mean["psnr_y"], 4),
                     "ssim_y": round(rep.mean["ssim_y"], 5),
                     "runtime_ms": round(rt["median_ms"], 2), "params": rt["params"],
                     "backend": backend, "sha256": c["sha256"][:16]})
    return rows, {key: rt}, loaded.name
