"""Training configuration: every value of the paper's recipe is a key with the paper's value
as its default, checked before any work starts.

One stage's config is a :class:`TrainConfig`. Where it comes from:

* ``stage_config(base, overrides, stage, extra)``: from plain mappings (the recipe, the stage's
  overrides, then ``extra``), validated; the one builder every caller uses.
* ``params_stage_config(train, train_stages, stage, extra)``: stage ``stage`` of the params
  layout (``params.yaml``'s ``train:`` plus ``train_stages."<k>"``, whose ``init`` is the
  pipeline's, not a training key): exactly what the pipeline's ``train_stage@<k>`` trains
  with (``pipeline.stage_config`` calls it; this merge is written here, once).
* ``load_config(path, overrides, stage)``: a YAML file (``rlfn train --config``), either

  - a **params file**: a top-level ``train:`` mapping and ``train_stages`` (read as above;
    ``stage`` picks the entry and is required when there are several), or
  - a **stage config**: one stage's keys at the top level (what the pipeline records as
    ``models/stage<k>/config.yaml``); its ``stage`` key (default 1) is the stage, and a
    ``stage`` argument must agree with it.

  The older ``train_stage<k>`` sections and a ``stages`` mapping are refused, naming the key.
  ``--set KEY=VALUE`` (``overrides``) overrides anything (values are parsed as YAML:
  ``--set lr=1e-3 --set contrastive=false``).

A value that cannot be used is a :class:`rlfn.errors.ConfigError` naming where it came from
(the file and key, or the ``--set`` option), the value and what is allowed, e.g.
``params.yaml: train.lr: must be > 0, got -1.0``. Numbers follow ``rlfn.yamlnum`` (YAML 1.1
reads ``2e5`` as a string: it is taken as the number).

The learning-rate schedule (``schedule.lr_at``, a pure function of the iteration):

* ``lr_schedule: step`` (default, the paper's): ``lr * lr_gamma ** (iteration // lr_step)``.
  A slower decay in one long run (the paper's "e2000" warm-start ablation) is just another
  ``lr_step``.
* ``lr_schedule: cyclic`` (the paper's "clr"): the lr restarts at ``lr`` every ``lr_cycle``
  iterations and decays by ``lr_step``/``lr_gamma`` within each cycle, in one run that keeps
  the Adam state across restarts (a warm start, in contrast, begins a new stage with a fresh
  optimizer). ``lr_cycle`` must be >= 1 then, and is 0 (unused) otherwise.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import ConfigError
from ..yamlnum import yaml_number

__all__ = ["TrainConfig", "ConfigError", "load_config", "stage_config", "params_stage_config",
           "stage_overrides", "TRAIN_KEYS", "STAGE_INIT"]

LR_SCHEDULES = ("step", "cyclic")
STAGE_INIT = "init"  # train_stages."<k>".init: what the pipeline's stage starts from


@dataclass
class TrainConfig:
    # model
    model: str = "rlfn"
    scale: int = 4
    # data: a patch store (from the pipeline) or a folder of HR images
    patch_store: str | None = None
    hr_dir: str | None = None
    patch_size: int = 256  # HR crop; the LR crop is patch_size / scale
    augment: bool = True  # the 8 flips / 90-degree rotations
    num_workers: int = 2
    epoch_iterations: int = 1000  # iterations per data epoch (each epoch reshuffles)
    # optimisation (the paper's values)
    iterations: int = 1_000_000
    batch_size: int = 64
    lr: float = 5e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    lr_step: int = 200_000  # halve the lr every lr_step iterations
    lr_gamma: float = 0.5
    lr_schedule: str = "step"  # step | cyclic (see the module docstring)
    lr_cycle: int = 0  # cyclic: restart the lr every lr_cycle iterations; 0 with step
    seed: int = 0
    # contrastive loss (stage 3)
    contrastive: bool = False
    contrastive_weight: float = 0.1
    contrastive_channels: int = 16
    contrastive_seed: int = 0
    # validation / checkpoints / logs
    val_hr_dir: str | None = None
    val_every: int = 5000
    val_max_images: int = 0  # 0 = all
    checkpoint_every: int = 1000
    log_every: int = 50
    # speed
    device: str = "auto"  # auto | cpu | cuda
    channels_last: bool = True
    amp: str = "auto"  # auto (bf16 on CUDA and on CPUs with AMX) | bf16 | off
    threads: int = 0  # torch intra-op threads on CPU, 0 = the process's cores (rlfn.threads)
    stage: int = 1  # which warm-start stage this is (recorded; the values above are its own)

    # ------------------------------------------------------------------ checks
    def validate(self, where: str = "config",
                 origins: Mapping[str, str] | None = None) -> "TrainConfig":
        """Check every value; a bad one is a ``ConfigError`` named by ``origins[key]`` (where
        that key was set, e.g. ``params.yaml: train.lr``) or else ``<where>: <key>``."""
        def bad(key: str, msg: str):
            raise ConfigError((origins or {}).get(key) or (f"{where}: {key}" if where else key),
                              msg)

        from ..models import model_names  # torch: only when a config is checked

        if self.model.lower().replace("-", "_") not in model_names():
            bad("model", f"unknown model name {self.model!r}; known: {', '.join(model_names())}")
        if self.scale not in (2, 3, 4):
            bad("scale", f"must be 2, 3 or 4, got {self.scale}")
        for key in ("iterations", "batch_size", "patch_size", "lr_step", "checkpoint_every",
                    "val_every", "log_every", "epoch_iterations"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(key, f"must be a positive integer, got {v!r}")
        if self.patch_size % self.scale:
            bad("patch_size", f"{self.patch_size} is not divisible by the scale {self.scale}")
        if self.patch_size // self.scale < 15:
            bad("patch_size", f"the LR crop ({self.patch_size // self.scale} px) must be at least "
                              "15 px (RLFN's ESA minimum)")
        for key in ("lr", "eps"):
            if not getattr(self, key) > 0:
                bad(key, f"must be > 0, got {getattr(self, key)!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            bad("lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}, got "
                               f"{self.lr_schedule!r}")
        if not isinstance(self.lr_cycle, int) or isinstance(self.lr_cycle, bool):
            bad("lr_cycle", f"must be an integer, got {self.lr_cycle!r}")
        if self.lr_schedule == "cyclic" and self.lr_cycle < 1:
            bad("lr_cycle", f"lr_schedule cyclic needs lr_cycle >= 1 (iterations per cycle), "
                            f"got {self.lr_cycle}")
        if self.lr_schedule != "cyclic" and self.lr_cycle != 0:
            bad("lr_cycle", f"is only used with lr_schedule: cyclic (lr_schedule is "
                            f"{self.lr_schedule!r}); leave it 0")
        for key in ("beta1", "beta2", "lr_gamma"):
            if not 0 < getattr(self, key) <= 1:
                bad(key, f"must be in (0, 1], got {getattr(self, key)}")
        if self.contrastive_weight < 0:
            bad("contrastive_weight", f"must be >= 0, got {self.contrastive_weight}")
        for key in ("num_workers", "threads", "val_max_images"):
            if getattr(self, key) < 0:
                bad(key, f"must be >= 0, got {getattr(self, key)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            bad("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.amp not in ("auto", "bf16", "off"):
            bad("amp", f"must be auto, bf16 or off, got {self.amp!r}")
        if not isinstance(self.stage, int) or isinstance(self.stage, bool) or self.stage < 1:
            bad("stage", f"must be a positive integer, got {self.stage!r}")
        if not self.patch_store and not self.hr_dir:
            bad("hr_dir", "give hr_dir (a folder of HR images) or patch_store")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        """Hash of everything that determines the result (not where logs go or speed knobs that
        do not change the numbers on CPU)."""
        d = self.to_dict()
        for k in ("num_workers", "log_every", "device", "threads"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


_FIELDS = {f.name: f for f in fields(TrainConfig)}
_SETTABLE = sorted(_FIELDS)
TRAIN_KEYS = frozenset(_FIELDS)  # the keys of train:, train_stages."<k>" and a stage config


def _coerce(key: str, value: Any, where: str) -> Any:
    default = TrainConfig.__dataclass_fields__[key].default
    if value is None:
        return value
    kind = type(default) if default is not None and not callable(default) else None
    if key in ("patch_store", "hr_dir", "val_hr_dir"):
        return str(value)
    if kind in (int, float):
        return yaml_number(value, where, integer=kind is int, finite=False)
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(where, f"expected true/false, got {value!r}")
    return value


def _merge(merged: dict, origins: dict, values: Mapping[str, Any], prefix: str) -> None:
    """Apply one layer of settings; ``prefix + key`` names where each came from."""
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in _SETTABLE:
            close = difflib.get_close_matches(str(key), _SETTABLE, n=1)
            hint = ("; a config holds one stage's values (per-stage settings go in "
                    "params.yaml's train_stages)" if key == "stages"
                    else f"; did you mean {close[0]!r}?" if close else "")
            raise ConfigError(where, f"unknown key {key!r}{hint}")
        merged[key] = _coerce(key, value, where)
        origins[key] = where


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(where, f"expected a mapping of keys, got {type(value).__name__}")
    return dict(value)


def _stage_number(key: Any, where: str) -> int:
    try:
        k = int(key)
    except (TypeError, ValueError):
        raise ConfigError(where, f"stage names must be integers, got {key!r}") from None
    if isinstance(key, bool) or (isinstance(key, float) and not key.is_integer()):
        raise ConfigError(where, f"stage names must be integers, got {key!r}")
    return k


def _build(base: Mapping[str, Any], base_prefix: str, stage: int, stage_values: Mapping,
           stage_prefix: str, sets: Mapping[str, Any], sets_prefix: str) -> TrainConfig:
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {k: f"{base_prefix}{k}" for k in _FIELDS}
    _merge(merged, origins, base, base_prefix)
    _merge(merged, origins, stage_values, stage_prefix)
    _merge(merged, origins, sets, sets_prefix)
    merged["stage"] = stage
    return TrainConfig(**merged).validate(base_prefix.rstrip(". :"), origins)


def stage_config(base: Mapping[str, Any], overrides: Mapping[str, Any] | None, stage: int,
                 extra: Mapping[str, Any] | None = None, where: str | Path | None = None,
                 section: str | None = "train", stage_where: str | None = None,
                 extra_where: str = "--set") -> TrainConfig:
    """One stage's config from plain mappings: ``base`` (the recipe), then the stage's
    ``overrides``, then ``extra``; validated. ``where`` (the file), ``section`` (the base's key
    in it) and ``stage_where`` (the overrides' key, default ``train_stages.<k>``) name the
    source of a bad value; ``extra`` keys are named ``<extra_where> KEY``."""
    file = f"{where}: " if where is not None else ""
    base_prefix = f"{file}{section}." if section else file
    stage_key = stage_where or f"train_stages.{stage}"
    overrides = _mapping(overrides, f"{file}{stage_key}")
    return _build(_mapping(base, base_prefix.rstrip(". ") or "config"), base_prefix, int(stage),
                  overrides, f"{file}{stage_key}.", dict(extra or {}), f"{extra_where} ")


def stage_overrides(train_stages: Mapping[Any, Any] | None, stage: int | str,
                    where: str | Path | None = None, required: bool = True) -> dict[str, Any]:
    """Stage ``stage``'s training keys in the params layout: ``train_stages."<stage>"`` less
    its ``init`` (the pipeline's: what the stage starts from). Not defined: a ``ConfigError``
    naming ``train_stages`` (``required=False``: no overrides)."""
    file = f"{where}: " if where is not None else ""
    stages = _mapping(train_stages, f"{file}train_stages")
    by_key = {str(k): v for k, v in stages.items()}
    if str(stage) not in by_key:
        if not required:
            return {}
        raise ConfigError(f"{file}train_stages", f"no stage {str(stage)!r}; defined: "
                                                 f"{', '.join(by_key) or 'none'}")
    values = _mapping(by_key[str(stage)], f"{file}train_stages.{stage}")
    values.pop(STAGE_INIT, None)
    return values


def params_stage_config(train: Mapping[str, Any] | None, train_stages: Mapping[Any, Any] | None,
                        stage: int | str, extra: Mapping[str, Any] | None = None,
                        where: str | Path | None = None, extra_where: str = "--set",
                        required: bool = True) -> TrainConfig:
    """Stage ``stage`` of the params layout: ``train`` + ``train_stages."<stage>"`` (less
    ``init``) + ``extra``, validated; the config the pipeline's ``train_stage@<stage>`` trains
    with, and ``rlfn train --config params.yaml --stage <stage>``. ``required=False``: a stage
    not in ``train_stages`` is ``train`` alone (the ablations' extra stages)."""
    return stage_config(train or {}, stage_overrides(train_stages, stage, where, required),
                        int(stage), extra=extra, where=where, extra_where=extra_where)


def _parse_sets(overrides: list[str] | Mapping | None) -> dict[str, Any]:
    if isinstance(overrides, Mapping):
        return dict(overrides)
    sets: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}", "expected KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            sets[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {k.strip()}", f"not a YAML value: {v!r} ({e})") from None
    return sets


_OLD_STAGE_SECTION = re.compile(r"train_stage(\d+)")


def _read_doc(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(path, "no such file")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(path, f"not valid YAML ({e})") from None
    return _mapping(doc, str(path))


def _params_file(path: Path, doc: dict, stage: int | None, sets: dict) -> TrainConfig:
    """Stage ``stage`` of a params file (``train:`` + ``train_stages``)."""
    train = _mapping(doc["train"], f"{path}: train")
    stages = doc.get("train_stages")
    if stages is None:  # no stages: the train section is the one stage's config
        st = _stage_number(stage if stage is not None else sets.pop("stage", 1), "--stage")
        return params_stage_config(train, None, st, extra=sets, where=path, required=False)
    keys = [str(k) for k in _mapping(stages, f"{path}: train_stages")]
    where = "--stage"
    if stage is None and "stage" in sets:
        stage, where = sets.pop("stage"), "--set stage"
    if stage is None:
        if len(keys) != 1:
            raise ConfigError("--stage", f"{path} defines stages {', '.join(keys)} "
                                         f"(train_stages); say which one")
        stage = keys[0]
    st = _stage_number(stage, where)
    if str(st) not in keys:
        raise ConfigError(where, f"no stage {st} in {path}: train_stages; defined: "
                                 f"{', '.join(keys) or 'none'}")
    return params_stage_config(train, stages, st, extra=sets, where=path)


def load_config(path: str | Path | None = None, overrides: list[str] | Mapping | None = None,
                stage: int | None = None) -> TrainConfig:
    """A training config from a YAML file (a params file or a stage config, see the module
    docstring) or from ``overrides`` alone, then ``--set`` overrides (``KEY=VALUE`` strings or a
    mapping); validated. ``stage``: the params file's stage (required when it has several);
    for a stage config, the stage it must be."""
    sets = _parse_sets(overrides)
    doc: dict[str, Any] = {}
    prefix = ""
    if path is not None:
        path = Path(path)
        doc = _read_doc(path)
        for name in doc:
            if isinstance(name, str) and _OLD_STAGE_SECTION.fullmatch(name):
                raise ConfigError(f"{path}: {name}", "the train_stage<k> layout is gone: give "
                                  "stage k's keys as train_stages: {\"k\": {...}} (as the "
                                  "pipeline reads them)")
        if "train" in doc:  # a stage config has no such key
            return _params_file(path, doc, stage, sets)
        prefix = f"{path}: "
    st_where = "stage"
    if "stage" in sets:
        file_stage, st_where = sets["stage"], "--set stage"
    else:
        file_stage, st_where = doc.get("stage"), f"{prefix}stage"
    if file_stage is not None:
        file_stage = _stage_number(file_stage, st_where)
    if stage is not None and file_stage is not None and int(stage) != file_stage:
        raise ConfigError("--stage", f"{stage}, but {st_where.rstrip(': ')} says this is stage "
                                     f"{file_stage}'s config")
    st = _stage_number(stage if stage is not None else file_stage or 1,
                       "--stage" if stage is not None else st_where)
    return _build(doc, prefix, st, {}, prefix, sets, "--set ")
