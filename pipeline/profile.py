"""Stage `profile`: the final model's NTIRE counts, runtime and peak memory, and a
PSNR-vs-runtime Pareto chart of every model the project knows.

``metrics/profile.json`` (the final, stage-3 model): ``params``, ``flops``, ``activations``
(NTIRE 2022 counting on a 256x256 LR input), ``runtime_ms_cpu`` (median over
``profile.input_dir`` with ``profile.backend``: the figure ``promote.runtime_budget_ms``
gates), spread, threads, peak RSS.

Pareto (``profile.pareto``): the official weights listed there (files that are absent are
skipped with a note), our three stages and every registered version of ``rlfn-x<scale>``
(deduplicated by weights sha256) are each scored on the listed sets (absent sets skipped)
and timed on the first ``pareto.max_images`` LR images with ``pareto.backend``.
``plots/pareto.csv`` (a DVC plot) and ``plots/pareto.png``; both logged to MLflow.
The registry is read as it is at run time: DVC does not track it, so a version registered
since the last run is picked up on the next change to this stage's inputs (or
``dvc repro -f profile``).
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import mlflow
import torch
from prefect import flow, task

from pipeline._common import log_dict_metrics, params, stage_run, write_json
from rlfn.complexity import count_complexity
from rlfn.evaluate import evaluate_folder
from rlfn.infer import BACKENDS, check_backend, make_engine
from rlfn.io import sha256_file
from rlfn.pareto import pareto_front, plot_pareto
from rlfn.profile import profile_runtime
from rlfn.upscale import ModelUpscaler
from rlfn.weights import load_model

CSV_FIELDS = ["label", "kind", "set", "psnr_y", "ssim_y", "runtime_ms", "params", "on_front",
              "backend", "sha256"]


@task
def measure(weights: Path, scale: int, p: dict) -> dict:
    """Counts, runtime and memory of one weights file."""
    loaded = load_model(weights, scale=scale)
    counts = count_complexity(loaded.model)
    engine = make_engine(loaded.model, p.get("backend", "eager"), "cpu")
    r = profile_runtime(engine, p["input_dir"], p.get("max_images", 0), p.get("warmup", 2))
    return {**counts, **r}


def _candidates(prm: dict, models: Path, scale: int, pp: dict, tmp: Path) -> list[dict]:
    """(label, kind, path) of every model to chart, first occurrence of each sha256 kept."""
    out: list[dict] = []
    for f in pp.get("models") or []:
        if Path(f).is_file():
            out.append({"label": Path(f).stem, "kind": "official", "path": Path(f)})
        else:
            print(f"profile: note: {f} not found; left out of the Pareto chart")
    for k in (1, 2, 3):
        out.append({"label": f"stage{k}", "kind": "stage",
                    "path": models / f"stage{k}" / "model.safetensors"})
    if pp.get("registry", True):
        from pipeline.registry import version_weights

        name = prm.get("promote", {}).get("registered_model") or f"rlfn-x{scale}"
        for v in version_weights(name, tmp):
            if "error" in v:
                print(f"profile: note: {name} v{v['version']}: weights not readable "
                      f"({v['error']}); left out")
                continue
            alias = f" @{','.join(v['aliases'])}" if v["aliases"] else ""
            out.append({"label": f"v{v['version']}{alias}", "kind": "registry",
                        "path": Path(v["path"])})
    seen: dict[str, dict] = {}
    for c in out:
        sha = sha256_file(c["path"])
        if sha in seen:  # a registered stage: one point, both names
            if c["kind"] == "registry":
                seen[sha]["label"] += f" ({c['label']})"
            continue
        c["sha256"] = sha
        seen[sha] = c
    return list(seen.values())


@task
def pareto_point(c: dict, scale: int, pp: dict, input_dir: str, sets: dict) -> list[dict]:
    loaded = load_model(c["path"], scale=scale)
    backend = pp.get("backend", "eager")
    engine = make_engine(loaded.model, backend, "cpu")
    rt = profile_runtime(engine, input_dir, pp.get("max_images", 5), pp.get("warmup", 1))
    rows = []
    for set_name, hr_dir in sets.items():
        rep = evaluate_folder(ModelUpscaler(engine), hr_dir, progress=True,
                              desc=f"{c['label']} {set_name}")
        if rep.errors:
            raise RuntimeError(f"pareto {c['label']} on {set_name}: " + "; ".join(rep.errors))
        rows.append({"label": c["label"], "kind": c["kind"], "set": set_name,
                     "psnr_y": round(rep.mean["psnr_y"], 4),
                     "ssim_y": round(rep.mean["ssim_y"], 5),
                     "runtime_ms": round(rt["median_ms"], 2), "params": rt["params"],
                     "backend": backend, "sha256": c["sha256"][:16]})
    return rows


def pareto(prm: dict, models: Path, scale: int) -> list[dict]:
    p = prm["profile"]
    pp = p.get("pareto") or {}
    sets = {}
    for name, hr in (pp.get("sets") or {}).items():
        if Path(hr).is_dir():
            sets[name] = hr
        else:
            print(f"profile: note: {name} ({hr}) not found; no {name} panel")
    if not sets:
        print("profile: no Pareto sets available; chart skipped")
        return []
    with tempfile.TemporaryDirectory(prefix="rlfn-registry-") as tmp:
        rows = []
        for c in _candidates(prm, models, scale, pp, Path(tmp)):
            rows += pareto_point(c, scale, pp, p["input_dir"], sets)
    for set_name in sets:
        sel = [r for r in rows if r["set"] == set_name]
        for r, f in zip(sel, pareto_front([r["runtime_ms"] for r in sel],
                                          [r["psnr_y"] for r in sel])):
            r["on_front"] = int(f)
    csv_path = Path(pp.get("csv", "plots/pareto.csv"))
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    threads = torch.get_num_threads()
    png = plot_pareto(rows, pp.get("png", "plots/pareto.png"),
                      title=f"x{scale}: Y-PSNR vs CPU runtime ({pp.get('backend', 'eager')}, "
                            f"{threads} threads, median of {pp.get('max_images', 5)} DIV2K LR "
                            "images)",
                      runtime_label=f"CPU ms / image ({pp.get('backend', 'eager')})")
    mlflow.log_artifact(str(csv_path), artifact_path="pareto")
    if png:
        mlflow.log_artifact(str(png), artifact_path="pareto")
    return rows


def _check_params(p: dict) -> None:
    """Backends named in params must exist and be installed: say so before any work."""
    for key, backend in (("profile.backend", p.get("backend", "eager")),
                         ("profile.pareto.backend", (p.get("pareto") or {}).get("backend",
                                                                                 "eager"))):
        try:
            check_backend(backend, "cpu")
        except ValueError as e:
            raise ValueError(f"params.yaml {key}: {e}") from None
    if not BACKENDS[p.get("backend", "eager")].exact:
        raise ValueError(f"params.yaml profile.backend: {p['backend']} is not exact; the "
                         "promotion gate's runtime must come from an exact backend")


@flow(name="rlfn-profile", flow_run_name="profile")
def profile() -> dict:
    prm = params()
    p, scale = prm["profile"], prm["train"]["scale"]
    _check_params(p)
    if p.get("threads"):
        torch.set_num_threads(int(p["threads"]))
    models = Path(prm.get("train_launch", {}).get("out", "models"))
    with stage_run("profile", prm, p):
        r = measure(models / "stage3" / "model.safetensors", scale, p)
        out = {"params": r["params"], "flops": r["flops"], "activations": r["activations"],
               "counts_input": r["input"], "backend": r["backend"],
               "runtime_ms_cpu": round(r["median_ms"], 3),
               "runtime_ms_cpu_mean": round(r["mean_ms"], 3),
               "runtime_ms_cpu_stdev": round(r["stdev_ms"], 3), "threads": r["threads"],
               "images": r["images"], "input_hw": r["input_hw"],
               "peak_rss_mb": round(r["peak_rss_mb"], 1)}
        rows = pareto(prm, models, scale)
        out["pareto_points"] = len(rows)
        write_json(p["out"], out)
        log_dict_metrics("", {k: v for k, v in out.items() if k != "counts_input"})
        for row in rows:
            mlflow.log_metrics({f"pareto.{row['label'].split()[0]}.{row['set']}.psnr_y":
                                row["psnr_y"],
                                f"pareto.{row['label'].split()[0]}.runtime_ms":
                                row["runtime_ms"]})
        print(f"profile: {out['params']:,} params, {out['flops'] / 1e9:.2f} G FLOPs, "
              f"{out['activations'] / 1e6:.2f} M activations; {out['runtime_ms_cpu']:.1f} "
              f"ms/image (CPU {out['backend']}, {out['threads']} threads, median of "
              f"{out['images']}), peak RSS {out['peak_rss_mb']:.0f} MB")
        for row in rows:
            print(f"  pareto {row['label']:<28} {row['set']:<6} {row['psnr_y']:.3f} dB  "
                  f"{row['runtime_ms']:.1f} ms{'  *front*' if row['on_front'] else ''}")
        return out


if __name__ == "__main__":
    try:
        _check_params(params()["profile"])  # one clear line before Prefect starts
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    profile()
