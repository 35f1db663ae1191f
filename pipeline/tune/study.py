"""The study: its storage (with heartbeats), the objective (one training run per trial) and the
Prefect flow ``tune`` that runs or resumes it and writes the outputs."""

from __future__ import annotations

import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger

from pipeline import tags as T
from pipeline.settings import read_params as params
from pipeline.tracking import stage_run
from rlfn.io import write_json

from .spec import TuneError, TuneSpec, hide_password, load_spec, mask_url, optuna_class

__all__ = ["open_storage", "tune", "write_outputs", "FINISHED"]

FINISHED = ("COMPLETE", "PRUNED")  # the states that count toward n_trials


def open_storage(spec: TuneSpec, on_stale=None):
    """The study's RDB storage with heartbeats; a clear error naming the (masked) URL when it
    cannot be opened."""
    import optuna
    from sqlalchemy.engine import make_url

    url, shown = spec.storage, mask_url(spec.storage)
    try:
        u = make_url(url)
    except Exception:
        raise TuneError("tune.storage", f"{shown} is not a database URL (expected e.g. "
                        "sqlite:///optuna.db or postgresql://user:pw@host/db)") from None
    kwargs: dict[str, Any] = {}
    if u.drivername.startswith("sqlite"):
        db = u.database or ""
        if db in ("", ":memory:"):
            raise TuneError("tune.storage", f"an in-memory database cannot be resumed "
                            f"({shown}); give a file (sqlite:///optuna.db)")
        if not Path(db).expanduser().resolve().parent.is_dir():
            raise TuneError("tune.storage", f"cannot open {shown}: directory "
                            f"{Path(db).parent} does not exist")
        kwargs = {"connect_args": {"timeout": 60}}
    elif u.drivername.split("+")[0] in ("postgresql", "mysql"):
        kwargs = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=spec.heartbeat_s,
                grace_period=spec.grace_s, heartbeat_stale_trial_callback=on_stale)
        storage.get_all_studies()  # really connect
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, ModuleNotFoundError):
            msg += " (install the database driver)"
        raise TuneError("tune.storage", hide_password(f"cannot open {shown} ({msg})", url)
                        ) from None
    return storage


# ---------------------------------------------------------------------------- the trials
def _suggest(trial, name: str, s: dict) -> Any:
    if s["type"] == "categorical":
        return trial.suggest_categorical(name, s["choices"])
    fn = trial.suggest_int if s["type"] == "int" else trial.suggest_float
    return fn(name, s["low"], s["high"], log=s["log"], **({"step": s["step"]} if "step" in s
                                                            else {}))


def _make(kind: str, name: str, kwargs: dict):
    return optuna_class(kind, name)(**kwargs)


def _reseed(sampler: Any, seed: int) -> None:
    """Seed ``sampler``'s random state (and its inner random sampler's) with ``seed``. Called
    with the sampler's seed + the trial number before a trial draws: the draws are a function
    of the trial number, so a resumed run does not replay the first run's, and two processes
    sharing a study (team mode) never draw the same values from the same seed."""
    from optuna.samplers._lazy_random_state import LazyRandomState

    for obj in (sampler, getattr(sampler, "_random_sampler", None)):
        if obj is not None and isinstance(getattr(obj, "_rng", None), LazyRandomState):
            obj._rng = LazyRandomState(seed)


def _store_for(spec: TuneSpec, patch_size: int, scale: int) -> str:
    """Without the pipeline's patch store: one store built from ``hr_dir`` per patch size,
    shared by the trials (rebuilt only when the folder changes)."""
    if "patch_store" in spec.data:
        return spec.data["patch_store"]
    from rlfn.train.data import store_from_folder

    return str(store_from_folder(spec.data["hr_dir"], scale, patch_size,
                                 spec.trials_dir / "_hr_store" / f"p{patch_size}",
                                 progress=False))


def _still_needed(study, spec: TuneSpec, t_end: float | None, log) -> bool:
    """Whether this process should start another trial: fewer than ``n_trials`` finished and
    not already enough with the trials running elsewhere (another process sharing the study).
    Such live trials are waited for: when one finishes it counts, when its process died the
    heartbeat fails it (``fail_stale_trials``, after ``grace_s``) and a trial is run in its
    place. Checking every finished trial only (Optuna's ``MaxTrialsCallback``, as before) let
    a process start a trial while another's last needed one was running: n_trials + 1 finished
    with two processes. False past ``tune.timeout_s``."""
    import optuna

    waiting = False
    while t_end is None or time.monotonic() < t_end:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        c = _counts(study)
        done = sum(c[s] for s in FINISHED)
        if done >= spec.n_trials:
            return False
        if done + c["RUNNING"] < spec.n_trials:
            return True
        if not waiting:
            log.info(f"{done} finished and {c['RUNNING']} running elsewhere make "
                     f"n_trials={spec.n_trials}: waiting for those to end")
            waiting = True
        time.sleep(max(1, spec.heartbeat_s))
    return False


def _counts(study) -> dict[str, int]:
    out = {s: 0 for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def _best(study):
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return max(done, key=lambda t: t.value) if done else None


def write_outputs(spec: TuneSpec, study) -> dict:
    best = _best(study)
    counts = _counts(study)
    summary = {"study": spec.study, "metric": spec.metric, "direction": "maximize",
               "n_trials_target": spec.n_trials, "n_trials": sum(counts.values()),
               "states": counts, "best_value": best.value if best else None,
               "best_trial": best.number if best else None}
    write_json(spec.out, summary)
    spec.best_out.parent.mkdir(parents=True, exist_ok=True)
    if best is None:
        head = (f"# Optuna study {spec.study!r} ({mask_url(spec.storage)}): no COMPLETE trial "
                "yet, nothing to merge.\n")
        body = {"train": {}}
    else:
        head = (f"# Best trial of Optuna study {spec.study!r} ({mask_url(spec.storage)}): "
                f"trial {best.number}, {spec.metric} {best.value:.4f} dB with the short "
                f"tune.base budget\n# ({counts['COMPLETE']} complete, {counts['PRUNED']} "
                f"pruned, {counts['FAIL']} failed trials). Merge into params.yaml's train: "
                "with: python -m pipeline.tune --apply\n")
        body = {"train": {k: best.params[k] for k in spec.space if k in best.params}}
    spec.best_out.write_text(head + yaml.safe_dump(body, sort_keys=False,
                                                   default_flow_style=False))
    return summary


# ---------------------------------------------------------------------------- the flow
@flow(name="rlfn-tune", flow_run_name="tune")
def tune(params_file: str = "params.yaml") -> dict:
    """Run (or resume) the study up to ``tune.n_trials`` finished trials; write the outputs."""
    import mlflow
    import optuna
    import torch

    from rlfn.train.engine import train

    log = get_run_logger()
    spec = load_spec(params_file)
    prm = params(params_file)
    client_box: dict[str, Any] = {}

    def on_stale(study, trial) -> None:  # a trial of a killed process: its MLflow run too
        log.warning(f"trial {trial.number}: no heartbeat for {spec.grace_s} s (its process "
                    "died): marked FAIL")
        if "client" not in client_box:
            return
        c, exp_id = client_box["client"], client_box["experiment_id"]
        rids = [trial.user_attrs["mlflow_run_id"]] if "mlflow_run_id" in trial.user_attrs \
            else [r.info.run_id for r in c.search_runs(  # killed before it was recorded
                [exp_id], f"tags.`optuna.study` = '{spec.study}' and tags.`optuna.trial` = "
                f"'{trial.number}' and attributes.status = 'RUNNING'")]
        for rid in rids:
            c.set_tag(rid, "optuna.state", "FAIL")
            c.set_tag(rid, "optuna.fail_reason", "stale heartbeat (process killed)")
            c.set_terminated(rid, "KILLED")

    storage = open_storage(spec, on_stale)
    section = {"tune": prm.get("tune"), "train": prm.get("train")}
    with stage_run("tune", prm, section):
        client_box.update(client=mlflow.MlflowClient(),
                          experiment_id=mlflow.active_run().info.experiment_id)
        study = optuna.create_study(
            study_name=spec.study, storage=storage, direction="maximize", load_if_exists=True,
            sampler=_make("sampler", *spec.sampler), pruner=_make("pruner", *spec.pruner))
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise TuneError("tune.study", f"study {spec.study!r} in {mask_url(spec.storage)} "
                            "minimises; use another tune.study")
        seed = spec.sampler[1].get("seed")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        for e in spec.enqueue:
            study.enqueue_trial(dict(e), skip_if_exists=True)
        before = _counts(study)
        missing = spec.n_trials - sum(before[s] for s in FINISHED)
        mlflow.log_params({"study": spec.study, "storage": mask_url(spec.storage),
                           "n_trials": spec.n_trials, "metric": spec.metric,
                           "sampler": spec.sampler[0], "pruner": spec.pruner[0],
                           "space": ",".join(spec.space), "resumed_with": sum(before.values())})
        log.info(f"study {spec.study!r} in {mask_url(spec.storage)}: {before}; "
                 f"{max(missing, 0)} trial(s) to run")

        def objective(trial) -> float:
            if seed is not None:  # the draws: a function of the trial number (see _reseed)
                _reseed(study.sampler, int(seed) + trial.number)
            sampled = {k: _suggest(trial, k, s) for k, s in spec.space.items()}
            cfg0 = spec.train_config(sampled, patch_store="-")
            cfg = spec.train_config(sampled, _store_for(spec, cfg0.patch_size, cfg0.scale))
            out = spec.trials_dir / spec.study / f"{trial.number:04d}"
            shutil.rmtree(out, ignore_errors=True)  # trial numbers are never reused
            run = mlflow.start_run(run_name=f"trial {trial.number}", nested=True,
                                   experiment_id=mlflow.active_run().info.experiment_id, tags={
                T.KIND: "trial", T.DVC_STAGE: "tune", "optuna.study": spec.study,
                "optuna.trial": str(trial.number), "optuna.state": "RUNNING"})
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            trial.set_user_attr("out_dir", str(out))
            state, status = "FAIL", "FAILED"
            try:
                mlflow.log_params({**{k: v for k, v in cfg.to_dict().items()
                                      if v is not None and k != "patch_store"},
                                   "optuna.trial": trial.number})

                def on_validate(it: int, psnr: float) -> None:
                    trial.report(psnr, step=it)
                    if it < cfg.iterations and trial.should_prune():
                        raise optuna.TrialPruned(f"val_psnr {psnr:.3f} dB at iteration {it}")

                res = train(cfg, out, progress=False, on_validate=on_validate,
                            on_log=lambda it, m: mlflow.log_metrics(m, step=it))
                value = res.final_psnr if spec.metric == "val_psnr" else res.best_psnr
                if value is None or not math.isfinite(value):
                    raise FloatingPointError(f"no finite validation PSNR ({value})")
                mlflow.log_metric(spec.metric + "_objective", value)
                state, status = "COMPLETE", "FINISHED"
                log.info(f"trial {trial.number}: {sampled} -> {spec.metric} {value:.3f} dB")
                return value
            except optuna.TrialPruned as e:
                state, status = "PRUNED", "FINISHED"
                log.info(f"trial {trial.number}: {sampled} pruned ({e})")
                raise
            except Exception as e:
                mlflow.set_tag("optuna.fail_reason", f"{type(e).__name__}: {e}"[:500])
                raise
            finally:
                mlflow.set_tag("optuna.state", state)
                mlflow.end_run(status)
                shutil.rmtree(out / "checkpoint", ignore_errors=True)  # never resumed

        if missing > 0:
            catch = (FloatingPointError, torch.cuda.OutOfMemoryError)  # a bad config: FAIL
            t_end = time.monotonic() + spec.timeout_s if spec.timeout_s else None
            # one trial at a time, each only while the study still needs it, counting the
            # trials other processes run (_still_needed): processes sharing the study finish
            # n_trials between them, not up to n_trials + processes - 1
            for _ in range(missing):
                if not _still_needed(study, spec, t_end, log):
                    break
                study.optimize(objective, n_trials=1, catch=catch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        summary = write_outputs(spec, study)
        mlflow.log_metrics({f"trials_{k.lower()}": v for k, v in summary["states"].items()})
        if summary["best_value"] is not None:
            mlflow.log_metrics({"best_value": summary["best_value"],
                                "best_trial": summary["best_trial"]})
        for p in (spec.out, spec.best_out):
            mlflow.log_artifact(str(p))
        log.info(f"best: trial {summary['best_trial']} ({summary['best_value']}); "
                 f"states {summary['states']}; wrote {spec.best_out} and {spec.out}")
        return summary
