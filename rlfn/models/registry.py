"""Models by name: ``build_model("rlfn", scale=4)``.

Every registered model is an architecture class (``RLFN``, ``RFDN``, ``EDSR``) built from a
frozen config dataclass (``RLFNConfig``, ...) that has ``scale`` and ``to_dict()``; the model
keeps it as ``model.config`` and exposes ``model.scale`` and ``model.min_input_size``.
"""

from __future__ import annotations

from torch import nn

from .edsr import EDSR, EDSRConfig
from .rfdb import RFDN, RFDNConfig
from .rlfn import RLFN, RLFNConfig

__all__ = ["ARCHITECTURES", "MODELS", "arch_name", "build_model", "build_from_config",
           "config_for", "model_names", "name_for"]

# architecture name (as stored in our weights' metadata) -> (class, config class)
ARCHITECTURES: dict[str, tuple[type[nn.Module], type]] = {
    "RLFN": (RLFN, RLFNConfig),
    "RFDN": (RFDN, RFDNConfig),
    "EDSR": (EDSR, EDSRConfig),
}

# name -> (architecture, config fields other than scale)
MODELS: dict[str, tuple[type[nn.Module], dict]] = {
    # RLFN of the paper: 52 channels, 6 RLFBs.
    "rlfn": (RLFN, dict(feature_channels=52, mid_channels=52, num_blocks=6)),
    # RLFN-S: 48 channels, 6 RLFBs.
    "rlfn_s": (RLFN, dict(feature_channels=48, mid_channels=48, num_blocks=6)),
    # The NTIRE 2022 challenge submission: 46 feature / 48 mid channels, 4 RLFBs.
    "rlfn_ntire": (RLFN, dict(feature_channels=46, mid_channels=48, num_blocks=4)),
    # The RLFN paper's body-block ablation, all inside RFDN's network (4 blocks, 1x1 fusion
    # of every block's output). "RFDB": RFDN's block; 48 channels (RFDN itself uses 50:
    # build_model("rfdb", feature_channels=50) is njulj/RFDN) so that it differs from
    # RFDB-R48 only in the feature distillation.
    "rfdb": (RFDN, dict(feature_channels=48, num_blocks=4, distillation=True)),
    # "RFDB-R48" / "RFDB-R52": RFDB without the feature-distillation connections.
    "rfdb_r48": (RFDN, dict(feature_channels=48, num_blocks=4, distillation=False)),
    "rfdb_r52": (RFDN, dict(feature_channels=52, num_blocks=4, distillation=False)),
    # EDSR-baseline (Lim et al. 2017): 16 residual blocks, 64 channels, res_scale 1.
    "edsr_baseline": (EDSR, dict(feature_channels=64, num_blocks=16, res_scale=1.0)),
}


def model_names() -> list[str]:
    return sorted(MODELS)


def _key(name: str) -> str:
    key = name.lower().replace("-", "_")
    if key not in MODELS:
        raise ValueError(f"unknown model name {name!r}; known models: {', '.join(model_names())}")
    return key


def _config_class(arch: type[nn.Module]) -> type:
    for cls, config_cls in ARCHITECTURES.values():
        if cls is arch:
            return config_cls
    raise ValueError(f"{arch.__name__} is not a registered architecture")


def config_for(name: str, scale: int, **overrides):
    """The config of a registered model at ``scale`` (an ``RLFNConfig``, ``RFDNConfig``...)."""
    arch, fields = MODELS[_key(name)]
    return _config_class(arch)(scale=int(scale), **{**fields, **overrides})


def build_model(name: str, scale: int = 4, **overrides) -> nn.Module:
    """A freshly initialised model by name (see ``model_names()``)."""
    key = _key(name)
    arch, _ = MODELS[key]
    return arch(config_for(key, scale, **overrides))


def arch_name(config) -> str:
    """The architecture name (``"RLFN"``, ``"RFDN"``, ``"EDSR"``) of a model config."""
    for name, (_, config_cls) in ARCHITECTURES.items():
        if type(config) is config_cls:
            return name
    raise ValueError(f"{type(config).__name__} is not the config of a registered architecture")


def build_from_config(config) -> nn.Module:
    """A freshly initialised model of the architecture that ``config`` belongs to."""
    arch, _ = ARCHITECTURES[arch_name(config)]
    return arch(config)


def name_for(config) -> str:
    """The registry name whose preset equals ``config`` (any scale), or ``"<arch>_custom"``
    (``"rlfn_custom"``, ...)."""
    for name, (arch, _) in MODELS.items():
        if type(config) is _config_class(arch) and config == config_for(name, config.scale):
            return name
    return f"{arch_name(config).lower()}_custom"
