"""Stage `ablate` (experiments/dvc.yaml, not part of the default `dvc repro`): one of the RLFN
paper's ablations, named by ``params.yaml``'s ``ablation.name``.

Run one: ``dvc exp run experiments/dvc.yaml:ablate -S ablation.name=rfdb`` (a DVC experiment),
or ``python -m pipeline.ablate`` (the name in params.yaml). All of them and the report:
``scripts/ablations.sh``; the report alone: ``python -m pipeline.ablation_report``.

A variant (``ablation.variants.<name>``) is ``{model, schedule, contrastive}`` or an alias
``{same_as: <name>}`` (the same runs under another row name). Every run trains with
``train`` + ``train_stages.<k>`` + ``ablation.base`` (a short budget of ``iterations`` per stage)
+ the variant's settings; ``ablation.stages`` (3) is the number of warm-start stages:

* ``ws``: ``stages`` warm-start stages, each from the previous stage's weights with a fresh
  optimizer and lr schedule; the contrastive loss (``train_stages.<last>``'s weight and seed)
  only in the last stage, when ``contrastive: true``.
* ``e2000``: one run of ``stages`` x ``iterations`` with ``lr_step`` x ``stages`` (the same
  total iterations, a slower decay).
* ``clr``: one run of ``stages`` x ``iterations`` with ``lr_schedule: cyclic`` and
  ``lr_cycle`` = ``iterations``: the lr restarts as a warm start would, but the optimizer
  state is kept.

With ``e2000``/``clr`` ``contrastive: true`` means the whole run. Training data: the patches
stage's store ``data/patches/x<scale>.arrow`` when present, else ``train.hr_dir`` (as
``pipeline/tune/``). Runs go to ``ablations/<name>/stage<k>/`` (git-ignored, started afresh).

``ablation.out`` (``metrics/ablation.json``): name, model, schedule, contrastive, Set5 (first
of ``evaluate.sets``) ``psnr_y``/``ssim_y`` and every set's scores, params/FLOPs/activations
(``rlfn.complexity``, 256x256 LR), CPU runtime (median ms over ``ablation.runtime.max_images``
LR images of ``profile.input_dir``, eager PyTorch), iterations and training seconds. Logged as
the MLflow stage run ``ablate``.

An unknown ablation name (or a bad variant) is refused with one ``error:`` line listing the
known names, exit code 2, before anything is trained.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from prefect import flow

from pipeline import tags as T
from pipeline.entry import log, run_entry
from pipeline.settings import (ABLATION_SCHEDULES, AblationError, AblationSettings, Settings,
                               load_settings)
from pipeline.stage_config import train_config
from pipeline.tracking import stage_run
from rlfn.errors import ConfigError, RLFNError
from rlfn.io import write_json

__all__ = ["AblationError", "SCHEDULES", "variant_names", "resolve", "stage_overrides",
           "stage_configs", "check", "ablate"]

SCHEDULES = ABLATION_SCHEDULES
SPEC_KEYS = {"model", "schedule", "contrastive", "same_as", "note"}


def _section(s: Settings) -> AblationSettings:
    if s.ablation is None:
        raise AblationError(f"{s.params_file}: no ablation: section")
    return s.ablation


def variant_names(s: Settings) -> list[str]:
    return list(_section(s).variants)


def resolve(s: Settings, name: str) -> dict:
    """The variant's spec ``{model, schedule, contrastive, runs_as}`` (aliases followed)."""
    variants = _section(s).variants
    if name not in variants:
        raise AblationError(f"ablation.name: unknown ablation {name!r}; known: "
                            f"{', '.join(variants)}")
    seen, cur = [name], variants[name]
    while isinstance(cur, dict) and "same_as" in cur:
        target = cur["same_as"]
        if target not in variants or target in seen:
            raise AblationError(f"ablation.variants.{seen[-1]}.same_as: {target!r} is not "
                                f"another ablation (known: {', '.join(variants)})")
        seen.append(target)
        cur = variants[target]
    if not isinstance(cur, dict):
        raise AblationError(f"ablation.variants.{seen[-1]}: expected {{model, schedule, "
                            f"contrastive}}")
    bad = sorted(set(cur) - SPEC_KEYS)
    if bad:
        raise AblationError(f"ablation.variants.{seen[-1]}: unknown key(s) {', '.join(bad)}; "
                            f"use model, schedule, contrastive")
    if "model" not in cur:
        raise AblationError(f"ablation.variants.{seen[-1]}: give a model")
    schedule = cur.get("schedule", "ws")
    if schedule not in SCHEDULES:
        raise AblationError(f"ablation.variants.{seen[-1]}.schedule: {schedule!r}; use one of "
                            f"{', '.join(SCHEDULES)}")
    contrastive = cur.get("contrastive", False)
    if not isinstance(contrastive, bool):
        raise AblationError(f"ablation.variants.{seen[-1]}.contrastive: expected true/false")
    return {"model": str(cur["model"]), "schedule": schedule, "contrastive": contrastive,
            "runs_as": seen[-1]}


def stage_overrides(s: Settings, name: str) -> list[tuple[int, dict]]:
    """``[(stage k, train overrides)]`` of the variant's runs, in order (warm start chains
    them)."""
    a = _section(s)
    spec = resolve(s, name)
    base, n = dict(a.base), a.stages
    iters = int(base.get("iterations", s.train.get("iterations", 1)))
    step = int(base.get("lr_step", s.train.get("lr_step", iters)))
    common = {**base, "model": spec["model"]}
    if spec["schedule"] == "ws":
        return [(k, {**common, "contrastive": spec["contrastive"] and k == n})
                for k in range(1, n + 1)]
    long = {**common, "iterations": n * iters, "contrastive": spec["contrastive"]}
    for key in ("val_every", "checkpoint_every", "epoch_iterations"):
        if key in base:  # keep the per-stage cadence: validations at the same iterations
            long[key] = base[key]
    if spec["schedule"] == "e2000":
        long.update(lr_step=n * step, lr_schedule="step", lr_cycle=0)
    else:  # clr
        long.update(lr_step=step, lr_schedule="cyclic", lr_cycle=iters)
    return [(1, long)]


def _data(s: Settings) -> dict:
    base = _section(s).base
    store = s.patches.store(base.get("scale", s.scale))
    if store.exists():
        return {"patch_store": str(store)}
    hr = base.get("hr_dir", s.train.get("hr_dir"))
    if not hr or not Path(hr).is_dir():
        raise AblationError(f"ablation: no training data: neither {store} (the patches stage) "
                            f"nor train.hr_dir ({hr}) exists")
    return {"hr_dir": str(hr)}


def stage_configs(s: Settings, name: str, data: dict | None = None) -> list:
    """The checked ``TrainConfig`` of every run of the variant: ``train`` + the warm-start
    stage's keys (``train_stages.<k>``, when defined) + the run's settings + ``data``."""
    data = data if data is not None else {"patch_store": "-"}
    out = []
    for k, sets in stage_overrides(s, name):
        sets = {**sets, **data}
        if "patch_store" in data:
            sets.pop("hr_dir", None)
        try:
            out.append(train_config(s, k, extra=sets, required=False))
        except ConfigError as e:
            raise AblationError(f"ablation {name}: {e}") from None
    return out


def check(params_file: str = "params.yaml") -> tuple[Settings, str]:
    """(settings, name) after every check that needs no training; raises AblationError."""
    s = load_settings(params_file)
    a = _section(s)
    for n in a.variants:  # every variant must expand (a typo anywhere is caught early)
        stage_overrides(s, n)
    if not a.name:
        raise AblationError(f"ablation.name: give one of {', '.join(a.variants)}")
    resolve(s, a.name)
    stage_configs(s, a.name)
    return s, a.name


@flow(name="rlfn-ablate", flow_run_name="ablate")
def ablate(params_file: str = "params.yaml") -> dict:
    """Train, score and time the variant ``ablation.name``; write ``ablation.out``."""
    import mlflow

    from pipeline.tracking import log_dict_metrics
    from rlfn.complexity import count_complexity
    from rlfn.evaluate import evaluate_folder
    from rlfn.profile import profile_runtime
    from rlfn.train.engine import train
    from rlfn.upscale import ModelUpscaler
    from rlfn.weights import load_model

    s, name = check(params_file)
    a = _section(s)
    spec = resolve(s, name)
    cfgs = stage_configs(s, name, _data(s))
    root = Path(a.dir) / name
    shutil.rmtree(root, ignore_errors=True)  # DVC reruns this only when something changed
    section = {"ablation": s.raw.get("ablation"), "train": s.raw.get("train"),
               "evaluate": s.raw.get("evaluate")}
    t0 = time.perf_counter()
    with stage_run("ablate", s, section):
        mlflow.set_tag(T.ABLATION, name)
        mlflow.log_params({"ablation": name, "model": spec["model"],
                           "schedule": spec["schedule"], "contrastive": spec["contrastive"],
                           "runs": len(cfgs)})
        init, results, offset = None, [], 0
        for i, cfg in enumerate(cfgs, 1):
            out = root / f"stage{i}"
            log.info(f"ablation {name}: run {i}/{len(cfgs)} {cfg.model} {cfg.iterations} it, "
                     f"lr_schedule {cfg.lr_schedule}, contrastive {cfg.contrastive} -> {out}")
            res = train(cfg, out, init=init, progress=False,
                        on_log=lambda it, m, o=offset: mlflow.log_metrics(m, step=o + it))
            results.append(res)
            offset += cfg.iterations
            init = res.weights
        scale = cfgs[-1].scale
        model = load_model(results[-1].weights, scale=scale).model.eval()
        sets = {}
        for set_name, hr_dir in s.evaluate.sets.items():
            rep = evaluate_folder(ModelUpscaler(model), hr_dir)
            if rep.errors:
                raise RLFNError(hr_dir, f"ablation {name}: evaluate {set_name}: "
                                        + "; ".join(rep.errors))
            sets[set_name] = {k: round(v, 4) for k, v in rep.mean.items()}
        first = sets.get("Set5") or next(iter(sets.values()))
        cx = count_complexity(model)
        rt_cfg = a.runtime
        rt = profile_runtime(model, s.profile.input_dir,
                             max_images=int(rt_cfg["max_images"]),
                             warmup=int(rt_cfg["warmup"]), device="cpu")
        metrics = {
            "name": name, "model": spec["model"], "schedule": spec["schedule"],
            "contrastive": spec["contrastive"], "runs_as": spec["runs_as"],
            "psnr_y": first["psnr_y"], "ssim_y": first["ssim_y"], "sets": sets,
            "params": cx["params"], "flops": cx["flops"], "activations": cx["activations"],
            "complexity_input": cx["input"],
            "runtime_ms_cpu": round(rt["median_ms"], 2), "runtime_images": rt["images"],
            "runtime_input_hw": rt["input_hw"], "runtime_threads": rt["threads"],
            "iterations": sum(c.iterations for c in cfgs), "runs": len(cfgs),
            "iterations_per_run": [c.iterations for c in cfgs],
            "iterations_per_stage": int(a.base.get("iterations", cfgs[0].iterations)),
            "batch_size": cfgs[0].batch_size, "patch_size": cfgs[0].patch_size,
            "val_psnr_by_run": [round(r.final_psnr, 4) if r.final_psnr is not None else None
                                for r in results],
            "train_seconds": round(sum(r.seconds for r in results), 1),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        write_json(a.out, metrics)
        log_dict_metrics("", {k: v for k, v in metrics.items() if k != "iterations_per_run"})
        log.info(f"ablation {name}: Set5 {metrics['psnr_y']:.3f} dB / {metrics['ssim_y']:.4f}, "
                 f"{metrics['params'] / 1e3:.1f}K params, {metrics['flops'] / 1e9:.2f} G "
                 f"FLOPs, {metrics['runtime_ms_cpu']:.0f} ms CPU, {metrics['seconds']:.0f} s")
        return metrics


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    # checked before the flow (and any training) starts; the entry contract of pipeline.entry
    return run_entry(lambda: ablate(args.params), check=lambda: check(args.params),
                     load_aware_threads=False)


if __name__ == "__main__":
    sys.exit(main())
