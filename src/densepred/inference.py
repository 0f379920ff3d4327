"""Inference modes: whole image, sliding window, overlap-tile, and multi-scale + flip on top.

Every mode returns float logits of shape ``(N, classes, H, W)`` for a normalised batch of
``(N, C, H, W)`` images, so modes can be swapped without touching the code around them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import torch_beside
from .config import EvalConfig
from .models.base import input_rule_of
from .precision import autocast, resolve_inference_amp

__all__ = [
    "predict_logits",
    "sliding_window",
    "overlap_tile",
    "multi_scale_flip",
    "mirror_pad",
    "tile_starts",
    "forward_size",
]


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out["fused"] if isinstance(out, dict) else out


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis that cover ``[0, size)``; the last tile is flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _gaussian_window(height: int, width: int, sigma_scale: float = 0.125) -> Tensor:
    """A separable Gaussian that trusts tile centres more than tile borders."""

    def g(n: int) -> Tensor:
        coords = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        return torch.exp(-(coords**2) / (2 * (sigma_scale * n) ** 2))

    return (g(height)[:, None] * g(width)[None, :]).clamp_min(1e-3)


@torch.inference_mode()
def sliding_window(
    model: nn.Module,
    image: Tensor,
    tile: int,
    overlap: float = 1 / 3,
    *,
    batch_size: int = 4,
    blend: str = "uniform",
    num_classes: int | None = None,
) -> Tensor:
    """Logits of a (N, C, H, W) batch by tiles of ``tile`` pixels overlapping by ``overlap``.

    Tiles are run ``batch_size`` at a time and their logits averaged where they overlap
    (``blend="gaussian"`` weighs tile centres more). Tiles are clipped to the image, so an image
    within one tile gets exactly whole-image inference.
    """
    if tile < 1 or not 0 <= overlap < 1:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < 1, got tile={tile}, overlap={overlap}")
    if blend not in ("uniform", "gaussian"):
        raise ValueError(f"blend must be 'uniform' or 'gaussian', got {blend!r}")
    n, _, h, w = image.shape
    # A tile never exceeds the image: an image within one tile is simply whole-image inference.
    th, tw = min(tile, h), min(tile, w)
    boxes = [
        (y, x)
        for y in tile_starts(h, th, max(1, math.ceil(th * (1 - overlap))))
        for x in tile_starts(w, tw, max(1, math.ceil(tw * (1 - overlap))))
    ]
    weight = (_gaussian_window(th, tw) if blend == "gaussian" else torch.ones(th, tw)).to(image.device)
    logits = counts = None
    for b in range(0, len(boxes), batch_size):
        chunk = boxes[b : b + batch_size]
        tiles = torch.cat([image[:, :, y : y + th, x : x + tw] for y, x in chunk])
        out = _forward(model, tiles).float()
        if out.shape[-2:] != (th, tw):
            raise ValueError(
                f"sliding window needs a model whose output has its input's size; got {tuple(out.shape[-2:])} "
                f"for {th}x{tw} tiles (use mode='overlap_tile' for the valid U-Net)"
            )
        if logits is None:
            logits = torch.zeros(n, out.shape[1], h, w, device=image.device)
            counts = torch.zeros(1, 1, h, w, device=image.device)
        for k, (y, x) in enumerate(chunk):
            # In place, no product tensor: a 4-tile CamVid slide's sums 4.3 -> 1.9 ms on one thread.
            logits[:, :, y : y + th, x : x + tw].addcmul_(out[k * n : (k + 1) * n], weight)
            counts[:, :, y : y + th, x : x + tw] += weight
    return logits.div_(counts)  # in place: a large image holds one logits map, not two


def mirror_pad(x: Tensor, top: int, bottom: int, left: int, right: int) -> Tensor:
    """Reflect-pad by any amount (repeated reflections when a pad exceeds the image), as the
    U-Net paper extrapolates missing context "by mirroring the input image" (Fig. 2)."""
    while top or bottom or left or right:
        h, w = x.shape[-2:]
        t, b, l_, r = min(top, h - 1), min(bottom, h - 1), min(left, w - 1), min(right, w - 1)
        if h == 1 or w == 1:  # a single row/column cannot reflect: replicate it
            return F.pad(x, (left, right, top, bottom), mode="replicate")
        x = F.pad(x, (l_, r, t, b), mode="reflect")
        top, bottom, left, right = top - t, bottom - b, left - l_, right - r
    return x


@torch.inference_mode()
def overlap_tile(model: nn.Module, image: Tensor, tile: int | None = None, *, batch_size: int = 4) -> Tensor:
    """Full-size logits from a valid-convolution U-Net by the overlap-tile strategy (U-Net Fig. 2).

    The image is mirror-padded by the net's context margin, cut into input tiles of ``tile``
    pixels (a valid size; default the paper's 572, or 16 pooling cells for other depths) whose
    output tiles cover the image without gaps, and the output tiles are stitched. Every output
    pixel sees full (partly mirrored) context, for any image size.
    """
    rule = input_rule_of(model)
    if rule.kind != "valid":
        raise ValueError(f"overlap-tile is for models with valid convolutions; {type(model).__name__} takes any size")
    n, _, h, w = image.shape
    grid = rule.step  # 2**depth: the poolings' grid
    tile = tile or _default_tile(rule)
    if not rule.fits(tile):
        valid = rule.nearest(tile)
        raise ValueError(
            f"overlap-tile needs a valid U-Net input tile; {tile} is not one "
            f"(next valid: {valid}, output {valid - rule.shrink})"
        )
    out = tile - rule.shrink
    # The net is shift-equivariant only by multiples of 2**depth (its poolings), so tiles start
    # on that grid: then stitched tiles equal one pass over the whole mirrored image.
    step = out // grid * grid
    if step == 0:
        raise ValueError(
            f"tile {tile} gives {out}-pixel outputs, smaller than the {grid}-pixel pooling grid; "
            f"use tile >= {rule.nearest(grid + rule.shrink)}"
        )
    margin = rule.shrink // 2  # context on each side of an output tile (92 for 572 -> 388)
    rows = [i * step for i in range(max(0, math.ceil((h - out) / step)) + 1)]
    cols = [i * step for i in range(max(0, math.ceil((w - out) / step)) + 1)]
    ext_h, ext_w = rows[-1] + out, cols[-1] + out
    padded = mirror_pad(image, margin, margin + ext_h - h, margin, margin + ext_w - w)
    boxes = [(y, x) for y in rows for x in cols]
    logits = None
    for b in range(0, len(boxes), batch_size):
        chunk = boxes[b : b + batch_size]
        tiles = torch.cat([padded[:, :, y : y + tile, x : x + tile] for y, x in chunk])
        scores = model(tiles).float()
        if logits is None:
            logits = torch.zeros(n, scores.shape[1], ext_h, ext_w, device=image.device)
        for k, (y, x) in enumerate(chunk):
            logits[:, :, y : y + out, x : x + out] = scores[k * n : (k + 1) * n]
    return logits[:, :, :h, :w]


def _default_tile(rule) -> int:  # noqa: ANN001 - a valid-convolution InputRule
    """Overlap-tile's input tile: the paper's 572 (depth 4), or 16 pooling cells for other depths."""
    return rule.nearest(572 if rule.step == 16 else 16 * rule.step)


def _tiles_overlap(model: nn.Module, o: EvalConfig) -> bool:
    return o.mode == "overlap_tile" or (o.mode == "whole" and input_rule_of(model).kind == "valid")


def forward_size(model: nn.Module, image_size: tuple[int, int], o: EvalConfig) -> tuple[int, int]:
    """The input size of the forward passes that mode ``o`` runs on an ``image_size`` image at
    scale 1: the size at which to choose the fastest backend (:mod:`densepred.backends`)."""
    h, w = image_size
    if _tiles_overlap(model, o):
        tile = o.tile or _default_tile(input_rule_of(model))
        return tile, tile
    if o.mode == "slide" and o.tile:
        return min(o.tile, h), min(o.tile, w)
    return h, w


def _single_scale(model: nn.Module, image: Tensor, o: EvalConfig) -> Tensor:
    if _tiles_overlap(model, o):
        return overlap_tile(model, image, o.tile, batch_size=o.batch_size)
    if o.mode == "whole":
        return _forward(model, image).float()
    if o.mode == "slide":
        if not o.tile:
            raise ValueError("mode='slide' needs tile=<tile size in pixels>")
        return sliding_window(model, image, o.tile, o.overlap, batch_size=o.batch_size, blend=o.blend)
    raise ValueError(f"unknown inference mode {o.mode!r}; choose 'whole', 'slide' or 'overlap_tile'")


@torch.inference_mode()
def multi_scale_flip(
    predict: Callable[[Tensor], Tensor],
    image: Tensor,
    scales: Sequence[float] = (1.0,),
    *,
    flip: bool = True,
    fusion: str = "mean",
) -> Tensor:
    """Test-time augmentation: logits at several input scales and mirrored, fused per pixel.

    ``predict`` maps a batch to logits (a model, or one inference mode of it). Each scaled (and
    horizontally flipped) copy is predicted, its logits resized back to the image size (and
    un-flipped), and all are fused by ``mean`` or ``max`` (DeepLab v2 fuses its multi-scale
    scores by max, Sec. 3.2).
    """
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be positive numbers, got {list(scales)}")
    if fusion not in ("mean", "max"):
        raise ValueError(f"fusion must be 'mean' or 'max', got {fusion!r}")
    h, w = image.shape[-2:]
    fused: Tensor | None = None
    count = 0
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        scaled = image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            x = scaled.flip(-1) if mirrored else scaled
            logits = _forward(predict, x).float() if isinstance(predict, nn.Module) else predict(x)
            logits = logits.flip(-1) if mirrored else logits
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            if fused is None:
                fused = logits
            elif fusion == "max":
                fused = torch.maximum(fused, logits)
            else:
                fused = fused + logits
            count += 1
    assert fused is not None
    return fused if fusion == "max" else fused / count


@torch.inference_mode()
def predict_logits(model: nn.Module, image: Tensor, options: EvalConfig | None = None) -> Tensor:
    """Logits for a normalised (N, C, H, W) batch with the inference ``options`` (an
    :class:`~densepred.config.EvalConfig`: mode, tile, scales, flip, precision, ...).

    For a valid-convolution U-Net, ``"whole"`` means overlap-tile: its whole-image output *is*
    the stitched tiles (U-Net Fig. 2), so the logits always cover the whole image. ``scales``
    other than ``(1.0,)`` or ``flip=True`` add multi-scale / mirrored test-time augmentation.
    ``amp`` runs the forward passes in reduced precision (``auto``: fp16 on CUDA, float32 on a
    CPU, see :func:`~densepred.precision.resolve_inference_amp`); the logits are float32 either way.
    """
    o = options or EvalConfig()

    def single(x: Tensor) -> Tensor:
        return _single_scale(model, x, o)

    # Beside a runtime's own thread pool, torch's operations between its forwards on this thread.
    with torch_beside(model), autocast(resolve_inference_amp(o.amp, image.device), image.device):
        if tuple(o.scales) == (1.0,) and not o.flip:
            return single(image).float()
        return multi_scale_flip(single, image, o.scales, flip=o.flip, fusion=o.fusion).float()
