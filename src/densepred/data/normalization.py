"""Input normalisation per backbone, as data a model's weights can carry."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import DataError

__all__ = ["Normalization", "IMAGENET", "CAFFE_BGR", "CAFFE_DEEPLAB", "UNIT"]


@dataclass(frozen=True)
class Normalization:
    """How a backbone expects its input tensor, starting from RGB uint8 pixels.

    ``bgr``: reverse the channels to BGR first (``mean``/``std`` are then given in BGR order).
    ``scale_255``: keep values in 0..255 (Caffe); otherwise divide by 255 first (torchvision).
    Then ``(x - mean) / std`` per channel. A 1-element ``mean``/``std`` applies to every channel.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    bgr: bool = False
    scale_255: bool = False

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
            raise ValueError(f"mean and std need 1 or 3 values each, got mean={self.mean} std={self.std}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.bgr and len(self.mean) != 3:
            raise ValueError("bgr=True needs a 3-channel mean and std")

    def _stats(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and 1/std in 0..255 pixel units, in the order of the (possibly reversed) channels."""
        if len(self.mean) not in (1, channels):
            raise DataError(
                f"normalisation with {len(self.mean)} channel means cannot apply to a {channels}-channel image; "
                "use a 1-channel Normalization (e.g. densepred.data.UNIT) for grayscale data"
            )
        unit = 1.0 if self.scale_255 else 255.0
        mean = np.broadcast_to(np.asarray(self.mean, np.float32) * unit, (channels,))
        std = np.broadcast_to(np.asarray(self.std, np.float32) * unit, (channels,))
        return mean, (1.0 / std).astype(np.float32)

    def fill_value(self, channels: int = 3) -> tuple[float, ...]:
        """The RGB 0..255 pixel that normalises to zero: padding with it adds no signal (as DeepLab pads)."""
        mean, _ = self._stats(channels)
        return tuple(float(v) for v in (mean[::-1] if self.bgr else mean))

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """uint8 ``(H, W, C)`` RGB -> float32 ``(C, H, W)`` tensor."""
        if image.ndim != 3:
            raise DataError(f"expected an (H, W, C) image, got shape {image.shape}")
        channels = image.shape[2]
        mean, inv_std = self._stats(channels)
        out = np.empty((channels, *image.shape[:2]), dtype=np.float32)
        # One channel plane at a time writes straight into the CHW result: ~6x faster than
        # converting the whole HWC image and transposing (the loader's hottest step).
        for c in range(channels):
            src = image[..., channels - 1 - c] if self.bgr else image[..., c]
            np.multiply(np.subtract(src, mean[c], dtype=np.float32), inv_std[c], out=out[c])
        return torch.from_numpy(out)

    def denormalize(self, tensor: torch.Tensor) -> np.ndarray:
        """Inverse of ``__call__`` for display: ``(C, H, W)`` tensor -> uint8 ``(H, W, C)`` RGB."""
        x = tensor.detach().cpu().numpy().transpose(1, 2, 0)
        mean, inv_std = self._stats(x.shape[2])
        x = x / inv_std + mean
        x = x[..., ::-1] if self.bgr else x
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)


IMAGENET = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
"""torchvision-style ImageNet statistics: RGB, values scaled to [0, 1] first."""

CAFFE_BGR = Normalization(mean=(104.00699, 116.66877, 122.67892), std=(1.0, 1.0, 1.0), bgr=True, scale_255=True)
"""Caffe-converted VGG weights (FCN, DeepLab v1/v2): BGR, 0..255, mean subtraction only."""

CAFFE_DEEPLAB = Normalization(mean=(104.008, 116.669, 122.675), std=(1.0, 1.0, 1.0), bgr=True, scale_255=True)
"""DeepLab's released Caffe nets: BGR, 0..255, less their own mean (train.prototxt mean_value)."""

UNIT = Normalization(mean=(0.0,), std=(1.0,))
"""Just scale to [0, 1], any number of channels (e.g. U-Net on grayscale EM)."""
