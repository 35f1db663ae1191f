"""The ``tune:`` section of params.yaml, checked into a ``TuneSpec`` before any work starts."""

from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.settings import PatchesSettings, TuneError, load_section
from pipeline.settings import read_params as params
from rlfn.errors import ConfigError
from rlfn.train.config import TRAIN_KEYS, TrainConfig, params_stage_config
from rlfn.yamlnum import yaml_number

__all__ = ["TuneError", "TuneSpec", "load_spec", "mask_url", "TRAIN_KEYS"]

TYPES = ("float", "int", "categorical")
NOT_TUNABLE = ("stage", "patch_store")
SAMPLERS = ("tpe", "random", "qmc")
PRUNERS = ("median", "hyperband", "percentile", "successive_halving", "none")


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", str(url))


def hide_password(text: str, url: str) -> str:
    """``text`` (an error message) with the URL's password masked wherever it appears."""
    try:
        from sqlalchemy.engine import make_url

        pw = make_url(url).password
    except Exception:
        pw = None
    text = text.replace(url, mask_url(url))
    return text.replace(str(pw), "***") if pw else text


def _num(v: Any, where: str, integer: bool = False) -> float | int:
    return yaml_number(v, where, integer, error=TuneError)


def _check_param(name: str, spec: Any) -> dict:
    """One entry of the search space, checked: ``{type, low, high, log[, step]}`` or
    ``{type: categorical, choices}``."""
    where = f"tune.space.{name}"
    if name not in TRAIN_KEYS or name in NOT_TUNABLE:
        raise TuneError(where, f"{name!r} is not a tunable training setting (a key of the "
                        "train section / TrainConfig)")
    if not isinstance(spec, dict):
        raise TuneError(where, "expected a mapping like {type: float, low: .., high: ..}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise TuneError(where, f"unknown type {kind!r}; use one of {', '.join(TYPES)}")
    allowed = {"float": {"type", "low", "high", "log", "step"},
               "int": {"type", "low", "high", "log", "step"},
               "categorical": {"type", "choices"}}[kind]
    extra = sorted(set(spec) - allowed)
    if extra:
        raise TuneError(where, f"unknown option(s) {', '.join(extra)} for type {kind}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise TuneError(where, "empty search space (choices must be a non-empty list)")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise TuneError(where, f"choice {c!r} is not a number, string or bool")
        if len(set(map(repr, choices))) != len(choices):
            raise TuneError(where, f"repeated choices {choices}")
        return {"type": kind, "choices": list(choices)}
    if "low" not in spec or "high" not in spec:
        raise TuneError(where, "give low and high")
    integer = kind == "int"
    low = _num(spec["low"], f"{where}.low", integer)
    high = _num(spec["high"], f"{where}.high", integer)
    if not low < high:
        raise TuneError(where, f"empty search space (low {low} >= high {high})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise TuneError(f"{where}.log", f"expected true/false, got {log!r}")
    if log and low <= 0:
        raise TuneError(where, f"log scale needs low > 0, got {low}")
    out = {"type": kind, "low": low, "high": high, "log": log}
    if spec.get("step") is not None:
        step = _num(spec["step"], f"{where}.step", integer)
        if step <= 0 or log:
            raise TuneError(f"{where}.step", "must be > 0 and cannot be combined with log")
        out["step"] = step
    return out


def optuna_class(kind: str, name: str):
    """The Optuna class of sampler / pruner ``name`` (one of SAMPLERS / PRUNERS)."""
    import optuna

    if kind == "sampler":
        return {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                "qmc": optuna.samplers.QMCSampler}[name]
    return {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
            "percentile": optuna.pruners.PercentilePruner,
            "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
            "none": optuna.pruners.NopPruner}[name]


def _factory(kind: str, spec: Any) -> tuple[str, dict]:
    """(name, kwargs) of ``tune.sampler`` / ``tune.pruner``, kwargs checked against the
    Optuna class's signature."""
    where = f"tune.{kind}"
    names = SAMPLERS if kind == "sampler" else PRUNERS
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise TuneError(where, "expected {name: ..., ...}")
    name = str(spec["name"]).lower()
    if name not in names:
        raise TuneError(where, f"unknown {kind} {spec['name']!r}; use one of {', '.join(names)}")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    accepted = set(inspect.signature(optuna_class(kind, name)).parameters)
    bad = sorted(set(kwargs) - accepted)
    if bad:
        raise TuneError(where, f"unknown option(s) {', '.join(bad)} for {name} (accepted: "
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
        """The training config of a trial: ``train`` + ``tune.base`` + ``sampled``."""
        sets = {**self.base, **sampled}
        if patch_store:
            sets["patch_store"] = patch_store
        elif "patch_store" in self.data:
            sets["patch_store"] = self.data["patch_store"]
        # train: + train_stages.<stage> (when the file has train_stages), as the pipeline's
        # train_stage@<stage>: the one merge (rlfn.train.config.params_stage_config)
        prm = params(self.params_file)
        return params_stage_config(prm.get("train"), prm.get("train_stages"), self.stage,
                                   extra=sets, where=self.params_file,
                                   required="train_stages" in prm)


def _extremes(space: dict[str, dict]) -> list[tuple[str, Any]]:
    out = []
    for name, s in space.items():
        values = s["choices"] if s["type"] == "categorical" else [s["low"], s["high"]]
        out += [(name, v) for v in values]
    return out


STORAGE_ENV = "RLFN_OPTUNA_STORAGE"


def load_spec(params_file: str = "params.yaml") -> TuneSpec:
    """The checked ``tune:`` section (everything but the storage, see ``open_storage``).
    ``RLFN_OPTUNA_STORAGE``, when set, replaces ``tune.storage`` (the team's PostgreSQL)."""
    t = load_section("tune", params_file)
    if t is None:
        raise TuneError(params_file, "no tune: section")
    for k in t.base:
        if k not in TRAIN_KEYS or k == "stage":
            raise TuneError("tune.base", f"{k!r} is not a training setting (a key of the train "
                            "section / TrainConfig)")
    space = {str(k): _check_param(str(k), v) for k, v in t.space.items()}
    clash = sorted(set(space) & set(t.base))
    if clash:
        raise TuneError("tune.space", f"{', '.join(clash)} also set in tune.base (set each "
                        "key in one of them)")
    for i, e in enumerate(t.enqueue):
        bad = sorted(set(e) - set(space))
        if bad:
            raise TuneError(f"tune.enqueue[{i}]", f"{', '.join(bad)} not in tune.space")
    # team mode: the shared study's database (scripts/stack.sh env) wins over params.yaml
    storage = os.environ.get(STORAGE_ENV) or t.storage
    base, enqueue = dict(t.base), [dict(e) for e in t.enqueue]
    spec = TuneSpec(params_file, t.study, storage, t.n_trials, t.timeout_s, t.stage,
                    _factory("sampler", t.sampler), _factory("pruner", t.pruner),
                    t.metric, base, space, enqueue, t.heartbeat_s, t.grace_s,
                    Path(t.trials_dir), Path(t.best_out), Path(t.out))
    # the data the trials train on, as pipeline/train.py does
    prm = params(params_file)
    train = prm.get("train") or {}
    patches = load_section("patches", params_file) or PatchesSettings()
    store = patches.store(base.get("scale", train.get("scale", 4)))
    if store.exists():
        spec.data = {"patch_store": str(store)}
    else:
        hr = base.get("hr_dir", train.get("hr_dir"))
        if not hr or not Path(hr).is_dir():
            raise TuneError("tune", f"no training data: neither {store} (the patches stage) "
                            f"nor train.hr_dir ({hr}) exists")
        spec.data = {"hr_dir": str(hr)}
    # every extreme of the space must make a valid training config (checked, not trained)
    try:
        cfg = spec.train_config({}, patch_store="-")
        if not cfg.val_hr_dir or not Path(cfg.val_hr_dir).is_dir():
            raise TuneError("tune", f"trials are scored by validation: train.val_hr_dir "
                            f"({cfg.val_hr_dir}) must be a folder of HR images")
        for name, value in _extremes(space):
            try:
                spec.train_config({name: value}, patch_store="-")
            except ConfigError as e:
                raise TuneError(f"tune.space.{name}", f"value {value!r} is not a valid "
                                f"training setting ({e})") from None
        for e in enqueue:
            spec.train_config(dict(e), patch_store="-")
    except TuneError:
        raise
    except ConfigError as e:  # a training setting of train: / tune.base / tune.enqueue
        raise TuneError("tune", str(e)) from None
    return spec
