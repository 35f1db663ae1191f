"""Training configuration: every value of the paper's recipe is a key with the paper's value
as its default, checked before any work starts.

A config file is YAML, read by ``load_config(path, overrides, stage, section)``:

* without ``section``, its top level holds the keys below, plus an optional ``stages: {1:
  {...}, 2: {...}, ...}`` mapping of per-stage overrides;
* with ``section="train"`` (a file that holds other things too, like ``params.yaml``), its
  ``train:`` mapping holds the keys, and every top-level mapping named ``train_stage<k>``
  (any integer ``k``) holds stage ``k``'s overrides (or, instead of those, a ``stages``
  mapping inside ``train:``).

The stages given are all the stages there are; without any, they are ``DEFAULT_STAGES``: the
paper's three, the same recipe with the contrastive loss on in stage 3. ``--set KEY=VALUE``
overrides anything (values are parsed as YAML: ``--set lr=1e-3 --set contrastive=false``).
``stage_config(base, overrides, stage)`` builds one stage's config from plain mappings (for a
caller that reads its own layout, like the pipeline's ``train_stages``).

A value that cannot be used is a :class:`rlfn.errors.ConfigError` naming where it came from
(the file and key, or the ``--set`` option), the value and what is allowed, e.g.
``params.yaml: train.lr: must be > 0, got -1.0``.

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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import ConfigError
from ..models import model_names

__all__ = ["TrainConfig", "ConfigError", "load_config", "stage_config", "DEFAULT_STAGES"]

LR_SCHEDULES = ("step", "cyclic")

# The paper's three warm-start stages: same recipe, stage 3 adds the contrastive loss.
DEFAULT_STAGES: dict[int, dict[str, Any]] = {1: {}, 2: {}, 3: {"contrastive": True}}


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
    amp: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16) | bf16 | off
    threads: int = 0  # torch intra-op threads on CPU, 0 = the process's cores (rlfn.threads)
    stage: int = 1
    stages: dict = field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_STAGES.items()})

    # ------------------------------------------------------------------ checks
    def validate(self, where: str = "config",
                 origins: Mapping[str, str] | None = None) -> "TrainConfig":
        """Check every value; a bad one is a ``ConfigError`` named by ``origins[key]`` (where
        that key was set, e.g. ``params.yaml: train.lr``) or else ``<where>: <key>``."""
        def bad(key: str, msg: str):
            raise ConfigError((origins or {}).get(key) or (f"{where}: {key}" if where else key),
                              msg)

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
        if self.stage not in self.stages:
            bad("stage", f"unknown stage {self.stage}; defined: {sorted(self.stages)}")
        if not self.patch_store and not self.hr_dir:
            bad("hr_dir", "give hr_dir (a folder of HR images) or patch_store")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("stages")
        return d

    def digest(self) -> str:
        """Hash of everything that determines the result (not where logs go or speed knobs that
        do not change the numbers on CPU)."""
        d = self.to_dict()
        for k in ("num_workers", "log_every", "device", "threads"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


_FIELDS = {f.name: f for f in fields(TrainConfig)}
_SETTABLE = sorted(k for k in _FIELDS if k != "stages")


def _coerce(key: str, value: Any, where: str) -> Any:
    default = TrainConfig.__dataclass_fields__[key].default
    if value is None:
        return value
    kind = type(default) if default is not None and not callable(default) else None
    if key in ("patch_store", "hr_dir", "val_hr_dir"):
        return str(value)
    if kind in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "2e5" (no dot) as a string
            value = float(value)
        except ValueError:
            raise ConfigError(where, f"expected a number, got {value!r}") from None
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(where, f"expected true/false, got {value!r}")
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)  # 2e5 in YAML
    if kind is int and not isinstance(value, int):
        raise ConfigError(where, f"expected an integer, got {value!r}")
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float:
        raise ConfigError(where, f"expected a number, got {value!r}")
    return value


def _merge(merged: dict, origins: dict, values: Mapping[str, Any], prefix: str) -> None:
    """Apply one layer of settings; ``prefix + key`` names where each came from."""
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in _SETTABLE:
            close = difflib.get_close_matches(str(key), _SETTABLE, n=1)
            hint = ("; per-stage settings go in the file's stage sections" if key == "stages"
                    else f"; if {key!r} is the section that holds the settings, read the file "
                         f"with section={key!r}" if isinstance(value, Mapping)
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
           stage_prefix: str, sets: Mapping[str, Any], sets_prefix: str,
           stages: dict[int, dict]) -> TrainConfig:
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {k: f"{base_prefix}{k}" for k in _FIELDS}
    _merge(merged, origins, base, base_prefix)
    _merge(merged, origins, stage_values, stage_prefix)
    _merge(merged, origins, sets, sets_prefix)
    merged["stage"] = stage
    cfg = TrainConfig(**merged)
    cfg.stages = stages
    return cfg.validate(base_prefix.rstrip(". :"), origins)


def stage_config(base: Mapping[str, Any], overrides: Mapping[str, Any] | None, stage: int,
                 extra: Mapping[str, Any] | None = None, where: str | Path | None = None,
                 section: str | None = "train", stage_where: str | None = None,
                 extra_where: str = "--set") -> TrainConfig:
    """One stage's config from plain mappings: ``base`` (the recipe), then the stage's
    ``overrides``, then ``extra``; validated. ``where`` (the file), ``section`` (the base's key
    in it) and ``stage_where`` (the overrides' key, default ``<section>_stage<k>``) name the
    source of a bad value; ``extra`` keys are named ``<extra_where> KEY``. The config's
    ``stages`` holds this stage alone."""
    file = f"{where}: " if where is not None else ""
    base_prefix = f"{file}{section}." if section else file
    stage_key = stage_where or (f"{section}_stage{stage}" if section else f"stages.{stage}")
    overrides = _mapping(overrides, f"{file}{stage_key}")
    return _build(_mapping(base, base_prefix.rstrip(". ") or "config"), base_prefix, int(stage),
                  overrides, f"{file}{stage_key}.", dict(extra or {}), f"{extra_where} ",
                  {int(stage): dict(overrides)})


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


def _read_file(path: Path, section: str | None) -> tuple[dict, str, dict[int, dict],
                                                       dict[int, str]]:
    """A config file's base values, their prefix (``<path>: [<section>.]``), its stage
    overrides and where each stage's overrides are (``<path>: train_stage3``)."""
    if not path.exists():
        raise ConfigError(path, "no such file")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(path, f"not valid YAML ({e})") from None
    doc = _mapping(doc, str(path))
    stages_key = f"{section}.stages" if section else "stages"
    found: dict[int, dict] = {}
    names: dict[int, str] = {}
    if section is None:
        base, prefix = doc, f"{path}: "
    else:
        if section not in doc:
            raise ConfigError(path, f"no {section!r} section (top-level keys: "
                                    f"{', '.join(map(str, doc)) or 'none'})")
        base, prefix = _mapping(doc[section], f"{path}: {section}"), f"{path}: {section}."
        pattern = re.compile(rf"{re.escape(section)}_stage(\d+)")
        for name in doc:
            m = pattern.fullmatch(name) if isinstance(name, str) else None
            if m:
                found[int(m.group(1))] = _mapping(doc[name], f"{path}: {name}")
                names[int(m.group(1))] = f"{path}: {name}"
        if found and "stages" in base:
            raise ConfigError(f"{path}: {stages_key}", f"give the stages either here or as "
                                                       f"{section}_stage<k> sections, not both")
    raw = _mapping(base.pop("stages", None), f"{path}: {stages_key}")
    if found:
        return base, prefix, found, names
    stages = {}
    for k, v in raw.items():
        n = _stage_number(k, f"{path}: {stages_key}")
        stages[n] = _mapping(v, f"{path}: {stages_key}.{k}")
        names[n] = f"{path}: {stages_key}.{k}"
    return base, prefix, stages, names


def load_config(path: str | Path | None = None, overrides: list[str] | Mapping | None = None,
                stage: int | None = None, section: str | None = None) -> TrainConfig:
    """Read a YAML config (see the module docstring for ``section``), apply the stage's
    overrides, then ``--set`` overrides (``KEY=VALUE`` strings or a mapping); validate.
    ``stage`` defaults to the ``stage`` key (of the overrides or the file), else 1."""
    base: dict[str, Any] = {}
    prefix, stages, names = "", {}, {}
    if path is not None:
        base, prefix, stages, names = _read_file(Path(path), section)
    if not stages:  # no stage overrides given: the paper's stages
        stages = {k: dict(v) for k, v in DEFAULT_STAGES.items()}
        names = {k: f"{prefix}stages.{k}" if prefix else f"stages.{k}" for k in stages}
    sets = _parse_sets(overrides)
    if stage is not None:
        st, st_where = stage, "stage"
    elif "stage" in sets:
        st, st_where = sets["stage"], "--set stage"
    else:
        st, st_where = base.get("stage", 1), f"{prefix}stage"
    st = _stage_number(st, st_where)
    if st not in stages:
        raise ConfigError(st_where, f"unknown stage {st}; defined: {sorted(stages)}")
    return _build(base, prefix, st, stages[st], f"{names[st]}.", sets, "--set ", stages)
