"""densepred: semantic segmentation (dense prediction) faithful to FCN, DeepLab and U-Net."""

from . import models  # noqa: F401  (imports every family, which registers its builders)
from .models.convolutionalize import convolutionalize
from .models.layers import BilinearDeconv, bilinear_kernel
from .registry import UnknownModelError, create_model, list_models, model_entry

__version__ = "0.1.0"
__all__ = [
    "BilinearDeconv",
    "UnknownModelError",
    "bilinear_kernel",
    "convolutionalize",
    "create_model",
    "list_models",
    "model_entry",
]
