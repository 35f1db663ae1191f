from .registry import MODELS, build_model, config_for, model_names, name_for
from .rlfn import ESA, RLFB, RLFN, RLFNConfig

__all__ = ["ESA", "RLFB", "RLFN", "RLFNConfig", "MODELS", "build_model", "config_for",
           "model_names", "name_for"]
