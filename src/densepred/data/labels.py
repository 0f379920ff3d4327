"""Label values: raw-id -> train-id maps, label down-sampling, colour palettes.

The library's ignore label is 255 everywhere (:data:`IGNORE_INDEX`); a dataset whose native
void id differs (CamVid 11, ADE20K 0) maps it to 255 here, in one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
import torch

from .errors import DataError

__all__ = ["IGNORE_INDEX", "LabelMap", "downsample_labels", "bitwise_palette", "colorize"]

IGNORE_INDEX = 255

RGB = tuple[int, int, int]
ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


def _ranges(values: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``: short enough for an error message."""
    vals, parts = sorted(set(values)), []
    for v in vals:
        if parts and v == parts[-1][1] + 1:
            parts[-1][1] = v
        else:
            parts.append([v, v])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts) or "none"


class LabelMap:
    """Raw mask values -> train ids in ``[0, num_classes)`` or :data:`IGNORE_INDEX`.

    Any raw value not in the map is an error that lists the values found, so a wrong dataset,
    a JPEG-compressed mask or a mask from another label set is never turned into wrong labels.
    """

    def __init__(self, mapping: Mapping[int, int], num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if not 0 < num_classes <= 255:
            raise ValueError(f"num_classes must be in 1..255 (255 is the ignore label), got {num_classes}")
        bad = {k: v for k, v in mapping.items() if k < 0 or not (0 <= v < num_classes or v == ignore_index)}
        if bad:
            raise ValueError(
                f"label map sends raw values to ids outside 0..{num_classes - 1} and {ignore_index}: {bad}"
            )
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self._lut = np.full(max(256, max(mapping, default=0) + 1), -1, dtype=np.int16)
        self._lut[list(mapping)] = list(mapping.values())
        self.classes = sorted(k for k, v in mapping.items() if v != ignore_index)
        self.ignored = sorted(k for k, v in mapping.items() if v == ignore_index)

    @classmethod
    def identity(cls, num_classes: int, ignored: Sequence[int] = (IGNORE_INDEX,)) -> LabelMap:
        """Raw ids are train ids ``0..num_classes-1``; the raw values in ``ignored`` become 255."""
        mapping = {i: i for i in range(num_classes)}
        mapping.update({v: IGNORE_INDEX for v in ignored})
        return cls(mapping, num_classes)

    def describe(self) -> str:
        return f"classes {_ranges(self.classes)}" + (f", ignored {_ranges(self.ignored)}" if self.ignored else "")

    def __call__(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        """Map a raw mask read from ``path`` (named in the error) to a uint8 train-id mask."""
        if raw.dtype.kind not in "ui":
            raise DataError(f"{path}: mask has non-integer values ({raw.dtype}); masks must hold integer labels")
        too_big = raw >= len(self._lut) if raw.dtype.itemsize > 1 else None
        mapped = self._lut[np.where(too_big, 0, raw) if too_big is not None else raw]
        bad = mapped < 0
        if too_big is not None:
            bad |= too_big
        if bad.any():
            found = np.unique(raw[bad])
            shown = ", ".join(str(v) for v in found[:20]) + (" ..." if len(found) > 20 else "")
            hint = (
                " (a JPEG mask blends labels: save masks as PNG)"
                if Path(path).suffix.lower() in {".jpg", ".jpeg"}
                else ""
            )
            raise DataError(
                f"{path}: mask has values [{shown}] in {int(bad.sum())} pixels that are not labels of this "
                f"dataset (valid raw values: {self.describe()}){hint}; fix the mask or choose the right "
                "dataset / class list"
            )
        return mapped.astype(np.uint8)


def downsample_labels(mask: ArrayOrTensor, factor: int) -> ArrayOrTensor:
    """Sub-sample a label map by ``factor`` for a loss at output stride ``factor`` (DeepLab v1).

    DeepLab v1 (Chen et al., ICLR 2015, Sec. 4.1) trains against "the ground truth labels
    subsampled by 8". We take every ``factor``-th label starting at 0 (nearest neighbour), which
    is the sampling grid of DeepLab's Caffe ``label_shrink`` (``Interp`` with ``shrink_factor``):
    output size ``(in - 1) // factor + 1``, e.g. 321 -> 41 for factor 8. Labels are picked, never
    interpolated, so no value between two classes can appear; the ignore label stays 255.
    Works on ``(..., H, W)`` NumPy arrays and tensors.
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    return mask[..., ::factor, ::factor]


def bitwise_palette(n: int) -> list[RGB]:
    """The PASCAL VOC devkit colour map (``labelcolormap.m``): class bits spread over R, G, B."""
    ids = np.arange(n)
    rgb = np.zeros((n, 3), dtype=np.int64)
    for shift in range(8):  # 8 bit planes, not pixels
        for channel in range(3):
            rgb[:, channel] |= ((ids >> (3 * shift + channel)) & 1) << (7 - shift)
    return [tuple(int(c) for c in row) for row in rgb]  # type: ignore[misc]


def colorize(mask: np.ndarray, palette: Sequence[RGB], ignore_colour: RGB = (0, 0, 0)) -> np.ndarray:
    """An ``(..., 3)`` uint8 picture of a train-id mask ``(...)``; ignored pixels get ``ignore_colour``."""
    lut = np.zeros((256, 4), dtype=np.uint8)  # RGB and a pad byte: one 32-bit word per class
    lut[: len(palette), :3] = palette
    lut[IGNORE_INDEX, :3] = ignore_colour
    mask = np.asarray(mask)
    index = mask if mask.dtype == np.uint8 else mask.astype(np.int64).clip(0, 255)
    # One 4-byte gather per pixel, then OpenCV drops the pad: a CamVid frame 0.78 -> 0.23 ms
    # (gathering 3-byte rows takes 0.78, NumPy's own copy without the pad 1.3).
    rgba = np.take(lut.view(np.uint32)[:, 0], index).view(np.uint8).reshape(*index.shape, 4)
    return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB) if index.ndim == 2 else np.ascontiguousarray(rgba[..., :3])
