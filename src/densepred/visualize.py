"""Seeing what a dense predictor computes: class heat maps and feature maps.

Heat maps. A classifier whose fully connected layers are read as convolutions "can produce a
heat map" (Long et al. 2015, FCN, Sec. 3.1 and Fig. 2): on an image larger than its training
size it scores one window every ``stride`` pixels (32 for VGG16). :func:`classifier_heatmap`
shows that coarse grid for an ImageNet classifier and the dense map FCN-32s makes of it with a
fixed bilinear deconvolution (Sec. 3.3); :func:`class_heatmaps` shows the same pair for a
trained segmentation model: FCN's stride-32 ``score_fr`` map against its fused output,
DeepLab's stride-8 scores (Chen et al. 2015, Sec. 3.1) against their interpolation. Both give
softmax probabilities, not logits: a probability reads the same for every model and class.

Feature maps. Shallow layers respond to edges and colours, deep layers to parts and whole
objects (Zeiler & Fergus 2014, ZFNet, Sec. 4 and Fig. 2); FCN's skip architecture fuses
"deep, coarse, semantic" with "shallow, fine, appearance" information (FCN Sec. 4.2).
:func:`feature_maps` records chosen layers with forward hooks and keeps their strongest
channels; :func:`plot_feature_grid` shows them one layer per row, shallow rows first.

``densepred heatmap`` and ``densepred features`` (:mod:`densepred.cli.visual`) are thin
commands over these functions.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import EvalConfig
from .inference import predict_logits
from .models.base import SegmentationModel, input_rule_of
from .models.convolutionalize import convolutionalize
from .models.layers import BilinearDeconv, centre_geometry, square_value

__all__ = [
    "HeatMaps",
    "LayerFeatures",
    "class_heatmaps",
    "classifier_heatmap",
    "load_vgg16_classifier",
    "plot_heatmaps",
    "resolve_layer",
    "default_layers",
    "feature_maps",
    "plot_feature_grid",
    "check_class",
]

# The stride probe of feature_maps grows the input by this much: a multiple of every stride
# the registered models have (32 at most), so map sizes grow by exactly 64 / stride.
_PROBE_GROWTH = 64


class HeatMaps(NamedTuple):
    """A class's coarse score grid and dense map for one image.

    ``coarse`` is ``(h, w)``: cell ``(i, j)`` is centred on image pixel
    ``(stride * i + offset, stride * j + offset)``. ``dense`` is ``(H, W)``, the image's size,
    NaN where no window of the net reaches. Both hold the class's softmax probability.
    ``note`` says how ``dense`` was made from the scores.
    """

    coarse: np.ndarray
    dense: np.ndarray
    stride: int
    offset: float
    note: str


class LayerFeatures(NamedTuple):
    """The strongest channels of one layer for one image.

    ``channels`` is ``(k, h, w)``, rectified (``max(0, x)``) and cropped to the cells whose
    centres lie on the image; ``indices`` are their channel numbers in the layer and
    ``strength`` their mean rectified activation, strongest first. ``stride`` is measured
    (input pixels per map pixel); ``num_channels`` is the layer's width.
    """

    channels: np.ndarray
    indices: np.ndarray
    strength: np.ndarray
    stride: float
    num_channels: int


# ---------------------------------------------------------------------------------------------
# Geometry


def _as_batch(image: Tensor) -> Tensor:
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one normalised image (C, H, W) or (1, C, H, W), got shape {tuple(image.shape)}")
    return image


def check_class(class_index: int, num_classes: int) -> None:
    if not 0 <= class_index < num_classes:
        raise ValueError(f"class id {class_index} is out of range: the model scores classes 0..{num_classes - 1}")


# ---------------------------------------------------------------------------------------------
# Heat maps


@torch.no_grad()
def class_heatmaps(model: nn.Module, image: Tensor, class_index: int) -> HeatMaps:
    """The coarse and dense probability maps of one class for a segmentation model.

    - FCN (Long et al. 2015, Sec. 3.1, 4.2): ``coarse`` is ``score_fr``, the stride-32 scores
      of the convolutionalized classifier on pool5; ``dense`` is the model's output (FCN-16s/8s
      add their skips, all upsample by deconvolution). Cell centres follow from the layers'
      geometry, including conv1_1's padding of 100 (cell ``j`` at pixel ``32 j + 12.5``).
    - DeepLab (Chen et al. 2015, Sec. 3.1): ``coarse`` is the stride-8 scores; ``dense`` their
      corner-aligned bilinear interpolation, so cell ``j`` lies on pixel ``8 j`` (exactly for
      the ``8k + 1`` input sizes DeepLab uses).
    - Anything else (U-Net): the logits are already full size, so ``coarse`` is ``dense`` at
      stride 1.

    ``dense`` comes from :func:`~densepred.inference.predict_logits` (overlap-tile for a valid
    U-Net), so it always covers the image.

    Args:
        model: a densepred segmentation model (its train/eval mode is restored).
        image: one normalised ``(C, H, W)`` tensor on the model's device.
        class_index: the class id; out of range is a ``ValueError`` naming the valid ids.
    """
    x = _as_batch(image)
    was_training = model.training
    model.eval()
    try:
        dense_logits = predict_logits(model, x, EvalConfig(amp="none"))  # exact, like the coarse scores
        check_class(class_index, dense_logits.shape[1])
        if isinstance(model, SegmentationModel) and input_rule_of(model).kind != "valid":
            scores = model.coarse_scores(x)
            coarse_logits, stride, offset, note = scores.logits, scores.stride, scores.offset, scores.note
        else:  # the valid U-Net's whole-image output is overlap-tiled: already dense, no coarse grid
            coarse_logits, stride, offset = dense_logits, 1, 0.0
            note = f"{type(model).__name__} output: decoded to full resolution, no coarse grid"
    finally:
        model.train(was_training)
    coarse = torch.softmax(coarse_logits.float(), 1)[0, class_index]
    dense = torch.softmax(dense_logits, 1)[0, class_index]
    return HeatMaps(coarse.cpu().numpy(), dense.cpu().numpy(), int(stride), float(offset), note)


def _place(values: np.ndarray, start: int, height: int, width: int) -> np.ndarray:
    """``out[r, c] = values[r + start, c + start]`` for an ``(height, width)`` window; NaN outside ``values``."""
    out = np.full((height, width), np.nan, dtype=np.float32)
    r0, r1 = max(0, -start), min(height, values.shape[0] - start)
    c0, c1 = max(0, -start), min(width, values.shape[1] - start)
    if r1 > r0 and c1 > c0:
        out[r0:r1, c0:c1] = values[r0 + start : r1 + start, c0 + start : c1 + start]
    return out


@torch.no_grad()
def classifier_heatmap(
    classifier: nn.Sequential,
    image: Tensor,
    class_index: int,
    input_size: Sequence[int] = (224, 224),
    *,
    padding: int = 100,
) -> HeatMaps:
    """The heat map of an ImageNet-style classifier made fully convolutional (FCN Sec. 3.1).

    The classifier (features, ``nn.Flatten``, ``nn.Linear`` ...) is
    :func:`~densepred.convolutionalize`-d at ``input_size`` and run on the whole image: its
    output is one score vector per window, a grid of stride 32 for VGG16. ``coarse`` is the
    class's softmax probability on that grid; ``dense`` is that grid upsampled by a fixed
    :class:`~densepred.models.layers.BilinearDeconv` (factor = the net's stride, kernel twice
    that) and cropped to the image: FCN-32s' final upsampling (Sec. 3.3, 4.1).

    Args:
        classifier: the classifier (its weights are shared, not copied; modes are restored).
        image: one normalised ``(C, H, W)`` tensor on the classifier's device.
        class_index: the class id (0..999 for ImageNet).
        input_size: ``(H, W)`` the classifier was trained at.
        padding: total zero padding before the first convolution, its own included. 100, as in
            FCN's reference nets, puts a window centre on every image pixel at any image size;
            the first convolution's own padding (1 for VGG16) keeps only windows the classifier
            would have seen whole, and leaves the dense map NaN near the borders.

    Unlike FCN, which upsamples all class scores and then takes the softmax, the one class's
    probability is upsampled: the deconvolution is linear and per channel, and upsampling
    1000 score maps to the image size would need gigabytes. The two agree on the cell centres.
    """
    x = _as_batch(image)
    first = next((m for m in classifier.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ValueError("the classifier has no nn.Conv2d: nothing to slide over the image")
    own = square_value(first.padding)
    extra = padding - own
    if extra < 0:
        raise ValueError(f"padding={padding} is below the first convolution's own padding {own}")
    was_training = classifier.training
    net = convolutionalize(classifier, input_size).eval()
    try:
        # Zeros after normalisation are the mean colour: exactly what a larger conv padding adds.
        scores = net(F.pad(x, (extra, extra, extra, extra))).float()
    finally:
        classifier.train(was_training)
    if scores.dim() != 4 or min(scores.shape[-2:]) < 1:
        raise ValueError(f"the image {tuple(x.shape[-2:])} is smaller than one window of the classifier")
    check_class(class_index, scores.shape[1])
    stride, offset = centre_geometry(net)
    offset -= extra
    if stride != int(stride) or stride < 1:
        raise ValueError(f"the classifier's stride {stride} is not a whole number of pixels")
    stride = int(stride)
    coarse = torch.softmax(scores, 1)[:, class_index : class_index + 1]
    up = BilinearDeconv(1, stride, learnable=False).to(coarse)(coarse)[0, 0]
    # The deconvolution centres input cell j on output index stride * j + stride - 1/2; the
    # image's pixel 0 is therefore output index stride - 1/2 - offset (19 for FCN-32s).
    crop = stride - 0.5 - offset
    if crop != round(crop):
        raise ValueError(f"cell centres fall between pixels (offset {offset}); cannot align the dense map")
    height, width = x.shape[-2:]
    # Beyond the outermost cell centres only one cell's kernel tail reaches, so the map fades
    # there, as FCN-32s' own output does (pixels 0..12 with padding 100).
    dense = _place(up.cpu().numpy(), int(round(crop)), height, width)
    note = f"coarse grid upsampled x{stride} by a fixed bilinear deconvolution, as in FCN-32s"
    return HeatMaps(coarse[0, 0].cpu().numpy(), dense, stride, float(offset), note)


def load_vgg16_classifier(source: str | Path) -> nn.Sequential:
    """The ImageNet VGG16 classifier from a torchvision-layout weight file (fc8 included).

    ``source`` is a path, a URL, or ``"imagenet"`` for torchvision's file
    (:data:`densepred.weights.PRETRAINED`, sha256-verified and cached). ``features.N`` are our
    ``features`` Sequential's layers in the same order, ``classifier.0/3/6`` are fc6/fc7/fc8.
    """
    from .models.backbones.vgg import vgg16_classifier
    from .weights import PRETRAINED, WeightsError, detect_layout, fetch, read_state_dict

    if str(source) == "imagenet":
        spec = PRETRAINED["vgg16"]
        path = fetch(spec.url, sha256=spec.sha256)
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
    mapped = {_sequential_key(k): v for k, v in state.items()}
    with torch.device("meta"):  # the file fills every tensor; no 138M-parameter initialisation
        classifier = vgg16_classifier(state["classifier.6.weight"].shape[0])
    try:
        classifier.load_state_dict(mapped, strict=True, assign=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path.name} does not fit VGG16: {exc}") from None
    return classifier.eval()


def _sequential_key(key: str) -> str:
    """torchvision VGG16 key -> :func:`vgg16_classifier` key (``features.N`` -> ``0.N``, fc6 -> ``2``)."""
    group, _, rest = key.partition(".")
    if group == "features":
        return f"0.{rest}"
    if group == "classifier":
        index, _, param = rest.partition(".")
        # Our Sequential puts Flatten at 1, so torchvision's classifier.K is our K + 2.
        return f"{int(index) + 2}.{param}" if index.isdigit() else key
    return key


def _display_image(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    return (image[..., 0], "gray") if image.ndim == 3 and image.shape[-1] == 1 else (image, None)


def plot_heatmaps(
    image: np.ndarray,
    maps: HeatMaps,
    out: str | Path,
    *,
    title: str = "",
    class_name: str = "",
    vmax: float | None = 1.0,
) -> Path:
    """Three panels: the image | the coarse grid over it | the dense map over it.

    The coarse grid is drawn as blocks (nearest neighbour), one per score cell at its true
    position and size, with the cell borders; the dense map is per pixel. Both share one
    colour scale of the class probability, so coarse and dense compare directly: 0..1 by
    default, 0..peak with ``vmax=None`` (a 1000-way softmax rarely comes near 1).
    """
    from .plots import plt

    height, width = image.shape[:2]
    shown, cmap = _display_image(image)
    if vmax is None:
        vmax = max(float(np.nanmax([np.nanmax(maps.coarse), np.nanmax(maps.dense)])), 1e-6)
    aspect = width / height
    fig, axes = plt.subplots(1, 3, figsize=(3 * 3.6 * min(max(aspect, 0.6), 2.0) + 1.2, 4.3), constrained_layout=True)
    h, w = maps.coarse.shape
    s, o = maps.stride, maps.offset
    label = f"P({class_name})" if class_name else "probability"

    axes[0].imshow(shown, cmap=cmap)
    axes[0].set_title(f"input {width}x{height}", fontsize=10)
    # Under a heat map the image is shown in gray: its own colours would blend with the map's.
    gray = image.reshape(height, width, -1).mean(-1)
    for ax in axes[1:]:
        ax.imshow(gray, cmap="gray", vmin=0, vmax=255)
    # Cell j covers input pixels centred on s * j + o, +- s / 2 (pixel i spans i +- 0.5).
    extent = (o - s / 2, o - s / 2 + s * w, o - s / 2 + s * h, o - s / 2)
    axes[1].imshow(maps.coarse, cmap="turbo", vmin=0, vmax=vmax, alpha=0.6, extent=extent, interpolation="nearest")
    if s >= 4 and max(h, w) <= 40:  # cell borders; on a finer grid they would hide the map
        for i in range(h + 1):
            axes[1].axhline(o - s / 2 + s * i, color="white", lw=0.5, alpha=0.45)
        for j in range(w + 1):
            axes[1].axvline(o - s / 2 + s * j, color="white", lw=0.5, alpha=0.45)
    if s > 1:
        axes[1].set_title(f"coarse: {w}x{h} score cells, stride {s}\n(one block = one window of the net)", fontsize=10)
    else:
        axes[1].set_title("coarse = dense: scores at stride 1\n(this model has no coarse grid)", fontsize=10)
    axes[2].imshow(maps.dense, cmap="turbo", vmin=0, vmax=vmax, alpha=0.6, interpolation="nearest")
    axes[2].set_title(f"dense: {width}x{height}\n{_wrap(maps.note, 48)}", fontsize=10)
    for ax in axes:
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
    scale = plt.cm.ScalarMappable(norm=plt.Normalize(0, vmax), cmap="turbo")  # opaque, unlike the overlays
    fig.colorbar(
        scale, ax=axes, shrink=0.85, label=label + ("" if vmax == 1.0 else f"\n(scale 0 to its maximum, {vmax:.2g})")
    )
    if title:
        fig.suptitle(title, fontsize=12)
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


# ---------------------------------------------------------------------------------------------
# Feature maps


def _short_names(names: Iterable[str]) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def resolve_layer(model: nn.Module, name: str) -> str:
    """The full module name for ``name``: an exact name, or a unique ``.``-suffix of one.

    ``conv1_2`` finds ``backbone.conv1_2``; ``fc7`` finds ``fc7`` (FCN) or ``head.fc7``
    (DeepLab v1). An unknown or ambiguous name is a ``ValueError`` listing close matches.
    """
    names = [n for n, _ in model.named_modules() if n]
    if name in names:
        return name
    matches = [n for n in names if n.endswith("." + name)]
    if len(matches) == 1:
        return matches[0]
    kind = type(model).__name__
    if matches:
        raise ValueError(
            f"layer {name!r} is ambiguous in {kind}: {', '.join(matches[:8])}"
            + (f" (and {len(matches) - 8} more)" if len(matches) > 8 else "")
            + "; give the full name"
        )
    close = difflib.get_close_matches(name, names + _short_names(names), n=5, cutoff=0.6)
    try:
        examples = default_layers(model)
    except ValueError:
        examples = names[:6]
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ValueError(f"{kind} has no layer {name!r}{hint}; valid names include {', '.join(examples)}")


def default_layers(model: nn.Module) -> list[str]:
    """Layers worth looking at, shallow to deep: what the model declares
    (:meth:`~densepred.models.base.SegmentationModel.feature_layers`)."""
    if not isinstance(model, SegmentationModel):
        raise ValueError(
            f"no default layers for {type(model).__name__}; pass the layer names (see model.named_modules())"
        )
    return model.feature_layers()


class _Chain:
    """The leaf modules called so far, while each was fed its predecessor's output (input first).

    For such a chain (VGG16, FCN, DeepLab on VGG) :func:`centre_geometry` gives a layer's exact
    cell positions; a branch or a concatenation (ResNet, U-Net) ends it.
    """

    def __init__(self, x: Tensor) -> None:
        self.last: object = x
        self.modules: list[nn.Module] | None = []

    def __call__(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if self.modules is not None and inputs and inputs[0] is self.last:
            self.modules.append(module)
            self.last = output  # an in-place ReLU or an eval-mode dropout returns its input: still a chain
        else:
            self.modules = None

    def upto(self, output: object) -> list[nn.Module] | None:
        return list(self.modules) if self.modules is not None and output is self.last else None


def _record(
    model: nn.Module, layers: list[str], x: Tensor, keep: Callable[[Tensor], Tensor]
) -> tuple[dict[str, Tensor], dict[str, list[nn.Module] | None]]:
    """Run ``model(x)``; keep each layer's first output (a multi-scale net runs once per scale)
    and the chain of leaf modules that produced it, if it is one."""
    modules = dict(model.named_modules())
    captured: dict[str, Tensor] = {}
    chains: dict[str, list[nn.Module] | None] = {}
    chain = _Chain(x)

    def hook(name: str):
        def fn(module: nn.Module, inputs: object, output: object) -> None:
            if name in captured:
                return
            if not isinstance(output, Tensor) or output.dim() != 4:
                raise ValueError(
                    f"layer {name!r} ({type(module).__name__}) outputs {type(output).__name__}, not an (N, C, H, W) "
                    "map; choose one of its submodules"
                )
            captured[name] = keep(output)
            chains[name] = chain.upto(output)

        return fn

    # Leaf hooks first: on a leaf target, the chain is extended before the target reads it.
    handles = [m.register_forward_hook(chain) for m in model.modules() if next(m.children(), None) is None]
    handles += [modules[n].register_forward_hook(hook(n)) for n in layers]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in layers if n not in captured]
    if missing:
        raise ValueError(f"layers {missing} did not run in {type(model).__name__}'s forward pass")
    return captured, chains


def _cell_offset(chain: list[nn.Module] | None, stride: float, size: int, map_size: int) -> float:
    """Input pixel of cell 0's centre: exact along a chain of layers, else assuming the map is
    centred on the image (symmetric padding; exact for U-Net and padded convolutions)."""
    if chain is not None:
        try:
            chain_stride, offset = centre_geometry(chain)
        except ValueError:
            chain_stride = None
        if chain_stride == stride:
            return offset
    return (size - 1 - stride * (map_size - 1)) / 2


def _window(size: int, map_size: int, stride: float, offset: float) -> tuple[int, int]:
    """The cells ``[first, last)`` whose centres ``offset + stride * j`` lie on the image."""
    first = max(0, math.ceil((-0.5 - offset) / stride))
    last = min(map_size, math.ceil((size - 0.5 - offset) / stride))
    return (first, last) if last > first else (0, map_size)


@torch.no_grad()
def feature_maps(model: nn.Module, image: Tensor, layers: Sequence[str], top_k: int = 8) -> dict[str, LayerFeatures]:
    """The ``top_k`` strongest channels of each layer (Zeiler & Fergus 2014, Sec. 4), by forward hooks.

    Strength is a channel's mean rectified activation ``mean(max(0, x))`` over the image: what
    the following ReLU passes on (a conv's raw output is also negative; a ReLU or pooling
    output is unchanged by it). Maps larger than the image (FCN pads by 100) are cropped to the
    cells centred on it. The stride of each layer is measured by a second pass on an input
    grown by 64 pixels; cell positions follow from the layers' geometry where the layers up to
    the hooked one form a chain, else the map is taken to be centred on the image. A module
    that runs several times in one pass (U-Net's shared pooling, a multi-scale net's layers)
    is recorded at its first call.

    Args:
        model: any ``nn.Module`` (switched to eval mode for the passes, then restored).
        image: one normalised ``(C, H, W)`` tensor on the model's device.
        layers: module names, full or a unique suffix (see :func:`resolve_layer`).
        top_k: channels kept per layer (all when the layer has fewer).

    Returns:
        ``{full layer name: LayerFeatures}`` in the order the layers ran (shallow first).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not layers:
        raise ValueError("no layers given")
    x = _as_batch(image)
    names = list(dict.fromkeys(resolve_layer(model, n) for n in layers))
    was_training = model.training
    model.eval()
    try:
        # clone: an in-place ReLU after a conv would otherwise rectify the recorded map later.
        maps, chains = _record(model, names, x, lambda t: t[0].detach().float().clone())
        grown = x.new_zeros(1, x.shape[1], x.shape[2] + _PROBE_GROWTH, x.shape[3] + _PROBE_GROWTH)
        sizes, _ = _record(model, names, grown, lambda t: torch.tensor(t.shape[-2:]))
    finally:
        model.train(was_training)
    height, width = x.shape[-2:]
    out: dict[str, LayerFeatures] = {}
    for name, fmap in maps.items():
        grew = int(sizes[name][0]) - fmap.shape[-2]
        stride = _PROBE_GROWTH / grew if grew > 0 else float("nan")
        if grew > 0:
            offset_y = _cell_offset(chains[name], stride, height, fmap.shape[-2])
            offset_x = _cell_offset(chains[name], stride, width, fmap.shape[-1])
            top, bottom = _window(height, fmap.shape[-2], stride, offset_y)
            left, right = _window(width, fmap.shape[-1], stride, offset_x)
            fmap = fmap[:, top:bottom, left:right]
        act = fmap.clamp_min(0)
        strength = act.mean((1, 2))
        k = min(top_k, act.shape[0])
        order = torch.argsort(strength, descending=True, stable=True)[:k]
        out[name] = LayerFeatures(
            act[order].cpu().numpy(), order.cpu().numpy(), strength[order].cpu().numpy(), stride, act.shape[0]
        )
    return out


def _stride_text(stride: float) -> str:
    if math.isnan(stride):
        return "stride unknown"
    if stride >= 1:
        return f"stride {stride:g}" if stride == round(stride) else f"stride {stride:.2f}"
    return f"upsampled x{1 / stride:g}"


def plot_feature_grid(
    image: np.ndarray, features: dict[str, LayerFeatures], out: str | Path, *, title: str = ""
) -> Path:
    """One row per layer, shallow first: the image at the layer's resolution, then its channels.

    Each channel is normalised to its own range (a weak channel's pattern stays visible); the
    panel title gives its index and mean activation. The first column shows how much of the
    image a map of that size can resolve: the image resampled to the layer's grid.
    """
    import cv2

    from .plots import plt

    if not features:
        raise ValueError("no feature maps to plot")
    cols = 1 + max(f.channels.shape[0] for f in features.values())
    rows = len(features)
    fig, axes = plt.subplots(rows, cols, figsize=(1.55 * cols + 1.4, 1.75 * rows + 0.6), squeeze=False)
    shown, cmap = _display_image(image)
    for r, (name, f) in enumerate(features.items()):
        h, w = f.channels.shape[-2:]
        # INTER_AREA averages the pixels each cell covers: what that resolution can resolve.
        small = cv2.resize(np.ascontiguousarray(shown), (w, h), interpolation=cv2.INTER_AREA)
        axes[r, 0].imshow(small, cmap=cmap, interpolation="nearest")
        axes[r, 0].set_ylabel(
            f"{name}\n{f.num_channels} ch, {w}x{h}\n{_stride_text(f.stride)}",
            rotation=0,
            ha="right",
            va="center",
            fontsize=9,
        )
        if r == 0:
            axes[r, 0].set_title("image at\nthis resolution", fontsize=8)
        for c in range(1, cols):
            ax = axes[r, c]
            if c - 1 < f.channels.shape[0]:
                ch = f.channels[c - 1]
                lo, hi = float(ch.min()), float(ch.max())
                norm = (ch - lo) / (hi - lo) if hi > lo else np.zeros_like(ch)
                ax.imshow(norm, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
                ax.set_title(f"ch {int(f.indices[c - 1])}, mean {float(f.strength[c - 1]):.2g}", fontsize=7)
            else:
                ax.axis("off")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    note = "bright = strong activation; each channel scaled to its own range; strongest (highest mean) first"
    fig.suptitle(f"{title}\n{note}" if title else f"the strongest channels per layer\n{note}", fontsize=11)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
