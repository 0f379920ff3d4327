"""One table of datasets: ``create_dataset(name, root, split, ...)``, ``list_datasets()``, ``detect_dataset(root)``."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .ade20k import ADE20K
from .base import SegmentationDataset, Transform
from .camvid import CamVid
from .cityscapes import Cityscapes
from .errors import DataError, UnknownDatasetError
from .folder import FolderDataset
from .isbi import ISBI2012
from .synthetic import SyntheticShapes
from .voc import SBD, VOCSegmentation

__all__ = ["DatasetEntry", "DATASETS", "create_dataset", "list_datasets", "dataset_entry", "detect_dataset"]


@dataclass(frozen=True)
class DatasetEntry:
    """A dataset name, its class, and the relative paths whose presence identifies its layout."""

    name: str
    cls: Callable[..., SegmentationDataset]
    description: str
    markers: tuple[str, ...] = ()  # any one present under root -> this layout (for detect_dataset)
    needs_root: bool = True


DATASETS: dict[str, DatasetEntry] = {
    e.name: e
    for e in (
        DatasetEntry(
            "voc",
            VOCSegmentation,
            "PASCAL VOC 2012 (+ SBD train_aug, seg11valid), 21 classes",
            ("VOCdevkit/VOC2012/JPEGImages", "VOC2012/JPEGImages", "JPEGImages"),
        ),
        DatasetEntry(
            "sbd",
            SBD,
            "SBD (VOC classes from .mat files), 21 classes",
            ("benchmark_RELEASE/dataset/cls", "dataset/cls", "cls"),
        ),
        DatasetEntry("cityscapes", Cityscapes, "Cityscapes fine, 19 train ids", ("gtFine",)),
        DatasetEntry("camvid", CamVid, "CamVid (SegNet version), 11 classes, 360x480", ("trainannot", "valannot")),
        DatasetEntry("isbi2012", ISBI2012, "ISBI 2012 EM membranes, 2 classes", ("train-volume.tif", "train/labels")),
        DatasetEntry(
            "ade20k", ADE20K, "ADE20K SceneParsing, 150 classes", ("ADEChallengeData2016", "annotations/training")
        ),
        DatasetEntry(
            "folder", FolderDataset, "images/ + masks/ + classes.yaml", ("classes.yaml", "classes.yml", "classes.json")
        ),
        DatasetEntry("synthetic", SyntheticShapes, "built-in textured shapes, 6 classes, no files", needs_root=False),
    )
}


def dataset_entry(name: str) -> DatasetEntry:
    """The entry for ``name``; an unknown name lists the close matches."""
    if name not in DATASETS:
        close = difflib.get_close_matches(name.lower(), list(DATASETS), n=3, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownDatasetError(f"unknown dataset {name!r}.{hint} Known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def list_datasets() -> list[str]:
    """Registered dataset names."""
    return list(DATASETS)


def _check_options(name: str, cls: type, options: dict) -> None:
    """Unknown keyword options are an error listing the dataset's options (not a TypeError from deep inside)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = sorted(set(params) - {"self", "root", "split", "transform"})
    unknown = sorted(set(options) - set(allowed), key=str)
    if unknown:
        raise DataError(
            f"dataset {name!r} has no option(s) {', '.join(map(str, unknown))} (data.options in a recipe); "
            f"its options: {', '.join(allowed) or 'none'}"
        )


def create_dataset(
    name: str,
    root: str | Path | None = None,
    split: str | None = "train",
    transform: Transform | None = None,
    **kwargs,
) -> SegmentationDataset:
    """Build dataset ``name`` (e.g. ``create_dataset("camvid", root="data/camvid", split="val")``).

    ``create_dataset("synthetic", split="train", num_images=..., size=..., seed=...)`` needs no root.
    ``split=None`` reads the dataset's default split: a plain folder without split sub-folders whole.
    """
    entry = dataset_entry(name)
    _check_options(name, entry.cls, kwargs)
    if split is None:
        split = entry.cls.default_split(None if root is None else Path(root))
    if not entry.needs_root:
        if root is not None:
            raise DataError(f"dataset {name!r} is generated and takes no root (got root={root!r})")
        return entry.cls(split=split, transform=transform, **kwargs)
    if root is None:
        raise DataError(
            f"dataset {name!r} needs root=... (the folder holding it); "
            f"get it with `densepred data download {name} --root DIR`"
        )
    if not Path(root).is_dir():
        raise DataError(f"dataset root {root} is not a directory")
    return entry.cls(root, split=split, transform=transform, **kwargs)


def detect_dataset(root: str | Path) -> str:
    """The dataset whose layout ``root`` has, from marker paths; an error if none or several match."""
    root = Path(root)
    found = [e.name for e in DATASETS.values() if any((root / m).exists() for m in e.markers)]
    if len(found) != 1:
        what = "no known layout" if not found else f"several layouts ({', '.join(found)})"
        raise DataError(f"{root}: {what}; name the dataset explicitly (--dataset NAME, one of {', '.join(DATASETS)})")
    return found[0]
