"""Released weights by name: the trained nets people already have, as typed data.

Each family declares its entries beside its builders (``models/fcn.py`` holds the FCN
caffemodels, ``models/deeplabv3.py`` torchvision's DeepLabV3 files, ``models/backbones/*`` the
ImageNet trunks), as torchvision's weights enums do: where the file is, how it is verified, which
classes it scores, the preprocessing it was trained with, and the figure its source reports.
``densepred weights list [PATTERN]`` and ``densepred weights show NAME`` print them;
:func:`densepred.weights.load_released` builds the model and loads the file.

A name is ``MODEL.TAG`` (``fcn8s.voc_caffe``). Verification, strongest first: the full sha256;
a SHA-1 or MD5 that another project publishes for the same file; the first hex digits of the
sha256 (torchvision's file names); and, where nothing is published, the sha256 recorded at the
first download (trust on first use), which later uses are checked against. Anything short of a
full sha256 is said with a warning when the file is fetched.

This module is plain data and imports nothing of densepred's models (they import it).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .data.normalization import Normalization

__all__ = [
    "Digest",
    "Weights",
    "UnknownWeightsError",
    "VOC_CATEGORIES",
    "register_weights",
    "weights_entry",
    "list_weights",
    "describe",
]

_HEX = re.compile(r"[0-9a-f]+")
_LENGTH = {"sha256": 64, "sha1": 40, "md5": 32}

# PASCAL VOC's 20 classes and background, in the order of every VOC-trained release
# (fcn.berkeleyvision.org data/pascal/classes.txt, torchvision's _VOC_CATEGORIES).
VOC_CATEGORIES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


class UnknownWeightsError(ValueError):
    """A weights name that is not in the catalogue."""


@dataclass(frozen=True)
class Digest:
    """A published (or recorded) hash of a weight file and who publishes it.

    ``value`` is the whole hex digest, or for sha256 at least its first 8 hex digits (a prefix
    check, with a warning).
    """

    algorithm: Literal["sha256", "sha1", "md5"]
    value: str
    published_by: str

    def __post_init__(self) -> None:
        n = _LENGTH.get(self.algorithm)
        if n is None:
            raise ValueError(f"digest algorithm must be sha256, sha1 or md5, got {self.algorithm!r}")
        if not _HEX.fullmatch(self.value):
            raise ValueError(f"{self.algorithm} digest must be lowercase hex digits, got {self.value!r}")
        partial_ok = self.algorithm == "sha256" and 8 <= len(self.value) < n
        if len(self.value) != n and not partial_ok:
            raise ValueError(f"{self.algorithm} digest must have {n} hex digits, got {len(self.value)}")

    @property
    def complete(self) -> bool:
        return len(self.value) == _LENGTH[self.algorithm]

    def __str__(self) -> str:
        what = self.algorithm if self.complete else f"first {len(self.value)} hex digits of the sha256"
        return f"{what} {self.value} (published by {self.published_by})"


@dataclass(frozen=True)
class Weights:
    """One released weight file and everything needed to use it faithfully.

    ``layout``: ``torchvision`` (its state-dict keys), ``caffe`` (a ``.caffemodel``, read by
    :mod:`densepred.caffemodel`, layers mapped by name) or ``densepred`` (our own state dict).
    ``caffe_layers`` maps the reference net's layer names onto our modules where they differ
    (``fc8_voc12`` -> ``head.fc8``); ``shared_copies`` are name parts of layers that repeat a
    shared layer's blobs (DeepLab v2's multi-scale branches), checked equal and then skipped;
    ``fixed_blobs`` are layers the model computes as constants, checked against them.
    ``archive_member`` names the file inside a zip download. ``metrics`` are the source's own
    figures, on ``metrics_on``.
    """

    model: str
    tag: str
    url: str
    digest: Digest | None
    layout: Literal["torchvision", "caffe", "densepred"]
    classes: tuple[str, ...]
    normalization: Normalization
    input_size: str
    metrics: Mapping[str, float]
    metrics_on: str
    license: str
    source: str
    kind: Literal["segmentation", "backbone"] = "segmentation"
    num_params: int | None = None
    file_size: int | None = None
    archive_member: str | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    caffe_layers: Mapping[str, str] = field(default_factory=dict)
    shared_copies: tuple[str, ...] = ()
    fixed_blobs: Mapping[str, float] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9_]+", self.tag):
            raise ValueError(f"weights tag must be lowercase letters, digits and '_', got {self.tag!r}")
        if not self.url.startswith(("https://", "http://")):
            raise ValueError(f"{self.name}: url must be http(s), got {self.url!r}")

    @property
    def name(self) -> str:
        return f"{self.model}.{self.tag}"

    @property
    def verification(self) -> str:
        """What is checked when the file is fetched, in words."""
        if self.digest is None:
            return "no published hash: the sha256 recorded at the first download (trust on first use)"
        return str(self.digest)


_CATALOGUE: dict[str, Weights] = {}


def register_weights(*entries: Weights) -> None:
    """Add entries to the catalogue; a duplicate name is an error."""
    for entry in entries:
        if entry.name in _CATALOGUE:
            raise ValueError(f"weights {entry.name!r} are already registered")
        _CATALOGUE[entry.name] = entry


def weights_entry(name: str) -> Weights:
    """The entry called ``name`` (``MODEL.TAG``); an unknown name lists the close matches."""
    if name not in _CATALOGUE:
        # "fcn8s" or "fcn9s.voc_caffe": offer the entries of the closest model names too.
        models = difflib.get_close_matches(name.split(".")[0], {w.model for w in _CATALOGUE.values()}, n=2, cutoff=0.6)
        close = difflib.get_close_matches(name, list(_CATALOGUE), n=3, cutoff=0.5)
        close += [n for n, w in sorted(_CATALOGUE.items()) if w.model in models and n not in close]
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownWeightsError(
            f"unknown weights {name!r}.{hint} `densepred weights list` shows all {len(_CATALOGUE)}"
        )
    return _CATALOGUE[name]


def list_weights(pattern: str = "*", kind: str | None = None) -> list[Weights]:
    """Entries whose name matches a shell-style ``pattern`` (and ``kind``), sorted by name."""
    return [
        w for n, w in sorted(_CATALOGUE.items()) if fnmatch.fnmatch(n, pattern) and (kind is None or w.kind == kind)
    ]


def _normalization_words(n: Normalization) -> str:
    order = "BGR" if n.bgr else "RGB"
    scale = "0-255 values" if n.scale_255 else "values scaled to [0, 1]"
    std = "" if set(n.std) == {1.0} else f", std {n.std}"
    return f"{order}, {scale}, mean {n.mean}{std}"


def describe(w: Weights) -> str:
    """Everything the catalogue knows about ``w``, as ``densepred weights show`` prints it."""
    metrics = ", ".join(f"{k} {v}" for k, v in w.metrics.items()) or "none reported"
    rows = [
        ("name", w.name),
        ("model", f"{w.model} ({w.kind})" + (f", built with {dict(w.model_kwargs)}" if w.model_kwargs else "")),
        ("url", w.url + (f" (member {w.archive_member})" if w.archive_member else "")),
        ("verified by", w.verification),
        ("layout", w.layout),
        (
            "classes",
            f"{len(w.classes)}: {', '.join(w.classes)}" if w.classes else "- (a trunk: its classifier is not used)",
        ),
        ("preprocessing", _normalization_words(w.normalization)),
        ("input size", w.input_size),
        ("reported", f"{metrics} ({w.metrics_on})"),
        ("parameters", f"{w.num_params:,}" if w.num_params else "-"),
        ("file size", f"{w.file_size:,} bytes" if w.file_size else "not published"),
        ("licence", w.license),
        ("source", w.source),
    ]
    if w.caffe_layers:
        rows.append(("Caffe layers", ", ".join(f"{k} -> {v}" for k, v in w.caffe_layers.items())))
    if w.notes:
        rows.append(("notes", w.notes))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


# ---------------------------------------------------------------------------------------------
# torchvision's releases: one URL scheme, one licence statement, one source of metrics.

_TV_MODELS = "https://download.pytorch.org/models/"
TORCHVISION_LICENSE = (
    "BSD-3-Clause (torchvision's licence; the files carry no licence of their own, and torchvision "
    "warns that terms of the data they were trained on may apply)"
)
IMAGENET_RGB = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def torchvision_weights(
    model: str,
    tag: str,
    file: str,
    *,
    sha256: str | None,
    published_by: str,
    classes: tuple[str, ...],
    metrics: Mapping[str, float],
    metrics_on: str,
    input_size: str,
    num_params: int,
    file_size: int | None = None,
    kind: Literal["segmentation", "backbone"] = "segmentation",
    notes: str = "",
) -> Weights:
    """An entry for ``https://download.pytorch.org/models/FILE``. torchvision publishes the first
    8 hex digits of each file's sha256 in its name (``-1167a1af.pth``); ``sha256`` is the full
    digest where another project publishes it (``published_by``), else the name's tag is checked."""
    name_tag = re.search(r"-([0-9a-f]{8})\.pth$", file)
    if name_tag is None:
        raise ValueError(f"{file}: torchvision file names end in -<8 hex digits>.pth")
    if sha256 is not None and not sha256.startswith(name_tag.group(1)):
        raise ValueError(f"{file}: sha256 {sha256} does not start with the file name's tag")
    digest = (
        Digest("sha256", sha256, published_by)
        if sha256
        else Digest("sha256", name_tag.group(1), "torchvision, in the file name")
    )
    return Weights(
        model=model,
        tag=tag,
        url=_TV_MODELS + file,
        digest=digest,
        layout="torchvision",
        classes=classes,
        normalization=IMAGENET_RGB,
        input_size=input_size,
        metrics=metrics,
        metrics_on=metrics_on,
        license=TORCHVISION_LICENSE,
        source="torchvision (https://github.com/pytorch/vision), torchvision/models/"
        + ("segmentation/" if kind == "segmentation" else ""),
        kind=kind,
        num_params=num_params,
        file_size=file_size,
        notes=notes,
    )


def imagenet_trunk(
    model: str,
    file: str,
    *,
    sha256: str | None,
    published_by: str = "",
    top1: float,
    top5: float,
    num_params: int,
    file_size: int | None = None,
) -> Weights:
    """torchvision's IMAGENET1K_V1 classifier file of a trunk (``model``: vgg16, resnet50, ...);
    ``num_params`` counts the whole classifier in the file, its ImageNet head included."""
    return torchvision_weights(
        model,
        "imagenet",
        file,
        sha256=sha256,
        published_by=published_by,
        classes=(),
        metrics={"acc@1": top1, "acc@5": top5},
        metrics_on="ImageNet-1k val, torchvision's figure for the whole classifier",
        input_size="any (trained on 224x224 crops)",
        num_params=num_params,
        file_size=file_size,
        kind="backbone",
    )


def torchvision_coco_voc(
    model: str,
    file: str,
    *,
    sha256: str,
    published_by: str,
    miou: float,
    pixel_acc: float,
    num_params: int,
    file_size: int,
) -> Weights:
    """torchvision's COCO_WITH_VOC_LABELS_V1 file of a segmentation model: trained on the COCO
    images that show the 20 VOC classes, scored by torchvision on COCO val2017 with VOC labels;
    the ``aux`` head is in the file (and in ``num_params``)."""
    return torchvision_weights(
        model,
        "coco_voc",
        file,
        sha256=sha256,
        published_by=published_by,
        classes=VOC_CATEGORIES,
        metrics={"mean IoU": miou, "pixel acc": pixel_acc},
        metrics_on="COCO val2017 with the VOC labels (torchvision's figures)",
        input_size="any; torchvision resizes the shorter side to 520",
        num_params=num_params,
        file_size=file_size,
    )
