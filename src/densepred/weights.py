"""Pretrained weights: verified download, safe reading, and strict mapping onto our modules.

Three steps, each usable alone:

1. :func:`fetch` turns a path or URL into a local file. URLs are downloaded into a cache
   (``$DENSEPRED_CACHE`` or ``~/.cache/densepred/weights``), resumed from a ``.part`` file with
   an HTTP Range request (:mod:`densepred.download`), and checked against the full sha256
   before they are moved into place; a cached file is checked again on every use, and one that
   no longer matches is downloaded again.
2. :func:`read_state_dict` reads ``.pth``/``.pt`` (``torch.load(weights_only=True)``: tensors
   only, a pickle that would run code is refused), ``.safetensors`` and ``.npz``
   (``allow_pickle=False``).
3. :func:`load_pretrained` recognises the file's layout from its keys and copies every tensor to
   its place. Strict: every parameter and buffer it targets must be filled and every key of the
   file used or ignored by design; errors name the keys and the file.

Layouts
-------
``torchvision`` (its ImageNet files):
    VGG16: ``features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}`` are conv1_1 ...
    conv5_3; ``classifier.0`` is fc6 (Linear 25088 -> 4096), ``classifier.3`` fc7 (4096 ->
    4096), ``classifier.6`` the ImageNet fc8. ResNet: ``conv1``, ``bn1``, ``layerK.M.*``,
    ``fc``, the module names of :class:`~densepred.models.backbones.resnet.ResNet`.
    MobileNetV3-Large: ``features.{0..16}.*`` (the stem, the fifteen bneck blocks
    ``features.N.block.M.*`` with squeeze-and-excite ``fc1``/``fc2``, the final 1x1 conv) and
    ``classifier.0``/``classifier.3``, the module names of
    :class:`~densepred.models.backbones.mobilenetv3.MobileNetV3Large`. A segmentation model holds
    the layers up to its deepest tap in a :class:`~densepred.models.backbones.mobilenetv3.FeatureTaps`
    (``backbone.{i}.*``, torchvision's ``IntermediateLayerGetter``): ``features.{i}`` fills
    ``backbone.{i}``, and the file's deeper layers are ignored by design, as the classifier is.

``caffe`` (the flat dump of a ``.caffemodel``, as used by the FCN and DeepLab reference models):
    one entry per blob, keyed ``"{caffe_layer_name}.{blob_index}"``, each blob with the shape
    Caffe stores (a convolution's weight is ``(out, in, kh, kw)`` in both frameworks).

    - VGG16 (``VGG_ILSVRC_16_layers``): ``conv1_1.0`` weight, ``conv1_1.1`` bias, ...,
      ``conv5_3.{0,1}``; ``fc6.0`` as ``(4096, 25088)`` (InnerProduct) or ``(4096, 512, 7, 7)``
      (already convolutionalized, as in FCN's nets) or DeepLab's decimated ``(1024, 512, 3, 3)``;
      ``fc7.{0,1}``; ``fc8.{0,1}`` the ImageNet classifier. Caffe flattens ``pool5`` in
      ``(C, H, W)`` order, as PyTorch does, so no transposition is needed.
    - ResNet (MSRA, He et al. 2016, ``ResNet-{50,101}-model.caffemodel``): ``conv1.0`` (and
      ``conv1.1``, a bias, in ResNet-50 only), ``bn_conv1.{0,1,2}`` = Caffe ``BatchNorm`` blobs
      (mean and variance, both multiplied by the moving-average factor in blob 2: the running
      statistics are ``blob / factor``, and all zero when the factor is 0, exactly as Caffe's
      ``BatchNormLayer`` computes them), ``scale_conv1.{0,1}`` = the ``Scale`` layer's gamma
      and beta; per block ``res{S}{B}_branch1`` (projection), ``res{S}{B}_branch2{a,b,c}``
      with ``bn{S}{B}_branch*`` and ``scale{S}{B}_branch*``; ``fc1000.{0,1}`` the classifier.
      Stages S = 2..5 are our ``layer1..layer4``. Blocks B are letters (``a``, ``b``, ...)
      in ResNet-50; ResNet-101 names stages with more than three blocks ``a``, ``b1``,
      ``b2``, ... (``res3b3``, ``res4b22``). Caffe ResNet convolutions have no bias except
      ResNet-50's ``conv1``, which is folded into ``bn_conv1``'s mean (exact: BN subtracts it).

``densepred``: a full ``model.state_dict()`` saved from a densepred model; loaded as it is.

What goes where: the VGG16 convolutions go to the backbone and fc6/fc7 to every module of the
model that has ``fc6`` and ``fc7`` (FCN itself, DeepLab's :class:`FCHead`, each ASPP-VGG
branch), reshaped (FCN Sec. 3.1) or decimated (:func:`decimate_fc`, DeepLab v1) to fit.
ImageNet classifiers (``classifier.6``, ``fc8``, ``fc``, ``fc1000``, MobileNetV3's ``classifier.0/3``
unless the model is a bare :class:`MobileNetV3Large` built ``with_classifier``) are ignored by design, and
the class-scoring layers (``score_fr``, ``fc8``, ResNet's ASPP) keep their initialisation.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import urllib.parse
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from .atomic import write_atomic
from .caffemodel import CaffeModelError, read_caffemodel
from .catalogue import Digest, Weights, list_weights, weights_entry
from .download import TransferFailed, TransferInterrupted, download_to_part, hash_file, sha256_file
from .models.backbones import VGG16, ResNet
from .models.backbones.mobilenetv3 import BNECKS_LARGE, FeatureTaps, MobileNetV3Large
from .models.backbones.vgg import VGG16_STAGES
from .models.base import SegmentationModel
from .registry import set_released_loader

M = TypeVar("M", bound=nn.Module)

__all__ = [
    "with_pretrained",
    "load_vgg16_classifier",
    "vgg16_classifier_key",
    "WeightsError",
    "WeightsWarning",
    "PRETRAINED",
    "LoadReport",
    "default_cache_dir",
    "sha256_file",
    "fetch",
    "read_state_dict",
    "detect_layout",
    "decimate_fc",
    "imagenet_spec",
    "load_pretrained",
    "fetch_released",
    "load_released",
    "convert_released",
]


class WeightsError(ValueError):
    """A weight file that cannot be used: wrong hash, wrong keys or shapes, unsafe content."""


class WeightsWarning(UserWarning):
    """A weight file checked less strictly than it should be (only a hash prefix is known), or a
    corrupt cached copy that was deleted and downloaded again."""


_HEX = re.compile(r"[0-9a-f]+")

# The ImageNet trunks' entries live beside the backbones (models/backbones/*.py), in the catalogue.
PRETRAINED: dict[str, Weights] = {w.model: w for w in list_weights(kind="backbone")}


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained` did: the file, its layout, what was filled and ignored."""

    path: Path
    layout: str
    loaded: tuple[str, ...]  # target state-dict keys that were written
    ignored: tuple[str, ...]  # file keys ignored by design (ImageNet classifiers)


# ---------------------------------------------------------------------------------------------
# Fetching


def default_cache_dir() -> Path:
    """``$DENSEPRED_CACHE`` if set, else ``~/.cache/densepred/weights``."""
    env = os.environ.get("DENSEPRED_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "densepred" / "weights"


def _mismatch(path: Path, digest: Digest, name: str) -> str | None:
    """``None`` when ``path`` has the expected digest, else what differs (for the caller's message).

    Anything short of a full sha256 is said with a :class:`WeightsWarning`.
    """
    if not (digest.algorithm == "sha256" and digest.complete):
        warnings.warn(f"{name} is checked against the {digest} only", WeightsWarning, stacklevel=3)
    actual = hash_file(path, digest.algorithm)
    ok = actual.startswith(digest.value) if digest.algorithm == "sha256" else actual == digest.value
    return None if ok else f"{digest.algorithm} mismatch for {name}: expected {digest.value}, got {actual}"


def _recorded(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _record_first_use(path: Path, url: str, record: Path | None = None) -> None:
    """Trust on first use: keep the sha256 of ``path`` to check every later use, and say so."""
    record = record or _recorded(path)
    actual = sha256_file(path)
    write_atomic(record, lambda f: f.write(f"{actual}\n".encode()), what="hash record")
    warnings.warn(
        f"no hash is published for {url}: the sha256 of this first copy, {actual}, is recorded in {record} "
        "and later uses are checked against it. Compare it with a copy you trust.",
        WeightsWarning,
        stacklevel=3,
    )


def _hash_tag(filename: str) -> str | None:
    # torch.hub's convention: "name-<first 8+ hex digits of the sha256>.ext".
    m = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z0-9.]+$", filename)
    return m.group(1) if m else None


def fetch(
    source: str | os.PathLike,
    *,
    sha256: str | None = None,
    sha256_prefix: str | None = None,
    digest: Digest | None = None,
    trust_on_first_use: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """A local file for ``source``: a path (used in place) or an ``http``/``https``/``file`` URL.

    A URL is downloaded into ``cache_dir`` (default :func:`default_cache_dir`) under its file
    name, streamed to ``<name>.part`` (resumed with a Range request when a ``.part`` exists, see
    :func:`densepred.download.download_to_part`), verified, and moved into place atomically. A
    cached file is verified again on every call; one that no longer matches is deleted, with a
    :class:`WeightsWarning`, and downloaded again. The expected digest is ``digest`` (any
    :class:`~densepred.catalogue.Digest`), else ``sha256``, else a ``#sha256=<hex>`` URL
    fragment, else (with a :class:`WeightsWarning`) ``sha256_prefix`` or the hex tag of a
    torch.hub-style file name. With none of these, ``trust_on_first_use`` records the sha256 of
    the first download beside the file (``<name>.sha256``), with a warning, and checks later
    uses against that record; without it such a URL is refused.

    Raises:
        WeightsError: a missing file, a failed download, a URL with no known digest, or a
            digest mismatch (a mismatching download is deleted; the message says the fix).
    """
    text = os.fspath(source)
    parts = urllib.parse.urlsplit(text)
    is_url = parts.scheme in ("http", "https", "file")
    if is_url:
        sha256 = sha256 or urllib.parse.parse_qs(parts.fragment).get("sha256", [None])[0]
    for name, value in (("sha256", sha256), ("sha256_prefix", sha256_prefix)):
        if value is not None and not _HEX.fullmatch(value):
            raise WeightsError(f"{name} must be lowercase hex digits, got {value!r}")
    if sha256 is not None and len(sha256) != 64:
        raise WeightsError(f"sha256 must have 64 hex digits, got {len(sha256)}; pass a prefix as sha256_prefix=")
    if digest is None and (sha256 or sha256_prefix):
        digest = Digest("sha256", sha256 or sha256_prefix or "", "the caller")
    if not is_url:
        path = Path(text).expanduser()
        if not path.is_file():
            raise WeightsError(f"weight file {path} does not exist; check the path (or pass an http(s) URL)")
        if digest is not None and (problem := _mismatch(path, digest, str(path))):
            raise WeightsError(f"{problem}. Check that this is the intended file.")
        return path

    url = urllib.parse.urlunsplit(parts._replace(fragment=""))
    name = urllib.parse.unquote(PurePosixPath(parts.path).name)
    if not name:
        raise WeightsError(f"cannot name a cache file after {url!r}: the URL path has no file name")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = cache / name
    if digest is None and (tag := _hash_tag(name)):
        digest = Digest("sha256", tag, f"the tag in the file name {name}")
    if digest is None and trust_on_first_use and _recorded(dest).is_file():
        digest = Digest("sha256", _recorded(dest).read_text().strip(), f"the record of the first download, {dest}")
    elif digest is None and not trust_on_first_use:
        raise WeightsError(
            f"no sha256 known for {url}; pass sha256=<64 hex digits> or append #sha256=<digest> to the URL "
            f"(compute it with `sha256sum {name}`)"
        )
    if dest.exists():
        if digest is None:  # put there by hand (an offline copy): its first use is now
            _record_first_use(dest, url)
            return dest
        problem = _mismatch(dest, digest, str(dest))
        if problem is None:
            return dest
        # A cached file is ours to replace: it was downloaded (and verified) by an earlier call.
        warnings.warn(f"{problem}; deleted it, downloading it again", WeightsWarning, stacklevel=2)
        dest.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(name + ".part")
    try:
        download_to_part(url, part, progress=progress)
    except TransferFailed as exc:
        raise WeightsError(f"downloading {url} failed: {exc.reason}; check the URL") from exc
    except TransferInterrupted as exc:
        kept = part.stat().st_size if part.exists() else 0
        raise WeightsError(
            f"download of {url} interrupted: {exc.reason}. {kept} bytes are kept in {part}: run again to resume, "
            "or download the file yourself and pass its path"
        ) from exc
    if digest is None:
        _record_first_use(part, url, record=_recorded(dest))
    elif problem := _mismatch(part, digest, name):
        part.unlink()
        raise WeightsError(f"{problem}. The download was deleted; check the URL {url} and the expected hash.")
    os.replace(part, dest)  # atomic: a reader never sees a half-written file under its final name
    return dest


# ---------------------------------------------------------------------------------------------
# Reading


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a weight file, by key, on the CPU. Never executes code from the file.

    ``.pth``/``.pt``: ``torch.load(weights_only=True)``, which refuses any pickle that would
    construct objects other than tensors and containers; ``.safetensors``; ``.npz`` with
    ``allow_pickle=False``. A top-level ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper
    (training checkpoints) is unwrapped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".pth", ".pt", ".safetensors", ".npz", ".caffemodel"):
        raise WeightsError(
            f"{path}: unknown weight file extension {path.suffix!r}; use .pth/.pt (PyTorch), "
            f".safetensors, .caffemodel or .npz (e.g. a Caffe blob dump)"
        )
    if suffix == ".caffemodel":
        try:
            return read_caffemodel(path).state_dict()
        except CaffeModelError as exc:  # names the file and the byte offset
            raise WeightsError(str(exc)) from exc
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(path, device="cpu")
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                obj = {k: torch.from_numpy(npz[k]) for k in npz.files}
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise WeightsError(f"cannot read weights from {path}: {exc}. Is the file complete?") from exc
        # torch names what the pickle asked for, e.g. "unsupported GLOBAL posix.system".
        wanted = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"it asks for GLOBAL {wanted.group(1)}" if wanted else "torch.load(weights_only=True) rejected it"
        raise WeightsError(
            f"{path} was refused: it is not a plain tensor file, and loading it could run code from the file "
            f"({what}). Load such a file only if you trust its source, and re-save its tensors with "
            f"torch.save(state_dict) or safetensors"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - each reader has its own errors; all mean "unreadable"
        raise WeightsError(
            f"cannot read weights from {path}: {type(exc).__name__}: {exc}. Is the file complete and of this format?"
        ) from exc
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a dict of tensors (a state dict)")
    bad = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(f"{path}: entries that are not tensors: {_listing(bad)}; save only the state dict")
    return {str(k): v for k, v in obj.items()}


def _listing(keys: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (and {len(keys) - limit} more)" if len(keys) > limit else shown


# ---------------------------------------------------------------------------------------------
# Layout mapping

# torchvision's vgg16().features indices of the 13 convolutions (ReLUs and pools in between).
_TV_VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG16_CONV_NAMES = tuple(f"conv{stage}_{i}" for stage, n, _ in VGG16_STAGES for i in range(1, n + 1))

# torchvision's mobilenet_v3_large().features: the stem, the bneck blocks, the final 1x1 conv.
_MOBILENETV3_LAYERS = len(BNECKS_LARGE) + 2
_MOBILENETV3_CLASSIFIER = ("classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias")
_MOBILENETV3_BLOCK = re.compile(r"features\.\d+\.block\.")

Layout = Literal[
    "torchvision-vgg16", "torchvision-resnet", "torchvision-mobilenetv3", "caffe-vgg16", "caffe-resnet", "densepred"
]


def detect_layout(keys: Iterable[str]) -> Layout | None:
    """The layout of a state dict from its keys; ``None`` if it is none of the known ones.

    ``"densepred"`` is not detected here (it depends on the target model): ``None`` means "not
    an ImageNet layout" and :func:`load_pretrained` then compares the keys with the model's.
    """
    keys = set(keys)
    # Both torchvision VGG16 and MobileNetV3 keep a ``features`` Sequential; only MobileNetV3's
    # layers are blocks (``features.1.block.0.0.weight``, SE ``features.4.block.2.fc1.weight``).
    if any(_MOBILENETV3_BLOCK.match(k) for k in keys):
        return "torchvision-mobilenetv3"
    if any(k.startswith("features.") for k in keys):
        return "torchvision-vgg16"
    if "conv1_1.0" in keys:
        return "caffe-vgg16"
    if "conv1.0" in keys or "res2a_branch2a.0" in keys:
        return "caffe-resnet"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "torchvision-resnet"
    return None


@dataclass(frozen=True)
class _Assign:
    """One target tensor and how to compute it from file entries."""

    target: str
    sources: tuple[str, ...]
    convert: Callable[[Sequence[Tensor], torch.Size], Tensor] = lambda ts, shape: ts[0]


def _as_vector(ts: Sequence[Tensor], shape: torch.Size) -> Tensor:
    # Old Caffe blobs carry 4-D shapes such as (1, 1, 1, C) for vectors.
    t = ts[0]
    return t.reshape(shape) if len(shape) == 1 and t.numel() == shape.numel() else t


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1) if t.dim() > 1 and t.numel() == max(t.shape) else t


def decimate_fc(weight: Tensor, bias: Tensor | None, shape: Sequence[int]) -> tuple[Tensor, Tensor | None]:
    """Subsample a convolutionalized fully connected layer to a smaller kernel and width.

    DeepLab v1 initialises its LargeFOV head from ImageNet VGG16: "we subsample (by
    decimation) the first FC layer" to 3x3 (Sec. 3.1), and fc6/fc7 have 1024 instead of
    4096 channels (Sec. 4.1, Table 2). A 7x7 kernel keeps taps 0, 3, 6 in each direction
    (the 3x3 kernel with dilation 12 then spans what the 7x7 one with dilation 4 spanned);
    the paper does not say which 1024 channels are kept: we keep every 4th (0, 4, 8, ...),
    of the outputs and, for fc7, of the inputs.

    Args:
        weight: ``(O, I, K, K)`` convolution weight.
        bias: ``(O,)`` or ``None``.
        shape: the target ``(o, i, k, k)``; ``O/o``, ``I/i`` and ``(K-1)/(k-1)`` must be whole.

    Returns:
        ``weight[::O/o, ::I/i, ::(K-1)/(k-1), ::(K-1)/(k-1)]`` and ``bias[::O/o]``.
    """
    if weight.dim() != 4 or len(shape) != 4:
        raise ValueError(f"decimate_fc expects 4-D (O, I, K, K) shapes, got {tuple(weight.shape)} -> {tuple(shape)}")
    steps = []
    for dim, (big, small) in enumerate(zip(weight.shape, shape, strict=True)):
        if dim < 2:  # channels: every (big / small)-th
            step, rest = divmod(big, small) if small > 0 else (0, 1)
        elif small > 1:  # kernel taps: evenly spaced, both ends kept
            step, rest = divmod(big - 1, small - 1)
        else:  # one tap only from one tap: the paper gives no rule for picking a centre
            step, rest = 1, big - 1
        if rest or step < 1:
            raise ValueError(f"cannot decimate a weight of shape {tuple(weight.shape)} to {tuple(shape)}")
        steps.append(step)
    so, si, sh, sw = steps
    sub = weight[::so, ::si, ::sh, ::sw].contiguous()
    return sub, (bias[::so].contiguous() if bias is not None else None)


def _fc_weight(ts: Sequence[Tensor], shape: torch.Size) -> Tensor:
    """fc6/fc7 weight in any stored form -> the target convolution (FCN Sec. 3.1, DeepLab v1)."""
    t = ts[0]
    if t.dim() == 2:  # a Linear/InnerProduct: (O, C*K*K), flattened in (C, H, W) order
        # fc7 is 1x1 whatever its width; fc6 keeps pool5's channels and only its kernel shrinks.
        channels = t.shape[1] if tuple(shape[2:]) == (1, 1) else shape[1]
        k = int(round((t.shape[1] / channels) ** 0.5)) if t.shape[1] % channels == 0 else 0
        if k == 0 or channels * k * k != t.shape[1]:
            return t  # the shape check reports it
        t = t.reshape(t.shape[0], channels, k, k)
    if t.shape == shape or t.dim() != 4:
        return t
    try:
        return decimate_fc(t, None, shape)[0]
    except ValueError:
        return t


def _fc_bias(ts: Sequence[Tensor], shape: torch.Size) -> Tensor:
    t = _flat(ts[0])
    if t.dim() == 1 and t.shape != shape and t.numel() % shape[0] == 0:
        return t[:: t.numel() // shape[0]]  # the channels decimate_fc keeps
    return t


def _caffe_bn_stat(ts: Sequence[Tensor], shape: torch.Size) -> Tensor:
    # Caffe's BatchNormLayer: scale = 0 if factor == 0 else 1 / factor; stat = blob * scale.
    stat, factor = _as_vector(ts[:1], shape), float(ts[1].reshape(-1)[0])
    value = stat * (0.0 if factor == 0 else 1.0 / factor)
    if len(ts) == 3:  # running_mean with a conv bias folded in: BN(Wx + b) = BN'(Wx), mean' = mean - b
        value = value - _as_vector(ts[2:], shape)
    return value


def _module_prefix(root: nn.Module, module: nn.Module) -> str:
    for name, m in root.named_modules():
        if m is module:
            return f"{name}." if name else ""
    raise AssertionError("module not inside root")  # internal invariant


def _weights_root(model: nn.Module) -> nn.Module:
    """Where weights go: the model a wrapper (DeepLab v2's multi-scale inputs) holds, else the model."""
    return model.weights_root() if isinstance(model, SegmentationModel) else model


_BACKBONES = (VGG16, ResNet, MobileNetV3Large, FeatureTaps)


def _backbone(root: nn.Module) -> nn.Module | None:
    if isinstance(root, _BACKBONES):
        return root
    backbone = getattr(root, "backbone", None)
    return backbone if isinstance(backbone, _BACKBONES) else None


def _fc_prefixes(root: nn.Module) -> list[str]:
    """Every module holding ``fc6`` and ``fc7`` convolutions: FCN, FCHead, each ASPP-VGG branch."""
    return [
        f"{name}." if name else ""
        for name, m in root.named_modules()
        if isinstance(getattr(m, "fc6", None), nn.Conv2d) and isinstance(getattr(m, "fc7", None), nn.Conv2d)
    ]


def _vgg16_plan(root: nn.Module, backbone: nn.Module, caffe: bool) -> tuple[list[_Assign], set[str]]:
    def names(layer: str) -> tuple[str, str]:
        if caffe:
            return f"{layer}.0", f"{layer}.1"
        index = {"fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6"}.get(layer)
        index = index or f"features.{_TV_VGG16_CONVS[_VGG16_CONV_NAMES.index(layer)]}"
        return f"{index}.weight", f"{index}.bias"

    prefix = _module_prefix(root, backbone)
    plan = []
    for conv in _VGG16_CONV_NAMES:
        w, b = names(conv)
        plan += [_Assign(f"{prefix}{conv}.weight", (w,)), _Assign(f"{prefix}{conv}.bias", (b,))]
    heads = _fc_prefixes(root)
    for head in heads:
        for layer in ("fc6", "fc7"):
            w, b = names(layer)
            plan += [_Assign(f"{head}{layer}.weight", (w,), _fc_weight), _Assign(f"{head}{layer}.bias", (b,), _fc_bias)]
    ignored = set(names("fc8")) | (set() if heads else {*names("fc6"), *names("fc7")})
    return plan, ignored


def _msra_block(depth: int, n_blocks: int, b: int) -> str:
    """MSRA's block name: letters, or ``a``, ``b1``, ``b2``, ... in deep nets' long stages."""
    if depth >= 101 and n_blocks > 3:
        return "a" if b == 0 else f"b{b}"
    return "abcdefghijklmnopqrstuvwxyz"[b]


def _resnet_plan(
    root: nn.Module, backbone: nn.Module, caffe: bool, file_keys: set[str]
) -> tuple[list[_Assign], set[str]]:
    prefix = _module_prefix(root, backbone)
    if not caffe:
        plan = [
            _Assign(prefix + key, (key,))
            for key in backbone.state_dict()
            if not key.endswith("num_batches_tracked") or key in file_keys
        ]
        return plan, {"fc.weight", "fc.bias"}

    def conv_bn(conv: str, bn: str, c_conv: str, c_bn: str, c_scale: str) -> list[_Assign]:
        mean_sources = (f"{c_bn}.0", f"{c_bn}.2") + ((f"{c_conv}.1",) if f"{c_conv}.1" in file_keys else ())
        return [
            _Assign(f"{prefix}{conv}.weight", (f"{c_conv}.0",)),
            _Assign(f"{prefix}{bn}.running_mean", mean_sources, _caffe_bn_stat),
            _Assign(f"{prefix}{bn}.running_var", (f"{c_bn}.1", f"{c_bn}.2"), _caffe_bn_stat),
            _Assign(f"{prefix}{bn}.weight", (f"{c_scale}.0",), _as_vector),
            _Assign(f"{prefix}{bn}.bias", (f"{c_scale}.1",), _as_vector),
        ]

    plan = conv_bn("conv1", "bn1", "conv1", "bn_conv1", "scale_conv1")
    for stage in range(1, 5):
        layer = getattr(backbone, f"layer{stage}")
        for b, block in enumerate(layer):
            name = f"{stage + 1}{_msra_block(backbone.depth, len(layer), b)}"
            branches = [("conv1", "bn1", "2a"), ("conv2", "bn2", "2b"), ("conv3", "bn3", "2c")]
            if block.downsample is not None:
                branches.append(("downsample.0", "downsample.1", "1"))
            for conv, bn, branch in branches:
                tag = f"{name}_branch{branch}"
                plan += conv_bn(
                    f"layer{stage}.{b}.{conv}", f"layer{stage}.{b}.{bn}", f"res{tag}", f"bn{tag}", f"scale{tag}"
                )
    return plan, {"fc1000.0", "fc1000.1"}


def _mobilenetv3_plan(root: nn.Module, backbone: nn.Module, file_keys: set[str]) -> tuple[list[_Assign], set[str]]:
    """``features.{i}.X`` -> ``features.{i}.X`` (a bare trunk) or ``backbone.{i}.X`` (FeatureTaps)."""
    prefix = _module_prefix(root, backbone)
    taps = isinstance(backbone, FeatureTaps)
    sources = {key: f"features.{key}" if taps else key for key in backbone.state_dict()}
    plan = [
        _Assign(prefix + key, (source,))
        for key, source in sources.items()
        if not key.endswith("num_batches_tracked") or source in file_keys
    ]
    # FeatureTaps holds layers 0 .. its deepest tap: the trunk's deeper layers are not in the model.
    held = len(backbone.features) if not taps else max(backbone.taps.values()) + 1
    deeper = {f"features.{i}." for i in range(held, _MOBILENETV3_LAYERS)}
    ignored = {k for k in file_keys if k.startswith(tuple(deeper))} if deeper else set()
    if not hasattr(backbone, "classifier"):  # a bare trunk built with_classifier takes the file's
        ignored |= set(_MOBILENETV3_CLASSIFIER)
    return plan, ignored


def _caffe_layer_plan(
    root: nn.Module,
    state: Mapping[str, Tensor],
    consumed: set[str],
    caffe_layers: Mapping[str, str],
    shared_copies: Sequence[str],
    fixed_blobs: Mapping[str, float],
    path: Path,
) -> tuple[list[_Assign], set[str]]:
    """The layers of a whole reference net beyond its trunk: FCN's ``score_fr``, ``upscore2``,
    ``score_pool4`` ... (our modules have those names), DeepLab's ``fc8_voc12`` or
    ``fc1_voc12_c0..c3`` (mapped by ``caffe_layers``). A layer named like another plus one of
    ``shared_copies`` (DeepLab v2's ``..._res075``) repeats that layer's shared blobs: it must
    equal it, and is then skipped. ``fixed_blobs`` are layers our model computes as a constant
    (FCN-8s at-once's ``scale_pool4`` = 0.01): every value must be that constant. Blob 0 is the
    weight, blob 1 the bias (Caffe's order)."""
    blobs: dict[str, list[str]] = {}
    for key in state:
        layer, _, index = key.rpartition(".")
        if index.isdigit() and key not in consumed:
            blobs.setdefault(layer, []).append(key)
    modules = dict(root.named_modules())
    plan, skipped = [], set()
    for layer, keys in blobs.items():
        owner = next((layer.replace(part, "") for part in shared_copies if part in layer), None)
        if owner is not None:
            differ = [k for k in keys if not torch.equal(state[k], state.get(owner + k[len(layer) :], torch.empty(0)))]
            if differ:
                raise WeightsError(
                    f"{path.name}: layer {layer} should repeat the shared blobs of {owner} (a multi-scale branch) "
                    f"but {', '.join(differ)} differ or {owner} is missing; the file is not the released net"
                )
            skipped |= set(keys)
            continue
        if layer in fixed_blobs:
            value = fixed_blobs[layer]
            if not all(torch.allclose(state[k], torch.full_like(state[k], value), rtol=1e-6) for k in keys):
                raise WeightsError(
                    f"{path.name}: layer {layer} must hold the constant {value} that the model fixes it at, "
                    f"but holds other values; the file is not the released net"
                )
            skipped |= set(keys)
            continue
        target = caffe_layers.get(layer, layer)
        module = modules.get(target) if target else None
        if not isinstance(getattr(module, "weight", None), Tensor):
            continue  # left for _apply to report as unexpected
        plan.append(_Assign(f"{target}.weight", (f"{layer}.0",)))
        if getattr(module, "bias", None) is not None:
            plan.append(_Assign(f"{target}.bias", (f"{layer}.1",), _as_vector))
    return plan, skipped


def _own_plan(root: nn.Module, file_keys: set[str]) -> list[_Assign]:
    return [
        _Assign(key, (key,)) for key in root.state_dict() if not key.endswith("num_batches_tracked") or key in file_keys
    ]


def _check_arch(root: nn.Module, backbone: nn.Module | None, layout: str, path: Path) -> None:
    wanted: tuple[type[nn.Module], ...]
    if layout.endswith("vgg16"):
        wanted = (VGG16,)
    elif layout.endswith("mobilenetv3"):
        wanted = (MobileNetV3Large, FeatureTaps)  # FeatureTaps holds MobileNetV3Large's layers
    else:
        wanted = (ResNet,)
    if not isinstance(backbone, wanted):
        have = (
            f"a {type(backbone).__name__} backbone" if backbone is not None else "no VGG16/ResNet/MobileNetV3 backbone"
        )
        raise WeightsError(
            f"{path.name} holds {wanted[0].__name__} weights ({layout} layout) but {type(root).__name__} has {have}; "
            f"pick a model built on {wanted[0].__name__}"
        )
    if isinstance(backbone, ResNet):
        caffe = layout.startswith("caffe")
        if backbone.caffe_style != caffe:
            where = "the first 1x1 conv (MSRA/Caffe)" if caffe else "the 3x3 conv (torchvision)"
            raise WeightsError(
                f"{path.name} is a ResNet in the {layout} layout, which puts a block's stride in {where}, "
                f"but the model was built with caffe_style={backbone.caffe_style}; build it with "
                f"caffe_style={caffe} (e.g. create_model(..., caffe_style={caffe}))"
            )


def _apply(
    root: nn.Module, plan: list[_Assign], ignored: set[str], state: Mapping[str, Tensor], path: Path, layout: str
) -> LoadReport:
    """Check ``plan`` against the file's keys and the targets' shapes, then write all or nothing."""
    expected = {k for a in plan for k in a.sources}
    optional = {k for k in state if k.endswith("num_batches_tracked")}
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected - ignored - optional)
    if missing or unexpected:
        lines = [f"{path.name} ({layout} layout) does not fit {type(root).__name__}:"]
        if missing:
            lines.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        lines.append("Check that the file is the weights of this architecture (depth, variant) and not truncated.")
        raise WeightsError("\n".join(lines))

    targets = root.state_dict(keep_vars=True)
    values, errors = {}, []
    for a in plan:
        target = targets[a.target]
        value = a.convert([state[k] for k in a.sources], target.shape)
        if value.shape != target.shape:
            got = ", ".join(f"{k} {tuple(state[k].shape)}" for k in a.sources)
            errors.append(f"{got} cannot fill {a.target} {tuple(target.shape)}")
        values[a.target] = value
    if errors:
        raise WeightsError(
            f"{path.name} ({layout} layout): shape mismatch: "
            + "; ".join(errors[:10])
            + (f" (and {len(errors) - 10} more)" if len(errors) > 10 else "")
        )
    with torch.no_grad():  # all checks passed: write everything, never a partial load
        for key, value in values.items():
            targets[key].copy_(value)
    used = state.keys() & ignored
    return LoadReport(path, layout, tuple(values), tuple(sorted(used)))


_LAYOUT_OF_ARCH = {
    "vgg16": "vgg16",
    "vgg16_bn": "vgg16",
    "resnet50": "resnet",
    "resnet101": "resnet",
    "mobilenet_v3_large": "mobilenetv3",
}


def imagenet_spec(model: nn.Module) -> Weights:
    """The :data:`PRETRAINED` ImageNet weights for ``model``'s backbone.

    Raises:
        WeightsError: for models without an ImageNet backbone (U-Net is trained from scratch,
            Ronneberger et al. 2015, Sec. 3).
    """
    root = _weights_root(model)
    if isinstance(root, SegmentationModel) and root.no_imagenet_weights:
        raise WeightsError(root.no_imagenet_weights)
    backbone = _backbone(root)
    if backbone is None:
        raise WeightsError(
            f"{type(root).__name__} has no VGG16, ResNet or MobileNetV3 backbone, so no ImageNet weights apply"
        )
    if isinstance(backbone, (MobileNetV3Large, FeatureTaps)):
        return PRETRAINED["mobilenet_v3_large"]
    return PRETRAINED[f"resnet{backbone.depth}" if isinstance(backbone, ResNet) else "vgg16"]


def with_pretrained(model: M, source: str | os.PathLike | None) -> M:
    """``model`` with ``source`` loaded (:func:`load_pretrained`), or as built when ``source`` is None:
    what every registered builder does with its ``pretrained`` argument."""
    if source is not None:
        load_pretrained(model, source)
    return model


def load_pretrained(
    model: nn.Module,
    source: str | os.PathLike,
    *,
    sha256: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    caffe_layers: Mapping[str, str] | None = None,
    shared_copies: Sequence[str] = (),
    fixed_blobs: Mapping[str, float] | None = None,
) -> LoadReport:
    """Load weights into ``model`` in place, strictly; see the module docstring for the layouts.

    Args:
        model: a densepred model (FCN, DeepLab, LR-ASPP, MultiScaleInputs, UNet) or a bare backbone.
        source: ``"imagenet"`` (the :data:`PRETRAINED` weights of the model's backbone, see
            :func:`imagenet_spec`), a path, or a URL (see :func:`fetch`).
        sha256: the expected digest of a path or URL source.
        cache_dir, progress: passed to :func:`fetch`.
        caffe_layers: for a whole Caffe net, its layer names -> our module paths where they
            differ (``{"fc8_voc12": "head.fc8"}``); FCN's layers have our names already.
        shared_copies: name parts of Caffe layers that repeat shared blobs (``"_res075"``).
        fixed_blobs: Caffe layers the model computes as constants (``{"scale_pool4": 0.01}``).

    Raises:
        WeightsError: the file cannot be fetched or read, has an unknown layout, does not fit
            the model (missing, unexpected or wrongly shaped keys, named in the message), or
            needs other model options (e.g. ``caffe_style``).
    """
    root = _weights_root(model)
    if os.fspath(source) == "imagenet":
        spec = imagenet_spec(model)
        # Refuse a model that cannot take these weights before downloading hundreds of MB.
        expected_layout = f"{spec.layout}-{_LAYOUT_OF_ARCH[spec.model]}"
        _check_arch(root, _backbone(root), expected_layout, Path(urllib.parse.urlsplit(spec.url).path))
        path = fetch(spec.url, digest=spec.digest, cache_dir=cache_dir, progress=progress)
    else:
        path = fetch(source, sha256=sha256, cache_dir=cache_dir, progress=progress)
    state = read_state_dict(path)
    keys = set(state)
    layout = detect_layout(keys)
    if layout is None:
        # Our own checkpoints: of the model and (for multi-scale inputs) the DeepLab inside it,
        # take the one whose keys the file shares most.
        candidates = [model, root] if root is not model else [model]
        root = max(candidates, key=lambda m: len(keys & m.state_dict().keys()))
        if not keys & root.state_dict().keys():
            raise WeightsError(
                f"{path.name}: unknown weight layout (first keys: {_listing(sorted(keys), 5)}); expected torchvision "
                f"or Caffe-converted ImageNet weights or a densepred state dict of {type(model).__name__}"
            )
        return _apply(root, _own_plan(root, keys), set(), state, path, "densepred")
    backbone = _backbone(root)
    _check_arch(root, backbone, layout, path)
    if layout.endswith("vgg16"):
        plan, ignored = _vgg16_plan(root, backbone, caffe=layout.startswith("caffe"))
    elif layout == "torchvision-mobilenetv3":
        plan, ignored = _mobilenetv3_plan(root, backbone, keys)
    else:
        plan, ignored = _resnet_plan(root, backbone, caffe=layout.startswith("caffe"), file_keys=keys)
    if layout.startswith("caffe"):
        if caffe_layers:  # a mapped layer is loaded, even one the trunk's plan ignores (fc8)
            ignored -= {k for k in ignored if k.rpartition(".")[0] in caffe_layers}
        consumed = {k for a in plan for k in a.sources} | ignored
        extra, skipped = _caffe_layer_plan(
            root, state, consumed, caffe_layers or {}, shared_copies, fixed_blobs or {}, path
        )
        plan, ignored = plan + extra, ignored | skipped
    return _apply(root, plan, ignored, state, path, layout)


def load_vgg16_classifier(source: str | Path) -> nn.Sequential:
    """The ImageNet VGG16 classifier from a torchvision-layout weight file (fc8 included).

    ``source`` is a path, a URL, or ``"imagenet"`` for torchvision's file
    (:data:`densepred.weights.PRETRAINED`, sha256-verified and cached). ``features.N`` are our
    ``features`` Sequential's layers in the same order, ``classifier.0/3/6`` are fc6/fc7/fc8.
    """
    from .models.backbones.vgg import vgg16_classifier

    if str(source) == "imagenet":
        spec = PRETRAINED["vgg16"]
        path = fetch(spec.url, digest=spec.digest)
    else:
        path = fetch(source)
    state = read_state_dict(path)
    layout = detect_layout(state)
    if layout != "torchvision-vgg16":
        raise WeightsError(
            f"{path.name}: expected torchvision's VGG16 layout (features.N, classifier.0/3/6), found "
            f"{layout or 'an unknown layout'}; use torchvision's vgg16-397923af.pth (or --weights imagenet)"
        )
    if "classifier.6.weight" not in state:
        raise WeightsError(
            f"{path.name} has no ImageNet classifier (classifier.6, fc8): a heat map needs class scores; "
            "use the full torchvision VGG16 file, not a backbone-only one"
        )
    mapped = {vgg16_classifier_key(k): v for k, v in state.items()}
    with torch.device("meta"):  # the file fills every tensor; no 138M-parameter initialisation
        classifier = vgg16_classifier(state["classifier.6.weight"].shape[0])
    try:
        classifier.load_state_dict(mapped, strict=True, assign=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path.name} does not fit VGG16: {exc}") from None
    return classifier.eval()


def vgg16_classifier_key(key: str) -> str:
    """torchvision VGG16 key -> :func:`vgg16_classifier` key (``features.N`` -> ``0.N``, fc6 -> ``2``)."""
    group, _, rest = key.partition(".")
    if group == "features":
        return f"0.{rest}"
    if group == "classifier":
        index, _, param = rest.partition(".")
        # Our Sequential puts Flatten at 1, so torchvision's classifier.K is our K + 2.
        return f"{int(index) + 2}.{param}" if index.isdigit() else key
    return key


# ---------------------------------------------------------------------------------------------
# Released weights by name (densepred.catalogue)


def fetch_released(entry: Weights | str, *, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The local, verified file of a catalogue entry: downloaded into the cache (or found there,
    e.g. copied in by hand for an offline machine), checked by the entry's digest or, where none
    is published, by the sha256 recorded at its first use; a zip's member is extracted beside it."""
    entry = weights_entry(entry) if isinstance(entry, str) else entry
    path = fetch(
        entry.url, digest=entry.digest, trust_on_first_use=entry.digest is None, cache_dir=cache_dir, progress=progress
    )
    return _extract_member(path, entry.archive_member) if entry.archive_member else path


def _extract_member(path: Path, name: str) -> Path:
    """``name`` from the zip ``path``, extracted once into a folder beside it (``<zip stem>/``)."""
    member = path.with_name(path.stem) / PurePosixPath(name).name
    if not member.is_file():
        try:
            with zipfile.ZipFile(path) as archive, archive.open(name) as src:
                write_atomic(member, lambda f: shutil.copyfileobj(src, f, 1 << 20), what="extracted weights")
        except KeyError:
            raise WeightsError(f"{path} has no member {name!r}; the archive is not the release") from None
        except zipfile.BadZipFile as exc:
            raise WeightsError(f"{path} is not a readable zip archive ({exc}); delete it and fetch again") from exc
    return member


def load_released(
    name: str,
    *,
    file: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> nn.Module:
    """The model of catalogue entry ``name`` (``"fcn8s.voc_caffe"``) with its released weights, in
    eval mode: built with the entry's classes and options, the file fetched and verified
    (:func:`fetch_released`) or taken from ``file`` (checked by the entry's digest when there is
    one), and loaded strictly (:func:`load_pretrained`). Preprocess its inputs with the entry's
    ``normalization``; :class:`densepred.prediction.Predictor` does (``Predictor.from_weights``).

    Raises:
        UnknownWeightsError: ``name`` is not in the catalogue (the message lists close names).
        WeightsError: a trunk's entry (use ``pretrained="imagenet"``), or a file that cannot be
            fetched, verified, read or fitted (missing and unexpected layers named).
    """
    from .registry import create_model

    entry = weights_entry(name)
    if entry.kind != "segmentation":
        raise WeightsError(
            f"{name} are ImageNet weights of a trunk, not a segmentation model; build a model on it with "
            f"create_model(MODEL, pretrained='imagenet')"
        )
    if file is not None:
        # The entry's digest is of the published file (for DeepLab v2, the zip), not of a member.
        digest = entry.digest if entry.archive_member is None or zipfile.is_zipfile(file) else None
        path = fetch(file, digest=digest)
        if digest is None:
            warnings.warn(
                f"{path} is used unverified: no hash is published for {name}'s file ({entry.verification})",
                WeightsWarning,
                stacklevel=2,
            )
        if entry.archive_member is not None and zipfile.is_zipfile(path):
            path = _extract_member(path, entry.archive_member)
    else:
        path = fetch_released(entry, cache_dir=cache_dir, progress=progress)
    model = create_model(entry.model, num_classes=len(entry.classes), **entry.model_kwargs)
    load_pretrained(
        model,
        path,
        caffe_layers=entry.caffe_layers,
        shared_copies=entry.shared_copies,
        fixed_blobs=entry.fixed_blobs,
    )
    return model.eval()


set_released_loader(load_released)


def convert_released(source: str | os.PathLike, name: str, out: str | os.PathLike) -> Path:
    """Write the weights of ``source`` (a ``.caffemodel`` or any file :func:`load_pretrained`
    reads) as the catalogue entry ``name``'s model into a ``.safetensors`` file, with the entry's
    facts as metadata (model, classes, preprocessing, source file and its sha256): the file then
    loads with ``load_released(name, file=out)`` or ``load_pretrained`` without Caffe."""
    import json

    from safetensors.torch import save

    entry = weights_entry(name)
    model = load_released(name, file=source)
    n = entry.normalization
    meta = {
        "densepred_weights": entry.name,
        "model": entry.model,
        "model_options": json.dumps(dict(entry.model_kwargs)),
        "classes": json.dumps(list(entry.classes)),
        "normalization": json.dumps({"mean": n.mean, "std": n.std, "bgr": n.bgr, "scale_255": n.scale_255}),
        "converted_from": Path(source).name,
        "converted_from_sha256": sha256_file(source),
        "url": entry.url,
    }
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return write_atomic(out, lambda f: f.write(save(tensors, metadata=meta)), what="safetensors file")
