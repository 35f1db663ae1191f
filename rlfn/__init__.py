"""rlfn: the RLFN super-resolution library (models, MATLAB-exact bicubic, metrics, IO).

Pure PyTorch / numpy; it never imports Prefect, DVC or MLflow.
"""

from .bicubic import downscale, imresize, imresize_array, modcrop
from .metrics import psnr_y, ssim_y
from .models import RLFN, RLFNConfig, build_model
from .weights import load_model, save_model

__version__ = "0.1.0"

__all__ = ["RLFN", "RLFNConfig", "build_model", "downscale", "imresize", "imresize_array",
           "load_model", "modcrop", "psnr_y", "save_model", "ssim_y", "__version__"]
