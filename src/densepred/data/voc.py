"""PASCAL VOC 2012 segmentation (Everingham et al., IJCV 2010) and the SBD extension.

SBD (Hariharan et al., "Semantic contours from inverse detectors", ICCV 2011) adds class masks
for 11,355 VOC images as MATLAB files. ``train_aug`` is the usual union used by FCN and DeepLab:
SBD train + SBD val + VOC train, minus VOC val (10,582 images with the full data).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Transform, check_split
from .errors import DataError
from .files import FileSegmentationDataset, pair_by_stem, read_split_file
from .io import read_mask
from .labels import LabelMap, bitwise_palette
from .voc_splits import SEG11VALID

__all__ = ["VOCSegmentation", "SBD", "VOC_CLASSES", "read_sbd_mat"]

# fmt: off
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# fmt: on


def read_sbd_mat(path: Path) -> np.ndarray:
    """The class mask of an SBD ``cls/*.mat`` file (``GTcls.Segmentation``, ids 0..20)."""
    from scipy.io import loadmat  # scipy.io is only needed for SBD

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        seg = np.asarray(loadmat(path, squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation)
    except Exception as e:  # scipy raises many types for a bad file; all mean the same to the user
        raise DataError(
            f"{path}: not a readable SBD class annotation (a .mat file with GTcls.Segmentation): "
            f"{type(e).__name__}: {e}; re-download SBD"
        ) from None
    if seg.ndim != 2 or seg.dtype.kind not in "ui":
        raise DataError(
            f"{path}: GTcls.Segmentation is {seg.dtype} with shape {seg.shape}, expected a 2-D integer mask"
        )
    return seg


def _find(candidates: list[Path], marker: str, what: str, hint: str) -> Path:
    for folder in candidates:
        if (folder / marker).is_dir():
            return folder
    raise DataError(f"{what} not found: looked for {marker}/ in {', '.join(str(c) for c in candidates)}; {hint}")


def _voc_dir(root: Path) -> Path:
    return _find(
        [root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"],
        "JPEGImages",
        "PASCAL VOC 2012",
        "pass the folder that holds VOCdevkit/ (get it with `densepred data download voc --root DIR`)",
    )


def _sbd_dir(root: Path, sbd_root: Path | None) -> Path:
    bases = [sbd_root] if sbd_root is not None else [root, root / "sbd", root.parent / "sbd"]
    candidates = [d for b in bases for d in (b, b / "dataset", b / "benchmark_RELEASE" / "dataset")]
    return _find(
        candidates,
        "cls",
        "SBD (benchmark_RELEASE/dataset)",
        "pass sbd_root=..., or download it next to VOC with `densepred data download sbd --root DIR`",
    )


class _VOCLabels(FileSegmentationDataset):
    """21 VOC classes; 255 marks object boundaries and difficult regions (ignored)."""

    class_names = VOC_CLASSES
    palette = bitwise_palette(len(VOC_CLASSES))
    label_map = LabelMap.identity(len(VOC_CLASSES))

    def read_raw_mask(self, path: Path) -> np.ndarray:
        return read_sbd_mat(path) if path.suffix == ".mat" else read_mask(path)


class VOCSegmentation(_VOCLabels):
    """VOC 2012 ``train``/``val``/``trainval``, plus ``train_aug`` (with SBD) and FCN's ``seg11valid``.

    ``train_aug`` takes each mask from VOC's ``SegmentationClass`` when the image has one (it
    marks boundaries as ignored), otherwise from SBD's ``cls/*.mat``.
    """

    SPLITS = ("train", "val", "trainval", "train_aug", "seg11valid")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform | None = None,
        sbd_root: str | Path | None = None,
    ) -> None:
        check_split("voc", split, self.SPLITS)
        voc = _voc_dir(Path(root))
        seg_lists = voc / "ImageSets" / "Segmentation"
        if split == "train_aug":
            sbd = _sbd_dir(Path(root), Path(sbd_root) if sbd_root is not None else None)
            val = set(read_split_file(seg_lists / "val.txt"))
            ids = (
                read_split_file(sbd / "train.txt")
                + read_split_file(sbd / "val.txt")
                + read_split_file(seg_lists / "train.txt")
            )
            ids = sorted(set(ids) - val)
        else:
            sbd = None
            ids = list(SEG11VALID) if split == "seg11valid" else read_split_file(seg_lists / f"{split}.txt")
        images = [voc / "JPEGImages" / f"{i}.jpg" for i in ids]
        if sbd is not None:  # SBD-only images are in SBD's img/ (VOC 2012 has nearly all of them too)
            images = [p if p.is_file() else sbd / "img" / p.name for p in images]

        def mask_for(p: Path) -> list[Path]:
            # VOC's own mask first: only it marks object boundaries as ignored.
            return [voc / "SegmentationClass" / f"{p.stem}.png"] + ([sbd / "cls" / f"{p.stem}.mat"] if sbd else [])

        files = pair_by_stem(images, mask_for, f"VOC split {split!r}")
        super().__init__(files, f"VOC split {split!r}", "the split list is empty", transform)


class SBD(_VOCLabels):
    """SBD on its own: ``train`` (8,498) and ``val`` (2,857) from ``benchmark_RELEASE/dataset``."""

    SPLITS = ("train", "val")

    def __init__(self, root: str | Path, split: str = "train", transform: Transform | None = None) -> None:
        check_split("sbd", split, self.SPLITS)
        sbd = _sbd_dir(Path(root), None)
        images = [sbd / "img" / f"{i}.jpg" for i in read_split_file(sbd / f"{split}.txt")]
        files = pair_by_stem(images, lambda p: [sbd / "cls" / f"{p.stem}.mat"], str(sbd))
        super().__init__(files, f"SBD split {split!r}", "the split list is empty", transform)
