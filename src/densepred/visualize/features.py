"""Feature maps: the strongest channels of chosen layers, with each layer's stride and cell
positions (Zeiler & Fergus 2014, Sec. 4 and Fig. 2)."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from ..models.base import SegmentationModel
from ..models.layers import centre_geometry
from .heatmaps import image_batch

__all__ = ["LayerFeatures", "resolve_layer", "default_layers", "feature_maps"]

# The stride probe of feature_maps grows the input by this much: a multiple of every stride
# the registered models have (32 at most), so map sizes grow by exactly 64 / stride.
_PROBE_GROWTH = 64


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
    x = image_batch(image)
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
