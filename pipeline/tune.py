"""Stage `tune` (experiments/dvc.yaml, not part of the default `dvc repro`): an Optuna study
over the training hyper-parameters declared in ``params.yaml``'s ``tune:`` section.

Each trial trains with ``train`` + ``tune.base`` (a short budget) + the sampled values (via
``rlfn.train.engine.train``, on ``data/patches/x<scale>.arrow`` when the pipeline made it, else
on ``train.hr_dir``) in ``<tune.trials_dir>/<study>/<trial number>``, reports its validation
Y-PSNR at every validation (``trial.report(psnr, step=iteration)``) and is stopped early when
``tune.pruner`` says so. The study maximises ``tune.metric`` (``val_psnr``: the final
validation PSNR, or ``best_val_psnr``).

Storage and resume. The study lives in ``tune.storage``, any SQLAlchemy URL (default the
SQLite file ``optuna.db`` in the project; ``postgresql://...`` to share one study between
several machines: run this command on each). Rerunning resumes the same study
(``load_if_exists``). ``tune.n_trials`` is the study's total target of *finished* trials
(COMPLETE + PRUNED): a resumed study runs only the missing ones, and a complete study runs
none (it just rewrites the outputs). Failed trials (a crash, a diverged loss, a killed
process) do not count, so a rerun replaces them. ``tune.timeout_s`` bounds one invocation
(0 = none). The sampler's seed is offset by the number of trials already in the study, so a
resumed run does not replay the first run's draws.

Killed processes. Trials are watched by Optuna's heartbeat (``RDBStorage(heartbeat_interval=
tune.heartbeat_s, grace_period=tune.grace_s)``): a RUNNING trial whose heartbeat is older
than ``grace_s`` is marked FAIL (and its MLflow run KILLED) when the next trial starts, by any
worker. Live trials of other workers are never touched, which marking every RUNNING trial
failed on start would break. A dead trial still inside its grace period blocks nothing: it
does not count toward ``n_trials`` and the pruner only compares against COMPLETE trials.

Outputs: ``tune.best_out`` (``train: {key: value}`` of the best COMPLETE trial, ready to
merge: ``python -m pipeline.tune --apply`` writes it into ``params.yaml``'s ``train:``
section, keeping comments and formatting) and ``tune.out`` (metrics: best value, best trial,
trial counts by state). MLflow: the stage run (nested under the repro's parent run) holds one
nested run per trial with its params, its curves (``val_psnr`` per iteration) and its
final state as the tag ``optuna.state`` (COMPLETE / PRUNED / FAIL).

Bad input is refused with one ``error:`` line before any work starts: an unreachable storage
(the URL is named, its password hidden), an empty or unknown search space entry, an unknown
sampler or pruner, a key that is not a training setting.
"""

from __future__ import annotations

import argparse
import inspect
import math
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger

from pipeline._common import params, stage_run, write_json
from rlfn.train.config import ConfigError, TrainConfig, load_config

__all__ = ["TuneError", "TuneSpec", "load_spec", "open_storage", "mask_url", "tune",
           "apply_best", "main"]

DEFAULTS: dict[str, Any] = {
    "study": "rlfn-tune", "storage": "sqlite:///optuna.db", "n_trials": 8, "timeout_s": 0,
    "stage": 1, "sampler": {"name": "tpe", "seed": 0}, "pruner": {"name": "median"},
    "metric": "val_psnr", "base": {}, "space": {}, "enqueue": [],
    "heartbeat_s": 30, "grace_s": 120, "trials_dir": "tune/trials",
    "best_out": "tune/best_params.yaml", "out": "metrics/tune.json",
}
METRICS = ("val_psnr", "best_val_psnr")
TYPES = ("float", "int", "categorical")
NOT_TUNABLE = ("stage", "stages", "patch_store")
TRAIN_KEYS = {f.name for f in fields(TrainConfig)}
FINISHED = ("COMPLETE", "PRUNED")  # the states that count toward n_trials


class TuneError(ValueError):
    """A ``tune:`` setting that cannot be used; names the key."""


# ---------------------------------------------------------------------------- the spec
def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", str(url))


def _hide(text: str, url: str) -> str:
    """``text`` (an error message) with the URL's password masked wherever it appears."""
    try:
        from sqlalchemy.engine import make_url

        pw = make_url(url).password
    except Exception:
        pw = None
    text = text.replace(url, mask_url(url))
    return text.replace(str(pw), "***") if pw else text


def _num(v: Any, where: str, integer: bool = False) -> float | int:
    if isinstance(v, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
        try:
            v = float(v)
        except ValueError:
            raise TuneError(f"{where}: expected a number, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TuneError(f"{where}: expected a number, got {v!r}")
    if integer:
        if float(v) != int(v):
            raise TuneError(f"{where}: expected an integer, got {v!r}")
        return int(v)
    return float(v)


def _check_param(name: str, spec: Any) -> dict:
    where = f"tune.space.{name}"
    if name not in TRAIN_KEYS or name in NOT_TUNABLE:
        raise TuneError(f"{where}: {name!r} is not a tunable training setting (a key of the "
                        "train section / TrainConfig)")
    if not isinstance(spec, dict):
        raise TuneError(f"{where}: expected a mapping like {{type: float, low: .., high: ..}}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise TuneError(f"{where}: unknown type {kind!r}; use one of {', '.join(TYPES)}")
    allowed = {"float": {"type", "low", "high", "log", "step"},
               "int": {"type", "low", "high", "log", "step"},
               "categorical": {"type", "choices"}}[kind]
    extra = sorted(set(spec) - allowed)
    if extra:
        raise TuneError(f"{where}: unknown option(s) {', '.join(extra)} for type {kind}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise TuneError(f"{where}: empty search space (choices must be a non-empty list)")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise TuneError(f"{where}: choice {c!r} is not a number, string or bool")
        if len(set(map(repr, choices))) != len(choices):
            raise TuneError(f"{where}: repeated choices {choices}")
        return {"type": kind, "choices": list(choices)}
    if "low" not in spec or "high" not in spec:
        raise TuneError(f"{where}: give low and high")
    integer = kind == "int"
    low, high = _num(spec["low"], f"{where}.low", integer), _num(spec["high"], f"{where}.high",
                                                                   integer)
    if not low < high:
        raise TuneError(f"{where}: empty search space (low {low} >= high {high})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise TuneError(f"{where}.log: expected true/false, got {log!r}")
    if log and low <= 0:
        raise TuneError(f"{where}: log scale needs low > 0, got {low}")
    out = {"type": kind, "low": low, "high": high, "log": log}
    if spec.get("step") is not None:
        step = _num(spec["step"], f"{where}.step", integer)
        if step <= 0 or log:
            raise TuneError(f"{where}.step: must be > 0 and cannot be combined with log")
        out["step"] = step
    return out


def _factory(kind: str, spec: Any) -> tuple[str, dict]:
    """(name, kwargs) of ``tune.sampler`` / ``tune.pruner``, kwargs checked against the
    Optuna class's signature."""
    import optuna

    classes = ({"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                "qmc": optuna.samplers.QMCSampler} if kind == "sampler" else
               {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
                "percentile": optuna.pruners.PercentilePruner,
                "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
                "none": optuna.pruners.NopPruner})
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise TuneError(f"tune.{kind}: expected {{name: ..., ...}}")
    name = str(spec["name"]).lower()
    if name not in classes:
        raise TuneError(f"tune.{kind}: unknown {kind} {spec['name']!r}; use one of "
                        f"{', '.join(classes)}")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    accepted = set(inspect.signature(classes[name]).parameters)
    bad = sorted(set(kwargs) - accepted)
    if bad:
        raise TuneError(f"tune.{kind}: unknown option(s) {', '.join(bad)} for {name} (accepted: "
                        f"{', '.join(sorted(accepted)) or 'none'})")
    return name, kwargs


@dataclass
class TuneSpec:
    params_file: str
    study: str
    storage: str
    n_trials: int
    timeout_s: float
    stage: int
    sampler: tuple[str, dict]
    pruner: tuple[str, dict]
    metric: str
    base: dict
    space: dict[str, dict]
    enqueue: list[dict]
    heartbeat_s: int
    grace_s: int
    trials_dir: Path
    best_out: Path
    out: Path
    data: dict = field(default_factory=dict)  # {"patch_store": ...} or {"hr_dir": ...}

    def train_config(self, sampled: dict, patch_store: str | None = None) -> TrainConfig:
        sets = {**self.base, **sampled}
        if patch_store:
            sets["patch_store"] = patch_store
        elif "patch_store" in self.data:
            sets["patch_store"] = self.data["patch_store"]
        return load_config(self.params_file, sets, stage=self.stage)


def _extremes(space: dict[str, dict]) -> list[tuple[str, Any]]:
    out = []
    for name, s in space.items():
        values = s["choices"] if s["type"] == "categorical" else [s["low"], s["high"]]
        out += [(name, v) for v in values]
    return out


def load_spec(params_file: str = "params.yaml") -> TuneSpec:
    """The checked ``tune:`` section (everything but the storage, see ``open_storage``)."""
    prm = params(params_file)
    raw = prm.get("tune")
    if not isinstance(raw, dict):
        raise TuneError(f"{params_file}: no tune: section")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise TuneError(f"tune: unknown key(s) {', '.join(unknown)}; known: "
                        f"{', '.join(DEFAULTS)}")
    t = {**DEFAULTS, **raw}
    for key in ("study", "storage", "trials_dir", "best_out", "out"):
        if not isinstance(t[key], str) or not t[key].strip():
            raise TuneError(f"tune.{key}: expected a non-empty string, got {t[key]!r}")
    n_trials = _num(t["n_trials"], "tune.n_trials", integer=True)
    if n_trials < 1:
        raise TuneError(f"tune.n_trials: must be >= 1, got {n_trials}")
    timeout = _num(t["timeout_s"] or 0, "tune.timeout_s")
    heartbeat = _num(t["heartbeat_s"], "tune.heartbeat_s", integer=True)
    grace = _num(t["grace_s"], "tune.grace_s", integer=True)
    if timeout < 0 or heartbeat < 1 or grace <= heartbeat:
        raise TuneError("tune: need timeout_s >= 0, heartbeat_s >= 1 and grace_s > heartbeat_s")
    if t["metric"] not in METRICS:
        raise TuneError(f"tune.metric: unknown metric {t['metric']!r}; use one of "
                        f"{', '.join(METRICS)} (maximised)")
    base = t["base"] or {}
    if not isinstance(base, dict):
        raise TuneError("tune.base: expected a mapping of train keys")
    for k in base:
        if k not in TRAIN_KEYS or k in ("stages", "stage"):
            raise TuneError(f"tune.base: {k!r} is not a training setting (a key of the train "
                            "section / TrainConfig)")
    if not isinstance(t["space"], dict) or not t["space"]:
        raise TuneError("tune.space: empty; declare at least one parameter to search")
    space = {str(k): _check_param(str(k), v) for k, v in t["space"].items()}
    clash = sorted(set(space) & set(base))
    if clash:
        raise TuneError(f"tune.base and tune.space both set {', '.join(clash)}")
    enqueue = t["enqueue"] or []
    if not isinstance(enqueue, list) or not all(isinstance(e, dict) for e in enqueue):
        raise TuneError("tune.enqueue: expected a list of {param: value} mappings")
    for i, e in enumerate(enqueue):
        bad = sorted(set(e) - set(space))
        if bad:
            raise TuneError(f"tune.enqueue[{i}]: {', '.join(bad)} not in tune.space")
    spec = TuneSpec(params_file, t["study"], t["storage"], n_trials, timeout,
                    _num(t["stage"], "tune.stage", integer=True),
                    _factory("sampler", t["sampler"]), _factory("pruner", t["pruner"]),
                    t["metric"], dict(base), space, enqueue, heartbeat, grace,
                    Path(t["trials_dir"]), Path(t["best_out"]), Path(t["out"]))
    # the data the trials train on, as pipeline/train.py does
    train = prm.get("train") or {}
    store = Path((prm.get("patches") or {}).get("out", "data/patches")) / \
        f"x{base.get('scale', train.get('scale', 4))}.arrow"
    if store.exists():
        spec.data = {"patch_store": str(store)}
    else:
        hr = base.get("hr_dir", train.get("hr_dir"))
        if not hr or not Path(hr).is_dir():
            raise TuneError(f"tune: no training data: neither {store} (the patches stage) nor "
                            f"train.hr_dir ({hr}) exists")
        spec.data = {"hr_dir": str(hr)}
    # every extreme of the space must make a valid training config (checked, not trained)
    try:
        cfg = spec.train_config({}, patch_store="-")
        if not cfg.val_hr_dir or not Path(cfg.val_hr_dir).is_dir():
            raise TuneError(f"tune: trials are scored by validation: train.val_hr_dir "
                            f"({cfg.val_hr_dir}) must be a folder of HR images")
        for name, value in _extremes(space):
            try:
                spec.train_config({name: value}, patch_store="-")
            except ConfigError as e:
                raise TuneError(f"tune.space.{name}: value {value!r} is not a valid training "
                                f"setting ({e})") from None
        for i, e in enumerate(enqueue):
            spec.train_config(dict(e), patch_store="-")
    except ConfigError as e:
        raise TuneError(f"tune: {e}") from None
    return spec


def open_storage(spec: TuneSpec, on_stale=None):
    """The study's RDB storage with heartbeats; a clear error naming the (masked) URL when it
    cannot be opened."""
    import optuna
    from sqlalchemy.engine import make_url

    url, shown = spec.storage, mask_url(spec.storage)
    try:
        u = make_url(url)
    except Exception:
        raise TuneError(f"tune.storage {shown}: not a database URL (expected e.g. "
                        "sqlite:///optuna.db or postgresql://user:pw@host/db)") from None
    kwargs: dict[str, Any] = {}
    if u.drivername.startswith("sqlite"):
        db = u.database or ""
        if db in ("", ":memory:"):
            raise TuneError(f"tune.storage {shown}: an in-memory database cannot be resumed; "
                            "give a file (sqlite:///optuna.db)")
        if not Path(db).expanduser().resolve().parent.is_dir():
            raise TuneError(f"tune.storage {shown}: cannot open: directory "
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
        raise TuneError(_hide(f"tune.storage {shown}: cannot open ({msg})", url)) from None
    return storage


# ---------------------------------------------------------------------------- the study
def _suggest(trial, name: str, s: dict) -> Any:
    if s["type"] == "categorical":
        return trial.suggest_categorical(name, s["choices"])
    fn = trial.suggest_int if s["type"] == "int" else trial.suggest_float
    return fn(name, s["low"], s["high"], log=s["log"], **({"step": s["step"]} if "step" in s
                                                            else {}))


def _make(kind: str, name: str, kwargs: dict, offset: int = 0):
    import optuna

    if kind == "sampler":
        kwargs = dict(kwargs)
        if kwargs.get("seed") is not None:
            kwargs["seed"] = int(kwargs["seed"]) + offset  # a resumed run draws afresh
        return {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                "qmc": optuna.samplers.QMCSampler}[name](**kwargs)
    return {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
            "percentile": optuna.pruners.PercentilePruner,
            "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
            "none": optuna.pruners.NopPruner}[name](**kwargs)


def _store_for(spec: TuneSpec, patch_size: int, scale: int) -> str:
    """Without the pipeline's patch store: one store built from ``hr_dir`` per patch size,
    shared by the trials (rebuilt only when the folder changes)."""
    if "patch_store" in spec.data:
        return spec.data["patch_store"]
    from rlfn.train.data import store_from_folder

    return str(store_from_folder(spec.data["hr_dir"], scale, patch_size,
                                 spec.trials_dir / "_hr_store" / f"p{patch_size}",
                                 progress=False))


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
            raise TuneError(f"study {spec.study!r} in {mask_url(spec.storage)} minimises; "
                            "use another tune.study")
        existing = len(study.get_trials(deepcopy=False))
        if existing:  # a resumed run must not replay the first run's draws
            study.sampler = _make("sampler", *spec.sampler, offset=existing)
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
            sampled = {k: _suggest(trial, k, s) for k, s in spec.space.items()}
            cfg0 = spec.train_config(sampled, patch_store="-")
            cfg = spec.train_config(sampled, _store_for(spec, cfg0.patch_size, cfg0.scale))
            out = spec.trials_dir / spec.study / f"{trial.number:04d}"
            shutil.rmtree(out, ignore_errors=True)  # trial numbers are never reused
            run = mlflow.start_run(run_name=f"trial {trial.number}", nested=True,
                                   experiment_id=mlflow.active_run().info.experiment_id, tags={
                "rlfn.kind": "trial", "dvc_stage": "tune", "optuna.study": spec.study,
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
            study.optimize(objective, n_trials=missing, timeout=spec.timeout_s or None,
                           catch=catch, callbacks=[optuna.study.MaxTrialsCallback(
                               spec.n_trials, states=tuple(getattr(
                                   optuna.trial.TrialState, s) for s in FINISHED))])
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


# ---------------------------------------------------------------------------- --apply
def _scalar(v: Any) -> str:
    """``v`` as a one-line YAML scalar."""
    if not (v is None or isinstance(v, (bool, int, float, str))):
        raise TuneError(f"cannot merge {v!r}: not a scalar")
    text = yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()
    return text[:-3].strip() if text.endswith("\n...") or text.endswith("...") else text


def merge_train_text(text: str, values: dict[str, Any]) -> str:
    """``text`` (a params.yaml) with ``values`` set under its top-level ``train:`` mapping,
    every other byte unchanged: each value's scalar is replaced in place (an end-of-line
    comment keeps its column), a missing key is added as a line after the last one."""
    root = yaml.compose(text)
    train = None
    if isinstance(root, yaml.MappingNode):
        train = next((v for k, v in root.value if k.value == "train"), None)
    if not isinstance(train, yaml.MappingNode) or train.flow_style or not train.value:
        raise TuneError("params file: no block-style train: mapping to merge into")
    spans, where = [], {k.value: (k, v) for k, v in train.value}
    for key, value in values.items():
        if key in where:
            node = where[key][1]
            if not isinstance(node, yaml.ScalarNode):
                raise TuneError(f"params file: train.{key} is not a scalar")
            spans.append((node.start_mark.index, node.end_mark.index, _scalar(value)))
    out = text
    for a, b, new in sorted(spans, reverse=True):
        line_end = out.find("\n", b)
        line_end = len(out) if line_end < 0 else line_end
        rest = out[b:line_end]
        if rest.strip().startswith("#"):  # keep the comment's column
            pad = max(1, len(rest) - len(rest.lstrip()) - (len(new) - (b - a)))
            rest = " " * pad + rest.lstrip()
        out = out[:a] + new + rest + out[line_end:]
    added = [f"{key}: {_scalar(v)}" for key, v in values.items() if key not in where]
    if added:
        indent = " " * train.value[0][0].start_mark.column
        last = max(v.end_mark.line if not (isinstance(v, yaml.ScalarNode) and v.end_mark.column == 0)
                   else v.end_mark.line - 1 for _, v in train.value)
        lines = out.split("\n")
        lines[last + 1:last + 1] = [indent + a for a in added]
        out = "\n".join(lines)
    return out


def apply_best(params_file: str = "params.yaml", best_file: str | None = None,
               dry_run: bool = False) -> dict[str, tuple[Any, Any]]:
    """Merge ``best_file``'s ``train:`` values into ``params_file``'s ``train:`` section,
    changing only those values' text (comments, order and formatting kept). Returns
    {key: (old, new)} of the values that changed."""
    prm = params(params_file)
    best_path = Path(best_file or {**DEFAULTS, **(prm.get("tune") or {})}["best_out"])
    if not best_path.exists():
        raise TuneError(f"{best_path}: no such file (run python -m pipeline.tune first)")
    best = (yaml.safe_load(best_path.read_text()) or {}).get("train")
    if not isinstance(best, dict) or not best:
        raise TuneError(f"{best_path}: no train values to merge (no COMPLETE trial yet?)")
    bad = sorted(set(best) - TRAIN_KEYS)
    if bad:
        raise TuneError(f"{best_path}: {', '.join(bad)} not training settings")
    train = prm.get("train") if isinstance(prm.get("train"), dict) else {}
    changes = {k: (train.get(k), v) for k, v in best.items()
               if k not in train or train[k] != v or type(train[k]) is not type(v)}
    if changes and not dry_run:
        path = Path(params_file)
        text = merge_train_text(path.read_text(), {k: v for k, (_, v) in changes.items()})
        check = yaml.safe_load(text)
        if {k: check["train"].get(k) for k in best} != best or \
                {k: v for k, v in check.items() if k != "train"} != \
                {k: v for k, v in prm.items() if k != "train"}:
            raise TuneError(f"{params_file}: merging changed more than train values; not "
                            "written. Merge by hand:\n" + yaml.safe_dump({"train": best}))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return changes


def _shadowed(prm: dict, keys) -> list[str]:
    return [f"train_stage{k}.{key}" for k in (1, 2, 3) for key in keys
            if isinstance(prm.get(f"train_stage{k}"), dict) and key in prm[f"train_stage{k}"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="the params file (params.yaml)")
    ap.add_argument("--apply", action="store_true",
                    help="merge tune.best_out into the params file's train: section, then exit")
    ap.add_argument("--dry-run", action="store_true", help="with --apply: only show changes")
    a = ap.parse_args(argv)
    try:
        if a.apply:
            changes = apply_best(a.params, dry_run=a.dry_run)
            for k, (old, new) in changes.items():
                print(f"train.{k}: {'(not set)' if old is None else repr(old)} -> {new!r}")
            verb = "would change" if a.dry_run else "changed"
            print(f"{a.params}: {verb} {len(changes)} value(s) under train:"
                  + ("" if changes else " (already up to date)"))
            for s in _shadowed(params(a.params), changes):
                print(f"note: {s} overrides train.{s.split('.')[1]} in that stage")
            return 0
        spec = load_spec(a.params)
        open_storage(spec)  # fail fast, before Prefect and MLflow start
    except (TuneError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tune(a.params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
