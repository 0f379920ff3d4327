"""Class heat maps: a model's coarse score grid over an image beside the dense map made from it
(FCN Sec. 3.1 and 3.3; DeepLab v1 Sec. 3.1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import EvalConfig
from ..inference import predict_logits
from ..models.base import SegmentationModel, input_rule_of
from ..models.convolutionalize import convolutionalize
from ..models.layers import BilinearDeconv, centre_geometry, square_value

__all__ = ["HeatMaps", "class_heatmaps", "classifier_heatmap", "check_class", "image_batch"]


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


def image_batch(image: Tensor) -> Tensor:
    """One normalised image as a batch of one; anything else is an error naming its shape."""
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one normalised image (C, H, W) or (1, C, H, W), got shape {tuple(image.shape)}")
    return image


def check_class(class_index: int, num_classes: int) -> None:
    if not 0 <= class_index < num_classes:
        raise ValueError(f"class id {class_index} is out of range: the model scores classes 0..{num_classes - 1}")


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
    x = image_batch(image)
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
    x = image_batch(image)
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
