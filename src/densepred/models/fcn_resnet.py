"""FCN-ResNet50/101: torchvision's variant of FCN (not Long et al.'s nets, see :mod:`.fcn`).

A ResNet dilated to output stride 8 (torchvision's rule: the first block of a dilated stage
keeps the previous rate), a 3x3 512-channel head with batch norm and dropout 0.1 on layer4,
bilinear upsampling of its stride-8 scores to the input size, and an auxiliary head of the
same form on layer3 (its loss weight 0.5 in torchvision's reference recipe). Module names
follow torchvision's state dicts (``backbone.*``, ``classifier.N``, ``aux_classifier.N``), so
its COCO-with-VOC-labels files load key for key.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..catalogue import register_weights, torchvision_coco_voc
from ..registry import register_model
from ..weights import with_pretrained
from .backbones.resnet import ResNet
from .base import CoarseScores, SegmentationModel
from .layers import Backbone, check_input

__all__ = ["FCNHead", "AuxiliaryHeadModel", "FCNResNet", "fcn_resnet50", "fcn_resnet101", "AUX_LOSS_WEIGHT"]

AUX_LOSS_WEIGHT = 0.5  # torchvision references/segmentation: loss = out + 0.5 * aux


class FCNHead(nn.Sequential):
    """3x3 conv to ``width`` (default ``in/4``) channels + BN + ReLU, dropout 0.1, 1x1 conv to
    the classes (also PSPNet's head after its pyramid, Sec. 3.3, at 512)."""

    def __init__(self, in_channels: int, num_classes: int, width: int | None = None) -> None:
        inter = width or in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, inter, 3, padding=1, bias=False),
            nn.BatchNorm2d(inter),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(inter, num_classes, 1),
        )


class AuxiliaryHeadModel(SegmentationModel):
    """A backbone, a main head on ``feature`` and an optional auxiliary head on ``aux_feature``.

    ``forward``: the main scores bilinearly upsampled (corners not aligned) to the input size;
    in ``train()`` mode with an auxiliary head, ``{"fused": main, "aux": aux}`` (both upsampled),
    whose losses :meth:`loss_weights` weighs. :meth:`outputs` gives torchvision's
    ``{"out", "aux"}`` in any mode.
    """

    align_corners = False  # torchvision's upsampling; PSPNet's own code aligns corners

    def __init__(
        self,
        backbone: Backbone,
        classifier: nn.Module,
        aux_classifier: nn.Module | None,
        *,
        feature: str,
        aux_feature: str,
        num_classes: int,
        aux_weight: float = AUX_LOSS_WEIGHT,
    ) -> None:
        super().__init__()
        self.backbone, self.classifier, self.aux_classifier = backbone, classifier, aux_classifier
        self.feature, self.aux_feature, self.aux_weight = feature, aux_feature, aux_weight
        self.num_classes, self.in_channels = num_classes, backbone.in_channels
        self.output_stride = backbone.feature_info[feature].stride

    def head(self, features: dict[str, Tensor]) -> Tensor:
        """The main scores at the output stride (a decoder may read other features too)."""
        return self.classifier(features[self.feature])

    def outputs(self, x: Tensor) -> dict[str, Tensor]:
        check_input(x, self.in_channels, type(self).__name__)
        features = self.backbone(x)
        size = x.shape[-2:]
        out = {"out": F.interpolate(self.head(features), size=size, mode="bilinear", align_corners=self.align_corners)}
        if self.aux_classifier is not None:
            aux = self.aux_classifier(features[self.aux_feature])
            out["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=self.align_corners)
        return out

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        if self.training and self.aux_classifier is not None:
            out = self.outputs(x)
            return {"fused": out["out"], "aux": out["aux"]}
        check_input(x, self.in_channels, type(self).__name__)
        scores = self.head(self.backbone(x))
        return F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)

    def loss_weights(self) -> dict[str, float]:
        return {"aux": self.aux_weight} if self.aux_classifier is not None else {}

    def classifier_layers(self) -> list[nn.Module]:
        last = [m for m in self.classifier.modules() if isinstance(m, nn.Conv2d)][-1:]
        aux = [m for m in self.aux_classifier.modules() if isinstance(m, nn.Conv2d)][-1:] if self.aux_classifier else []
        return last + aux

    def coarse_scores(self, x: Tensor) -> CoarseScores:
        check_input(x, self.in_channels, type(self).__name__)
        scores = self.head(self.backbone(x))
        # Not aligned: cell j covers pixels [s j, s (j + 1)), centred on s j + (s - 1) / 2; aligned: on s j.
        s = self.output_stride
        aligned = "aligned" if self.align_corners else "not aligned"
        note = f"{type(self).__name__}: stride-{s} scores bilinearly upsampled (corners {aligned})"
        return CoarseScores(scores, s, 0.0 if self.align_corners else (s - 1) / 2, note)

    def feature_layers(self) -> list[str]:
        return [f"backbone.{n}" for n in self.backbone.feature_layers()]

    def weights_root(self) -> nn.Module:
        return self


class FCNResNet(AuxiliaryHeadModel):
    """torchvision's FCN on a dilated ResNet (stride 8)."""


def _fcn_resnet(depth: int, num_classes: int, in_channels: int, aux: bool, pretrained: str | None) -> FCNResNet:
    backbone = ResNet(depth, in_channels, output_stride=8, dilation_rule="torchvision")
    model = FCNResNet(
        backbone,
        FCNHead(2048, num_classes),
        FCNHead(1024, num_classes) if aux else None,
        feature="layer4",
        aux_feature="layer3",
        num_classes=num_classes,
    )
    return with_pretrained(model, pretrained)


_TV = "torchvision's FCN-ResNet (Long et al. 2015's FCN idea on a dilated ResNet)"


@register_model("fcn_resnet50", paper=_TV, output_stride=8, receptive_field=443, default_size=520)
def fcn_resnet50(
    *, num_classes: int = 21, in_channels: int = 3, aux: bool = True, pretrained: str | None = None
) -> FCNResNet:
    """FCN-ResNet50 as torchvision builds it (35,322,218 parameters with aux, 21 classes)."""
    return _fcn_resnet(50, num_classes, in_channels, aux, pretrained)


@register_model("fcn_resnet101", paper=_TV, output_stride=8, receptive_field=987, default_size=520)
def fcn_resnet101(
    *, num_classes: int = 21, in_channels: int = 3, aux: bool = True, pretrained: str | None = None
) -> FCNResNet:
    """FCN-ResNet101 as torchvision builds it (54,314,346 parameters with aux, 21 classes)."""
    return _fcn_resnet(101, num_classes, in_channels, aux, pretrained)


# torchvision's COCO_WITH_VOC_LABELS_V1 weights; the full sha256 as LibreYOLO records it (its
# provenance notes); torchvision publishes the first 8 hex digits, in the file name.
_BY = "LibreYOLO (weights/parity_deeplabv3.py, docs/provenance/fcn.md)"
register_weights(
    torchvision_coco_voc(
        "fcn_resnet50",
        "fcn_resnet50_coco-1167a1af.pth",
        sha256="1167a1affa42e1e62858f8d3fac12d109e0108327ffc91c5855a324b11683c36",
        published_by=_BY,
        miou=60.5,
        pixel_acc=91.4,
        num_params=35_322_218,
        file_size=141_567_418,
    ),
    torchvision_coco_voc(
        "fcn_resnet101",
        "fcn_resnet101_coco-7ecb50ca.pth",
        sha256="7ecb50ca17844860a70d5ed0c748d997cf8adb62932abaa0233430c68594d749",
        published_by=_BY,
        miou=63.7,
        pixel_acc=91.9,
        num_params=54_314_346,
        file_size=217_800_805,
    ),
)
