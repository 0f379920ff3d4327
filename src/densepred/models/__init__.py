"""The model zoo; importing it registers every family with :mod:`densepred.registry`."""

from . import deeplab, deeplabv3, fcn, fcn_resnet, lraspp, pspnet, segnet, unet  # noqa: F401  (registration side effect)
from .deeplab import DeepLab, MultiScaleInputs
from .fcn import FCN
from .unet import UNet, unet_output_size, unet_valid_size

__all__ = ["DeepLab", "MultiScaleInputs", "FCN", "UNet", "unet_output_size", "unet_valid_size"]
