"""Stage `profile`: the final model's NTIRE counts, runtime and peak memory, and a
PSNR-vs-runtime Pareto chart of every model the project knows.

``profile.out`` (metrics/profile.json, the last stage's model; what ``dvc metrics show``
shows): ``params``, ``flops``, ``activations`` (NTIRE 2022 counting on a 256x256 LR input),
``runtime_ms_cpu`` (median over ``profile.input_dir`` with ``profile.backend``),
``runtime_rel`` (that time relative to ``profile.reference`` timed alongside: the figure
``promote.runtime_budget_rel`` gates) and ``peak_rss_mb``. ``profile.details``
(reports/profile.json): the whole ``rlfn.profile.profile_report`` (spread, threads, images,
backend, reference) and the Pareto points.

Pareto (``profile.pareto``): the official weights listed there (files that are absent are
skipped with a note), every warm-start stage's model and every registered version of ``rlfn-x<scale>``
(deduplicated by weights sha256) are each scored on the listed sets (absent sets skipped)
and timed on the first ``pareto.max_images`` LR images with ``pareto.backend``. The official
weights' points come from stage ``pareto_official`` (``pareto.official_out``), not scored again
here, while that file was made with these settings and for a file of the recorded sha256
(otherwise that model is scored here, said in one line); ``pipeline.pareto`` has the rules.
``pareto.extra_backends`` adds the final model with other (lossy) backends; int8 is
calibrated on the patch store of the model's scale (``patches.out``, a dep of this stage).
``plots/pareto.csv`` (a DVC plot) and ``plots/pareto.png``; both logged to MLflow.
The registry is read as it is at run time: DVC does not track it, so a version registered
since the last run is picked up on the next change to this stage's inputs (or
``dvc repro -f profile``).
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from pathlib import Path

import mlflow
import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipeline.entry import log, main
from pipeline.pareto import available_sets, official_settings, pareto_point, time_architecture
from pipeline.settings import ParetoSettings, ProfileSettings, Settings, load_settings
from pipeline.tracking import log_dict_metrics, stage_run
from rlfn.errors import ConfigError, DataError
from rlfn.backends import BACKENDS, check_backend, make_engine
from rlfn.engine import BackendError
from rlfn.io import write_json
from rlfn.io import sha256_file
from rlfn.models import build_model, model_names
from rlfn.pareto import pareto_front, plot_pareto
from rlfn.profile import profile_report, timing_machine
from rlfn.threads import configure_threads
from rlfn.weights import load_model

CSV_FIELDS = ["label", "kind", "set", "psnr_y", "ssim_y", "runtime_ms", "params", "on_front",
              "backend", "sha256"]


@task(cache_policy=NO_CACHE)  # DVC is the cache; inputs need not hash
def measure(weights: Path, scale: int, p: ProfileSettings) -> dict:
    """The profile report (``rlfn.profile.profile_report``) of one weights file on the CPU,
    timed image by image alongside ``profile.reference`` (seeded weights; its runtime does
    not depend on them) for the machine-independent ``runtime_rel``."""
    loaded = load_model(weights, scale=scale)
    engine = make_engine(loaded.model, p.backend, "cpu")
    torch.manual_seed(0)
    reference = make_engine(build_model(p.reference, scale).eval(), p.backend, "cpu")
    return profile_report(loaded.model, engine, p.input_dir, p.max_images, p.warmup,
                          reference=reference, reference_name=p.reference)


def figures(report: dict) -> dict:
    """The figures of ``profile.out`` (DVC metrics) from a profile report."""
    rt, mem = report["runtime"], report["memory"]
    return {"params": report["params"], "flops": report["flops"],
            "activations": report["activations"], "runtime_ms_cpu": round(rt["median"], 3),
            "runtime_rel": round(rt["relative"], 4), "peak_rss_mb": round(mem["peak_rss"], 1)}


def _candidates(s: Settings, tmp: Path) -> list[dict]:
    """(label, kind, path) of every model to chart, first occurrence of each sha256 kept."""
    pp = s.profile.pareto
    out: list[dict] = []
    for f in pp.models:
        if Path(f).is_file():
            out.append({"label": Path(f).stem, "kind": "official", "path": Path(f)})
        else:
            log.warning(f"profile: {f} not found; left out of the Pareto chart")
    for k in s.stage_keys:
        out.append({"label": f"stage{k}", "kind": "stage", "path": s.stage_weights(k)})
    if pp.registry:
        from pipeline.mlflow_registry import version_weights

        name = s.registered_model
        for v in version_weights(name, tmp):
            if "error" in v:
                log.warning(f"profile: {name} v{v['version']}: weights not readable "
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


def _backend_candidates(s: Settings) -> list[dict]:
    """The final model with each of ``pareto.extra_backends`` that can run here."""
    out = []
    final = s.final_weights
    for b in s.profile.pareto.extra_backends:
        if b == s.profile.pareto.backend:
            continue
        try:
            check_backend(b, "cpu")
        except BackendError as e:
            log.warning(f"profile: pareto.extra_backends {b}: {e.reason}; left out of the chart")
            continue
        out.append({"label": f"stage{s.stage_keys[-1]} {b}", "kind": "backend", "path": final,
                    "backend": b, "sha256": sha256_file(final)})
    return out


def _official(s: Settings, sets: dict[str, str]) -> dict[str, dict]:
    """The points of ``pareto.official_out`` (stage ``pareto_official``) that hold here, by
    sha256: made with this chart's settings, for a file that still has that sha256. Where the
    file is missing or made with other settings: {} (every official model scored here), said
    in one line."""
    pp = s.profile.pareto
    f = Path(pp.official_out)
    if not f.is_file():
        log.warning(f"profile: {f} not found (stage pareto_official); the official weights "
                    f"are scored here")
        return {}
    try:
        rec = json.loads(f.read_text())
        settings, models = rec["settings"], rec["models"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(str(f), f"not a pareto_official file ({e}); run dvc repro -f "
                                f"pareto_official") from None
    want = official_settings(s, sets)
    if settings != want:
        diff = sorted(k for k in want if settings.get(k) != want[k])
        log.warning(f"profile: {f} was made with other settings ({', '.join(diff)}); the "
                    f"official weights are scored here")
        return {}
    return {m["sha256"]: {**m, "machine": rec.get("machine")} for m in models if m["rows"]}


def _official_rows(c: dict, rec: dict, pp: ParetoSettings, s: Settings, timed: dict) -> list[dict]:
    """An official model's rows from its record; its runtime reused on the machine it was
    timed on, else its architecture timed here (once per chart)."""
    key = f"{rec['arch']}/{pp.backend}"
    if key not in timed:
        if rec["runtime"] is not None and rec["machine"] == timing_machine():
            timed[key] = rec["runtime"]
        else:
            log.info(f"profile: {c['label']}: recorded on {rec['machine']}; timing "
                     f"{rec['arch']} here")
            timed[key] = time_architecture(rec["arch"], s.scale, pp.backend, pp,
                                           s.profile.input_dir)
    rt = timed[key]
    return [{**r, "label": c["label"], "runtime_ms": round(rt["median_ms"], 2),
             "params": rt["params"]} for r in rec["rows"]]


def pareto(s: Settings) -> list[dict]:
    pp = s.profile.pareto
    sets = available_sets(pp)
    if not sets:
        log.warning("profile: no Pareto sets available; chart skipped")
        return []
    official = _official(s, sets)
    with tempfile.TemporaryDirectory(prefix="rlfn-registry-") as tmp:
        rows, timed, reused = [], {}, []
        for c in _candidates(s, Path(tmp)) + _backend_candidates(s):
            rec = official.get(c["sha256"]) if c["kind"] == "official" else None
            if rec is not None:
                rows += _official_rows(c, rec, pp, s, timed)
                reused.append(c["label"])
                continue
            if c["kind"] == "official" and official:
                log.warning(f"profile: {c['path']}: sha256 {c['sha256'][:16]} is not the one "
                            f"{pp.official_out} scored; scored here")
            more, rt, _ = pareto_point(c, s.scale, pp, s.profile.input_dir, sets, timed,
                                       calibration=str(s.patches.store(s.scale)))
            rows += more
            timed.update(rt)
    if reused:
        log.info(f"profile: official points reused from {pp.official_out}: "
                 f"{', '.join(reused)}")
    for set_name in sets:
        sel = [r for r in rows if r["set"] == set_name]
        for r, f in zip(sel, pareto_front([r["runtime_ms"] for r in sel],
                                          [r["psnr_y"] for r in sel])):
            r["on_front"] = int(f)
    csv_path = Path(pp.csv)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    threads = torch.get_num_threads()
    extra = "".join(f"; {b}" for b in dict.fromkeys(r["backend"] for r in rows)
                    if b != pp.backend)
    png = plot_pareto(rows, pp.png,
                      title=f"x{s.scale}: Y-PSNR vs CPU runtime ({pp.backend}{extra}, {threads} "
                            f"threads, median of {pp.max_images} DIV2K LR images)",
                      runtime_label=f"CPU ms / image ({pp.backend} unless named)")
    mlflow.log_artifact(str(csv_path), artifact_path="pareto")
    if png:
        mlflow.log_artifact(str(png), artifact_path="pareto")
    return rows


def check(s: Settings) -> None:
    """Backends named in params must exist and be installed: said before any work."""
    p = s.profile
    check_backend(p.backend, "cpu", where=f"{s.params_file}: profile.backend",
                  exact_for="the promotion gate's runtime must come from an exact backend")
    check_backend(p.pareto.backend, "cpu", where=f"{s.params_file}: profile.pareto.backend")
    for b in p.pareto.extra_backends:  # a typo is an error; a backend not runnable here, a note
        if b not in BACKENDS:
            raise ConfigError(f"{s.params_file}: profile.pareto.extra_backends",
                              f"unknown backend {b!r}; known: {', '.join(BACKENDS)}")
    if p.reference not in model_names():
        raise ConfigError(f"{s.params_file}: profile.reference", f"unknown model "
                          f"{p.reference!r}; known: {', '.join(model_names())}")


@flow(name="rlfn-profile", flow_run_name="profile")
def profile(settings: Settings | None = None) -> dict:
    s = settings or load_settings()
    check(s)
    p = s.profile
    if p.threads:
        configure_threads(p.threads)
    with stage_run("profile", s, s.section("profile")):
        report = measure(s.final_weights, s.scale, p)
        out = figures(report)
        rows = pareto(s)
        write_json(p.out, out)
        write_json(p.details, {**report, "pareto": rows})
        log_dict_metrics("", out)
        mlflow.log_artifact(p.details)
        for row in rows:
            mlflow.log_metrics({f"pareto.{row['label'].split()[0]}.{row['set']}.psnr_y":
                                row["psnr_y"],
                                f"pareto.{row['label'].split()[0]}.runtime_ms":
                                row["runtime_ms"]})
        rt = report["runtime"]
        log.info(f"profile: {out['params']:,} params, {out['flops'] / 1e9:.2f} G FLOPs, "
                 f"{out['activations'] / 1e6:.2f} M activations; {out['runtime_ms_cpu']:.1f} "
                 f"ms/image (CPU {report['backend']}, {rt['threads']} threads, median of "
                 f"{rt['images']}), {out['runtime_rel']:.2f}x {rt['reference']} "
                 f"({rt['reference_median']:.1f} ms), peak RSS {out['peak_rss_mb']:.0f} MB")
        for row in rows:
            log.info(f"  pareto {row['label']:<28} {row['set']:<6} {row['psnr_y']:.3f} dB  "
                     f"{row['runtime_ms']:.1f} ms{'  *front*' if row['on_front'] else ''}")
        return out


if __name__ == "__main__":
    sys.exit(main(profile, check=check))
