"""The pipeline's settings: ``params.yaml`` checked once into typed objects.

``load_settings(path)`` reads the params file (``RLFN_PARAMS`` or ``params.yaml``) and validates
every section a default stage reads into a :class:`Settings` (pydantic models: each field's
default here is the one default in the project). A value that cannot be used is one
:class:`rlfn.errors.ConfigError` naming the file, the key, the value and what is allowed::

    params.yaml: profile.warmup: input should be greater than or equal to 0 (got -1)

Flows take a ``Settings`` as their parameter (``None``: read ``params.yaml`` in the working
directory, as a Prefect deployment does). The paths in it are the ones ``dvc.yaml`` uses
(``${data.manifest}``, ``${train_launch.out}``, ...): moving an output is one edit of
params.yaml.

The ``tune:`` and ``ablation:`` sections (stages outside the default pipeline) are typed
sections here too (``TuneSettings``, ``AblationSettings``: their keys, defaults and the checks
that need nothing but the section); a problem in one is a ``TuneError`` / ``AblationError``
naming the key without the file (``tune.n_trials: must be >= 1, got 0``), as those stages
always said it. What needs more (a search space's training values, an Optuna class's
options, a variant's runs) is checked by the stage's module. ``load_section(name)`` reads one
section alone (a tune or ablation project need not hold the default pipeline's sections).

The library (``rlfn``) never sees this layout: stages hand it plain values, and
``pipeline.stage_config.train_config`` builds a stage's ``TrainConfig``. This module imports
nothing of the library but its errors and its YAML number rule (``rlfn.yamlnum``, no torch),
so that a stage's DVC deps stay its own.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt,
                      StrictBool, ValidationError, field_validator, model_validator)

from rlfn.errors import ConfigError
from rlfn.yamlnum import yaml_number

__all__ = ["Settings", "load_settings", "load_section", "read_params", "params_path",
           "DataSettings", "DegradeSettings", "PatchesSettings", "TrainLaunch", "StageSettings",
           "EvaluateSettings", "ParetoSettings", "ProfileSettings", "PromoteSettings",
           "MlflowSettings", "TuneSettings", "AblationSettings", "TuneError", "AblationError",
           "TUNE_METRICS"]


def params_path(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get("RLFN_PARAMS", "params.yaml"))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSettings(_Section):
    # each source is checked by the prepare stage (rlfn.data.sources), the one that reads them
    sources: list[dict[str, Any]] = Field(min_length=1)
    cache: str = ".cache/rlfn"
    manifest: str = "data/manifest.parquet"
    manifest_summary: str = "data/manifest.summary.json"
    min_size: PositiveInt = 128
    workers: PositiveInt = 2

    @model_validator(mode="after")
    def _summary_beside(self) -> "DataSettings":
        m = Path(self.manifest)
        want = m.with_name((m.stem if m.suffix == ".parquet" else m.name) + ".summary.json")
        if Path(self.manifest_summary) != want:
            raise ValueError(f"manifest_summary: the manifest's summary is written beside it, "
                             f"as {want}; got {self.manifest_summary}")
        return self


class DegradeSettings(_Section):
    scales: list[Literal[2, 3, 4]] = Field(default=[4], min_length=1)
    out: str = "data/lr"
    workers: PositiveInt = 2

    @field_validator("scales")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"repeated scale in {v}")
        return v


class PatchesSettings(_Section):
    out: str = "data/patches"
    sub_image: tuple[PositiveInt, PositiveInt] | None = None  # (size, step) to pre-cut 2K images

    def store(self, scale: int) -> Path:
        return Path(self.out) / f"x{scale}.arrow"


class TrainLaunch(_Section):
    out: str = "models"
    curves: str = "plots/training"
    ddp: bool = False
    nproc_per_node: PositiveInt = 2

    def stage_dir(self, key: str) -> Path:
        return Path(self.out) / f"stage{key}"


class StageSettings(BaseModel):
    """One warm-start stage: ``init`` (the previous stage's weights, or the patch store for a
    first stage trained from seeded weights) plus ``train`` keys it overrides."""

    model_config = ConfigDict(extra="allow", frozen=True)
    init: str

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def warm_start(self) -> Path | None:
        """The weights this stage starts from, ``None`` when it starts from seeded weights."""
        return Path(self.init) if self.init.endswith(".safetensors") else None


class EvaluateSettings(_Section):
    sets: dict[str, str] = Field(min_length=1)
    optional_sets: dict[str, str] = {}
    stage_sets: list[str] = Field(default=["Set5"], min_length=1)
    backend: str = "eager"
    out: str = "metrics/evaluate.json"
    stages_out: str = "metrics/evaluate_stages.json"
    plot: str = "plots/psnr_by_stage.csv"

    @model_validator(mode="after")
    def _stage_sets_known(self) -> "EvaluateSettings":
        unknown = [n for n in self.stage_sets if n not in self.sets]
        if unknown:
            raise ValueError(f"stage_sets: {', '.join(unknown)} not in evaluate.sets "
                             f"({', '.join(self.sets)})")
        clash = sorted(set(self.sets) & set(self.optional_sets))
        if clash:
            raise ValueError(f"optional_sets: {', '.join(clash)} also in evaluate.sets")
        return self


class ParetoSettings(_Section):
    backend: str = "openvino"
    max_images: NonNegativeInt = 5
    warmup: NonNegativeInt = 1
    sets: dict[str, str] = {}
    models: list[str] = []
    registry: bool = True
    # the final model again with each of these backends (lossy ones: int8, bf16, ...): one
    # point per backend; a backend that cannot run here is left out with a warning
    extra_backends: list[str] = []
    official_out: str = "reports/pareto_official.json"  # stage pareto_official's points
    csv: str = "plots/pareto.csv"
    png: str = "plots/pareto.png"


class ProfileSettings(_Section):
    input_dir: str = "data/sample/train"
    max_images: NonNegativeInt = 10
    warmup: NonNegativeInt = 2
    threads: NonNegativeInt = 0
    backend: str = "openvino"
    reference: str = "rlfn_ntire"  # timed alongside: runtime_rel = model time / its time
    out: str = "metrics/profile.json"
    details: str = "reports/profile.json"
    pareto: ParetoSettings = ParetoSettings()


class PromoteSettings(_Section):
    gate_metric: str = "mean_psnr_y"
    margin: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    runtime_budget_rel: float | None = Field(default=3.0, gt=0, allow_inf_nan=False)
    flops_budget_g: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    runtime_budget_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    registered_model: str | None = None
    # team mode (MLFLOW_TRACKING_URI at a server): a candidate built from code or params in
    # no commit (rlfn.git_state dirty) is refused unless this is true; on one machine it is
    # promoted with a warning either way
    allow_uncommitted: StrictBool = False
    out: str = "metrics/promote.json"
    details: str = "reports/promotion.json"

    def budgets(self) -> dict[str, float]:
        """``{figure: maximum}`` of the budgets that are set (figures of the profile stage)."""
        out = {}
        if self.runtime_budget_rel is not None:
            out["runtime_rel"] = self.runtime_budget_rel
        if self.flops_budget_g is not None:
            out["flops"] = self.flops_budget_g * 1e9
        if self.runtime_budget_ms is not None:
            out["runtime_ms_cpu"] = self.runtime_budget_ms
        return out


class MlflowSettings(_Section):
    db: str = "mlflow.db"
    artifacts: str = "mlartifacts"
    experiment: str = "rlfn"


class TuneError(ConfigError):
    """A ``tune:`` setting that cannot be used: ``TuneError(key, reason)``, e.g.
    ``TuneError("tune.space.lr", "empty search space ...")`` (exit 2, bad configuration)."""


class AblationError(ConfigError):
    """A bad ``ablation:`` setting; the message names it (exit code 2)."""


def _known_keys(cls: type[BaseModel], v: Any, name: str, err: type[ConfigError]) -> dict:
    if not isinstance(v, dict):
        raise err(name, f"expected a mapping of settings, got {type(v).__name__}")
    unknown = sorted(set(map(str, v)) - set(cls.model_fields))
    if unknown:
        raise err(name, f"unknown key(s) {', '.join(unknown)}; known: "
                        f"{', '.join(cls.model_fields)}")
    return dict(v)


TUNE_METRICS = ("val_psnr", "best_val_psnr")


class TuneSettings(_Section):
    """``tune:`` (``python -m pipeline.tune``; the search itself is checked by
    ``pipeline.tune.spec``)."""

    study: str = "rlfn-tune"
    storage: str = "sqlite:///optuna.db"
    n_trials: int = 8
    timeout_s: float = 0
    stage: int = 1
    sampler: dict[str, Any] | str = {"name": "tpe", "seed": 0}
    pruner: dict[str, Any] | str = {"name": "median"}
    metric: str = "val_psnr"
    base: dict[str, Any] = {}
    space: dict[str, Any] = {}
    enqueue: list[dict[str, Any]] = []
    heartbeat_s: int = 30
    grace_s: int = 120
    trials_dir: str = "tune/trials"
    best_out: str = "tune/best_params.yaml"
    out: str = "metrics/tune.json"

    @model_validator(mode="before")
    @classmethod
    def _check(cls, v: Any) -> Any:
        t = {**{k: f.default for k, f in cls.model_fields.items()},
             **_known_keys(cls, v, "tune", TuneError)}
        for key in ("study", "storage", "trials_dir", "best_out", "out"):
            if not isinstance(t[key], str) or not t[key].strip():
                raise TuneError(f"tune.{key}", f"expected a non-empty string, got {t[key]!r}")

        def num(key: str, integer: bool = False) -> float | int:
            return yaml_number(t[key] or 0, f"tune.{key}", integer, error=TuneError)

        t["n_trials"] = num("n_trials", integer=True)
        if t["n_trials"] < 1:
            raise TuneError("tune.n_trials", f"must be >= 1, got {t['n_trials']}")
        t["timeout_s"] = num("timeout_s")
        t["heartbeat_s"], t["grace_s"] = num("heartbeat_s", True), num("grace_s", True)
        if t["timeout_s"] < 0 or t["heartbeat_s"] < 1 or t["grace_s"] <= t["heartbeat_s"]:
            raise TuneError("tune", "need timeout_s >= 0, heartbeat_s >= 1 and grace_s > "
                                    "heartbeat_s")
        if t["metric"] not in TUNE_METRICS:
            raise TuneError("tune.metric", f"unknown metric {t['metric']!r}; use one of "
                                           f"{', '.join(TUNE_METRICS)} (maximised)")
        t["base"] = t["base"] or {}
        if not isinstance(t["base"], dict):
            raise TuneError("tune.base", "expected a mapping of train keys")
        if not isinstance(t["space"], dict) or not t["space"]:
            raise TuneError("tune.space", "empty; declare at least one parameter to search")
        t["enqueue"] = t["enqueue"] or []
        if not isinstance(t["enqueue"], list) or not all(isinstance(e, dict)
                                                         for e in t["enqueue"]):
            raise TuneError("tune.enqueue", "expected a list of {param: value} mappings")
        t["stage"] = yaml_number(t["stage"], "tune.stage", integer=True, error=TuneError)
        for kind in ("sampler", "pruner"):
            if not isinstance(t[kind], (str, dict)) or (isinstance(t[kind], dict)
                                                        and "name" not in t[kind]):
                raise TuneError(f"tune.{kind}", "expected {name: ..., ...}")
        return t


ABLATION_SCHEDULES = ("ws", "e2000", "clr")


class AblationSettings(_Section):
    """``ablation:`` (``python -m pipeline.ablate``; each variant's runs are expanded and
    checked by ``pipeline.ablate``)."""

    name: str | None = None
    stages: int = 3
    base: dict[str, Any] = {}
    runtime: dict[str, Any] = {"max_images": 3, "warmup": 1}
    variants: dict[str, Any]
    out: str = "metrics/ablation.json"
    dir: str = "ablations"

    @model_validator(mode="before")
    @classmethod
    def _check(cls, v: Any) -> Any:
        a = _known_keys(cls, v, "ablation", AblationError)
        if not isinstance(a.get("variants"), dict) or not a["variants"]:
            raise AblationError("ablation.variants", "expected a mapping name -> {model, "
                                                     "schedule, contrastive}")
        n = yaml_number(a.get("stages", 3), "ablation.stages", integer=True,
                        error=AblationError)
        if n < 1:
            raise AblationError("ablation.stages", f"must be >= 1, got {n}")
        a["stages"] = n
        for key in ("base", "runtime"):
            if not isinstance(a.get(key) or {}, dict):
                raise AblationError(f"ablation.{key}", "expected a mapping")
        a["base"] = dict(a.get("base") or {})
        a["runtime"] = {"max_images": 3, "warmup": 1, **(a.get("runtime") or {})}
        return a


class Settings(BaseModel):
    """Every section of params.yaml that a default stage reads."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    params_file: str = "params.yaml"
    data: DataSettings
    degrade: DegradeSettings = DegradeSettings()
    patches: PatchesSettings = PatchesSettings()
    train: dict[str, Any]
    train_launch: TrainLaunch = TrainLaunch()
    train_stages: dict[str, StageSettings] = Field(min_length=1)
    evaluate: EvaluateSettings
    profile: ProfileSettings = ProfileSettings()
    promote: PromoteSettings = PromoteSettings()
    mlflow: MlflowSettings = MlflowSettings()
    tune: TuneSettings | None = None
    ablation: AblationSettings | None = None
    raw: dict[str, Any] = Field(default_factory=dict, repr=False)  # the whole file

    @field_validator("train_stages", mode="before")
    @classmethod
    def _stage_keys(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for k in v:
                if not str(k).isdigit() or int(k) < 1:
                    raise ValueError(f"stage key {k!r} must be a positive integer in quotes "
                                     "(\"1\", \"2\", ...)")
            keys = [int(k) for k in v]
            if keys != sorted(keys):
                raise ValueError(f"stages must be listed in order, got {list(v)}")
            return {str(k): s for k, s in v.items()}
        return v

    @model_validator(mode="after")
    def _chain(self) -> "Settings":
        keys = list(self.train_stages)
        for prev, key in zip([None] + keys, keys):
            init = self.train_stages[key].init
            want = None if prev is None else str(self.train_launch.stage_dir(prev) /
                                                 "model.safetensors")
            if want is not None and Path(init) != Path(want):
                raise ValueError(f"train_stages.{key}.init: a later stage warm-starts from the "
                                 f"previous stage's weights {want}, got {init}")
            if want is None and Path(init) != Path(self.patches.out):
                raise ValueError(f"train_stages.{key}.init: the first stage starts from the "
                                 f"patch store {self.patches.out} (seeded weights), got {init}")
        return self

    # ------------------------------------------------------------------ derived values
    @property
    def scale(self) -> int:
        return int(self.train.get("scale", 4))

    @property
    def stage_keys(self) -> list[str]:
        return list(self.train_stages)

    @property
    def last_stage(self) -> str:
        return self.stage_keys[-1]

    def stage_dir(self, key: str) -> Path:
        return self.train_launch.stage_dir(key)

    def stage_weights(self, key: str) -> Path:
        return self.stage_dir(key) / "model.safetensors"

    @property
    def final_weights(self) -> Path:
        return self.stage_weights(self.last_stage)

    @property
    def registered_model(self) -> str:
        return self.promote.registered_model or f"rlfn-x{self.scale}"

    def section(self, name: str) -> Any:
        """A section as plain data (what a stage's MLflow params hash covers)."""
        value = getattr(self, name)
        return value.model_dump() if isinstance(value, BaseModel) else value


def _describe(err: dict) -> tuple[str, str]:
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    msg = msg[0].lower() + msg[1:] if msg else msg
    if msg.startswith("value error, "):  # our validators say "key: reason" themselves
        msg = msg[len("value error, "):]
        m = re.match(r"([A-Za-z_][\w.\[\]]*): (.*)", msg, re.S)
        if m:
            key = m.group(1)
            loc = key if not loc or key.startswith(loc + ".") else f"{loc}.{key}"
            msg = m.group(2)
    got = err.get("input")
    tail = "" if err["type"] == "missing" or isinstance(got, (dict, list)) else f" (got {got!r})"
    return loc, msg + tail


def read_params(path: str | Path | None = None) -> dict[str, Any]:
    """``params.yaml`` (or ``path``; ``RLFN_PARAMS`` when unset) as plain data, unchecked
    beyond being a readable YAML mapping (a ``ConfigError`` naming the file otherwise)."""
    p = params_path(path)
    if not p.exists():
        raise ConfigError(p, "no such params file (run from the project root, or set "
                             "RLFN_PARAMS)")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(p, f"not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(p, f"expected a mapping of sections, got {type(raw).__name__}")
    return raw


def load_settings(path: str | Path | None = None) -> Settings:
    """``params.yaml`` (or ``path``) checked into :class:`Settings`; the first problem is one
    ``ConfigError`` naming the file and key."""
    p = params_path(path)
    raw = read_params(p)
    try:
        s = Settings(**{k: v for k, v in raw.items() if k not in ("params_file", "raw")},
                     params_file=str(p), raw=raw)
    except ValidationError as e:
        raise _error(p, e) from None
    return s


_SECTIONS: dict[str, type[_Section]] = {"tune": TuneSettings, "ablation": AblationSettings,
                                        "patches": PatchesSettings}


def _error(p: Path, e: ValidationError, section: str | None = None) -> ConfigError:
    err = e.errors()[0]
    own = _own_error(err)
    if own is not None:
        return own
    loc, msg = _describe(err)
    loc = f"{section}.{loc}" if section and loc else section or loc
    more = len(e.errors()) - 1
    return ConfigError(f"{p}: {loc}", msg + (f" (and {more} more problem"
                                             f"{'s' if more > 1 else ''})" if more else ""))


def _own_error(err: dict) -> ConfigError | None:
    """A section validator's own ``TuneError`` / ``AblationError`` (pydantic wraps the
    ``ValueError`` it is), unwrapped."""
    exc = (err.get("ctx") or {}).get("error")
    return exc if isinstance(exc, ConfigError) else None


def load_section(name: str, path: str | Path | None = None) -> Any:
    """One section of ``params.yaml`` (or ``path``), checked alone: ``tune``, ``ablation`` or
    ``patches`` (``None`` when the file has none). The same model and errors as ``load_settings``."""
    p = params_path(path)
    raw = read_params(p)
    if raw.get(name) is None:
        return None
    try:
        return _SECTIONS[name].model_validate(raw[name])
    except ValidationError as e:
        raise _error(p, e, name) from None
