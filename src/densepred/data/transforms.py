"""Joint image + mask augmentation (albumentations) ending in normalised tensors.

Geometry is applied to image and mask with the same random parameters; masks are always
resampled with nearest neighbour (never interpolated between labels) and padded with the
ignore label, images are padded with the normalisation's mean pixel (zero after normalising, up
to rounding to whole pixel values, as DeepLab's Caffe data layer pads with the mean value).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # a data pipeline must not phone home on import
import albumentations as A  # noqa: E402

from .elastic import GridElastic  # noqa: E402
from .errors import DataError  # noqa: E402
from .labels import IGNORE_INDEX  # noqa: E402
from .normalization import IMAGENET, UNIT, Normalization  # noqa: E402

__all__ = ["JointTransform", "deeplab_train", "unet_train", "eval_transform", "build_transforms", "PRESETS"]


class JointTransform:
    """``(uint8 image (H, W, C), uint8 mask (H, W)) -> (float32 (C, H', W'), int64 (H', W'))``.

    Random state: one generator shared by all steps. In a DataLoader worker (another process)
    it is reseeded from ``torch.initial_seed()`` on first use, so workers never repeat each
    other's augmentations and each epoch differs; ``seed`` makes the main process reproducible.
    """

    def __init__(
        self, augment: Sequence[A.BasicTransform] = (), normalization: Normalization = IMAGENET, seed: int | None = None
    ) -> None:
        self.steps = list(augment)
        # No shape check by albumentations: the dataset has already checked image/mask sizes.
        self.compose = A.Compose(self.steps, is_check_shapes=False) if self.steps else None
        self.normalization = normalization
        self.reseed(seed)

    def reseed(self, seed: int | None) -> None:
        """Restart the random stream (``None``: fresh entropy)."""
        self._pid = os.getpid()
        if self.compose is not None:
            # One shared generator: per-step generators seeded alike would make the steps' draws correlated.
            self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compose is not None:
            if os.getpid() != self._pid:  # first call in a DataLoader worker: forked state is shared
                self.reseed(torch.initial_seed() % 2**63)
            out = self.compose(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        if image.ndim == 2:
            image = image[..., None]
        return self.normalization(image), torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))

    def __repr__(self) -> str:
        steps = ", ".join(type(s).__name__ for s in self.steps) or "no augmentation"
        return f"JointTransform([{steps}], {self.normalization})"


def _pad_and_crop(
    crop: int | tuple[int, int], normalization: Normalization, channels: int, ignore_index: int
) -> list[A.BasicTransform]:
    h, w = (crop, crop) if isinstance(crop, int) else crop
    fill = normalization.fill_value(channels)
    return [
        # DeepLab pads at the bottom and right (image placed top-left), then crops at random.
        A.PadIfNeeded(
            min_height=h,
            min_width=w,
            position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=fill if channels > 1 else fill[0],
            fill_mask=ignore_index,
        ),
        A.RandomCrop(height=h, width=w),
    ]


def deeplab_train(
    crop: int | tuple[int, int] = 321,
    scale: tuple[float, float] = (0.5, 1.5),
    flip: bool = True,
    normalization: Normalization = IMAGENET,
    ignore_index: int = IGNORE_INDEX,
    color_jitter: float = 0.0,
    blur: float = 0.0,
    channels: int = 3,
    seed: int | None = None,
) -> JointTransform:
    """DeepLab-style training: random scale, pad with the ignore label, random ``crop``, flip.

    DeepLab v2 (Chen et al., TPAMI 2018, experiments) augments by randomly scaling the input from
    0.5 to 1.5 and random left-right flips, and trains on 321x321 crops. ``color_jitter`` and
    ``blur`` are probabilities of the extra photometric steps (off by default, as in the paper).
    """
    lo, hi = scale
    if not 0 < lo <= hi:
        raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {scale}")
    steps: list[A.BasicTransform] = []
    if (lo, hi) != (1.0, 1.0):
        # INTER_NEAREST_EXACT, not INTER_NEAREST: OpenCV's plain nearest samples floor(i / s), up to
        # a whole source pixel left of/above where INTER_LINEAR samples the image (pixel centres),
        # so masks drifted against their images; the exact variant uses the same centres.
        steps.append(
            A.RandomScale(
                scale_limit=(lo - 1.0, hi - 1.0),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST_EXACT,
                p=1.0,
            )
        )
    steps += _pad_and_crop(crop, normalization, channels, ignore_index)
    if flip:
        steps.append(A.HorizontalFlip(p=0.5))
    if color_jitter > 0:
        steps.append(A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=color_jitter))
    if blur > 0:
        steps.append(A.GaussianBlur(blur_limit=(3, 7), p=blur))
    return JointTransform(steps, normalization, seed)


def unet_train(
    crop: int | tuple[int, int] | None = None,
    elastic_sigma: float = 10.0,
    elastic_grid: int = 3,
    flip: bool = True,
    rotate90: bool = True,
    brightness_contrast: float = 0.5,
    normalization: Normalization = UNIT,
    ignore_index: int = IGNORE_INDEX,
    channels: int = 1,
    seed: int | None = None,
) -> JointTransform:
    """U-Net training (Ronneberger et al., MICCAI 2015, Sec. 3.1): shifts, rotations, gray-value
    variations and elastic deformation on a ``elastic_grid`` x ``elastic_grid`` grid with
    ``elastic_sigma`` px displacements (bicubic image, nearest mask), then an optional random crop.
    Defaults suit 1-channel EM data; pass ``channels=3`` and an RGB ``normalization`` otherwise.
    """
    steps: list[A.BasicTransform] = []
    if flip:
        steps += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if rotate90:
        steps.append(A.RandomRotate90(p=1.0))
    steps.append(GridElastic(grid=elastic_grid, sigma=elastic_sigma, p=1.0))
    if brightness_contrast > 0:
        steps.append(A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=brightness_contrast))
    if crop is not None:
        steps += _pad_and_crop(crop, normalization, channels, ignore_index)
    return JointTransform(steps, normalization, seed)


def eval_transform(normalization: Normalization = IMAGENET) -> JointTransform:
    """Evaluation: no augmentation, full image, just normalisation."""
    return JointTransform((), normalization)


PRESETS: dict[str, Callable[..., JointTransform]] = {
    "deeplab_train": deeplab_train,
    "unet_train": unet_train,
    "eval": eval_transform,
}


def build_transforms(preset: str, **kwargs) -> JointTransform:
    """A preset by name: ``"deeplab_train"``, ``"unet_train"`` or ``"eval"``, with its keyword options."""
    if preset not in PRESETS:
        raise DataError(f"unknown transform preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset](**kwargs)
