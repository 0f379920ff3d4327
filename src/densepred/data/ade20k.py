"""ADE20K SceneParsing (MIT Scene Parsing Benchmark, Zhou et al., CVPR 2017), 150 classes."""

from __future__ import annotations

from pathlib import Path

from .base import Transform, check_split
from .files import FileSegmentationDataset, list_images, pair_by_stem, require_dir
from .labels import IGNORE_INDEX, LabelMap, bitwise_palette

__all__ = ["ADE20K", "ADE20K_CLASSES"]

# The 150 classes of objectInfo150 (short names), in id order 1..150.
# fmt: off
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",
    "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
# fmt: on


class ADE20K(FileSegmentationDataset):
    """``ADEChallengeData2016/{images,annotations}/{training,validation}``.

    Raw label 0 ("other objects") is not one of the 150 classes: it becomes the ignore label
    255 and ids 1..150 shift down to 0..149, as in the benchmark's evaluation.
    """

    SPLITS = ("train", "val")
    class_names = ADE20K_CLASSES
    # Not the benchmark's own colour table: the VOC bit-spread colour map, for visualisation only.
    palette = bitwise_palette(len(ADE20K_CLASSES) + 1)[1:]
    label_map = LabelMap({0: IGNORE_INDEX, **{i + 1: i for i in range(len(ADE20K_CLASSES))}}, len(ADE20K_CLASSES))

    def __init__(self, root: str | Path, split: str = "train", transform: Transform | None = None) -> None:
        check_split("ade20k", split, self.SPLITS)
        root = Path(root)
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        folder = {"train": "training", "val": "validation"}[split]
        hint = (
            "expected ADEChallengeData2016/images/{training,validation} and annotations/ "
            "(get it with `densepred data download ade20k --root DIR`)"
        )
        images = require_dir(root / "images" / folder, f"ADE20K {split} images", hint)
        annot = require_dir(root / "annotations" / folder, f"ADE20K {split} annotations", hint)
        files = pair_by_stem(list_images(images), lambda p: [annot / f"{p.stem}.png"], str(images))
        super().__init__(files, str(images), hint, transform)
