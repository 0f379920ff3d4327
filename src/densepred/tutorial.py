"""The dense-prediction tutorial, computed live on a CPU (``densepred tutorial``, docs/tutorial.md).

Eight steps in the order a course teaches them, one function each, each returning a
:class:`Step`: the numbers its text states (``facts``) and the arrays its figure draws
(``panels``). Steps that need a trained net get it from an earlier step:

1. :func:`pixel_classification`: a class for every pixel, by a patch classifier slid over the image
2. :func:`convolutionalization`: that classifier as a fully convolutional net (FCN Sec. 3.1)
3. :func:`deconvolution`: the bilinear kernel and in-network upsampling (FCN Sec. 3.3)
4. :func:`skip_architecture`: FCN-32s, -16s, -8s on the same data (FCN Sec. 4.2)
5. :func:`what_layers_see`: feature maps shallow to deep, their strides measured (ZFNet Sec. 4)
6. :func:`field_of_view`: atrous convolution, LargeFOV vs a 7x7 fc6, ASPP (DeepLab v1 Sec. 3, v2 Sec. 3.3)
7. :func:`fully_connected_crf`: the CRF before and after, on a boundary (DeepLab v1 Sec. 4)
8. :func:`unet_tiles`: valid convolutions, the 572 -> 388 tile, overlap-tile, the weight map (U-Net Sec. 2-3)

:func:`run_tutorial` runs them on the built-in synthetic shapes, draws the figures
(:mod:`densepred.tutorial_figures`) and writes both editions of the text from the templates at
the end of this file, so every number printed in the text is the one this run measured.
``TINY`` runs every step in seconds, for the tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

from .tutorial_figures import SYNTHETIC_CLASS_NAMES, Step

__all__ = [
    "TutorialSize",
    "FULL",
    "TINY",
    "Step",
    "Scenes",
    "synthetic_scenes",
    "small_classifier",
    "boundary_band",
    "boundary_accuracy",
    "ideal_upsampled_labels",
    "dot_rounding_bound",
    "receptive_field",
    "slim_copy",
    "pixel_classification",
    "convolutionalization",
    "deconvolution",
    "skip_architecture",
    "what_layers_see",
    "field_of_view",
    "fully_connected_crf",
    "unet_tiles",
    "run_tutorial",
    "render_text",
]

# Unit roundoff of float32: a correctly rounded operation is off by at most this, relatively.
U32 = 2.0**-24


@dataclass(frozen=True)
class TutorialSize:
    """How large each step runs: :data:`FULL` for the docs, :data:`TINY` for the tests."""

    image: int = 128  # side of the synthetic scenes of steps 1-5 and 7
    train_images: int = 256
    val_images: int = 48
    patch: int = 32  # the patch classifier's window (steps 1-2)
    patch_iterations: int = 500
    deconv_iterations: int = 150
    fcn_iterations: int = 400
    fcn_batch: int = 8
    slim: int = 16  # the VGG16 nets keep 1/slim of their hidden channels
    band: int = 3  # boundary accuracy counts pixels within this many pixels of a class boundary
    aspp_image: int = 321  # DeepLab v2's training crop
    rf_width: int = 256  # first probe width of the receptive-field measurement (doubles as needed)
    crf_tuning_images: int = 8
    unet_tile: int = 572
    unet_image: int = 512
    unet_width: int = 2  # base channels of the (untrained) U-Net whose geometry step 8 shows
    cells: int = 128  # side of the toy cell mask of the weight map


FULL = TutorialSize()
TINY = TutorialSize(
    image=64,
    train_images=16,
    val_images=4,
    patch_iterations=20,
    deconv_iterations=5,
    fcn_iterations=2,
    fcn_batch=2,
    band=2,
    aspp_image=161,
    crf_tuning_images=1,
    unet_tile=204,
    unet_image=40,
    cells=64,
)


# ----------------------------------------------------------------------------------------------
# Data and shared helpers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenes:
    """Synthetic scenes: uint8 ``images`` (N, H, W, 3) for display and the CRF, normalised
    float32 ``x`` (N, 3, H, W) for the nets, int64 ``masks`` (N, H, W) of six classes."""

    images: np.ndarray
    x: Tensor
    masks: Tensor

    def objects(self) -> Tensor:
        """The masks with the five shape classes merged: 0 background, 1 object."""
        return (self.masks > 0).long()


def synthetic_scenes(split: str, count: int, size: int, seed: int = 0) -> Scenes:
    """``count`` scenes of the built-in synthetic data (``create_dataset("synthetic", ...)``)."""
    from .data.factory import create_dataset
    from .data.normalization import IMAGENET

    dataset = create_dataset("synthetic", split=split, num_images=count, size=size, seed=seed)
    samples = [dataset.load(i) for i in range(count)]
    images = np.stack([s.image for s in samples])
    x = torch.stack([IMAGENET(s.image) for s in samples])
    masks = torch.from_numpy(np.stack([s.mask for s in samples]).astype(np.int64))
    return Scenes(images, x, masks)


def boundary_band(mask: np.ndarray | Tensor, width: int) -> np.ndarray:
    """Pixels within ``width`` pixels (Euclidean) of a class boundary of ``mask`` (..., H, W).

    A boundary pixel has a 4-neighbour of another class; the band grows it by ``width``.
    """
    m = np.asarray(mask)
    edge = np.zeros(m.shape, dtype=bool)
    vertical, horizontal = m[..., 1:, :] != m[..., :-1, :], m[..., :, 1:] != m[..., :, :-1]
    edge[..., 1:, :] |= vertical
    edge[..., :-1, :] |= vertical
    edge[..., :, 1:] |= horizontal
    edge[..., :, :-1] |= horizontal
    flat = edge.reshape(-1, *m.shape[-2:])
    band = np.stack([ndimage.distance_transform_edt(~e) <= width if e.any() else e for e in flat])
    return band.reshape(m.shape)


def boundary_accuracy(pred: Tensor, target: Tensor, width: int) -> float:
    """Pixel accuracy over the pixels within ``width`` pixels of a ground-truth class boundary."""
    band = torch.from_numpy(boundary_band(target, width))
    return float((pred == target)[band].double().mean()) if band.any() else float("nan")


def _metrics(pred: Tensor, target: Tensor, num_classes: int, band: int) -> dict[str, float]:
    from .metrics import ConfusionMatrix

    matrix = ConfusionMatrix(num_classes)
    matrix.update(pred, target)
    scores = matrix.compute()
    return {
        "miou": scores["miou"],
        "pixel_acc": scores["pixel_acc"],
        "boundary_acc": boundary_accuracy(pred, target, band),
    }


def ideal_upsampled_labels(masks: Tensor, num_classes: int, stride: int) -> Tensor:
    """The labels of *perfect* stride-``stride`` scores upsampled by FCN's fixed bilinear layer.

    Each score cell holds the class frequencies of its ``stride x stride`` block (what a perfect
    coarse net could say), a :class:`~densepred.models.layers.BilinearDeconv` upsamples them and
    the centre crop lines the output up with the pixels (offset ``stride / 2``, see step 3).
    What is lost here no training can recover: it is the resolution of the output alone.
    """
    from .models.layers import BilinearDeconv

    one_hot = F.one_hot(masks, num_classes).permute(0, 3, 1, 2).double()
    coarse = F.avg_pool2d(one_hot, stride)
    up = BilinearDeconv(num_classes, stride, learnable=False).double()(coarse)
    height, width = masks.shape[-2:]
    half = stride // 2
    return up[..., half : half + height, half : half + width].argmax(1)


def dot_rounding_bound(weight: Tensor, bias: Tensor | None, inputs: Tensor) -> Tensor:
    """Twice the float32 error bound of ``inputs @ weight.T + bias``, computed in any order.

    For a sum of ``n`` products the rounding error is at most ``gamma_n * sum |w_i x_i|`` with
    ``gamma_n = n u / (1 - n u)`` (Higham, *Accuracy and Stability*, Sec. 3.1); two
    implementations (a matrix product and a convolution) can differ by twice that.
    """
    n = weight.shape[1] + 1
    gamma = n * U32 / (1 - n * U32)
    magnitude = inputs.double().abs() @ weight.double().abs().T
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    return 2 * gamma * magnitude


def receptive_field(score_map: Callable[[Tensor], Tensor], in_channels: int, height: int, width: int) -> int:
    """The receptive field of ``score_map``'s centre output along the width, in input pixels.

    It is the support of the input gradient of that one output (pass a net whose max-poolings
    are average poolings and whose weights are all non-zero, see :func:`_theoretical`); the
    width doubles until the field no longer reaches the border.
    """
    while width <= 16384:
        x = torch.randn(1, in_channels, height, width, requires_grad=True)
        out = score_map(x)
        out[..., out.shape[-2] // 2, out.shape[-1] // 2].sum().backward()
        cols = (x.grad.abs().sum(dim=(0, 1, 2)) > 0).nonzero().flatten()
        first, last = int(cols[0]), int(cols[-1])
        if first > 0 and last < width - 1:
            return last - first + 1
        width *= 2
    raise ValueError("receptive field wider than 16384 pixels")


def _theoretical(model: nn.Module) -> nn.Module:
    """``model`` for a receptive-field probe: eval mode, max-pools as average pools (a max routes
    the gradient through one pixel per window), no zero weights, no parameter gradients."""
    model.eval()
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.MaxPool2d):
                pool = nn.AvgPool2d(child.kernel_size, child.stride, child.padding, ceil_mode=child.ceil_mode)
                setattr(module, name, pool)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.01)
            p.requires_grad_(False)
    return model


def slim_copy(model: nn.Module, divisor: int) -> nn.Module:
    """``model`` with 1/``divisor`` of every hidden convolution's channels, in place, dropout off.

    The graph (kernels, strides, dilations, paddings, crops) does not depend on the widths, so
    a slim copy of the 134M-parameter VGG16 nets is the same net at a CPU's scale (the test
    suite's ``tests/slim.py`` idea). Image and class channels keep their widths; He init, as
    for a net trained from scratch; zero biases. Dropout off: the short runs here do not overfit.
    """
    keep = {model.in_channels, model.num_classes}
    for parent in list(model.modules()):
        for name, conv in list(parent.named_children()):
            if isinstance(conv, nn.Conv2d):  # the same kind of layer, thinner
                cin, cout = (c if c in keep else c // divisor for c in (conv.in_channels, conv.out_channels))
                thin = type(conv)(cin, cout, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
                nn.init.kaiming_normal_(thin.weight, nonlinearity="relu")
                nn.init.zeros_(thin.bias)
                setattr(parent, name, thin)
            elif isinstance(conv, nn.Dropout):
                conv.p = 0.0
    return model


def _slim_model(name: str, divisor: int, **kwargs: Any) -> nn.Module:
    """The registered model ``name`` as a :func:`slim_copy`, built without allocating the full
    net: on the meta device, then the slim convolutions are real and the few other layers
    (FCN's bilinear deconvolutions) are materialised and reset."""
    from .registry import create_model

    with torch.device("meta"):
        model = create_model(name, **kwargs)
    slim_copy(model, divisor)
    for module in model.modules():
        if any(t.is_meta for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))):
            module.to_empty(device="cpu", recurse=False)
            module.reset_parameters()
    return model


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Step 1: pixel-level classification
# ----------------------------------------------------------------------------------------------


def small_classifier(num_classes: int, patch: int = 32) -> nn.Sequential:
    """A small image classifier: three conv + pool stages to a 4x4x16 map, then one fully
    connected layer (``nn.Flatten`` + ``nn.Linear(4*4*16, num_classes)``) for ``patch`` = 32."""

    def stage(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]

    features = nn.Sequential(*stage(3, 16), *stage(16, 16), *stage(16, 16))
    side = patch // 8
    return nn.Sequential(features, nn.Flatten(1), nn.Linear(16 * side * side, num_classes))


def _patches(x: Tensor, n: Tensor, y: Tensor, x0: Tensor, patch: int) -> Tensor:
    """The ``patch`` x ``patch`` windows of the (zero = mean colour) padded batch ``x`` whose
    centres are pixels ``(y, x0)`` of images ``n``."""
    offsets = torch.arange(patch)
    rows = (y[:, None] + offsets)[:, :, None]
    cols = (x0[:, None] + offsets)[:, None, :]
    return x[n[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def pixel_classification(train: Scenes, val: Scenes, size: TutorialSize) -> tuple[Step, nn.Sequential]:
    """Step 1: dense prediction is a softmax over classes at every pixel (FCN Sec. 1 and 3.4).

    The classic way before FCN: train a classifier on the window around a pixel (its label is
    the centre pixel's class, "patchwise training", FCN Sec. 3.4; Ciresan et al. 2012) and slide
    it over the image, one forward pass per pixel. Returns the step and the trained classifier.
    """
    torch.manual_seed(1)
    patch, half = size.patch, size.patch // 2
    classifier = small_classifier(6, patch)
    padded = F.pad(train.x, (half, half, half, half))
    opt = torch.optim.Adam(classifier.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(1)
    n_img, height, width = train.masks.shape
    # Half the windows anywhere, half class-balanced: a rare class (a dot) is seen often enough
    # to be learned, and the background keeps its weight.
    by_class = [torch.nonzero(train.masks.flatten() == c).flatten() for c in range(6)]
    by_class = [c for c in by_class if len(c)]
    for _ in range(size.patch_iterations):
        anywhere = torch.randint(0, train.masks.numel(), (64,), generator=gen)
        picks = [by_class[c] for c in torch.randint(0, len(by_class), (64,), generator=gen).tolist()]
        balanced = torch.stack([c[torch.randint(0, len(c), (1,), generator=gen)][0] for c in picks])
        flat = torch.cat([anywhere, balanced])
        n, y, x0 = flat // (height * width), flat // width % height, flat % width
        loss = F.cross_entropy(classifier(_patches(padded, n, y, x0, patch)), train.masks[n, y, x0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    classifier.eval()

    @torch.no_grad()
    def slide(image: Tensor) -> Tensor:  # one window per pixel, in batches
        windows = F.unfold(F.pad(image[None], (half, half - 1, half, half - 1)), patch)[0].T
        windows = windows.reshape(-1, 3, patch, patch)
        return torch.cat([classifier(w).softmax(1) for w in windows.split(2048)]).T.reshape(6, height, width)

    probs, seconds = _timed(lambda: slide(val.x[0]))
    pred = probs.argmax(0)
    scores = _metrics(pred[None], val.masks[:1], 6, size.band)
    facts = dict(
        classes=len(SYNTHETIC_CLASS_NAMES),
        height=height,
        width=width,
        pixels=height * width,
        patch=patch,
        naive_seconds=seconds,
        naive_us_per_window=1e6 * seconds / (height * width),
        pixel_acc=scores["pixel_acc"],
        miou=scores["miou"],
        iterations=size.patch_iterations,
        train_images=n_img,
        prob_sum_error=float((probs.sum(0) - 1).abs().max()),
    )
    panels = dict(image=val.images[0], mask=val.masks[0].numpy(), probs=probs.numpy(), pred=pred.numpy())
    return Step(1, "pixel-level classification", facts, panels), classifier


# ----------------------------------------------------------------------------------------------
# Step 2: convolutionalization
# ----------------------------------------------------------------------------------------------


def convolutionalization(classifier: nn.Sequential, val: Scenes, size: TutorialSize) -> Step:
    """Step 2: the classifier's fully connected layer read as a convolution (FCN Sec. 3.1).

    :func:`densepred.convolutionalize` reshapes the ``Linear(4*4*16, C)`` weights into a 4x4
    ``Conv2d(16, C)``: the same parameters, the same outputs at the training size, and on a
    larger image one score vector per window, every 8 pixels: the heat map.
    """
    from .models.convolutionalize import convolutionalize
    from .models.layers import centre_geometry
    from .visualize import classifier_heatmap

    patch, half = size.patch, size.patch // 2
    lecture = small_classifier(10, patch)  # the lecture's example: 4x4x16 -> 10 classes
    lecture_twin = convolutionalize(lecture, (patch, patch))
    fc, conv = lecture[-1], lecture_twin[-1]
    twin = convolutionalize(classifier, (patch, patch)).eval()

    # The same windows through both nets: the trained classifier's patches around val pixels.
    gen = torch.Generator().manual_seed(2)
    padded = F.pad(val.x, (half, half, half, half))
    n = torch.randint(0, val.x.shape[0], (256,), generator=gen)
    y, x0 = (torch.randint(0, s, (256,), generator=gen) for s in val.masks.shape[1:])
    windows = _patches(padded, n, y, x0, patch)
    with torch.no_grad():
        features = classifier[0](windows).flatten(1)
        by_fc = classifier(windows)
        by_conv = twin(windows)
    diff = (by_fc - by_conv[:, :, 0, 0]).abs().double()
    bound = dot_rounding_bound(classifier[-1].weight.detach(), classifier[-1].bias.detach(), features)

    present = torch.bincount(val.masks[0].flatten(), minlength=6)[1:]
    cls = int(present.argmax()) + 1  # the shape class that covers most of the shown scene
    maps, seconds = _timed(lambda: classifier_heatmap(classifier, val.x[0], cls, (patch, patch)))
    stride, offset = centre_geometry(twin)
    facts = dict(
        fc_weights=fc.weight.numel(),
        fc_params=_count(fc),
        conv_weights=conv.weight.numel(),
        conv_params=_count(conv),
        fc_shape=" x ".join(map(str, fc.weight.shape)),
        conv_shape=" x ".join(map(str, conv.weight.shape)),
        ours_fc=_count(classifier[-1]),
        ours_conv=_count(twin[-1]),
        total_params=_count(classifier),
        twin_params=_count(twin),
        windows=len(windows),
        max_diff=float(diff.max()),
        bound_ratio=float((diff / bound).max()),  # <= 1: within float32 rounding of the head
        max_bound=float(bound.max()),
        stride=int(stride),
        centre=offset,
        grid=" x ".join(map(str, maps.coarse.shape)),
        grid_windows=maps.coarse.size,
        heat_seconds=seconds,
        heat_us_per_window=1e6 * seconds / maps.coarse.size,
        heat_class=SYNTHETIC_CLASS_NAMES[cls],
        patch=patch,
    )
    return Step(2, "convolutionalization", facts, dict(image=val.images[0], maps=maps, cls=cls))


# ----------------------------------------------------------------------------------------------
# Step 3: deconvolution
# ----------------------------------------------------------------------------------------------


def deconvolution(train: Scenes, val: Scenes, size: TutorialSize, factor: int = 8) -> Step:
    """Step 3: upsampling inside the net, by a transposed convolution (FCN Sec. 3.3).

    A fixed :class:`~densepred.BilinearDeconv` (kernel ``2 * factor``, stride ``factor``) is
    bilinear interpolation: its output, cropped by ``factor / 2``, equals
    ``F.interpolate(..., align_corners=False)`` wherever both neighbours of a pixel exist. A
    learnable one starts there and is trained, here to turn coarse class scores into labels.
    """
    from .models.layers import BilinearDeconv, bilinear_kernel

    half = factor // 2
    cls = int(torch.bincount(val.masks[0].flatten(), minlength=6)[1:].argmax()) + 1  # the scene's main shape
    coarse = F.avg_pool2d(F.one_hot(val.masks[:1], 6).permute(0, 3, 1, 2).float(), factor)
    fixed = BilinearDeconv(6, factor, learnable=False)
    with torch.no_grad():
        up = fixed(coarse)
    height, width = val.masks.shape[1:]
    cropped = up[..., half : half + height, half : half + width]
    reference = F.interpolate(coarse, scale_factor=factor, mode="bilinear", align_corners=False)
    # Interior: output pixels whose sampling point (o + 0.5) / factor - 0.5 lies between two cells.
    inner = slice(half, factor * coarse.shape[-1] - half)
    interior = (cropped - reference)[..., inner, inner].abs().max()
    border = (cropped - reference).abs().max()
    # Each output is a two-tap (per axis) convex blend: a few roundings of the largest input.
    tolerance = 16 * U32 * float(coarse.abs().max())

    # A learned upsampling: from coarse class frequencies to labels, initialised bilinear.
    torch.manual_seed(3)
    learned = BilinearDeconv(6, factor, learnable=True)
    scale = nn.Parameter(torch.tensor(1.0))  # the fixed layer's argmax does not depend on it
    opt = torch.optim.Adam([learned.weight, scale], 1e-2)
    inputs = F.avg_pool2d(F.one_hot(train.masks, 6).permute(0, 3, 1, 2).float(), factor)
    gen = torch.Generator().manual_seed(3)
    for _ in range(size.deconv_iterations):
        idx = torch.randint(0, len(inputs), (8,), generator=gen)
        logits = scale * learned(inputs[idx])[..., half : half + height, half : half + width]
        loss = F.cross_entropy(logits, train.masks[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    val_coarse = F.avg_pool2d(F.one_hot(val.masks, 6).permute(0, 3, 1, 2).float(), factor)
    with torch.no_grad():
        by_fixed = fixed(val_coarse)[..., half : half + height, half : half + width].argmax(1)
        by_learned = learned(val_coarse)[..., half : half + height, half : half + width].argmax(1)
    kernel = bilinear_kernel(1, 2 * factor)[0, 0]
    facts = dict(
        factor=factor,
        kernel_size=2 * factor,
        taps=", ".join(f"{round(float(v) * 2 * factor)}/{2 * factor}" for v in kernel.diagonal().sqrt()[:factor]),
        height=height,
        coarse_grid=" x ".join(map(str, coarse.shape[-2:])),
        out_size=up.shape[-1],
        crop=half,
        interior_diff=float(interior),
        border_diff=float(border),
        tolerance=tolerance,
        fixed_boundary=boundary_accuracy(by_fixed, val.masks, size.band),
        learned_boundary=boundary_accuracy(by_learned, val.masks, size.band),
        fixed_acc=float((by_fixed == val.masks).double().mean()),
        learned_acc=float((by_learned == val.masks).double().mean()),
        iterations=size.deconv_iterations,
        weight_change=float((learned.weight.detach() - fixed.weight).abs().max()),
        shown_class=SYNTHETIC_CLASS_NAMES[cls],
        kernel_gain=float(learned.weight.detach()[cls, cls].max() / fixed.weight[cls, cls].max()),
        cross_mean=float(learned.weight.detach()[0, cls].mean()),
    )
    panels = dict(
        kernel=kernel.numpy(),
        coarse=coarse[0, cls].numpy(),
        up=cropped[0, cls].numpy(),
        reference=reference[0, cls].numpy(),
        learned=learned.weight.detach()[cls, cls].numpy(),
        learned_cross=learned.weight.detach()[0, cls].numpy(),
        cls=cls,
    )
    return Step(3, "deconvolution", facts, panels)


# ----------------------------------------------------------------------------------------------
# Step 4: the skip architecture
# ----------------------------------------------------------------------------------------------


class _OnePass(nn.Module):
    """A backbone that computes once per input tensor: three FCNs sharing it cost one pass."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.inner = backbone
        self._input: Tensor | None = None
        self._output: Any = None

    def forward(self, x: Tensor) -> Any:
        if x is not self._input:
            self._input, self._output = x, self.inner(x)
        return self._output


@contextmanager
def _shared_backbone(nets: dict[str, nn.Module]) -> Iterator[None]:
    backbone = next(iter(nets.values())).backbone
    once = _OnePass(backbone)
    for net in nets.values():
        net.backbone = once
    try:
        yield
    finally:
        for net in nets.values():
            net.backbone = backbone


def _slim_fcns(size: TutorialSize, num_classes: int) -> dict[str, nn.Module]:
    """Slim FCN-32s, -16s and -8s that share their layers: FCN-16s is FCN-8s without the pool3
    skip, FCN-32s is it without both skips (the relation of the paper's stage-wise nets, Sec. 4.2)."""
    torch.manual_seed(4)
    fcn8s, fcn16s, fcn32s = (_slim_model(n, size.slim, num_classes=num_classes) for n in ("fcn8s", "fcn16s", "fcn32s"))
    for net in (fcn16s, fcn32s):
        for name in ("backbone", "fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "score_fr"):
            setattr(net, name, getattr(fcn8s, name))
    fcn16s.upscore2, fcn16s.score_pool4 = fcn8s.upscore2, fcn8s.score_pool4
    return {"fcn32s": fcn32s, "fcn16s": fcn16s, "fcn8s": fcn8s}


def skip_architecture(train: Scenes, val: Scenes, size: TutorialSize) -> tuple[Step, dict[str, nn.Module]]:
    """Step 4: FCN-32s, -16s and -8s trained on the same scenes (FCN Sec. 4.2, Fig. 3-4).

    The three slim nets share their layers and are trained together (the sum of their losses),
    so they differ only in the skips: what pool4 and pool3 add to the stride-32 scores. The
    question is *where* objects are (the five shapes merged into "object"): boundaries are what
    the skips are for, and the six-way shape question needs longer training than a tutorial has.
    Next to them, :func:`ideal_upsampled_labels` gives the best each stride could do.
    """
    from .zoo import summarize

    target, val_target = train.objects(), val.objects()
    nets = _slim_fcns(size, 2)
    params = list({id(p): p for net in nets.values() for p in net.parameters() if p.requires_grad}.values())
    opt = torch.optim.Adam(params, 1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (1 - i / size.fcn_iterations) ** 0.9)  # poly
    gen = torch.Generator().manual_seed(4)
    losses = []
    with _shared_backbone(nets):
        for net in nets.values():
            net.train()
        for _ in range(size.fcn_iterations):
            idx = torch.randint(0, len(target), (size.fcn_batch,), generator=gen)
            x, y = train.x[idx], target[idx]
            loss = sum(F.cross_entropy(net(x), y) for net in nets.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(float(loss.detach()) / len(nets))
        for net in nets.values():
            net.eval()
        with torch.no_grad():
            logits = {name: torch.cat([net(x) for x in val.x.split(8)]) for name, net in nets.items()}
    facts: dict[str, Any] = dict(
        iterations=size.fcn_iterations,
        batch=size.fcn_batch,
        train_images=len(target),
        val_images=len(val_target),
        size=size.image,
        slim=size.slim,
        band=size.band,
        first_loss=float(np.mean(losses[:10])),
        last_loss=float(np.mean(losses[-10:])),
        shared_params=sum(p.numel() for p in params),
    )
    preds = {}
    for name, lg in logits.items():
        preds[name] = lg.argmax(1)
        for key, value in _metrics(preds[name], val_target, 2, size.band).items():
            facts[f"{name}_{key}"] = value
        facts[f"{name}_params"] = _count(nets[name])
        facts[f"{name}_full_params"] = summarize(name, num_classes=2).params
    for stride in (32, 16, 8):
        ideal = ideal_upsampled_labels(val_target, 2, stride)
        facts[f"ideal{stride}_boundary"] = boundary_accuracy(ideal, val_target, size.band)
        facts[f"ideal{stride}_acc"] = float((ideal == val_target).double().mean())
    panels = dict(
        image=val.images[0],
        mask=val_target[0].numpy(),
        preds={k: v[0].numpy() for k, v in preds.items()},
        ideal={s: ideal_upsampled_labels(val_target[:1], 2, s)[0].numpy() for s in (32, 16, 8)},
        band=boundary_band(val_target[0], size.band),
        probs32=logits["fcn32s"].softmax(1),
    )
    return Step(4, "the skip architecture", facts, panels), nets


# ----------------------------------------------------------------------------------------------
# Step 5: what layers see
# ----------------------------------------------------------------------------------------------


def what_layers_see(fcn8s: nn.Module, val: Scenes, size: TutorialSize) -> Step:
    """Step 5: feature maps shallow to deep, with their measured strides (ZFNet Sec. 4; FCN Sec. 4.2).

    :func:`densepred.visualize.feature_maps` hooks the layers, keeps the strongest channels and
    measures each layer's stride from how its map grows with the input.
    """
    from .visualize import feature_maps

    layers = ["conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3", "fc7"]
    features = feature_maps(fcn8s, val.x[0], layers, top_k=6)
    full_width = {"conv1_2": 64, "conv2_2": 128, "conv3_3": 256, "conv4_3": 512, "conv5_3": 512, "fc7": 4096}
    rows = []
    for name, f in features.items():
        short = name.rsplit(".", 1)[-1]
        h, w = f.channels.shape[-2:]
        rows.append((short, f.num_channels, full_width[short], f"{w} x {h}", f.stride))
    facts = dict(
        rows=rows,
        strides=", ".join(f"{r[0]} {r[4]:g}" for r in rows),
        deepest_stride=rows[-1][4],
        size=size.image,
    )
    return Step(5, "what layers see", facts, dict(image=val.images[0], features=features))


# ----------------------------------------------------------------------------------------------
# Step 6: atrous convolution and the field of view
# ----------------------------------------------------------------------------------------------


def field_of_view(size: TutorialSize) -> Step:
    """Step 6: atrous convolution enlarges the field of view without parameters (DeepLab v1
    Sec. 3.1, Table 2; v2 Sec. 3.1-3.3).

    The receptive field of DeepLab-LargeFOV (fc6 3x3, dilation 12) and DeepLab-7x7 (fc6 7x7,
    dilation 4) is measured from input gradients on slim copies (the field depends on the graph
    only) and compared with what the registry declares; parameters are counted on the meta device.
    """
    from .models.deeplab import ASPP_RATES
    from .registry import create_model, model_entry
    from .zoo import summarize

    facts: dict[str, Any] = {}
    profiles = {}
    for name in ("deeplab_v1_largefov", "deeplab_v1_7x7"):
        key = "largefov" if name.endswith("largefov") else "fc7x7"
        torch.manual_seed(6)
        net = _theoretical(_slim_model(name, size.slim, num_classes=2))
        measured, seconds = _timed(lambda net=net: receptive_field(net.coarse_logits, 3, 33, size.rf_width))
        with torch.device("meta"):
            full = create_model(name, num_classes=21)
        fc6 = full.head.fc6
        facts.update(
            {
                f"{key}_rf": measured,
                f"{key}_declared": model_entry(name).receptive_field,
                f"{key}_params": summarize(name, num_classes=21).params,
                f"{key}_fc6_params": _count(fc6),
                f"{key}_fc6_kernel": fc6.kernel_size[0],
                f"{key}_fc6_dilation": fc6.dilation[0],
                f"{key}_fc6_width": fc6.out_channels,
                f"{key}_fc6_span": (fc6.kernel_size[0] - 1) * fc6.dilation[0] + 1,
                f"{key}_seconds": seconds,
            }
        )
        profiles[key] = _gradient_profile(net.coarse_logits, measured)
    facts["ratio"] = facts["fc7x7_params"] / facts["largefov_params"]
    facts["rf_difference"] = facts["largefov_rf"] - facts["fc7x7_rf"]
    facts["fc6_ratio"] = facts["fc7x7_fc6_params"] / facts["largefov_fc6_params"]
    rates = ASPP_RATES["L"]
    facts["rates"] = ", ".join(map(str, rates))
    facts["tap_offsets"] = ", ".join(str(8 * r) for r in rates)
    facts["aspp_image"] = size.aspp_image
    facts["aspp_rf"] = model_entry("deeplab_v2_vgg16").receptive_field
    scene = synthetic_scenes("val", 1, size.aspp_image, seed=1)
    return Step(
        6,
        "atrous convolution and the field of view",
        facts,
        dict(image=scene.images[0], rates=rates, profiles=profiles),
    )


def _gradient_profile(score_map: Callable[[Tensor], Tensor], field: int) -> np.ndarray:
    """|d output / d input| of the centre output along the width, on an input twice its field."""
    width = 2 * field + 64
    x = torch.randn(1, 3, 33, width, requires_grad=True)
    out = score_map(x)
    out[..., out.shape[-2] // 2, out.shape[-1] // 2].sum().backward()
    return x.grad.abs().sum(dim=(0, 1, 2)).numpy()


# ----------------------------------------------------------------------------------------------
# Step 7: the fully-connected CRF
# ----------------------------------------------------------------------------------------------


def fully_connected_crf(fcn32s: nn.Module, train: Scenes, val: Scenes, size: TutorialSize) -> Step:
    """Step 7: the fully-connected CRF sharpens a coarse net's boundaries (DeepLab v1 Sec. 4).

    Its input is FCN-32s's softmax (the coarsest output of step 4). As DeepLab cross-validated
    ``w1``, ``theta_alpha`` and ``theta_beta`` on held-out images (v1 Sec. 4.1), a small grid
    is searched on training scenes (``w2 = 3``, ``theta_gamma = 3`` as in the paper); the val
    scenes are scored once, before and after.
    """
    from .crf import CRFParams, dense_crf

    def probs(scenes: Scenes) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([fcn32s(x).softmax(1) for x in scenes.x.split(8)]).numpy()

    def refine(scenes: Scenes, p: np.ndarray, params: CRFParams) -> Tensor:
        labels = [dense_crf(im, q, params).argmax(0) for im, q in zip(scenes.images, p, strict=True)]
        return torch.from_numpy(np.stack(labels))

    tune = Scenes(*(a[: size.crf_tuning_images] for a in (train.images, train.x, train.masks)))
    tune_probs, tune_target = probs(tune), tune.objects()
    grid = [
        CRFParams(w1=w1, theta_alpha=a, theta_beta=b, w2=3, theta_gamma=3, iterations=10)
        for w1 in (3, 5, 10)
        for a in (10, 30, 80)
        for b in (5, 13, 30)
    ]

    # The boundary band is where a CRF can help or hurt; whole-image accuracy breaks ties.
    def score(params: CRFParams) -> tuple[float, float]:
        pred = refine(tune, tune_probs, params)
        return boundary_accuracy(pred, tune_target, size.band), float((pred == tune_target).double().mean())

    (best, tuning_seconds) = _timed(lambda: max(grid, key=score))
    val_probs, target = probs(val), val.objects()
    before = torch.from_numpy(val_probs.argmax(1))
    after, seconds = _timed(lambda: refine(val, val_probs, best))
    facts: dict[str, Any] = dict(
        w1=best.w1,
        theta_alpha=best.theta_alpha,
        theta_beta=best.theta_beta,
        w2=best.w2,
        theta_gamma=best.theta_gamma,
        iterations=best.iterations,
        grid=len(grid),
        tuning_images=len(tune_target),
        tuning_seconds=tuning_seconds,
        crf_seconds=seconds / len(target),
        val_images=len(target),
        band=size.band,
    )
    for name, pred in (("before", before), ("after", after)):
        for key, value in _metrics(pred, target, 2, size.band).items():
            facts[f"{name}_{key}"] = value
    # The figure shows the scene of the median change: neither the best case nor the worst.
    gains = [
        boundary_accuracy(after[i], target[i], size.band) - boundary_accuracy(before[i], target[i], size.band)
        for i in range(len(target))
    ]
    k = int(np.argsort(gains, kind="stable")[len(gains) // 2])
    facts["shown_scene"] = k
    q = dense_crf(val.images[k], val_probs[k], best)
    panels = dict(
        image=val.images[k],
        mask=target[k].numpy(),
        before=val_probs[k][1],
        after=q[1],
        band=boundary_band(target[k], size.band),
    )
    return Step(7, "the fully-connected CRF", facts, panels)


# ----------------------------------------------------------------------------------------------
# Step 8: U-Net
# ----------------------------------------------------------------------------------------------


def _cell_mask(side: int, cells: int, seed: int) -> np.ndarray:
    """A toy cell mask (ISBI 2012 convention: 0 background, 1 cell): Voronoi cells of random
    seeds, each shrunk by its own 0.5-6 pixels, so that some neighbours nearly touch and others
    lie far apart, as the HeLa cells of U-Net's Fig. 3."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, side, size=(cells, 2))
    yy, xx = np.mgrid[0:side, 0:side]
    label = ((yy[..., None] - points[:, 0]) ** 2 + (xx[..., None] - points[:, 1]) ** 2).argmin(-1)
    inside = ndimage.distance_transform_edt(~boundary_band(label, 0))  # distance to the cell's border
    shrink = rng.uniform(0.5, 6.0, size=cells)
    return (inside > shrink[label]).astype(np.uint8)


def unet_tiles(size: TutorialSize) -> Step:
    """Step 8: U-Net's valid convolutions, overlap-tile and weight map (Ronneberger et al. 2015,
    Sec. 2 Fig. 1-2, Sec. 3 Eq. 2).

    An untrained narrow U-Net (the geometry does not depend on the widths) records its map
    sizes for one tile; overlap-tile inference of an image larger than the tile is checked
    against one pass over the whole mirrored image (in float64, so that the two agree to
    float32 rounding); the border weight map is drawn for a toy cell mask.
    """
    from .inference import mirror_pad, overlap_tile
    from .losses import unet_weight_map
    from .models.base import input_rule_of
    from .registry import create_model
    from .zoo import summarize

    torch.manual_seed(8)
    net = create_model("unet", num_classes=2, in_channels=1, base_channels=size.unet_width).eval()
    trace: list[tuple[str, int]] = []
    hooks = [m.register_forward_hook(_size_hook(trace, n)) for n, m in net.named_modules() if _traced(n)]
    tile = size.unet_tile
    with torch.no_grad():
        out = net(torch.zeros(1, 1, tile, tile))
    for h in hooks:
        h.remove()
    rule = input_rule_of(net)
    scene = synthetic_scenes("val", 1, size.unet_image, seed=8)
    gray = torch.from_numpy(scene.images[0].mean(-1, dtype=np.float32) / 255.0)[None, None]
    net = net.double()
    stitched, tiled_seconds = _timed(lambda: overlap_tile(net, gray.double(), tile))
    out_tile = tile - rule.shrink
    step = out_tile // rule.step * rule.step
    count = math.ceil(max(0, size.unet_image - out_tile) / step) + 1
    extent = (count - 1) * step + out_tile
    margin = rule.shrink // 2
    whole_in = mirror_pad(
        gray.double(), margin, margin + extent - size.unet_image, margin, margin + extent - size.unet_image
    )
    with torch.no_grad():
        whole = net(whole_in)[..., : size.unet_image, : size.unet_image]
    diff = float((stitched.double() - whole).abs().max())
    ulp = float(whole.abs().max()) * 2 * U32  # one float32 unit in the last place of the largest logit

    mask = _cell_mask(size.cells, max(4, size.cells // 8), seed=8)
    weights = unet_weight_map(mask)
    gaps = (mask == 0) & (weights > 0)
    facts = dict(
        tile=tile,
        out_tile=int(out.shape[-1]),
        shrink=rule.shrink,
        margin=margin,
        trace=trace,
        first_valid=rule.first,
        valid_step=rule.step,
        image=size.unet_image,
        tiles=count * count,
        tile_step=step,
        padded=int(whole_in.shape[-1]),
        max_diff=diff,
        ulp=ulp,
        tiled_seconds=tiled_seconds,
        w0=10.0,
        sigma=5.0,
        max_weight=float(weights.max()),
        membrane_weight=float(np.median(weights[gaps])) if gaps.any() else float("nan"),
        cell_weight=float(np.median(weights[mask == 1])),
        cells=size.cells,
        params=summarize("unet", num_classes=2, in_channels=1).params,
    )
    panels = dict(
        image=scene.images[0],
        margin=margin,
        tile=tile,
        out_tile=out_tile,
        step=step,
        count=count,
        mask=mask,
        weights=weights,
        stitched=stitched[0, 1].numpy(),
    )
    return Step(8, "U-Net: valid convolutions and overlap-tile", facts, panels)


def _traced(name: str) -> bool:
    # The levels of Fig. 1: each double convolution, each pooling output, each up-convolution.
    return name.count(".") == 1 and name.split(".")[0] in ("down", "up", "dec") or name in ("pool", "final")


def _size_hook(trace: list[tuple[str, int]], name: str) -> Callable[..., None]:
    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        trace.append((name, int(output.shape[-1])))

    return hook


# ----------------------------------------------------------------------------------------------
# The whole tutorial
# ----------------------------------------------------------------------------------------------


def _fastest_threads(size: TutorialSize) -> tuple[int, dict[int, float]]:
    """The intra-op thread count that runs a training step of step 4's slim FCN-8s fastest here.

    The tutorial's layers are narrow: a second thread gains little on an idle machine, and on a
    busy one every operation waits for whichever thread lost its core (3x slower, measured on a
    shared 2-core CPU). So the run measures both and keeps the faster (STYLE: chosen by what the
    machine measures, not by what the author's had).
    """
    default = torch.get_num_threads()
    candidates = sorted({1, default})
    if len(candidates) == 1:
        return default, {}
    net = _slim_model("fcn8s", size.slim, num_classes=2)
    x = torch.randn(size.fcn_batch, 3, size.image, size.image)
    y = torch.randint(0, 2, (size.fcn_batch, size.image, size.image))
    seconds: dict[int, float] = {}
    try:
        for threads in candidates:
            torch.set_num_threads(threads)
            times = []
            for _ in range(3):  # the first pays for kernel selection
                t = time.perf_counter()
                F.cross_entropy(net(x), y).backward()
                times.append(time.perf_counter() - t)
            seconds[threads] = min(times[1:])
    finally:
        torch.set_num_threads(default)
    return min(seconds, key=seconds.get), seconds


@dataclass
class TutorialResult:
    """What :func:`run_tutorial` wrote and measured."""

    steps: list[Step]
    files: list[Path]
    seconds: float
    machine: str


def run_tutorial(
    out: str | Path = "docs", *, size: TutorialSize = FULL, progress: Callable[[str], None] | None = print
) -> TutorialResult:
    """Run the eight steps, draw their figures under ``out/tutorial/`` and write
    ``out/tutorial.md`` and ``out/tutorial.ko.md`` with the numbers of this run.

    Deterministic seeds throughout; the numbers still hold for this machine's arithmetic only
    (threads and vector units change float rounding and so training), so the text names it.
    The run uses the thread count it measures fastest (see :func:`_fastest_threads`).
    """
    start = time.perf_counter()
    out = Path(out)
    (out / "tutorial").mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _line: None)
    default_threads = torch.get_num_threads()
    threads, measured = _fastest_threads(size)
    if measured:
        times = ", ".join(f"{n} thread{'s' * (n > 1)} {t:.2f} s" for n, t in measured.items())
        say(f"threads: {threads} (one training step of the slim FCN-8s: {times})")
    torch.set_num_threads(threads)
    try:
        return _run_steps(out, size, say, start)
    finally:
        torch.set_num_threads(default_threads)


def _run_steps(out: Path, size: TutorialSize, say: Callable[[str], None], start: float) -> TutorialResult:
    from . import tutorial_figures as figures
    from .precision import machine_info

    steps: list[Step] = []

    def run(fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        value = fn()
        step = value[0] if isinstance(value, tuple) else value
        step.seconds = time.perf_counter() - t
        steps.append(step)
        say(f"step {step.number}/8  {step.title}: {step.seconds:.1f} s")
        return value

    t = time.perf_counter()
    train = synthetic_scenes("train", size.train_images, size.image)
    val = synthetic_scenes("val", size.val_images, size.image)
    say(f"data: {size.train_images} + {size.val_images} scenes of {size.image} px: {time.perf_counter() - t:.1f} s")
    _, classifier = run(lambda: pixel_classification(train, val, size))
    run(lambda: convolutionalization(classifier, val, size))
    run(lambda: deconvolution(train, val, size))
    _, nets = run(lambda: skip_architecture(train, val, size))
    run(lambda: what_layers_see(nets["fcn8s"], val, size))
    run(lambda: field_of_view(size))
    run(lambda: fully_connected_crf(nets["fcn32s"], train, val, size))
    run(lambda: unet_tiles(size))

    t = time.perf_counter()
    files = [figures.draw(step, out / "tutorial") for step in steps]
    say(f"figures: {len(files)} PNGs in {out / 'tutorial'}: {time.perf_counter() - t:.1f} s")
    seconds = time.perf_counter() - start
    machine = machine_info().line()
    for lang, name in (("en", "tutorial.md"), ("ko", "tutorial.ko.md")):
        path = out / name
        path.write_text(render_text(steps, lang, seconds=seconds, machine=machine, size=size), encoding="utf-8")
        files.append(path)
    say(f"wrote {out / 'tutorial.md'} and {out / 'tutorial.ko.md'}: {seconds:.0f} s in all")
    return TutorialResult(steps, files, seconds, machine)


# ----------------------------------------------------------------------------------------------
# The text: one template per edition, filled with the measured facts
# ----------------------------------------------------------------------------------------------


def _better(after: float, before: float, lang: str, *, eps: float = 5e-4) -> str:
    """The comparison word for two measured numbers: a sentence never claims what they contradict."""
    words = {
        "en": ("rises", "stays the same", "falls"),
        "ko": ("높아졌습니다", "거의 변하지 않았습니다", "낮아졌습니다"),
    }[lang]
    return words[0] if after > before + eps else words[2] if after < before - eps else words[1]


def _rising(values: list[float], lang: str, *, trained: bool) -> str:
    """Whether ``values`` (stride 32, 16, 8) rise at every step, in words."""
    rising = all(b > a for a, b in zip(values, values[1:], strict=False))
    if lang == "en":
        if not trained:
            return "rises as the stride shrinks" if rising else "does not rise at every stride"
        return "rises at every skip" if rising else "does not rise at every skip in this short run"
    if not trained:
        return (
            "정확한 점수로 계산하면 스트라이드가 촘촘해질수록 경계 정확도가 올라갑니다."
            if rising
            else "정확한 점수로 계산해도 스트라이드마다 경계 정확도가 오르지는 않습니다."
        )
    return (
        "학습한 신경망도 건너뛰기 연결을 하나 더할 때마다 경계 정확도가 올라갑니다."
        if rising
        else "학습한 신경망의 경계 정확도는 이 짧은 학습에서 건너뛰기 연결마다 오르지는 않았습니다."
    )


_HEADERS = {
    "en": dict(
        fcn=("net", "output stride", "mIoU", "pixel acc.", "boundary acc.", "exact scores upsampled: boundary acc."),
        layers=("layer", "channels (slim / VGG16)", "map (W x H)", "stride, measured"),
        fov=("", "DeepLab-LargeFOV", "DeepLab-7x7"),
        fov_rows=(
            "fc6 kernel, dilation, channels",
            "fc6 span (cells of the stride-8 map)",
            "fc6 parameters",
            "parameters (21 classes)",
            "receptive field, measured",
            "receptive field, registry",
        ),
        crf=("", "pixel acc.", "mIoU", "boundary acc."),
        crf_rows=("FCN-32s softmax", "after the CRF"),
        trace=("layer (U-Net Fig. 1)", "side (px)"),
    ),
    "ko": dict(
        fcn=("모델", "출력 스트라이드", "mIoU", "픽셀 정확도", "경계 정확도", "정확한 점수를 업샘플링: 경계 정확도"),
        layers=("층", "채널 (슬림 / VGG16)", "맵 (W x H)", "측정한 스트라이드"),
        fov=("", "DeepLab-LargeFOV", "DeepLab-7x7"),
        fov_rows=(
            "fc6 커널, 확장률, 채널",
            "fc6이 걸치는 폭 (스트라이드 8 맵의 셀)",
            "fc6 매개변수",
            "매개변수 (21개 클래스)",
            "수용 영역, 측정값",
            "수용 영역, 레지스트리",
        ),
        crf=("", "픽셀 정확도", "mIoU", "경계 정확도"),
        crf_rows=("FCN-32s 소프트맥스", "CRF 적용 후"),
        trace=("층 (U-Net 그림 1)", "한 변 (px)"),
    ),
}


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _tables(f: dict[int, dict[str, Any]], lang: str) -> dict[str, str]:
    h = _HEADERS[lang]
    s4, s6, s7, s8 = f[4], f[6], f[7], f[8]
    fcn = [
        (
            f"FCN-{k}s",
            k,
            f"{s4[f'fcn{k}s_miou']:.3f}",
            f"{s4[f'fcn{k}s_pixel_acc']:.3f}",
            f"{s4[f'fcn{k}s_boundary_acc']:.3f}",
            f"{s4[f'ideal{k}_boundary']:.3f}",
        )
        for k in (32, 16, 8)
    ]
    layers = [(f"`{n}`", f"{c} / {full}", m, f"{st:g}") for n, c, full, m, st in f[5]["rows"]]
    fov = []
    for i, label in enumerate(h["fov_rows"]):
        cells = []
        for key in ("largefov", "fc7x7"):
            values = (
                f"{s6[key + '_fc6_kernel']}x{s6[key + '_fc6_kernel']}, {s6[key + '_fc6_dilation']}, "
                f"{s6[key + '_fc6_width']:,}",
                f"{s6[key + '_fc6_span']}",
                f"{s6[key + '_fc6_params']:,}",
                f"{s6[key + '_params']:,}",
                f"{s6[key + '_rf']} px",
                f"{s6[key + '_declared']} px",
            )
            cells.append(values[i])
        fov.append((label, *cells))
    crf = [
        (label, *(f"{s7[f'{when}_{m}']:.3f}" for m in ("pixel_acc", "miou", "boundary_acc")))
        for label, when in zip(h["crf_rows"], ("before", "after"), strict=True)
    ]
    trace = [(f"`{name}`", side) for name, side in [("input", s8["tile"]), *s8["trace"]]]
    return dict(
        fcn=_table(h["fcn"], fcn),
        layers=_table(h["layers"], layers),
        fov=_table(h["fov"], fov),
        crf=_table(h["crf"], crf),
        trace=_table(h["trace"], trace),
    )


def render_text(steps: list[Step], lang: str, *, seconds: float, machine: str, size: TutorialSize = FULL) -> str:
    """One edition of the tutorial (``lang`` "en" or "ko") with ``steps``' measured facts filled in."""
    if lang not in _TEMPLATES:
        raise ValueError(f"unknown edition {lang!r}; editions: {', '.join(_TEMPLATES)}")
    f = {s.number: s.facts for s in steps}
    if sorted(f) != list(range(1, 9)):
        raise ValueError(f"render_text needs the eight steps, got {sorted(f)}")
    s3, s4, s7 = f[3], f[4], f[7]
    verdict = dict(
        deconv=_better(s3["learned_boundary"], s3["fixed_boundary"], lang),
        trained=_rising([s4[f"fcn{k}s_boundary_acc"] for k in (32, 16, 8)], lang, trained=True),
        ideal=_rising([s4[f"ideal{k}_boundary"] for k in (32, 16, 8)], lang, trained=False),
        crf=_better(s7["after_boundary_acc"], s7["before_boundary_acc"], lang),
        crf_pixels=_better(s7["after_pixel_acc"], s7["before_pixel_acc"], lang),
        cross=("negative" if s3["cross_mean"] < 0 else "positive")
        if lang == "en"
        else ("음수" if s3["cross_mean"] < 0 else "양수"),
    )
    timings = dict(total=seconds, **{f"s{s.number}": s.seconds for s in steps})
    return _TEMPLATES[lang].format(
        s1=f[1], s2=f[2], s3=s3, s4=s4, s5=f[5], s6=f[6], s7=s7, s8=f[8],
        v=verdict, t=_tables(f, lang), time=timings, machine=machine,
        command="densepred tutorial --out docs" if size == FULL else "densepred tutorial --tiny",
    )  # fmt: skip


_EN = """\
# Dense prediction, step by step

*Generated by `{command}`: every number and figure below was computed by that command, on
{machine}, in {time[total]:.0f} s. Korean edition: [tutorial.ko.md](tutorial.ko.md).*

Semantic segmentation gives every pixel a class: it is *dense prediction*. This walk-through
follows a course's order (FCN, then DeepLab, then U-Net) and makes each idea visible with
densepred's own code on its built-in synthetic scenes: six classes (background, disk, square,
triangle, ring, and a *dot*, a small disk lying on a square) whose colours and textures all come
from one distribution, so that only shape and context tell them apart. Seeds are fixed; a
different CPU or thread count rounds differently, so its trained numbers differ a little.

## 1. Pixel-level classification

A classifier maps an image to C class scores; a dense predictor maps an H x W image to
H x W x C scores. A softmax over the C scores *at each pixel* turns them into a probability
distribution, the label map is the per-pixel argmax, and training minimises the per-pixel
cross-entropy averaged over the pixels (FCN Sec. 3).

The most direct way to get there is to classify the window around every pixel: train a
classifier on {s1[patch]}x{s1[patch]} windows labelled with their centre pixel's class
("patchwise training", FCN Sec. 3.4), then slide it over the image. Here a small classifier
(three conv + pool stages, then one fully connected layer) is trained for {s1[iterations]} steps
of 128 windows from {s1[train_images]} scenes, and slid over a {s1[width]}x{s1[height]}
validation scene: {s1[pixels]:,} forward passes, **{s1[naive_seconds]:.1f} s**.

```python
from densepred.tutorial import small_classifier
classifier = small_classifier(num_classes=6)     # 32x32 window -> 4x4x16 map -> Linear(256, 6)
probs = classifier(windows).softmax(1)            # one window per pixel: ({s1[pixels]}, 6), rows sum to 1
labels = probs.argmax(1).reshape({s1[height]}, {s1[width]})
```

![per-pixel softmax](tutorial/01_pixels.png)

The six probability maps sum to 1 at every pixel (largest error {s1[prob_sum_error]:.0e}). On
this scene the pixel accuracy is {s1[pixel_acc]:.2f} but the mean IoU only {s1[miou]:.2f}:
most background is right, the shapes are often confused, because a 32-pixel window sees only
part of a shape. Two problems to solve: the cost (one pass per pixel) and the context.

## 2. Convolutionalization: the classifier as a fully convolutional net

"Fully connected layers can also be viewed as convolutions with kernels that cover their entire
input regions" (FCN Sec. 3.1). The lecture's example: a 4x4x16 feature map scored into 10
classes by a fully connected layer with 4x4x16x10 = **{s2[fc_weights]:,}** weights (shape
{s2[fc_shape]}). Its convolutional twin is a 4x4 convolution from 16 to 10 channels, whose kernel
({s2[conv_shape]}) holds **{s2[conv_weights]:,}** weights: the same numbers, reshaped
({s2[fc_params]:,} = {s2[conv_params]:,} with the biases).

```python
import densepred
lecture = small_classifier(num_classes=10)
twin = densepred.convolutionalize(lecture, input_size=(32, 32))   # Flatten + Linear -> Conv2d(16, 10, 4)
lecture[-1].weight.numel(), twin[-1].weight.numel()               # {s2[fc_weights]}, {s2[conv_weights]}
```

The trained classifier of step 1 becomes a fully convolutional net with the same
{s2[total_params]:,} parameters ({s2[ours_fc]:,} in the scoring layer either way). At the
training size it computes the same scores: over {s2[windows]} validation windows the largest
difference is {s2[max_diff]:.1e}, at most {s2[bound_ratio]:.2f} of the float32 rounding bound of
the two 256-term dot products (2 gamma_n sum |w x|): equal up to rounding. On a larger image
the twin slides: the {s1[width]}x{s1[height]} scene, zero-padded by 100 pixels as FCN does,
gives a {s2[grid]} grid of score vectors, one window every {s2[stride]} pixels, in
**{s2[heat_seconds]:.3f} s**: {s2[heat_us_per_window]:.0f} µs per window, where step 1's loop
spent {s1[naive_us_per_window]:.0f} µs on each: overlapping windows share their computation.
The class map over the image is the *heat map* (FCN Fig. 2).

```python
from densepred.visualize import classifier_heatmap, plot_heatmaps
maps = classifier_heatmap(classifier, image, class_index, input_size=(32, 32))
```

![heat map](tutorial/02_heatmap.png)

## 3. Deconvolution: upsampling inside the net

The heat map has one score per {s2[stride]} pixels (32 for VGG16). FCN upsamples inside the
net with a transposed convolution ("deconvolution", Sec. 3.3) of stride f, initialised to
bilinear interpolation; the last one is kept fixed. Its 2f x 2f kernel is the outer product of a
triangle: for f = {s3[factor]}, the taps {s3[taps]} and back down.

```python
from densepred import BilinearDeconv
import torch.nn.functional as F
up = BilinearDeconv(channels=6, factor=8, learnable=False)   # ConvTranspose2d(6, 6, 16, stride=8)
h, c = {s3[height]}, {s3[crop]}                                  # crop f/2 = {s3[crop]} of {s3[out_size]} px
fine = up(coarse)[..., c:c + h, c:c + h]
ref = F.interpolate(coarse, scale_factor=8, mode="bilinear", align_corners=False)
```

On the interior (each pixel whose sampling point lies between two score cells) the two agree:
max |fine - ref| = **{s3[interior_diff]:.1g}** (the float32 rounding tolerance is
{s3[tolerance]:.1g}; with f a power of two the weights are exact binary fractions). At the
border they differ, by up to {s3[border_diff]:.2f}: `F.interpolate` repeats the edge cell, while
only one cell's kernel reaches the border pixels of the transposed convolution, so it fades.

"The deconvolution filter in such a layer need not be fixed ... but can be learned" (Sec. 3.3).
A learnable one, started at bilinear and trained for {s3[iterations]} steps to turn the exact
stride-8 class frequencies of training scenes into labels: on the validation scenes the boundary
accuracy {v[deconv]}, {s3[fixed_boundary]:.3f} -> {s3[learned_boundary]:.3f} (pixel accuracy
{s3[fixed_acc]:.4f} -> {s3[learned_acc]:.4f}). In the figure, the kernel from a class to itself
keeps its bilinear shape, scaled by {s3[kernel_gain]:.1f} (a sharper softmax), and the kernel
from background to that class, zero at the start, has become {v[cross]} on average: nearby
background now lowers the class's score, a competition between classes that a fixed bilinear
layer cannot express.

![deconvolution](tutorial/03_deconvolution.png)

## 4. The skip architecture: FCN-32s, -16s and -8s

FCN-32s upsamples the stride-32 scores in one step. FCN-16s adds scores predicted from pool4
(stride 16) to the stride-32 scores upsampled 2x; FCN-8s adds pool3's (stride 8) as well, "to
combine what and where" (Sec. 4.2, Fig. 3). The three nets here are slim copies of densepred's
`fcn32s`, `fcn16s` and `fcn8s`: the same graphs (kernels, strides, crops, conv1_1's padding of
100) with 1/{s4[slim]} of the channels, {s4[fcn32s_params]:,} / {s4[fcn16s_params]:,} /
{s4[fcn8s_params]:,} parameters instead of {s4[fcn32s_full_params]:,} /
{s4[fcn16s_full_params]:,} / {s4[fcn8s_full_params]:,}. Without ImageNet weights, six-way shape
recognition from scratch takes far longer than a tutorial, so these answer *where* the objects
are: the five shapes are merged into one class, "object". The nets share their layers (FCN-16s
is FCN-8s without the pool3 skip, FCN-32s without both skips, as the paper's stage-wise nets
start from one another) and are trained together on the sum of their losses: {s4[iterations]}
Adam steps of batch {s4[batch]} on {s4[train_images]} scenes of {s4[size]} px, poly lr from
1e-3, loss {s4[first_loss]:.2f} -> {s4[last_loss]:.2f}.

```python
from densepred.tutorial import slim_copy
fcn8s = slim_copy(densepred.create_model("fcn8s", num_classes=2), divisor=16)
```

*Boundary accuracy* is the pixel accuracy over the pixels within {s4[band]} px of a
ground-truth class boundary. The last column needs no training: it is what the fixed bilinear
upsampling makes of the *true* class frequencies of each s x s cell
(`densepred.tutorial.ideal_upsampled_labels`), the cost of the output stride alone.
Scores over {s4[val_images]} validation scenes:

{t[fcn]}

With exact scores, boundary accuracy {v[ideal]}; the trained nets' boundary accuracy
{v[trained]}. A net can do better than the exact-frequency column (its coarse scores need not be
block averages), but the finer the stride, the more of each boundary it can place.

![FCN-32s, 16s, 8s](tutorial/04_skips.png)

## 5. What layers see

The trained slim FCN-8s of step 4, layer by layer, each row showing the strongest channels
(Zeiler & Fergus 2014, Sec. 4): shallow layers answer edges and colours at full resolution;
deep ones answer larger parts on a coarse grid. The strides are measured, not looked up:
`feature_maps` runs the net again on an input 64 px larger and sees how much each map grows.

```python
from densepred.visualize import feature_maps, plot_feature_grid
features = feature_maps(fcn8s, image, ["conv1_2", "conv3_3", "conv5_3", "fc7"], top_k=6)
features["fc7"].stride                                    # {s5[deepest_stride]:g}
```

{t[layers]}

![feature maps](tutorial/05_features.png)

Fine maps know *where*, coarse maps know *what*: the trade-off the skips of step 4 resolve.

## 6. Atrous convolution and the field of view

DeepLab (v1 Sec. 3.1) keeps VGG16 at stride 8 (pool4 and pool5 of stride 1, conv5 dilated by
2) and makes fc6 an *atrous* (dilated) convolution: a k x k kernel with dilation d spreads its
taps d cells apart and spans (k - 1) d + 1 cells, with no more weights. DeepLab-LargeFOV's fc6
is 3x3 with dilation 12; the 7x7 fc6 of DeepLab-7x7 (dilation 4) spans as much with
{s6[fc6_ratio]:.0f}x the weights (v1 Table 2).

{t[fov]}

```python
densepred.model_entry("deeplab_v1_largefov").receptive_field   # {s6[largefov_declared]}
```

The receptive field is measured as the support of the input gradient of one output, on slim
copies with the max-poolings replaced by average poolings (a max passes the gradient to one
pixel per window): {s6[largefov_rf]} px and {s6[fc7x7_rf]} px, what the registry declares.
Both fc6 span {s6[largefov_fc6_span]} cells; LargeFOV sees {s6[rf_difference]} px more because
the released net averages pool5 over 3x3 (`pool5a`) first. For {s6[ratio]:.1f}x fewer parameters, the same field
of view.

ASPP (DeepLab v2, Sec. 3.3) runs four such 3x3 branches in parallel, at rates {s6[rates]}, and
sums their scores: on the image, the taps of a branch are 8 r pixels apart ({s6[tap_offsets]}
px), so one layer looks at the object and at its surroundings at several scales. On a
{s6[aspp_image]} px image the outer taps of rate 24 fall outside the image and read the padding
(DeepLab v3, Sec. 3.3, notes the loss of valid weights at large rates). ASPP-L on VGG16 sees
{s6[aspp_rf]} px.

![atrous convolution, ASPP](tutorial/06_field_of_view.png)

## 7. The fully-connected CRF

A stride-8 or stride-32 net gives smooth, blurred boundaries. DeepLab (v1 Sec. 4) refines them
with a fully-connected CRF (Krähenbühl & Koltun 2011): the unary term is -log P from the net;
every pair of pixels is linked by a Potts term weighted by two Gaussian kernels, an appearance
kernel w1 exp(-|p_i - p_j|^2 / 2 theta_alpha^2 - |I_i - I_j|^2 / 2 theta_beta^2), which
pulls pixels of similar colour to the same label, and a smoothness kernel
w2 exp(-|p_i - p_j|^2 / 2 theta_gamma^2); mean-field inference on the permutohedral lattice
makes it linear in the pixels.

The input here is FCN-32s's softmax from step 4, the coarsest. As DeepLab did, w1, theta_alpha
and theta_beta are chosen by cross-validation: a grid of {s7[grid]} settings on
{s7[tuning_images]} training scenes (w2 = 3, theta_gamma = 3, as in the paper), picked by
boundary accuracy; the validation scenes are scored once.

```python
from densepred.crf import CRFParams, dense_crf
params = CRFParams(w1={s7[w1]:g}, theta_alpha={s7[theta_alpha]:g}, theta_beta={s7[theta_beta]:g},
                   w2=3, theta_gamma=3, iterations=10)
refined = dense_crf(image, probs, params)     # uint8 (H, W, 3) image, (C, H, W) probabilities
```

{t[crf]}

Over {s7[val_images]} validation scenes, with the CRF the boundary accuracy {v[crf]} and the
pixel accuracy {v[crf_pixels]} ({s7[crf_seconds]:.2f} s per {s4[size]} px scene). The figure
shows the scene whose change is the median of the {s7[val_images]} (not the best case) and follows
one row across its boundaries, before and after.

![CRF](tutorial/07_crf.png)

## 8. U-Net: valid convolutions, overlap-tile, the weight map

U-Net (Ronneberger et al. 2015, Sec. 2, Fig. 1) uses only unpadded ("valid") 3x3 convolutions:
each loses a one-pixel border, so a {s8[tile]} x {s8[tile]} tile gives a
{s8[out_tile]} x {s8[out_tile]} output, {s8[shrink]} px less ({s8[margin]} px of context on each
side). The sides, recorded by hooks on the real net (narrow widths, the same geometry):

{t[trace]}

Only sides {s8[first_valid]} + {s8[valid_step]} k fit: every map before a 2x2 pooling must be even.

```python
from densepred.inference import overlap_tile
logits = overlap_tile(unet, image, tile=572)    # any image size; stitched 388-px output tiles
```

*Overlap-tile* (Fig. 2) predicts a large image tile by tile; the context a border tile lacks is
mirrored. The {s8[image]} px scene takes {s8[tiles]} tiles, {s8[tile_step]} px apart (tiles
start on the 16-px grid of the four poolings). Stitched, they equal one pass over the whole
mirrored {s8[padded]} px image: max difference {s8[max_diff]:.1e}, below one float32 unit
({s8[ulp]:.1e}) of the largest logit (computed in float64, returned in float32).

The *weight map* (Sec. 3, Eq. 2), w(x) = w_c(x) + w0 exp(-(d1(x) + d2(x))^2 / 2 sigma^2) with
w0 = {s8[w0]:g} and sigma = {s8[sigma]:g} px (d1, d2: distances to the nearest and second-nearest
cell), weights the loss so that the net learns the thin gaps between touching cells: on a toy
mask of {s8[cells]} px, gap pixels weigh up to {s8[max_weight]:.1f} (median {s8[membrane_weight]:.1f}),
cell pixels {s8[cell_weight]:.2f} (the class-balance term w_c).

```python
from densepred.losses import unet_weight_map
w = unet_weight_map(mask, w0=10, sigma=5)      # mask: 0 background, 1 cell
```

![U-Net](tutorial/08_unet.png)

The paper's U-Net has {s8[params]:,} parameters (`densepred.create_model("unet")`).

---

Regenerate everything (figures and both editions): `densepred tutorial --out docs`. Times of
this run: steps 1-8 took {time[s1]:.0f}, {time[s2]:.0f}, {time[s3]:.0f}, {time[s4]:.0f},
{time[s5]:.0f}, {time[s6]:.0f}, {time[s7]:.0f} and {time[s8]:.0f} s.
"""

_KO = """\
# 밀집 예측, 한 단계씩

*`{command}` 명령이 만든 문서입니다. 아래의 숫자와 그림은 모두 이 명령이 {machine}에서
{time[total]:.0f}초 동안 계산한 것입니다. 영어판: [tutorial.md](tutorial.md).*

의미론적 분할(semantic segmentation)은 이미지의 모든 픽셀에 클래스를 하나씩 붙이는 일, 곧
밀집 예측(dense prediction)입니다. 이 글은 강의에서 배우는 순서(FCN, DeepLab, U-Net)를 따라가며,
각 아이디어를 densepred의 코드로 직접 계산해 눈으로 확인합니다. 데이터는 densepred에 내장된
합성 장면입니다. 클래스는 여섯 개(배경, 원판(disk), 정사각형(square), 삼각형(triangle),
고리(ring), 그리고 정사각형 위에 놓인 작은 원판인 점(dot))이고, 모든 물체의 색과 질감은 같은
분포에서 뽑으므로 클래스를 가르는 단서는 모양과 주변 맥락뿐입니다. 난수 시드는 고정되어 있지만,
CPU나 스레드 수가 다르면 부동소수점 반올림이 달라져 학습 결과 숫자도 조금씩 달라집니다.

## 1. 픽셀 단위 분류

분류기는 이미지 한 장을 C개의 클래스 점수로 바꾸고, 밀집 예측기는 H x W 이미지를
H x W x C 점수로 바꿉니다. *픽셀마다* C개 점수에 소프트맥스(softmax)를 취하면 확률 분포가 되고,
픽셀별 argmax가 레이블 맵이며, 학습은 픽셀마다 계산한 교차 엔트로피(cross-entropy)의 평균을
줄입니다(FCN 3절).

가장 직접적인 방법은 픽셀마다 그 주변 창(window)을 분류하는 것입니다. 가운데 픽셀의 클래스를
레이블로 붙인 {s1[patch]}x{s1[patch]} 패치로 분류기를 학습시키고("패치 단위 학습(patchwise
training)", FCN 3.4절), 이미지 위를 한 픽셀씩 옮겨 가며 적용합니다. 여기서는 작은 분류기(합성곱과
풀링 3단, 그 뒤 완전 연결층 하나)를 장면 {s1[train_images]}장에서 뽑은 패치 128개씩
{s1[iterations]}번 학습시킨 뒤, {s1[width]}x{s1[height]} 검증 장면에 적용했습니다.
순전파 {s1[pixels]:,}번에 **{s1[naive_seconds]:.1f}초**가 걸렸습니다.

```python
from densepred.tutorial import small_classifier
classifier = small_classifier(num_classes=6)     # 32x32 창 -> 4x4x16 맵 -> Linear(256, 6)
probs = classifier(windows).softmax(1)            # 픽셀마다 창 하나: ({s1[pixels]}, 6), 각 행의 합은 1
labels = probs.argmax(1).reshape({s1[height]}, {s1[width]})
```

![픽셀별 소프트맥스](tutorial/01_pixels.png)

여섯 장의 확률 맵은 모든 픽셀에서 합이 1입니다(최대 오차 {s1[prob_sum_error]:.0e}). 이 장면의
픽셀 정확도는 {s1[pixel_acc]:.2f}이지만 평균 IoU(mean IoU, mIoU)는 {s1[miou]:.2f}에 그칩니다.
배경은 대부분 맞히지만 모양끼리는 자주 헷갈리는데, 32픽셀 창으로는 도형의 일부밖에 보이지 않기
때문입니다. 풀어야 할 문제는 두 가지, 비용(픽셀마다 순전파 한 번)과 맥락입니다.

## 2. 합성곱화: 분류기를 완전 합성곱 신경망으로

"완전 연결층은 입력 영역 전체를 덮는 커널을 가진 합성곱으로 볼 수도 있다"(FCN 3.1절).
합성곱화(convolutionalization)라 부르는 이 관점으로 분류기는 완전 합성곱 신경망(fully
convolutional network, FCN)이 됩니다. 강의의 예: 4x4x16 특징 맵(feature map)을 10개 클래스로
점수 매기는 완전 연결층의 가중치는 4x4x16x10 = **{s2[fc_weights]:,}**개(모양 {s2[fc_shape]})입니다.
이와 쌍둥이인 합성곱은 16채널에서 10채널로 가는 4x4 합성곱으로, 커널({s2[conv_shape]})의 가중치도
**{s2[conv_weights]:,}**개입니다. 같은 숫자를 모양만 바꿔 놓은 것이지요(편향을 더하면
{s2[fc_params]:,} = {s2[conv_params]:,}).

```python
import densepred
lecture = small_classifier(num_classes=10)
twin = densepred.convolutionalize(lecture, input_size=(32, 32))   # Flatten + Linear -> Conv2d(16, 10, 4)
lecture[-1].weight.numel(), twin[-1].weight.numel()               # {s2[fc_weights]}, {s2[conv_weights]}
```

1단계에서 학습한 분류기도 매개변수 {s2[total_params]:,}개(점수층은 어느 쪽이든
{s2[ours_fc]:,}개)를 그대로 가진 완전 합성곱 신경망이 됩니다. 학습 때의 크기에서는 같은 점수를
냅니다. 검증 패치 {s2[windows]}개에서 두 출력의 최대 차이는 {s2[max_diff]:.1e}로, 256항 내적 두 번의
float32 반올림 오차 한계(2 gamma_n sum |w x|)의 {s2[bound_ratio]:.2f}배 이하입니다. 반올림을 빼면
같다는 뜻입니다. 더 큰 이미지에서는 이 쌍둥이가 이미지 위를 미끄러집니다. FCN처럼 100픽셀을 0으로
덧댄 {s1[width]}x{s1[height]} 장면에서 {s2[stride]}픽셀마다 창 하나씩, {s2[grid]} 격자의 점수
벡터가 **{s2[heat_seconds]:.3f}초** 만에 나옵니다. 창 하나에 {s2[heat_us_per_window]:.0f}µs로,
1단계의 반복문이 창 하나에 쓴 {s1[naive_us_per_window]:.0f}µs와 비교됩니다. 겹치는 창들이 계산을
나눠 쓰기 때문입니다. 한 클래스의 점수를 이미지 위에 펼친 것이
*히트 맵(heat map)*입니다(FCN 그림 2).

```python
from densepred.visualize import classifier_heatmap, plot_heatmaps
maps = classifier_heatmap(classifier, image, class_index, input_size=(32, 32))
```

![히트 맵](tutorial/02_heatmap.png)

## 3. 역합성곱: 신경망 안에서 업샘플링하기

히트 맵에는 {s2[stride]}픽셀마다(VGG16이라면 32픽셀마다) 점수가 하나뿐입니다. FCN은 스트라이드
f인 전치 합성곱(transposed convolution)으로 신경망 안에서 업샘플링(upsampling)합니다. FCN 논문은
이 층을 "역합성곱(deconvolution)"이라 부릅니다(3.3절). 쌍선형 보간(bilinear interpolation)으로
초기화하고, 마지막 층은 그대로 고정합니다. 2f x 2f 커널은 삼각형의 외적입니다. f = {s3[factor]}이면 탭은
{s3[taps]}로 올라갔다가 같은 값으로 내려옵니다.

```python
from densepred import BilinearDeconv
import torch.nn.functional as F
up = BilinearDeconv(channels=6, factor=8, learnable=False)   # ConvTranspose2d(6, 6, 16, stride=8)
h, c = {s3[height]}, {s3[crop]}                                  # {s3[out_size]} px에서 f/2 = {s3[crop]}씩 잘라냄
fine = up(coarse)[..., c:c + h, c:c + h]
ref = F.interpolate(coarse, scale_factor=8, mode="bilinear", align_corners=False)
```

안쪽(표본점이 두 점수 셀 사이에 놓이는 픽셀)에서는 둘이 일치합니다. 최대 |fine - ref| =
**{s3[interior_diff]:.1g}**입니다(float32 반올림 허용치는 {s3[tolerance]:.1g}이고, f가 2의 거듭제곱이라
가중치가 정확한 이진 분수입니다). 가장자리에서는 최대 {s3[border_diff]:.2f}만큼 다릅니다.
`F.interpolate`는 가장자리 셀 값을 반복하지만, 전치 합성곱에서는 가장자리 픽셀에 셀 하나의 커널만
닿아 값이 흐려지기 때문입니다.

"이 층의 역합성곱 필터는 고정할 필요가 없고 ... 학습할 수도 있다"(3.3절). 쌍선형에서 출발해
학습 장면의 스트라이드 8 정확한 클래스 빈도를 레이블로 바꾸도록 {s3[iterations]}번 학습시키자,
검증 장면의 경계 정확도가 {s3[fixed_boundary]:.3f} -> {s3[learned_boundary]:.3f}로 {v[deconv]}.
픽셀 정확도는 {s3[fixed_acc]:.4f} -> {s3[learned_acc]:.4f}입니다. 그림에서 한 클래스에서
자기 자신으로 가는 커널은 쌍선형 모양을 유지한 채 {s3[kernel_gain]:.1f}배 커졌고(더 날카로운
소프트맥스), 처음에 0이던 배경에서 그 클래스로 가는 커널은 평균이 {v[cross]}가 되었습니다. 근처의
배경이 그 클래스의 점수를 깎는, 클래스 사이의 경쟁으로, 고정된 쌍선형 층은 표현할 수 없는 일입니다.

![역합성곱](tutorial/03_deconvolution.png)

## 4. 건너뛰기 구조: FCN-32s, -16s, -8s

FCN-32s는 스트라이드 32 점수를 한 번에 업샘플링합니다. FCN-16s는 2배 업샘플링한 스트라이드 32
점수에 pool4(스트라이드 16)에서 예측한 점수를 더하고, FCN-8s는 pool3(스트라이드 8)의 점수까지
더합니다. "무엇(what)과 어디(where)를 결합"하는 건너뛰기 연결(skip connection)입니다(4.2절,
그림 3). 여기의 세 신경망은 densepred의 `fcn32s`, `fcn16s`, `fcn8s`를 얇게 만든 복사본입니다. 그래프
(커널, 스트라이드, 잘라내기, conv1_1의 100픽셀 덧대기)는 같고 채널만 1/{s4[slim]}이라, 매개변수가
{s4[fcn32s_full_params]:,} / {s4[fcn16s_full_params]:,} / {s4[fcn8s_full_params]:,}개가 아닌
{s4[fcn32s_params]:,} / {s4[fcn16s_params]:,} / {s4[fcn8s_params]:,}개입니다. ImageNet 가중치 없이
여섯 가지 모양을 처음부터 구별하도록 학습시키려면 튜토리얼에 쓸 수 있는 시간보다 훨씬 오래
걸리므로, 여기서는 물체가 *어디* 있는지만 묻습니다. 다섯 가지 모양을 "물체" 한 클래스로 합쳤습니다.
세 신경망은 층을 공유하고(FCN-16s는 pool3 건너뛰기가 없는 FCN-8s, FCN-32s는 둘 다 없는 FCN-8s로,
논문의 단계별 학습에서 각 신경망이 앞 신경망에서 출발하는 관계와 같습니다), 손실의 합으로 함께
학습합니다. {s4[size]}px 장면 {s4[train_images]}장에서 배치 {s4[batch]}로 Adam {s4[iterations]}스텝,
학습률은 1e-3에서 poly로 줄였고, 손실은 {s4[first_loss]:.2f} -> {s4[last_loss]:.2f}입니다.

```python
from densepred.tutorial import slim_copy
fcn8s = slim_copy(densepred.create_model("fcn8s", num_classes=2), divisor=16)
```

*경계 정확도(boundary accuracy)*는 정답의 클래스 경계에서 {s4[band]}px 안에 있는 픽셀만 센 픽셀
정확도입니다. 마지막 열은 학습과 무관합니다. 각 s x s 셀의 *실제* 클래스 빈도를 고정 쌍선형
업샘플링에 넣었을 때의 결과(`densepred.tutorial.ideal_upsampled_labels`)로, 출력 스트라이드만으로
생기는 손실을 보여 줍니다. 검증 장면 {s4[val_images]}장의 점수입니다.

{t[fcn]}

{v[ideal]} {v[trained]} 학습한
신경망이 정확한 빈도 열보다 나을 수도 있지만(거친 점수가 블록 평균일 필요는 없으니까요), 스트라이드가
촘촘할수록 경계를 더 많이 제자리에 놓을 수 있습니다.

![FCN-32s, 16s, 8s](tutorial/04_skips.png)

## 5. 층이 보는 것

4단계에서 학습한 얇은 FCN-8s를 층별로, 가장 강하게 반응한 채널을 한 줄씩 보여 줍니다(Zeiler &
Fergus 2014, 4절). 얕은 층은 원래 해상도에서 모서리와 색에 반응하고, 깊은 층은 거친 격자에서 더 큰
부분에 반응합니다. 스트라이드는 표에서 읽은 값이 아니라 측정한 값입니다. `feature_maps`가 64px 더 큰
입력으로 신경망을 한 번 더 돌려 각 맵이 얼마나 커지는지 봅니다.

```python
from densepred.visualize import feature_maps, plot_feature_grid
features = feature_maps(fcn8s, image, ["conv1_2", "conv3_3", "conv5_3", "fc7"], top_k=6)
features["fc7"].stride                                    # {s5[deepest_stride]:g}
```

{t[layers]}

![특징 맵](tutorial/05_features.png)

촘촘한 맵은 *어디*를, 거친 맵은 *무엇*을 압니다. 4단계의 건너뛰기 연결이 바로 이 상충
관계(trade-off)를 풉니다.

## 6. 아트러스 합성곱과 시야

DeepLab(v1 3.1절)은 VGG16을 스트라이드 8로 유지하고(pool4와 pool5의 스트라이드를 1로, conv5는
확장률 2), fc6를 확장/아트러스 합성곱(atrous/dilated convolution)으로 바꿉니다. 확장률 d인 k x k
커널은 탭을 d셀 간격으로 벌려 가중치를 늘리지 않고 (k - 1) d + 1셀에 걸칩니다. DeepLab-LargeFOV의
fc6는 확장률 12인 3x3이고, DeepLab-7x7의 7x7 fc6(확장률 4)는 같은 폭을 가중치
{s6[fc6_ratio]:.0f}배로 덮습니다(v1 표 2).

{t[fov]}

```python
densepred.model_entry("deeplab_v1_largefov").receptive_field   # {s6[largefov_declared]}
```

수용 영역(receptive field)은 출력 하나의 입력 기울기가 0이 아닌 범위로 측정했습니다. 최대 풀링은
창마다 한 픽셀로만 기울기를 보내므로 평균 풀링으로 바꾼 얇은 복사본을 썼습니다. 결과는
{s6[largefov_rf]}px와 {s6[fc7x7_rf]}px로, 레지스트리에 선언된 값과 같습니다. 두 fc6 모두
{s6[largefov_fc6_span]}셀에 걸치고, LargeFOV가 {s6[rf_difference]}px 더 보는 것은 공개된 신경망이 그 앞에서 pool5를
3x3으로 평균(`pool5a`)하기 때문입니다. 매개변수는 {s6[ratio]:.1f}배 적은데 시야(field of view)는
같습니다.

ASPP(atrous spatial pyramid pooling, DeepLab v2 3.3절)는 이런 3x3 갈래 네 개를 확장률 {s6[rates]}로
나란히 두고 점수를 더합니다. 이미지 위에서 한 갈래의 탭은 8 r픽셀({s6[tap_offsets]}px) 간격이라,
층 하나가 물체와 그 주변을 여러 크기로 한꺼번에 봅니다. {s6[aspp_image]}px 이미지에서는 확장률 24의
바깥 탭이 이미지 밖으로 나가 덧댄 값을 읽습니다(DeepLab v3 3.3절이 지적한, 큰 확장률에서 유효한
가중치가 줄어드는 현상입니다). VGG16 위의 ASPP-L은 {s6[aspp_rf]}px를 봅니다.

![아트러스 합성곱, ASPP](tutorial/06_field_of_view.png)

## 7. 완전 연결 CRF

스트라이드 8이나 32인 신경망은 경계가 매끄럽게 번집니다. DeepLab(v1 4절)은 이를 완전 연결
조건부 무작위장(fully-connected conditional random field, CRF)으로 다듬습니다(Krähenbühl & Koltun
2011). 단항(unary) 항은 신경망이 준 -log P이고, 모든 픽셀 쌍은 두 가우시안 커널로 가중한 Potts
항으로 이어집니다. 외관 커널(appearance kernel)
w1 exp(-|p_i - p_j|^2 / 2 theta_alpha^2 - |I_i - I_j|^2 / 2 theta_beta^2)는 색이 비슷한 픽셀을
같은 레이블로 끌어당기고, 평활 커널(smoothness kernel) w2 exp(-|p_i - p_j|^2 / 2 theta_gamma^2)는
작은 잡음을 지웁니다. 퍼뮤토헤드럴 격자(permutohedral lattice) 위의 평균장 추론(mean-field
inference)으로 계산량이 픽셀 수에 비례합니다.

입력은 4단계에서 가장 거친 FCN-32s의 소프트맥스입니다. DeepLab처럼 w1, theta_alpha, theta_beta는
교차 검증으로 골랐습니다. 학습 장면 {s7[tuning_images]}장에서 {s7[grid]}가지 설정을 경계 정확도로
비교했고(w2 = 3, theta_gamma = 3은 논문과 같음), 검증 장면은 한 번만 채점했습니다.

```python
from densepred.crf import CRFParams, dense_crf
params = CRFParams(w1={s7[w1]:g}, theta_alpha={s7[theta_alpha]:g}, theta_beta={s7[theta_beta]:g},
                   w2=3, theta_gamma=3, iterations=10)
refined = dense_crf(image, probs, params)     # uint8 (H, W, 3) 이미지, (C, H, W) 확률
```

{t[crf]}

검증 장면 {s7[val_images]}장에서 CRF를 거치자 경계 정확도는 {v[crf]}. 픽셀 정확도는
{v[crf_pixels]}. {s4[size]}px 장면 하나에 {s7[crf_seconds]:.2f}초가 걸렸습니다. 그림에는
{s7[val_images]}장 가운데 변화량이 중앙값인 장면을 골랐습니다(가장 잘된 경우가 아닙니다). 한 줄을
따라 경계를 가로지르며 CRF 전후를 비교합니다.

![CRF](tutorial/07_crf.png)

## 8. U-Net: 유효 합성곱, 겹침-타일, 가중치 맵

U-Net(Ronneberger 외 2015, 2절, 그림 1)은 덧대기 없는 유효 합성곱(valid convolution)만 씁니다.
3x3 합성곱마다 테두리 한 픽셀씩 줄어서, {s8[tile]} x {s8[tile]} 타일이 {s8[out_tile]} x {s8[out_tile]}
출력이 되고 {s8[shrink]}px(양쪽에 맥락 {s8[margin]}px씩)가 사라집니다. 실제 신경망(폭만 좁히고
기하는 같음)에 훅을 걸어 기록한 크기입니다.

{t[trace]}

맞는 크기는 {s8[first_valid]} + {s8[valid_step]} k뿐입니다. 2x2 풀링 앞의 맵은 모두 짝수여야 하기
때문입니다.

```python
from densepred.inference import overlap_tile
logits = overlap_tile(unet, image, tile=572)    # 어떤 크기의 이미지든, 388px 출력 타일을 이어 붙임
```

*겹침-타일 전략(overlap-tile strategy)*(그림 2)은 큰 이미지를 타일 단위로 예측하고, 가장자리
타일에 모자란 맥락은 이미지를 거울처럼 비춰 채웁니다. {s8[image]}px 장면에는 {s8[tile_step]}px 간격의
타일 {s8[tiles]}개가 필요합니다(타일은 풀링 네 번이 만드는 16px 격자 위에서 시작합니다). 이어 붙인
결과는 거울로 채운 {s8[padded]}px 이미지 전체를 한 번에 통과시킨 결과와 같습니다. 최대 차이
{s8[max_diff]:.1e}로, 가장 큰 로짓의 float32 한 단위({s8[ulp]:.1e})보다 작습니다(float64로 계산해
float32로 반환).

*가중치 맵(weight map)*(3절, 식 2) w(x) = w_c(x) + w0 exp(-(d1(x) + d2(x))^2 / 2 sigma^2)는
w0 = {s8[w0]:g}, sigma = {s8[sigma]:g}px(d1, d2는 가장 가까운 세포와 두 번째로 가까운 세포까지의
거리)로, 맞닿은 세포 사이의 좁은 틈을 배우도록 손실에 무게를 싣습니다. {s8[cells]}px 장난감
마스크에서 틈의 픽셀은 최대 {s8[max_weight]:.1f}(중앙값 {s8[membrane_weight]:.1f}), 세포 픽셀은
{s8[cell_weight]:.2f}(클래스 균형 항 w_c)의 무게를 받습니다.

```python
from densepred.losses import unet_weight_map
w = unet_weight_map(mask, w0=10, sigma=5)      # mask: 0 배경, 1 세포
```

![U-Net](tutorial/08_unet.png)

논문의 U-Net은 매개변수가 {s8[params]:,}개입니다(`densepred.create_model("unet")`).

---

그림과 두 판본을 모두 다시 만들려면 `densepred tutorial --out docs`를 실행하세요. 이번 실행에서
1-8단계는 각각 {time[s1]:.0f}, {time[s2]:.0f}, {time[s3]:.0f}, {time[s4]:.0f}, {time[s5]:.0f},
{time[s6]:.0f}, {time[s7]:.0f}, {time[s8]:.0f}초가 걸렸습니다.
"""

_TEMPLATES = {"en": _EN, "ko": _KO}
