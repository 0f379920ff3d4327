"""DeepLab v3 (Chen et al. 2017, "Rethinking Atrous Convolution for Semantic Image
Segmentation"), DeepLab v3+ (Chen et al., ECCV 2018, "Encoder-Decoder with Atrous Separable
Convolution") and torchvision's DeepLabV3 configuration.

- v3 (Sec. 3.2-3.3): ResNet-50/101 at output stride 16 (training) or 8; block4's units use
  multi-grid rates (1, 2, 4) x the block's rate (2 at OS16, 4 at OS8). ASPP: a 1x1
  convolution, three 3x3 atrous convolutions at rates (6, 12, 18) at OS16 (doubled at OS8) and
  image-level features (global average pooling, 1x1, upsampled), each 256 channels with batch
  norm; concatenated, a 1x1 convolution of 256 with batch norm, then the 1x1 class scores.
- v3+ (Sec. 3.1, Fig. 2): v3's encoder, and a decoder: the stride-4 features (ResNet's
  layer1) reduced to 48 channels by a 1x1 convolution, concatenated with the encoder output
  upsampled 4x, two 3x3 convolutions of 256, the class scores, upsampled 4x. ResNet-101 here
  with ordinary convolutions (the paper's aligned Xception and separable convolutions are not
  built).
- torchvision (``deeplabv3_resnet50/101``, ``deeplabv3_mobilenet_v3_large`` at stride 16 on
  the dilated MobileNetV3-Large): output stride 8 with torchvision's dilation rule
  (the first block of a dilated stage keeps the previous rate), no multi-grid, ASPP rates
  (12, 24, 36), dropout 0.5 after the projection, an extra 3x3 convolution of 256 before the
  scores, and an FCN auxiliary head on layer3. Module names are torchvision's, so its files
  load key for key.

Both ResNets are "v1.5" (the stride in the 3x3 convolution), as torchvision's ImageNet files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..catalogue import register_weights, torchvision_coco_voc
from ..registry import register_model
from ..weights import with_pretrained
from .backbones.mobilenetv3 import FeatureTaps, MobileNetV3Large
from .backbones.resnet import ResNet
from .fcn_resnet import AuxiliaryHeadModel, FCNHead
from .layers import GlobalAveragePool, RateClippedConv2d, in_layout_of

__all__ = ["ASPP", "ImagePooling", "DeepLabV3", "DeepLabV3Plus", "aspp_rates", "ASPP_RATES_OS16"]

ASPP_RATES_OS16 = (6, 12, 18)  # v3 Sec. 3.3; doubled at output stride 8
MULTI_GRID = (1, 2, 4)  # v3 Sec. 3.2, Table 3's best: block4's units at rate x (1, 2, 4)


def aspp_rates(output_stride: int) -> tuple[int, ...]:
    """ASPP's atrous rates for an output stride (v3 Sec. 3.3: 6/12/18 at 16, twice that at 8)."""
    if output_stride not in (8, 16):
        raise ValueError(f"DeepLab v3 runs at output stride 8 or 16, got {output_stride}")
    return tuple(r * 16 // output_stride for r in ASPP_RATES_OS16)


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> list[nn.Module]:
    conv = (
        RateClippedConv2d(cin, cout, kernel, dilation, bias=False)
        if dilation > 1
        else nn.Conv2d(cin, cout, kernel, padding=(kernel - 1) // 2, bias=False)
    )
    return [
        conv,
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    ]


class ImagePooling(nn.Sequential):
    """ASPP's image-level features (v3 Sec. 3.3, after ParseNet): global average pooling, 1x1
    conv + BN + ReLU, bilinearly upsampled to the map's size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(GlobalAveragePool(), *_conv_bn_relu(in_channels, out_channels))

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        return in_layout_of(F.interpolate(super().forward(x), size=size, mode="bilinear", align_corners=False), x)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling with image-level features (v3 Fig. 5): ``convs`` are the
    1x1 branch, one 3x3 branch per rate and the pooling; ``project`` fuses their concatenation."""

    def __init__(self, in_channels: int, rates: Sequence[int], out_channels: int = 256, dropout: float = 0.0):
        super().__init__()
        self.rates = tuple(rates)
        branches: list[nn.Module] = [nn.Sequential(*_conv_bn_relu(in_channels, out_channels))]
        branches += [nn.Sequential(*_conv_bn_relu(in_channels, out_channels, 3, r)) for r in self.rates]
        branches.append(ImagePooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        project = _conv_bn_relu(len(branches) * out_channels, out_channels)
        self.project = nn.Sequential(*project, *([nn.Dropout(dropout)] if dropout else []))

    def forward(self, x: Tensor) -> Tensor:
        # The pooling first, so that autograd adds its gradient to the others' and not the reverse
        # (the sum keeps the others' channels-last layout in training; see LRASPPHead.forward).
        pooled = self.convs[-1](x)
        return self.project(torch.cat([branch(x) for branch in self.convs[:-1]] + [pooled], 1))


class DeepLabV3(AuxiliaryHeadModel):
    """A dilated backbone, ASPP and the class scores on its last map, upsampled to the input."""

    def aspp(self) -> ASPP:
        return self.classifier[0]


class _Decoder(nn.Module):
    """v3+'s decoder (Sec. 3.1): 1x1 to 48 on the stride-4 features, concatenated with the
    upsampled encoder output, two 3x3 convolutions of 256 and the class scores."""

    def __init__(self, low_channels: int, encoder_channels: int, num_classes: int) -> None:
        super().__init__()
        self.reduce = nn.Sequential(*_conv_bn_relu(low_channels, 48))
        self.fuse = nn.Sequential(*_conv_bn_relu(encoder_channels + 48, 256, 3), *_conv_bn_relu(256, 256, 3))
        self.classifier = nn.Conv2d(256, num_classes, 1)

    def forward(self, low: Tensor, encoded: Tensor) -> Tensor:
        low = self.reduce(low)
        encoded = F.interpolate(encoded, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([encoded, low], 1)))


class DeepLabV3Plus(DeepLabV3):
    """v3's encoder (``classifier`` = ASPP) and the decoder on the stride-4 features: its scores
    are at stride 4 (``output_stride`` says so), upsampled 4x to the input."""

    def __init__(self, backbone: ResNet, encoder: ASPP, decoder: _Decoder, *, num_classes: int) -> None:
        super().__init__(backbone, encoder, None, feature="layer4", aux_feature="layer3", num_classes=num_classes)
        self.decoder = decoder
        self.output_stride = backbone.feature_info["layer1"].stride
        self.encoder_stride = backbone.feature_info["layer4"].stride

    def head(self, features: dict[str, Tensor]) -> Tensor:
        return self.decoder(features["layer1"], self.classifier(features["layer4"]))

    def aspp(self) -> ASPP:
        return self.classifier

    def classifier_layers(self) -> list[nn.Module]:
        return [self.decoder.classifier]


def _paper_backbone(depth: int, in_channels: int, output_stride: int, multi_grid: Sequence[int] | None) -> ResNet:
    return ResNet(depth, in_channels, output_stride=output_stride, multi_grid=multi_grid or MULTI_GRID)


_V3 = "Chen et al. 2017, DeepLab v3"
_V3P = "Chen et al. 2018, DeepLab v3+"
_TV = "torchvision's DeepLabV3 (Chen et al. 2017, DeepLab v3)"


@register_model("deeplabv3", paper=_V3, output_stride=16, receptive_field=1835, default_size=513)
def deeplabv3(
    *,
    num_classes: int = 21,
    in_channels: int = 3,
    depth: Literal[50, 101] = 101,
    output_stride: Literal[8, 16] = 16,
    multi_grid: Sequence[int] = MULTI_GRID,
    pretrained: str | None = None,
) -> DeepLabV3:
    """DeepLab v3 as the paper builds it: ResNet-``depth`` at ``output_stride`` (v3 trains at 16,
    evaluates at 8, Sec. 4.1), multi-grid block4, ASPP with image pooling, 1x1 scores."""
    backbone = _paper_backbone(depth, in_channels, output_stride, multi_grid)
    classifier = nn.Sequential(ASPP(2048, aspp_rates(output_stride)), nn.Conv2d(256, num_classes, 1))
    model = DeepLabV3(backbone, classifier, None, feature="layer4", aux_feature="layer3", num_classes=num_classes)
    return with_pretrained(model, pretrained)


@register_model("deeplabv3plus", paper=_V3P, output_stride=4, receptive_field=1867, default_size=513)
def deeplabv3plus(
    *,
    num_classes: int = 21,
    in_channels: int = 3,
    depth: Literal[50, 101] = 101,
    output_stride: Literal[8, 16] = 16,
    multi_grid: Sequence[int] = MULTI_GRID,
    pretrained: str | None = None,
) -> DeepLabV3Plus:
    """DeepLab v3+ on ResNet-``depth``: v3's encoder at ``output_stride`` (16 in the paper's
    main results, Table 3) and the decoder on layer1 (stride 4)."""
    backbone = _paper_backbone(depth, in_channels, output_stride, multi_grid)
    model = DeepLabV3Plus(
        backbone, ASPP(2048, aspp_rates(output_stride)), _Decoder(256, 256, num_classes), num_classes=num_classes
    )
    return with_pretrained(model, pretrained)


def _torchvision_deeplabv3(
    depth: int, num_classes: int, in_channels: int, aux: bool, pretrained: str | None
) -> DeepLabV3:
    backbone = ResNet(depth, in_channels, output_stride=8, dilation_rule="torchvision")
    classifier = nn.Sequential(
        ASPP(2048, (12, 24, 36), dropout=0.5), *_conv_bn_relu(256, 256, 3), nn.Conv2d(256, num_classes, 1)
    )
    model = DeepLabV3(
        backbone,
        classifier,
        FCNHead(1024, num_classes) if aux else None,
        feature="layer4",
        aux_feature="layer3",
        num_classes=num_classes,
    )
    return with_pretrained(model, pretrained)


@register_model("deeplabv3_resnet50", paper=_TV, output_stride=8, receptive_field=1019, default_size=520)
def deeplabv3_resnet50(
    *, num_classes: int = 21, in_channels: int = 3, aux: bool = True, pretrained: str | None = None
) -> DeepLabV3:
    """torchvision's DeepLabV3-ResNet50 (42,004,074 parameters with aux, 21 classes)."""
    return _torchvision_deeplabv3(50, num_classes, in_channels, aux, pretrained)


@register_model("deeplabv3_resnet101", paper=_TV, output_stride=8, receptive_field=1563, default_size=520)
def deeplabv3_resnet101(
    *, num_classes: int = 21, in_channels: int = 3, aux: bool = True, pretrained: str | None = None
) -> DeepLabV3:
    """torchvision's DeepLabV3-ResNet101 (60,996,202 parameters with aux, 21 classes)."""
    return _torchvision_deeplabv3(101, num_classes, in_channels, aux, pretrained)


@register_model("deeplabv3_mobilenet_v3_large", paper=_TV, output_stride=16, receptive_field=1843, default_size=520)
def deeplabv3_mobilenet_v3_large(
    *, num_classes: int = 21, in_channels: int = 3, aux: bool = True, pretrained: str | None = None
) -> DeepLabV3:
    """torchvision's DeepLabV3 on dilated MobileNetV3-Large (11,029,328 parameters with aux, 21
    classes): the head of the ResNet models on the last map (960 channels, stride 16), the
    auxiliary FCN head on the stride-8 map (40 channels). (Field: the convolutions only.)"""
    trunk = MobileNetV3Large(in_channels, dilated=True)
    out, aux_at = trunk.stage_indices[-1], trunk.stage_indices[-4]
    backbone = FeatureTaps(trunk, {"out": out, "aux": aux_at})
    channels = backbone.feature_info["out"].channels
    classifier = nn.Sequential(
        ASPP(channels, (12, 24, 36), dropout=0.5), *_conv_bn_relu(256, 256, 3), nn.Conv2d(256, num_classes, 1)
    )
    model = DeepLabV3(
        backbone,
        classifier,
        FCNHead(backbone.feature_info["aux"].channels, num_classes) if aux else None,
        feature="out",
        aux_feature="aux",
        num_classes=num_classes,
    )
    return with_pretrained(model, pretrained)


# torchvision's COCO_WITH_VOC_LABELS_V1 weights; the full sha256 as LibreYOLO records it (its
# provenance notes); torchvision publishes the first 8 hex digits, in the file name.
_BY = "LibreYOLO (weights/parity_deeplabv3.py, docs/provenance/fcn.md)"
register_weights(
    torchvision_coco_voc(
        "deeplabv3_resnet50",
        "deeplabv3_resnet50_coco-cd0a2569.pth",
        sha256="cd0a25694c4a0f7106b38f4938bf90a874f2f241cc410b8f63c7024399538f06",
        published_by=_BY,
        miou=66.4,
        pixel_acc=92.4,
        num_params=42_004_074,
        file_size=168_312_152,
    ),
    torchvision_coco_voc(
        "deeplabv3_resnet101",
        "deeplabv3_resnet101_coco-586e9e4e.pth",
        sha256="586e9e4e203fcbf17e1ad45533d8d33ab133fc762bf03101c5dd743995c08c0d",
        published_by=_BY,
        miou=67.4,
        pixel_acc=92.4,
        num_params=60_996_202,
        file_size=244_545_539,
    ),
    torchvision_coco_voc(
        "deeplabv3_mobilenet_v3_large",
        "deeplabv3_mobilenet_v3_large-fc3c493d.pth",
        sha256="fc3c493d68e89cc31ef488c803d5d7dd2f3190fb570598faa49fef69be8e5e70",
        published_by=_BY,
        miou=60.3,
        pixel_acc=91.2,
        num_params=11_029_328,
        file_size=44_356_159,
    ),
)
