"""Training configuration: every value of the paper's recipe is a key with the paper's value
as its default, checked before any work starts.

A config file is YAML. Its top level holds the keys below; ``params.yaml`` works as one (a
file with a top-level ``train:`` mapping is unwrapped, and its ``train_stage1`` ..
``train_stage3`` sections become the per-stage overrides). ``stages: {1: {...}, 2: {...},
3: {...}}`` holds per-stage overrides (the contrastive loss is on in stage 3 by default). ``--set KEY=VALUE`` overrides anything (values are
parsed as YAML: ``--set lr=1e-3 --set contrastive=false``).

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

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..models import model_names

__all__ = ["TrainConfig", "ConfigError", "load_config", "DEFAULT_STAGES"]

LR_SCHEDULES = ("step", "cyclic")

# The paper's three warm-start stages: same recipe, stage 3 adds the contrastive loss.
DEFAULT_STAGES: dict[int, dict[str, Any]] = {1: {}, 2: {}, 3: {"contrastive": True}}


class ConfigError(ValueError):
    """A configuration value that cannot be used; names the key (and the file)."""


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
    threads: int = 0  # torch intra-op threads on CPU, 0 = torch's default
    stage: int = 1
    stages: dict = field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_STAGES.items()})

    # ------------------------------------------------------------------ checks
    def validate(self, where: str = "config") -> "TrainConfig":
        def bad(key: str, msg: str):
            raise ConfigError(f"{where}: {key}: {msg}")

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
        if not self.lr > 0 or not self.eps > 0:
            bad("lr" if not self.lr > 0 else "eps", "must be > 0")
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
        if self.num_workers < 0 or self.threads < 0 or self.val_max_images < 0:
            bad("num_workers/threads/val_max_images", "must be >= 0")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            bad("device", f"must be auto, cpu or cuda, got {self.device!r}")
        if self.amp not in ("auto", "bf16", "off"):
            bad("amp", f"must be auto, bf16 or off, got {self.amp!r}")
        if self.stage not in (1, 2, 3) and self.stage not in self.stages:
            bad("stage", f"unknown stage {self.stage}")
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


def _coerce(key: str, value: Any, where: str) -> Any:
    default = TrainConfig.__dataclass_fields__[key].default
    if value is None or key == "stages":
        return value
    kind = type(default) if default is not None and not callable(default) else None
    if key in ("patch_store", "hr_dir", "val_hr_dir"):
        return str(value)
    if kind in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "2e5" (no dot) as a string
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: {key}: expected a number, got {value!r}") from None
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: {key}: expected true/false, got {value!r}")
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)  # 2e5 in YAML
    if kind is int and not isinstance(value, int):
        raise ConfigError(f"{where}: {key}: expected an integer, got {value!r}")
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float:
        raise ConfigError(f"{where}: {key}: expected a number, got {value!r}")
    return value


def _merge(base: dict, overrides: Mapping[str, Any], where: str) -> dict:
    for key, value in overrides.items():
        if key not in _FIELDS:
            raise ConfigError(f"{where}: unknown key {key!r}")
        base[key] = _coerce(key, value, where)
    return base


def load_config(path: str | Path | None = None, overrides: list[str] | Mapping | None = None,
                stage: int | None = None) -> TrainConfig:
    """Read a YAML config, apply the stage's settings, then ``--set`` overrides; validate."""
    values: dict[str, Any] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.exists():
            raise ConfigError(f"{path}: no such file")
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if isinstance(doc, dict) and "train" in doc:  # a params.yaml: its train section, with
            stage_sections = {k: doc.pop(f"train_stage{k}") for k in (1, 2, 3)  # the stage
                              if isinstance(doc.get(f"train_stage{k}"), dict)}  # sections
            doc = doc["train"]
            if stage_sections and isinstance(doc, dict) and "stages" not in doc:
                doc = {**doc, "stages": {**DEFAULT_STAGES, **stage_sections}}
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: expected a mapping of keys, got {type(doc).__name__}")
        values = dict(doc)
    sets: dict[str, Any] = {}
    for item in (overrides or []) if not isinstance(overrides, Mapping) else []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        sets[k.strip()] = yaml.safe_load(v)
    if isinstance(overrides, Mapping):
        sets.update(overrides)
    stages = {int(k): dict(v or {}) for k, v in
              (values.pop("stages", None) or DEFAULT_STAGES).items()}
    st = int(stage if stage is not None else sets.get("stage", values.get("stage", 1)))
    if st not in stages:
        raise ConfigError(f"{where}: stage: unknown stage {st}; defined: {sorted(stages)}")
    merged = _merge({}, values, where)
    _merge(merged, stages[st], f"{where} (stages.{st})")
    _merge(merged, sets, "--set")
    merged["stage"] = st
    cfg = TrainConfig(**merged)
    cfg.stages = stages
    return cfg.validate(where)
