"""DeepLab v1 (Chen et al., ICLR 2015) and DeepLab v2 (Chen et al., TPAMI 2017).

A DeepLab is a backbone at output stride 8 (atrous VGG16 or dilated ResNet-101) and a head
that scores classes from its last map; the stride-8 scores are bilinearly interpolated to the
input size (v1 Sec. 3.1). The fully-connected CRF (v1 Sec. 4) is post-processing, in
:mod:`densepred.crf`.

- v1 LargeFOV: fc6 3x3 with dilation ("input stride") 12 and 1024 channels, fc7 1x1 1024
  (v1 Sec. 3.1 and Table 2: 20.5M parameters). v1 7x7: fc6 7x7 dilation 4, 4096 channels.
- v2 ASPP (v2 Sec. 3.3, Fig. 7): parallel branches with dilations 6/12/18/24 (ASPP-L) or
  2/4/8/12 (ASPP-S) whose class scores are summed. On ResNet-101 each branch is one 3x3
  dilated convolution to the classes; on VGG16 each is an fc6/fc7/fc8 stack.
- v2 multi-scale inputs (v2 Sec. 4.1 "MSC"): the net runs on the image at scales 1, 0.75, 0.5;
  the scores are upsampled to the scale-1 size and fused by max. In training every branch is
  returned, as each gets its own loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..catalogue import VOC_CATEGORIES, Weights, register_weights
from ..data.normalization import CAFFE_DEEPLAB
from ..registry import register_model
from ..weights import with_pretrained
from .backbones.resnet import ResNet
from .backbones.vgg import VGG16
from .base import CoarseScores, SegmentationModel
from .layers import AtrousConv2d, Backbone, RateClippedConv2d, check_input

__all__ = ["DeepLab", "FCHead", "ASPPVGG", "ASPPResNet", "MultiScaleInputs", "ASPP_RATES", "caffe_resize"]

ASPP_RATES: dict[str, tuple[int, ...]] = {"L": (6, 12, 18, 24), "S": (2, 4, 8, 12)}


def caffe_resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize with corners aligned, as Caffe's ``Interp`` layer that DeepLab uses.

    DeepLab feeds inputs of size 8k+1 (321, 513) so that corner-aligned stride-8 scores map
    exactly onto input pixels.
    """
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class FCHead(nn.Sequential):
    """DeepLab's convolutionalized classifier: fc6 (dilated) -> fc7 (1x1) -> fc8 (scores).

    ReLU and dropout 0.5 follow fc6 and fc7 as in VGG16's classifier; fc8 is initialised from
    a Gaussian with std 0.01 (the released prototxt). ``pool5a``: the released LargeFOV net
    averages pool5 over 3x3 (stride 1, padding counted, as Caffe's AVE pooling) before fc6
    (DeepLab-LargeFOV/train.prototxt; the paper does not mention it).
    """

    def __init__(
        self, in_channels: int, num_classes: int, *, kernel_size: int, dilation: int, width: int, pool5a: bool = False
    ):
        padding = dilation * (kernel_size - 1) // 2  # keeps the stride-8 map's size
        super().__init__()
        if pool5a:
            self.pool5a = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=True)
        self.fc6 = AtrousConv2d(in_channels, width, kernel_size, padding=padding, dilation=dilation)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(0.5)
        self.fc7 = nn.Conv2d(width, width, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(0.5)
        self.fc8 = nn.Conv2d(width, num_classes, 1)
        for m in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(self.fc8.bias)

    def classifier_layers(self) -> list[nn.Module]:
        return [self.fc8]


class ASPPVGG(nn.Module):
    """ASPP on VGG16 (v2 Fig. 7): one LargeFOV-style fc6/fc7/fc8 branch per rate, scores summed."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int], width: int = 1024):
        super().__init__()
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(
            FCHead(in_channels, num_classes, kernel_size=3, dilation=r, width=width) for r in rates
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([branch(x) for branch in self.branches]).sum(0)

    def classifier_layers(self) -> list[nn.Module]:
        return [branch.fc8 for branch in self.branches]


class ASPPResNet(nn.Module):
    """ASPP on ResNet-101 (v2 Sec. 3.3): a 3x3 dilated conv to the classes per rate, summed.

    Branch names mirror the released prototxt's ``fc1_voc12_c0..c3``; Gaussian init std 0.01.
    """

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int]):
        super().__init__()
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(RateClippedConv2d(in_channels, num_classes, 3, r) for r in rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([branch(x) for branch in self.branches]).sum(0)

    def classifier_layers(self) -> list[nn.Module]:
        return list(self.branches)


class DeepLab(SegmentationModel):
    """A backbone at output stride 8 and a scoring head on one of its maps.

    ``coarse_logits`` gives the stride-8 scores (what DeepLab's losses see, against labels
    sub-sampled by 8); ``forward`` interpolates them to the input size.
    """

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        *,
        feature: str,
        num_classes: int,
    ):
        super().__init__()
        if feature not in backbone.feature_info:
            raise ValueError(f"backbone has no feature {feature!r}; it declares {sorted(backbone.feature_info)}")
        self.backbone, self.head, self.feature = backbone, head, feature
        self.num_classes = num_classes
        self.in_channels = backbone.in_channels
        self.output_stride = backbone.feature_info[feature].stride

    def classifier_layers(self) -> list[nn.Module]:
        """The final class-scoring layers: DeepLab trains them with 10x the base lr (v1 Sec. 4.1)."""
        return self.head.classifier_layers()

    def coarse_logits(self, x: Tensor) -> Tensor:
        check_input(x, self.in_channels, type(self).__name__)
        return self.head(self.backbone(x)[self.feature])

    def forward(self, x: Tensor) -> Tensor:
        return caffe_resize(self.coarse_logits(x), x.shape[-2:])

    def stride_logits(self, x: Tensor) -> Tensor:
        return self.coarse_logits(x)

    def coarse_scores(self, x: Tensor) -> CoarseScores:
        """The stride-8 scores; corner-aligned interpolation puts cell ``j`` on pixel ``8 j``
        (exactly for DeepLab's ``8k + 1`` input sizes, v1 Sec. 3.1)."""
        return CoarseScores(self.coarse_logits(x), self.output_stride, 0.0, self.coarse_scores_note())

    def coarse_scores_note(self) -> str:
        return f"DeepLab output: stride-{self.output_stride} scores bilinearly interpolated (corners aligned)"

    def feature_layers(self) -> list[str]:
        """The backbone's layers shallow to deep, then the head's first fc7 (VGG16 heads)."""
        fc7 = [f"head.{n}" for n, _ in self.head.named_modules() if n.rsplit(".", 1)[-1] == "fc7"][:1]
        return [f"backbone.{n}" for n in self.backbone.feature_layers()] + fc7


def _rescale(x: Tensor, s: float) -> Tensor:
    """``x`` resized by Caffe's ``(size - 1) * s + 1`` rule, rounded down (DeepLab v2's MSC inputs)."""
    height, width = x.shape[-2:]
    if torch.jit.is_tracing():
        # Traced sizes are tensors: keeping the arithmetic in the graph (in float64, as Python's)
        # lets an exported model rescale any input size, not only the one it was traced at.
        if s == 1:
            return x
        return caffe_resize(x, [((d - 1).to(torch.float64) * s).floor().to(torch.int64) + 1 for d in (height, width)])
    size = (int((height - 1) * s) + 1, int((width - 1) * s) + 1)
    return x if size == (height, width) else caffe_resize(x, size)


class MultiScaleInputs(SegmentationModel):
    """DeepLab v2's multi-scale inputs ("MSC", v2 Sec. 4.1), wrapping any :class:`DeepLab`.

    The image is resized to each scale (Caffe's ``(size - 1) * s + 1`` rule), scored, and the
    scores are interpolated to the scale-1 stride-8 size and fused by ``fusion`` (max in v2).
    ``eval()``: the fused scores at the input size. ``train()``: a dict with the fused and
    every scale's stride-8 scores, ``{"fused", "scale_1", "scale_0.75", "scale_0.5"}``, each to
    be matched against labels sub-sampled to its own size.
    """

    def __init__(
        self, model: DeepLab, scales: Sequence[float] = (1.0, 0.75, 0.5), fusion: Literal["max", "mean"] = "max"
    ):
        super().__init__()
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be positive numbers, got {list(scales)}")
        if fusion not in ("max", "mean"):
            raise ValueError(f"fusion must be 'max' or 'mean', got {fusion!r}")
        self.model, self.scales, self.fusion = model, tuple(scales), fusion
        self.num_classes, self.in_channels = model.num_classes, model.in_channels
        self.output_stride = model.output_stride

    def classifier_layers(self) -> list[nn.Module]:
        return self.model.classifier_layers()

    def coarse_logits(self, x: Tensor) -> Tensor:
        """The fused stride-8 scores (eval-mode fusion, whatever the training flag)."""
        return self._fuse(self.branches(x))

    def stride_logits(self, x: Tensor) -> Tensor:
        return self.coarse_logits(x)

    def coarse_scores(self, x: Tensor) -> CoarseScores:
        return CoarseScores(self.coarse_logits(x), self.output_stride, 0.0, self.model.coarse_scores_note())

    def feature_layers(self) -> list[str]:
        return [f"model.{n}" for n in self.model.feature_layers()]

    def weights_root(self) -> nn.Module:
        return self.model

    def example_size(self) -> tuple[int, int]:
        return self.model.example_size()

    def _fuse(self, branches: dict[str, Tensor]) -> Tensor:
        first = f"scale_{self.scales[0]:g}"
        ref = branches[first].shape[-2:]
        # A trace records one side of a shape test; exported graphs resize every other branch
        # (a same-size corner-aligned resize is the identity, so the maths is unchanged).
        tracing = torch.jit.is_tracing()
        aligned = torch.stack(
            [
                b if k == first or (not tracing and b.shape[-2:] == ref) else caffe_resize(b, ref)
                for k, b in branches.items()
            ]
        )
        return aligned.amax(0) if self.fusion == "max" else aligned.mean(0)

    def branches(self, x: Tensor) -> dict[str, Tensor]:
        return {f"scale_{s:g}": self.model.coarse_logits(_rescale(x, s)) for s in self.scales}

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        branches = self.branches(x)
        fused = self._fuse(branches)
        if self.training:
            return {"fused": fused, **branches}
        return caffe_resize(fused, x.shape[-2:])


def _atrous_vgg16(in_channels: int) -> VGG16:
    return VGG16(in_channels, first_padding=1, pooling="deeplab")


def _maybe_msc(model: DeepLab, msc: bool | Sequence[float]) -> nn.Module:
    if msc is False:
        return model
    return MultiScaleInputs(model) if msc is True else MultiScaleInputs(model, scales=msc)


_V1 = "Chen et al. 2015, DeepLab v1"
_V2 = "Chen et al. 2017, DeepLab v2"


@register_model("deeplab_v1_largefov", paper=_V1, output_stride=8, receptive_field=435, default_size=513)
def deeplab_v1_largefov(*, num_classes: int = 21, in_channels: int = 3, pretrained: str | None = None) -> DeepLab:
    """DeepLab-LargeFOV: fc6 3x3, dilation 12, 1024 channels (v1 Table 2, 20.5M parameters),
    after the released net's 3x3 average pooling ``pool5a``."""
    backbone = _atrous_vgg16(in_channels)
    head = FCHead(backbone.out_channels, num_classes, kernel_size=3, dilation=12, width=1024, pool5a=True)
    return with_pretrained(DeepLab(backbone, head, feature="pool5", num_classes=num_classes), pretrained)


@register_model("deeplab_v1_7x7", paper=_V1, output_stride=8, receptive_field=419, default_size=513)
def deeplab_v1_7x7(*, num_classes: int = 21, in_channels: int = 3, pretrained: str | None = None) -> DeepLab:
    """DeepLab-CRF-7x7: fc6 7x7, dilation 4, 4096 channels (v1 Table 2, 134.3M parameters)."""
    backbone = _atrous_vgg16(in_channels)
    head = FCHead(backbone.out_channels, num_classes, kernel_size=7, dilation=4, width=4096)
    return with_pretrained(DeepLab(backbone, head, feature="pool5", num_classes=num_classes), pretrained)


@register_model("deeplab_v2_vgg16", paper=_V2, output_stride=8, receptive_field=611, default_size=321)
def deeplab_v2_vgg16(
    *,
    num_classes: int = 21,
    in_channels: int = 3,
    aspp: Literal["L", "S"] = "L",
    msc: bool | Sequence[float] = False,
    pretrained: str | None = None,
) -> nn.Module:
    """DeepLab v2 on atrous VGG16 with ASPP-L (default) or ASPP-S (v2 Sec. 4.1, Table 3)."""
    backbone = _atrous_vgg16(in_channels)
    head = ASPPVGG(backbone.out_channels, num_classes, _aspp_rates(aspp))
    return with_pretrained(
        _maybe_msc(DeepLab(backbone, head, feature="pool5", num_classes=num_classes), msc), pretrained
    )


@register_model("deeplab_v2_resnet101", paper=_V2, output_stride=8, receptive_field=1411, default_size=321)
def deeplab_v2_resnet101(
    *,
    num_classes: int = 21,
    in_channels: int = 3,
    aspp: Literal["L", "S"] = "L",
    msc: bool | Sequence[float] = False,
    caffe_style: bool = True,
    frozen_bn: bool = True,
    pretrained: str | None = None,
) -> nn.Module:
    """DeepLab v2: ResNet-101 at output stride 8 with ASPP (v2 Sec. 4.1, Table 4).

    ``caffe_style`` and ``frozen_bn`` default to the released model (MSRA ResNet-101, batch
    norm statistics fixed during fine-tuning); ``msc=True`` wraps it in multi-scale inputs.
    """
    backbone = ResNet(101, in_channels, output_stride=8, caffe_style=caffe_style, frozen_bn=frozen_bn)
    head = ASPPResNet(backbone.feature_info["layer4"].channels, num_classes, _aspp_rates(aspp))
    model = _maybe_msc(DeepLab(backbone, head, feature="layer4", num_classes=num_classes), msc)
    return with_pretrained(model, pretrained)


def _aspp_rates(aspp: str) -> tuple[int, ...]:
    if aspp not in ASPP_RATES:
        raise ValueError(
            f"aspp must be one of {sorted(ASPP_RATES)} (ASPP-L: 6/12/18/24, ASPP-S: 2/4/8/12), got {aspp!r}"
        )
    return ASPP_RATES[aspp]


# The authors' Caffe releases (DeepLab project page; the v1 LargeFOV net at CCVL, the v2 nets in
# one zip). DeepLab subtracts its own BGR mean from 0-255 pixels (train.prototxt mean_value) and
# tests on images padded to 513x513. No hash is published for any of them: each is checked by
# the sha256 of its first download. DeepLab's ``train_`` nets are trained on train_aug, its
# ``train2_`` nets fine-tuned further on trainval_aug (run_pascal.sh), so only ``train_`` files
# may be scored on VOC12 val.
_DEEPLAB = dict(
    digest=None,
    layout="caffe",
    classes=VOC_CATEGORIES,
    normalization=CAFFE_DEEPLAB,
    input_size="any; the authors test on images padded to 513x513 with the mean",
    license="not stated by the release (its code is a fork of BVLC Caffe); ask the authors before redistributing",
)
_V2_ZIP = "http://liangchiehchen.com/projects/released/deeplab_aspp_resnet101/prototxt_and_model.zip"
_V2_LAYERS = dict(
    model_kwargs={"msc": True},
    caffe_layers={f"fc1_voc12_c{i}": f"head.branches.{i}" for i in range(4)},  # ASPP-L, rates 6/12/18/24
    shared_copies=("_res075", "_res05"),  # the 0.75x and 0.5x branches repeat the shared weights
    source="http://liangchiehchen.com/projects/DeepLab_Models.html (DeepLab v2, ResNet-101, ASPP-L, MSC, COCO)",
    num_params=43_943_188,
)
register_weights(
    Weights(
        model="deeplab_v1_largefov",
        tag="voc12_caffe",
        url="http://ccvl.stat.ucla.edu/ccvl/DeepLab-LargeFOV/train2_iter_8000.caffemodel",
        metrics={"mean IoU (with CRF)": 70.3},
        metrics_on="PASCAL VOC 2012 test (v1 paper; this net is the train2 one, fine-tuned on trainval_aug)",
        source="http://ccvl.stat.ucla.edu/ccvl/DeepLab-LargeFOV/ (with train.prototxt and test.prototxt)",
        caffe_layers={"fc8_voc12": "head.fc8"},
        num_params=20_505_429,
        **_DEEPLAB,
    ),
    Weights(
        model="deeplab_v2_resnet101",
        tag="voc12_caffe",
        url=_V2_ZIP,
        archive_member="train_iter_20000.caffemodel",
        metrics={"mean IoU": 76.35, "mean IoU (with CRF)": 77.69},
        metrics_on="PASCAL VOC 2012 val, trained on train_aug (v2 paper Table 4, MSC + COCO + Aug + ASPP-L)",
        **_V2_LAYERS,
        **_DEEPLAB,
    ),
    Weights(
        model="deeplab_v2_resnet101",
        tag="voc12_trainval_caffe",
        url=_V2_ZIP,
        archive_member="train2_iter_20000.caffemodel",
        metrics={"mean IoU (with CRF)": 79.7},
        metrics_on="PASCAL VOC 2012 test (DeepLab v2 README); fine-tuned on trainval_aug: do not score it on val",
        **_V2_LAYERS,
        **_DEEPLAB,
    ),
)
