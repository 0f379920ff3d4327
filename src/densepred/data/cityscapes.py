"""Cityscapes fine annotations (Cordts et al., CVPR 2016): labelIds -> the 19 train ids."""

from __future__ import annotations

from pathlib import Path

from .base import Transform, check_split
from .files import FileSegmentationDataset, list_images, pair_by_stem, require_dir
from .labels import IGNORE_INDEX, LabelMap

__all__ = ["Cityscapes", "CITYSCAPES_CLASSES", "CITYSCAPES_LABEL_TO_TRAIN"]

# From cityscapesScripts/helpers/labels.py: (labelId, trainId, name, colour) of the 19 evaluated classes.
# fmt: off
_LABELS = (
    (7, 0, "road", (128, 64, 128)), (8, 1, "sidewalk", (244, 35, 232)), (11, 2, "building", (70, 70, 70)),
    (12, 3, "wall", (102, 102, 156)), (13, 4, "fence", (190, 153, 153)), (17, 5, "pole", (153, 153, 153)),
    (19, 6, "traffic light", (250, 170, 30)), (20, 7, "traffic sign", (220, 220, 0)),
    (21, 8, "vegetation", (107, 142, 35)), (22, 9, "terrain", (152, 251, 152)), (23, 10, "sky", (70, 130, 180)),
    (24, 11, "person", (220, 20, 60)), (25, 12, "rider", (255, 0, 0)), (26, 13, "car", (0, 0, 142)),
    (27, 14, "truck", (0, 0, 70)), (28, 15, "bus", (0, 60, 100)), (31, 16, "train", (0, 80, 100)),
    (32, 17, "motorcycle", (0, 0, 230)), (33, 18, "bicycle", (119, 11, 32)),
)
# fmt: on
_SUFFIX = "_leftImg8bit.png"
CITYSCAPES_CLASSES = tuple(name for _, _, name, _ in _LABELS)
# labelIds 0..33 are defined; every one that is not evaluated (void, flat/other, caravan, ...) is ignored.
CITYSCAPES_LABEL_TO_TRAIN = {i: IGNORE_INDEX for i in range(34)} | {lid: tid for lid, tid, _, _ in _LABELS}


class Cityscapes(FileSegmentationDataset):
    """``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with ``gtFine/{split}/{city}/*_gtFine_labelIds.png``."""

    SPLITS = ("train", "val", "test")
    class_names = CITYSCAPES_CLASSES
    palette = [colour for _, _, _, colour in _LABELS]
    label_map = LabelMap(CITYSCAPES_LABEL_TO_TRAIN, len(CITYSCAPES_CLASSES))

    def __init__(self, root: str | Path, split: str = "train", transform: Transform | None = None) -> None:
        check_split("cityscapes", split, self.SPLITS)
        root = Path(root)
        hint = (
            "expected root/leftImg8bit/{split}/{city}/ and root/gtFine/{split}/{city}/ "
            "(`densepred data download cityscapes` explains how to get them)"
        )
        images_dir = require_dir(root / "leftImg8bit" / split, f"Cityscapes {split} images", hint)
        gt_dir = require_dir(root / "gtFine" / split, f"Cityscapes {split} annotations", hint)
        images = [p for p in list_images(images_dir, recursive=True) if p.name.endswith(_SUFFIX)]

        def frame(p: Path) -> str:  # e.g. "aachen_000000_000019"
            return p.name[: -len(_SUFFIX)]

        def mask_for(p: Path) -> list[Path]:
            return [gt_dir / p.parent.name / f"{frame(p)}_gtFine_labelIds.png"]

        files = pair_by_stem(images, mask_for, str(images_dir), name_of=frame)
        super().__init__(files, str(images_dir), hint, transform)
