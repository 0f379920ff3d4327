"""ISBI 2012 EM segmentation challenge (Arganda-Carreras et al., 2015), the U-Net paper's data.

U-Net (Ronneberger et al., MICCAI 2015, Sec. 3.1) trains on the 30 labelled 512x512 slices.
Labels are 0 = membrane and 255 = cell interior; since 255 is the library's ignore label, they
become class ids 0 = membrane and 1 = cell here. Any other label value is an error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Sample, SegmentationDataset, Transform, check_not_empty, check_split
from .errors import DataError
from .files import FileSegmentationDataset, SampleFiles, list_images, pair_by_stem, require_dir
from .io import check_same_size, read_image_stack, read_mask_stack
from .labels import IGNORE_INDEX, LabelMap

__all__ = ["ISBI2012", "ISBI_CLASSES"]

ISBI_CLASSES = ("membrane", "cell")
_LABELS = LabelMap({0: 0, 255: 1}, len(ISBI_CLASSES))
_HINT = (
    "expected either the challenge's stacks root/{train-volume,train-labels,test-volume}.tif or PNG folders "
    "root/train/images/, root/train/labels/, root/test/images/ (`densepred data download isbi2012 --root DIR`)"
)


class _ISBIFiles(FileSegmentationDataset):
    in_channels = 1
    label_map = _LABELS


class _ISBIStack(SegmentationDataset):
    """Slices of the challenge's multi-page TIFF stacks, decoded once (30 x 512 x 512 bytes each)."""

    in_channels = 1

    def __init__(self, volume: Path, labels: Path | None) -> None:
        super().__init__()
        self.images = read_image_stack(volume, channels=1)
        check_not_empty(len(self.images), str(volume), "the stack has no frames")
        self.masks: list[np.ndarray] | None = None
        if labels is not None:
            raw = read_mask_stack(labels)
            if len(raw) != len(self.images):
                raise DataError(
                    f"{labels} has {len(raw)} frames but {volume} has {len(self.images)}; "
                    "every slice needs exactly one label frame"
                )
            self.masks = [_LABELS(m, f"{labels} frame {k}") for k, m in enumerate(raw)]
            for k, (image, mask) in enumerate(zip(self.images, self.masks, strict=True)):
                check_same_size(image.shape, mask.shape, f"{volume} frame {k}", f"{labels} frame {k}")
        self.prefix = volume.stem

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Sample:
        image = self.images[index]
        mask = self.masks[index] if self.masks is not None else np.full(image.shape[:2], IGNORE_INDEX, np.uint8)
        return Sample(image, mask, f"{self.prefix}-{index:02d}")


# Our fixed split of the 30 labelled slices for model selection (the challenge's test labels are
# private): the first 25 slices train, the last 5 validate. Consecutive slices are similar, so a
# contiguous block keeps the validation slices as far from the training ones as the stack allows.
ISBI_SUBSETS: dict[str, range] = {"train25": range(0, 25), "val5": range(25, 30)}


class ISBI2012(SegmentationDataset):
    """ISBI 2012 ``train`` (30 labelled slices), its ``train25``/``val5`` split (slices 0-24 /
    25-29), or ``test`` (30 unlabelled: masks are all ignore)."""

    SPLITS = ("train", "train25", "val5", "test")
    class_names = ISBI_CLASSES
    palette = [(0, 0, 0), (255, 255, 255)]
    in_channels = 1

    def __init__(self, root: str | Path, split: str = "train", transform: Transform | None = None) -> None:
        super().__init__(transform)
        check_split("isbi2012", split, self.SPLITS)
        subset = ISBI_SUBSETS.get(split)
        split = "train" if subset is not None else split
        root = Path(root)
        volume = root / f"{split}-volume.tif"
        labels = root / "train-labels.tif" if split == "train" else None
        self._source: SegmentationDataset
        if volume.is_file():
            if labels is not None and not labels.is_file():
                raise DataError(f"{volume} has no label stack: {labels} is missing; {_HINT}")
            self._source = _ISBIStack(volume, labels)
        else:
            images_dir = require_dir(root / split / "images", f"ISBI 2012 {split} images", _HINT)
            images = list_images(images_dir)
            if split == "train":
                labels_dir = require_dir(root / "train" / "labels", "ISBI 2012 train labels", _HINT)
                files = pair_by_stem(
                    images, lambda p: [labels_dir / p.name, labels_dir / f"{p.stem}.png"], str(images_dir)
                )
            else:
                files = [SampleFiles(p, None, p.stem) for p in images]
            self._source = _ISBIFiles(files, str(images_dir), _HINT)
        self._indices = list(subset) if subset is not None else list(range(len(self._source)))
        if len(self._indices) and self._indices[-1] >= len(self._source):
            raise DataError(f"ISBI 2012 split {split!r} needs 30 labelled slices; {root} has {len(self._source)}")

    def __len__(self) -> int:
        return len(self._indices)

    def load(self, index: int) -> Sample:
        return self._source.load(self._indices[index])

    def load_mask(self, index: int) -> np.ndarray:
        return self._source.load_mask(self._indices[index])
