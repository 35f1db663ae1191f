"""Models by name: ``build_model("rlfn", scale=4)``."""

from __future__ import annotations

from torch import nn

from .rlfn import RLFN, RLFNConfig

__all__ = ["MODELS", "build_model", "model_names", "config_for"]

# name -> (architecture, config fields other than scale)
MODELS: dict[str, tuple[type[nn.Module], dict]] = {
    # RLFN of the paper: 52 channels, 6 RLFBs.
    "rlfn": (RLFN, dict(feature_channels=52, mid_channels=52, num_blocks=6)),
    # RLFN-S: 48 channels, 6 RLFBs.
    "rlfn_s": (RLFN, dict(feature_channels=48, mid_channels=48, num_blocks=6)),
    # The NTIRE 2022 challenge submission: 46 feature / 48 mid channels, 4 RLFBs.
    "rlfn_ntire": (RLFN, dict(feature_channels=46, mid_channels=48, num_blocks=4)),
}


def model_names() -> list[str]:
    return sorted(MODELS)


def config_for(name: str, scale: int, **overrides) -> RLFNConfig:
    key = name.lower().replace("-", "_")
    if key not in MODELS:
        raise ValueError(f"unknown model name {name!r}; known models: {', '.join(model_names())}")
    _, fields = MODELS[key]
    return RLFNConfig(scale=int(scale), **{**fields, **overrides})


def build_model(name: str, scale: int = 4, **overrides) -> nn.Module:
    """A freshly initialised model by name (``rlfn``, ``rlfn_s``, ``rlfn_ntire``)."""
    key = name.lower().replace("-", "_")
    config = config_for(key, scale, **overrides)
    arch, _ = MODELS[key]
    return arch(config)


def name_for(config: RLFNConfig) -> str:
    """The registry name whose preset matches ``config`` (any scale), or ``"rlfn_custom"``."""
    for name, (_, fields) in MODELS.items():
        if all(getattr(config, k) == v for k, v in fields.items()) and config.esa_channels == 16:
            return name
    return "rlfn_custom"
