"""Training losses of FCN, DeepLab and U-Net: per-pixel cross-entropy and its weightings.

- :func:`cross_entropy`: softmax cross-entropy with the ignore label, optional class weights and
  per-pixel weights, averaged over valid pixels (DeepLab's Caffe ``SoftmaxWithLoss``) or summed
  (FCN's "sum over the spatial dimensions", Long et al., CVPR 2015, Sec. 3).
- :func:`unet_weight_map`: U-Net's pre-computed weight map (Ronneberger et al., MICCAI 2015,
  Sec. 3, Eq. 2) that stresses the thin borders between touching cells.
- :func:`multi_scale_loss`: DeepLab v2's MSC training (Chen et al., TPAMI 2017, Sec. 4.1): one
  loss per scale branch and for the fused output, each against labels shrunk to its size.
- :func:`dice_loss`: soft Dice, an addition that none of the three papers uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from .config import TrainConfig
from .data.labels import IGNORE_INDEX
from .metrics import check_labels
from .models.layers import center_crop, is_channels_last

__all__ = [
    "RecipeLoss",
    "WithWeightMaps",
    "fit_target",
    "cross_entropy",
    "dice_loss",
    "multi_scale_loss",
    "resize_labels",
    "unet_weight_map",
    "unet_weight_maps",
]

# Distances beyond this many sigmas count as "no second cell": the border term there is below
# w0 * 1e-6 (exp(-x^2 / 2) = 1e-6 at x = sqrt(2 ln 1e6) = 5.26), and it bounds each cell's
# distance transform to a window around the cell instead of the whole image.
_CUTOFF_SIGMAS = math.sqrt(2 * math.log(1e6))


def _corner_aligned_nearest(n_in: int, n_out: int, device: torch.device) -> Tensor:
    """Indices ``round(i * (n_in - 1) / (n_out - 1))`` in integer arithmetic (halves round up)."""
    if n_out == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    i = torch.arange(n_out, device=device)
    return (2 * i * (n_in - 1) + (n_out - 1)) // (2 * (n_out - 1))


def resize_labels(target: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resize of a label map ``(..., H, W)`` to ``size`` on a corner-aligned grid.

    Output pixel ``i`` takes input pixel ``round(i * (H_in - 1) / (H_out - 1))``. Why this grid:
    DeepLab's scores are corner-aligned with the image (Caffe's ``Interp``; see
    ``densepred.models.deeplab.caffe_resize``), so on its ``8k + 1`` inputs score ``i`` sits
    exactly on pixel ``8i``, and this picks the label under each score. For the stride-8 size
    ``(H - 1) // 8 + 1`` it equals :func:`densepred.data.labels.downsample_labels` with factor 8;
    unlike that one it also reaches the MSC branch sizes (v2 Sec. 4.1: 321 -> 41, 31, 21) that are
    no integer stride of the labels. Labels are picked, never blended, so the ignore label and
    class ids survive unchanged.
    """
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (height, width) with positive sides, got {tuple(size)}")
    if target.dim() < 2:
        raise ValueError(f"expected labels (..., H, W), got shape {tuple(target.shape)}")
    (h_in, w_in), (h_out, w_out) = target.shape[-2:], size
    rows = _corner_aligned_nearest(h_in, int(h_out), target.device)
    cols = _corner_aligned_nearest(w_in, int(w_out), target.device)
    return target.index_select(-2, rows).index_select(-1, cols)


def _match_target(logits: Tensor, target: Tensor, resize_target: bool) -> Tensor:
    """Check ``target`` is ``(N, *spatial)`` for logits ``(N, C, *spatial)``; shrink it if asked."""
    if logits.dim() < 2 or target.dim() != logits.dim() - 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} need a target of shape (N, *spatial) = "
            f"({logits.shape[0]}, ...), got {tuple(target.shape)}"
        )
    if target.shape[1:] == logits.shape[2:]:
        return target
    if resize_target and logits.dim() == 4:
        return resize_labels(target, logits.shape[-2:])
    raise ValueError(
        f"logits of shape {tuple(logits.shape)} and target of shape {tuple(target.shape)} differ in spatial size; "
        "pass resize_target=True to sub-sample the labels by nearest neighbour (DeepLab's label shrinking), "
        "or crop the target to the output (U-Net's valid convolutions: densepred.models.layers.center_crop)"
    )


def _class_weight_tensor(class_weights: Tensor | Sequence[float] | np.ndarray | None, logits: Tensor) -> Tensor | None:
    if class_weights is None:
        return None
    weight = torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)
    if weight.shape != (logits.shape[1],):
        raise ValueError(
            f"class_weights needs one weight per class ({logits.shape[1]}), got shape {tuple(weight.shape)}"
        )
    if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise ValueError(f"class_weights must be finite and >= 0, got {weight.tolist()}")
    return weight


def _pixel_cross_entropy(
    logits: Tensor, target: Tensor, valid: Tensor, weight: Tensor | None, ignore_index: int
) -> Tensor:
    """Each pixel's (class-weighted) cross-entropy, 0 where ignored: ``F.cross_entropy(...,
    reduction="none")``. Channels-last logits take the softmax along their contiguous class axis:
    PyTorch's copies them to channels-first first and sends a channels-first gradient back into
    the channels-last network (LR-ASPP, 11 classes at 8 x 256 x 256, with the upsampling before
    it, forward and backward: 37.5 -> 31.7 ms on a 2-core Zen 2)."""
    if not is_channels_last(logits):
        return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="none")
    safe = target.masked_fill(~valid, 0)
    log_probs = F.log_softmax(logits.permute(0, 2, 3, 1), -1)  # (N, H, W, C), a contiguous view's
    picked = log_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    if weight is not None:
        picked = picked * weight.to(picked.dtype)[safe]
    return torch.where(valid, -picked, 0.0)


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    class_weights: Tensor | Sequence[float] | np.ndarray | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    pixel_weights: Tensor | None = None,
    resize_target: bool = False,
) -> Tensor:
    """Per-pixel softmax cross-entropy of ``logits (N, C, H, W)`` against ``target (N, H, W)``.

    Pixels labelled ``ignore_index`` contribute nothing. ``reduction``:

    - ``"mean"``: divided by the number of valid pixels, as DeepLab's ``SoftmaxWithLoss`` with
      normalisation; with ``class_weights`` it is torch's weighted mean (divided by the summed
      weights of the valid pixels); with ``pixel_weights`` ``sum(w * ce) / valid pixels``.
    - ``"sum"``: the unnormalised loss of FCN ("a sum over the spatial dimensions of the final
      layer", Long et al., CVPR 2015, Sec. 3). Its scale grows with the image, which is why the
      FCN reference solvers train with batch 1 and a learning rate of 1e-10.

    ``pixel_weights (N, H, W)`` multiply each pixel's loss: U-Net's Eq. 2 weight map
    (:func:`unet_weight_maps`), which already holds the class balancing, so it cannot be
    combined with ``class_weights``. A target whose spatial size differs from the logits' is an
    error unless ``resize_target=True``, which shrinks it with :func:`resize_labels` (DeepLab's
    stride-8 loss, v1 Sec. 4.1). If every pixel is ignored the loss is a differentiable 0.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    target = _match_target(logits, target, resize_target)
    check_labels(target, logits.shape[1], ignore_index)
    weight = _class_weight_tensor(class_weights, logits)
    if weight is not None and pixel_weights is not None:
        raise ValueError(
            "pass either class_weights or pixel_weights, not both; put the class balancing into the weight "
            "map (unet_weight_map(class_weights=...))"
        )
    target = target.long()
    valid = target != ignore_index
    loss = _pixel_cross_entropy(logits, target, valid, weight, ignore_index)
    if pixel_weights is not None:
        if pixel_weights.shape != target.shape:
            raise ValueError(
                f"pixel_weights of shape {tuple(pixel_weights.shape)} must match the target at the logits' "
                f"size, {tuple(target.shape)}"
            )
        loss = loss * pixel_weights.to(loss.dtype)
    if reduction == "sum":
        return loss.sum()
    denom = weight[target[valid]].sum() if weight is not None else valid.sum().to(loss.dtype)
    # All pixels ignored (e.g. a crop of padding only): 0 with a graph, not torch's NaN.
    return loss.sum() / torch.where(denom > 0, denom, torch.ones_like(denom))


def dice_loss(logits: Tensor, target: Tensor, *, ignore_index: int = IGNORE_INDEX, smooth: float = 1.0) -> Tensor:
    """Soft Dice loss ``1 - mean_c (2 sum p_c g_c + s) / (sum p_c + sum g_c + s)`` over classes ``c``.

    ``p`` is the softmax of ``logits (N, C, ...)``, ``g`` the one-hot target; sums run over the
    batch and all valid pixels, so ignored pixels count in neither. ``smooth`` keeps a class that
    is absent from both at Dice 1 instead of 0/0. Not one of the three papers' losses (they all
    train with cross-entropy); provided for imbalanced binary tasks.
    """
    target = _match_target(logits, target, resize_target=False)
    num_classes = logits.shape[1]
    check_labels(target, num_classes, ignore_index)
    valid = target != ignore_index
    onehot = F.one_hot(torch.where(valid, target, 0).long(), num_classes).movedim(-1, 1)
    keep = valid.unsqueeze(1).to(logits.dtype)
    probs = logits.softmax(1) * keep
    onehot = onehot.to(logits.dtype) * keep
    dims = (0, *range(2, logits.dim()))
    intersection = (probs * onehot).sum(dims)
    dice = (2 * intersection + smooth) / (probs.sum(dims) + onehot.sum(dims) + smooth)
    return 1 - dice.mean()


def multi_scale_loss(
    outputs: Mapping[str, Tensor],
    target: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = cross_entropy,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DeepLab v2's MSC loss (Chen et al., TPAMI 2017, Sec. 4.1): the sum of every branch's loss.

    ``outputs`` is what :class:`densepred.models.deeplab.MultiScaleInputs` returns in ``train()``
    mode, ``{"fused", "scale_1", "scale_0.75", "scale_0.5"}``: each branch's stride-8 logits at
    its own size. Each is scored by ``loss_fn(logits, labels)`` against the labels shrunk to its
    size with :func:`resize_labels`. Returns the total and the detached per-branch values.
    """
    if isinstance(outputs, Tensor) or not isinstance(outputs, Mapping):
        raise TypeError(
            f"outputs must be a dict of branch logits, got {type(outputs).__name__}; MultiScaleInputs returns "
            "the dict only in train() mode (for a single output call loss_fn directly)"
        )
    if not outputs:
        raise ValueError("outputs is empty: expected at least one branch, e.g. {'fused': ..., 'scale_1': ...}")
    shrunk: dict[tuple[int, ...], Tensor] = {}  # "fused" and "scale_1" share a size
    losses: dict[str, Tensor] = {}
    for name, logits in outputs.items():
        size = tuple(logits.shape[-2:])
        if size not in shrunk:
            shrunk[size] = target if tuple(target.shape[-2:]) == size else resize_labels(target, size)
        losses[name] = loss_fn(logits, shrunk[size])
    total = torch.stack(list(losses.values())).sum()
    return total, {name: value.detach() for name, value in losses.items()}


def _class_weight_map(
    mask: np.ndarray, valid: np.ndarray, class_weights: Literal["balance"] | Sequence[float] | np.ndarray | None
) -> np.ndarray:
    """``w_c(x)``: the weight of pixel ``x``'s class; 0 on ignored pixels."""
    w = np.zeros(mask.shape, dtype=np.float64)
    labels = mask[valid].astype(np.int64)
    if labels.size == 0:
        return w
    if class_weights is None:
        w[valid] = 1.0
        return w
    if isinstance(class_weights, str):
        if class_weights != "balance":
            raise ValueError(f"class_weights must be 'balance', None or one weight per class, got {class_weights!r}")
        # Each class present gets the same total weight; the mean weight over valid pixels is 1.
        counts = np.bincount(labels)
        table = np.zeros(len(counts))
        present = counts > 0
        table[present] = labels.size / (present.sum() * counts[present])
    else:
        table = np.asarray(class_weights, dtype=np.float64)
        if table.ndim != 1 or labels.max() >= len(table):
            raise ValueError(
                f"class_weights has shape {table.shape} but the mask has class {int(labels.max())}; "
                "give one weight per class"
            )
    w[valid] = table[labels]
    return w


def _two_nearest_cell_distances(cells: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the distances to the nearest and second-nearest cell (``inf`` beyond ``cutoff``).

    One exact Euclidean distance transform per cell inside its bounding box grown by ``cutoff``:
    a pixel outside that window is farther than ``cutoff`` from the cell. The two smallest
    distances are kept as running minima, so memory stays two images however many cells there are.
    """
    d1 = np.full(cells.shape, np.inf)
    d2 = np.full(cells.shape, np.inf)
    pad = int(math.ceil(cutoff))
    for k, box in enumerate(ndimage.find_objects(cells), start=1):  # a loop over cells, not pixels
        if box is None:
            continue
        window = tuple(
            slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(box, cells.shape, strict=True)
        )
        d = ndimage.distance_transform_edt(cells[window] != k)
        near, second = d1[window], d2[window]  # views: updated in place
        second[...] = np.minimum(second, np.maximum(near, d))  # uses the old nearest
        near[...] = np.minimum(near, d)
    return d1, d2


def unet_weight_map(
    mask: np.ndarray | Tensor,
    *,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: Literal["balance"] | Sequence[float] | np.ndarray | None = "balance",
    foreground_class: int = 1,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """U-Net's weight map (Ronneberger et al., MICCAI 2015, Sec. 3, Eq. 2) of one ``(H, W)`` mask.

    ``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))``, with ``w0 = 10`` and
    ``sigma = 5`` pixels as in the paper; ``d1``/``d2`` are the distances to the nearest and
    second-nearest cell. Returns float32 ``(H, W)``; ignored pixels get weight 0.

    - Cells are the 4-connected components (``scipy.ndimage.label``) of ``foreground_class``.
      With this library's ISBI 2012 masks (0 = membrane, 1 = cell) that is the default 1.
    - ``w_c``: ``"balance"`` gives each class present in *this* mask the same total weight
      (``n_valid / (n_classes_present * n_class)``); the paper balances the frequencies of the
      training set, which an array of per-class weights reproduces (e.g.
      ``densepred.data.median_frequency_weights``); ``None`` means ``w_c = 1``.
    - The border term is added on background (non-cell) pixels only. Eq. 2 is written for all
      pixels, but inside a cell ``d1 = 0`` and the term would also raise the weights along
      every cell's rim; the paper's purpose ("to force the network to learn the small
      separation borders", Fig. 3d) is the background gaps between touching cells, where a
      pixel one pixel from two cells gets about ``w_c + 0.92 w0``.
    - Distances beyond ``5.26 sigma`` are treated as infinite, which changes ``w`` by less than
      ``w0 * 1e-6`` and keeps each cell's distance transform local.
    """
    m = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"expected one 2-D mask (H, W), got shape {m.shape}; use unet_weight_maps for a batch")
    if sigma <= 0 or w0 < 0:
        raise ValueError(f"need sigma > 0 and w0 >= 0, got sigma={sigma}, w0={w0}")
    valid = m != ignore_index
    weights = _class_weight_map(m, valid, class_weights)
    cells, num_cells = ndimage.label(m == foreground_class)
    if num_cells >= 2 and w0 > 0:  # the term needs a second cell
        d1, d2 = _two_nearest_cell_distances(cells, _CUTOFF_SIGMAS * sigma)
        gaps = valid & (cells == 0)
        weights[gaps] += w0 * np.exp(-((d1[gaps] + d2[gaps]) ** 2) / (2 * sigma**2))
    return weights.astype(np.float32)


def unet_weight_maps(masks: Tensor, **kwargs) -> Tensor:
    """:func:`unet_weight_map` for each mask of a batch ``(N, H, W)``: float32 on the masks' device.

    The maps are computed on the CPU with SciPy; the U-Net paper pre-computes them once per
    ground-truth mask, which is cheaper than calling this every step.
    """
    if masks.dim() != 3:
        raise ValueError(f"expected a batch of masks (N, H, W), got shape {tuple(masks.shape)}")
    maps = np.stack([unet_weight_map(m, **kwargs) for m in masks.detach().cpu().numpy()])
    return torch.from_numpy(maps).to(masks.device)


def fit_target(logits: Tensor, target: Tensor, *, crop: bool) -> Tensor:
    """Labels (or pixel weights) for a score map smaller than the image: the valid U-Net scores
    the image's centre (``crop``); DeepLab's stride-8 scores see labels sub-sampled by nearest
    neighbour, never interpolated."""
    if logits.shape[-2:] == target.shape[-2:]:
        return target
    if crop:
        return center_crop(target[:, None], *logits.shape[-2:])[:, 0]
    return resize_labels(target, tuple(logits.shape[-2:]))


class RecipeLoss:
    """The recipe's loss (``train.loss``), for one output (a tensor, or a dict of branches:
    multi-scale inputs, auxiliary heads, weighted by ``branch_weights``).

    ``crop_target``: the model's output is its input's centre (the valid U-Net), so labels are
    centre-cropped to it; a smaller score map otherwise sees labels sub-sampled to its size.
    """

    def __init__(
        self,
        t: TrainConfig,
        ignore_index: int,
        device: torch.device,
        *,
        crop_target: bool,
        branch_weights: Mapping[str, float] | None = None,
    ) -> None:
        self.kind, self.ignore_index, self.crop_target = t.loss, ignore_index, crop_target
        # Auxiliary heads' losses are weighted (PSPNet Sec. 4.1: 0.4); other branches count once.
        self.branch_weights = dict(branch_weights or {})
        self.class_weights = torch.tensor(t.class_weights, device=device) if t.class_weights else None

    def single(self, logits: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
        target = fit_target(logits, target, crop=self.crop_target)
        logits = logits.float()
        if self.kind == "dice":
            return dice_loss(logits, target, ignore_index=self.ignore_index)
        if weight is not None and self.kind == "unet_weighted":
            weight = fit_target(logits, weight, crop=self.crop_target)
        ce = cross_entropy(
            logits,
            target,
            ignore_index=self.ignore_index,
            class_weights=self.class_weights,
            reduction="sum" if self.kind == "ce_sum" else "mean",
            pixel_weights=weight if self.kind == "unet_weighted" else None,
        )
        if self.kind == "ce_dice":
            ce = ce + dice_loss(logits, target, ignore_index=self.ignore_index)
        return ce

    def __call__(self, output: Tensor | dict[str, Tensor], target: Tensor, weight: Tensor | None) -> Tensor:
        if isinstance(output, dict):  # multi-scale inputs (v2 MSC), auxiliary heads: one loss per branch
            return sum(  # type: ignore[return-value]
                self.branch_weights.get(name, 1.0) * self.single(v, target, weight) for name, v in output.items()
            )
        return self.single(output, target, weight)


class WithWeightMaps(torch.utils.data.Dataset):
    """Adds the U-Net border weight map (Sec. 3, Eq. 2) of each augmented mask, in the workers."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: Any) -> dict:
        sample = self.dataset[item]
        sample["weight"] = torch.from_numpy(unet_weight_map(sample["mask"].numpy())).float()
        return sample
