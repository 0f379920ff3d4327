"""The dataset contract every densepred dataset follows.

``dataset[i]`` is ``{"image": float32 (C, H, W), "mask": int64 (H, W), "name": str}``; mask
values are train ids in ``[0, num_classes)`` or :data:`IGNORE_INDEX` (255). Subclasses only
implement ``__len__`` and ``load`` (uint8 pixels and a checked uint8 mask); the optional
``transform`` turns those into tensors (without one, images are just scaled to [0, 1]).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataError
from .labels import IGNORE_INDEX, RGB
from .normalization import UNIT

__all__ = ["Sample", "Transform", "SegmentationDataset", "check_split", "check_not_empty"]

Transform = Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]]
"""``(uint8 image (H, W, C), uint8 mask (H, W)) -> (float image (C, H', W'), int64 mask (H', W'))``."""


class Sample(NamedTuple):
    """One decoded, checked example before any transform."""

    image: np.ndarray  # uint8 (H, W, C)
    mask: np.ndarray  # uint8 (H, W): train ids and IGNORE_INDEX
    name: str


class SegmentationDataset(Dataset):
    """Base class: image + integer mask, with ``num_classes``, ``class_names``, ``palette``, ``ignore_index``."""

    class_names: tuple[str, ...] = ()
    palette: list[RGB] = []
    ignore_index: int = IGNORE_INDEX
    in_channels: int = 3

    @classmethod
    def default_split(cls, root: Path | None) -> str:
        """The split read when none is named (``densepred data stats ROOT``)."""
        return "train"

    def __init__(self, transform: Transform | None = None) -> None:
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Sample:
        """Decode example ``index`` (no transform); bad files raise :class:`DataError`."""
        raise NotImplementedError

    def load_mask(self, index: int) -> np.ndarray:
        """Only the checked mask of example ``index`` (statistics use this; subclasses may skip the image)."""
        return self.load(index).mask

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        image, mask, name = self.load(index % len(self))
        if self.transform is None:
            image_t, mask_t = UNIT(image), torch.from_numpy(mask.astype(np.int64))
        else:
            image_t, mask_t = self.transform(image, mask)
        return {"image": image_t, "mask": mask_t, "name": name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {self.num_classes} classes)"


def check_split(dataset: str, split: str, splits: tuple[str, ...]) -> None:
    """Refuse an unknown split, listing the known ones."""
    if split not in splits:
        raise DataError(f"{dataset}: unknown split {split!r}; choose one of {', '.join(splits)}")


def check_not_empty(count: int, where: str, hint: str) -> None:
    """An empty dataset is an error, never a silent zero-length epoch."""
    if count == 0:
        raise DataError(f"no images found in {where}; {hint}")
