from .edsr import EDSR, EDSRConfig
from .registry import (ARCHITECTURES, MODELS, arch_name, build_from_config, build_model,
                       config_for, model_names, name_for)
from .rfdb import RFDB, RFDBR, RFDN, RFDNConfig
from .rlfn import ESA, RLFB, RLFN, RLFNConfig

__all__ = ["ESA", "RLFB", "RLFN", "RLFNConfig", "RFDB", "RFDBR", "RFDN", "RFDNConfig", "EDSR",
           "EDSRConfig", "ARCHITECTURES", "MODELS", "arch_name", "build_from_config",
           "build_model", "config_for", "model_names", "name_for"]
