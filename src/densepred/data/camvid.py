"""CamVid, 11 classes at 360x480, as prepared for SegNet (Badrinarayanan et al., PAMI 2017)."""

from __future__ import annotations

from pathlib import Path

from .base import Transform, check_split
from .files import FileSegmentationDataset, list_images, pair_by_stem, require_dir
from .labels import IGNORE_INDEX, LabelMap

__all__ = ["CamVid", "CAMVID_CLASSES", "CAMVID_PALETTE", "SEGNET_CLASS_WEIGHTS"]

# Order and colours: SegNet-Tutorial Scripts/test_segmentation_camvid.py (label_colours).
# fmt: off
CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree",
    "sign_symbol", "fence", "car", "pedestrian", "bicyclist",
)
CAMVID_PALETTE = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
]
# fmt: on
# Median-frequency class weights of SegNet's CamVid training definition (segnet_train.prototxt).
# Recomputing them from the 367 train labels (densepred.data.stats.median_frequency_weights)
# gives the same ordering and mostly similar values, but not these exact numbers (sign_symbol
# 3.85 vs 9.64): SegNet's figures were evidently computed on other data or counts.
SEGNET_CLASS_WEIGHTS = (0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826, 9.6446, 1.8418, 0.6823, 6.2478, 7.3614)


class CamVid(FileSegmentationDataset):
    """``root/{split}/*.png`` with labels in ``root/{split}annot/`` (same file name).

    Label ids 0..10 are the classes; 11 ("Unlabelled", SegNet's ``ignore_label: 11``) becomes
    the library's ignore label 255, and a 255 already in a mask stays ignored.
    """

    SPLITS = ("train", "val", "test")
    class_names = CAMVID_CLASSES
    palette = CAMVID_PALETTE
    label_map = LabelMap.identity(11, ignored=(11, IGNORE_INDEX))

    def __init__(self, root: str | Path, split: str = "train", transform: Transform | None = None) -> None:
        check_split("camvid", split, self.SPLITS)
        root = Path(root)
        hint = (
            "expected the SegNet layout root/{train,val,test}/ + root/{train,val,test}annot/ "
            "(get it with `densepred data download camvid --root DIR`)"
        )
        images = require_dir(root / split, f"CamVid {split} images", hint)
        annot = require_dir(root / f"{split}annot", f"CamVid {split} labels", hint)
        files = pair_by_stem(list_images(images), lambda p: [annot / p.name, annot / f"{p.stem}.png"], str(images))
        super().__init__(files, str(images), hint, transform)
