"""A plain folder: ``images/`` + ``masks/`` matched by file stem, classes from a small yaml/json.

Layout (``split`` sub-folders are optional)::

    root/classes.yaml              # or classes.yml / classes.json
    root/[split/]images/a.jpg
    root/[split/]masks/a.png       # index PNG (value = class id) or colour PNG (needs a palette)

``classes.yaml``::

    classes: [background, road, car]
    palette: [[0, 0, 0], [128, 64, 128], [0, 0, 142]]   # optional; needed for colour masks
    ignore_index: 255                                    # optional raw value ignored in index masks
    ignore_colour: [255, 255, 255]                       # optional colour ignored in colour masks
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .base import Transform
from .errors import DataError
from .files import FileSegmentationDataset, list_images, pair_by_stem, require_dir
from .labels import IGNORE_INDEX, RGB, LabelMap, bitwise_palette

__all__ = ["FolderDataset", "load_class_file"]

_CLASS_FILES = ("classes.yaml", "classes.yml", "classes.json")
_EXAMPLE = "e.g. classes.yaml containing `classes: [background, cat, dog]`"


def _colour(value: Any, where: str) -> RGB:
    if not (
        isinstance(value, Sequence) and len(value) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in value)
    ):
        raise DataError(f"{where}: colour {value!r} must be three integers 0..255, e.g. [128, 64, 128]")
    return (value[0], value[1], value[2])


def load_class_file(path: Path) -> dict[str, Any]:
    """Read and validate a class file; returns ``classes``, ``palette``, ``ignore_index``, ``ignore_colour``."""
    try:
        text = path.read_text()
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise DataError(f"{path}: cannot read the class file ({e}); {_EXAMPLE}") from None
    if isinstance(spec, list):
        spec = {"classes": spec}
    if not isinstance(spec, Mapping) or "classes" not in spec:
        raise DataError(f"{path}: needs a 'classes' list; {_EXAMPLE}")
    unknown = set(spec) - {"classes", "palette", "ignore_index", "ignore_colour", "ignore_color"}
    if unknown:
        raise DataError(
            f"{path}: unknown key(s) {sorted(unknown)}; allowed: classes, palette, ignore_index, ignore_colour"
        )
    names = spec["classes"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise DataError(f"{path}: 'classes' must be a non-empty list of names, got {names!r}")
    if len(names) > 255 or len(set(names)) != len(names):
        raise DataError(f"{path}: 'classes' must be at most 255 distinct names (255 is the ignore label)")
    palette = spec.get("palette")
    if palette is not None:
        if not isinstance(palette, list) or len(palette) != len(names):
            raise DataError(f"{path}: 'palette' needs one colour per class ({len(names)}), got {palette!r}")
        palette = [_colour(c, str(path)) for c in palette]
        if len(set(palette)) != len(palette):
            raise DataError(f"{path}: 'palette' has repeated colours; each class needs its own colour")
    ignore_index = spec.get("ignore_index", IGNORE_INDEX)
    if not isinstance(ignore_index, int) or 0 <= ignore_index < len(names) or ignore_index < 0:
        raise DataError(
            f"{path}: 'ignore_index' must be an integer >= {len(names)} (not a class id), got {ignore_index!r}"
        )
    ignore_colour = spec.get("ignore_colour", spec.get("ignore_color"))
    if ignore_colour is not None:
        ignore_colour = _colour(ignore_colour, str(path))
        if palette is not None and ignore_colour in palette:
            raise DataError(f"{path}: 'ignore_colour' {ignore_colour} is also a class colour")
    return {"classes": tuple(names), "palette": palette, "ignore_index": ignore_index, "ignore_colour": ignore_colour}


class FolderDataset(FileSegmentationDataset):
    """Your own data: images and masks matched by stem, masks as index or colour PNGs."""

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        transform: Transform | None = None,
        class_file: str | Path | None = None,
    ) -> None:
        root = Path(root)
        spec = load_class_file(self._class_file(root, class_file))
        base = root / split if split not in (None, "", "all") else root
        hint = "put images in images/ and masks with the same stem in masks/"
        if not (base / "images").is_dir() and split not in (None, "", "all") and (root / "images").is_dir():
            raise DataError(
                f"split {split!r} not found: {base / 'images'} does not exist; this folder has no split "
                "sub-folders, so pass split='all' (or make root/train/images, root/val/images, ...)"
            )
        images_dir = require_dir(base / "images", "image folder", hint)
        masks_dir = require_dir(base / "masks", "mask folder", hint)
        files = pair_by_stem(list_images(images_dir), lambda p: [masks_dir / f"{p.stem}.png"], str(images_dir))

        self.class_names = spec["classes"]
        self.palette = spec["palette"] or bitwise_palette(len(self.class_names))
        mapping = {i: i for i in range(len(self.class_names))} | {spec["ignore_index"]: IGNORE_INDEX}
        self.label_map = LabelMap(mapping, len(self.class_names))
        colours: dict[RGB, int] | None = None
        if spec["palette"] is not None:
            colours = {c: i for i, c in enumerate(spec["palette"])}
            if spec["ignore_colour"] is not None:
                colours[spec["ignore_colour"]] = spec["ignore_index"]
        self.mask_colours: Mapping[RGB, int] | None = colours
        super().__init__(files, str(images_dir), hint, transform)

    @classmethod
    def default_split(cls, root: Path | None) -> str:
        """A folder without split sub-folders is read whole; one with them, its train split."""
        return "all" if root is not None and (Path(root) / "images").is_dir() else "train"

    @staticmethod
    def _class_file(root: Path, class_file: str | Path | None) -> Path:
        if class_file is not None:
            return Path(class_file)
        for name in _CLASS_FILES:
            if (root / name).is_file():
                return root / name
        raise DataError(f"no class file in {root}: add one of {', '.join(_CLASS_FILES)}, {_EXAMPLE}")
