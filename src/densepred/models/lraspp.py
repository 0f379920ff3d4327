"""Lite R-ASPP (Howard et al. 2019, "Searching for MobileNetV3", Sec. 6.4) on MobileNetV3-Large.

LR-ASPP is a dilated MobileNetV3-Large trunk (output stride 16) and a light head with two
branches on the last map: a 1x1 convolution, batch norm and ReLU, and an attention branch
(pooling, 1x1 convolution, sigmoid) whose per-channel weights multiply it, as in
squeeze-and-excite. The product is upsampled to the stride-8 map's size and scored; scores from
the stride-8 map (torchvision's low tap, the output of the first stride-8 block, 40 channels) are
added, and the sum is bilinearly upsampled to the input.

This is the torchvision variant, whose weights load key for key (``backbone.{i}.*`` and
``classifier.{cbr,scale,low_classifier,high_classifier}.*``). It differs from the paper in one
place: the paper's attention branch pools with a large 49x49 kernel at stride (16, 20) (for
1024x2048 Cityscapes inputs), torchvision's pools globally, so the weights do not depend on the
input size. torchvision also keeps the last stage's full width (no "RF2" reduced tail).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..catalogue import register_weights, torchvision_coco_voc
from ..registry import register_model
from ..weights import with_pretrained
from .backbones.mobilenetv3 import FeatureTaps, MobileNetV3Large
from .base import CoarseScores, SegmentationModel
from .layers import Backbone, GlobalAveragePool, check_input

__all__ = ["LRASPP", "LRASPPHead"]


class LRASPPHead(nn.Module):
    """The LR-ASPP head (Sec. 6.4): ``cbr`` and ``scale`` on the high map, one classifier
    per map. Names and defaults as torchvision's (default batch norm, PyTorch's default init)."""

    def __init__(self, low_channels: int, high_channels: int, num_classes: int, inter_channels: int = 128) -> None:
        super().__init__()
        self.cbr = nn.Sequential(
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            nn.BatchNorm2d(inter_channels),
            nn.ReLU(inplace=True),
        )
        # torchvision's variant: global pooling where the paper pools 49x49 at stride (16, 20).
        self.scale = nn.Sequential(
            GlobalAveragePool(),
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            nn.Sigmoid(),
        )
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        """The stride-8 class scores (at ``low``'s size)."""
        # The pooled branch's gradient is a broadcast view (global_average_pool), so autograd's sum
        # of the two branches' gradients keeps a channels-last model's layout in training, which
        # the batch norm before needs (mixed layouts: 6.5 ms against 1.5, 960 x 16 x 16, batch 8).
        scale = self.scale(high)
        x = self.cbr(high) * scale
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)


class LRASPP(SegmentationModel):
    """A backbone with ``"low"`` and ``"high"`` maps and the LR-ASPP head; logits at the input size.

    ``output_stride`` is that of the scores before the final upsampling (the low map's, 8).
    """

    def __init__(self, backbone: Backbone, num_classes: int, *, inter_channels: int = 128) -> None:
        super().__init__()
        missing = {"low", "high"} - backbone.feature_info.keys()
        if missing:
            raise ValueError(f"LR-ASPP reads 'low' and 'high'; the backbone declares {sorted(backbone.feature_info)}")
        low, high = backbone.feature_info["low"], backbone.feature_info["high"]
        self.backbone = backbone
        self.classifier = LRASPPHead(low.channels, high.channels, num_classes, inter_channels)
        self.num_classes, self.in_channels = num_classes, backbone.in_channels
        self.output_stride = low.stride

    def classifier_layers(self) -> list[nn.Module]:
        return [self.classifier.low_classifier, self.classifier.high_classifier]

    def coarse_logits(self, x: Tensor) -> Tensor:
        check_input(x, self.in_channels, type(self).__name__)
        feats = self.backbone(x)
        return self.classifier(feats["low"], feats["high"])

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.coarse_logits(x), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def coarse_scores(self, x: Tensor) -> CoarseScores:
        """The stride-8 scores. Every convolution pads to keep its size, so cell ``j`` is centred on
        pixel ``8 j``; the half-pixel (``align_corners=False``) upsampling places it at ``8 j + 3.5``."""
        note = "LR-ASPP output: stride-8 scores bilinearly upsampled (half-pixel centres, torchvision's)"
        return CoarseScores(self.coarse_logits(x), self.output_stride, 0.0, note)

    def feature_layers(self) -> list[str]:
        return [f"backbone.{n}" for n in self.backbone.feature_layers()]

    def example_size(self) -> tuple[int, int]:
        return (65, 81)  # odd and non-square; big enough for a stride-16 map of 5x6


# The field of the convolutions alone, of the high branch (the deeper one): 659 px, from
# r += (k - 1) * dilation * stride-so-far over the stem and the depthwise kernels of Table 1 with
# torchvision's dilation of the last stage. The SE blocks and the head's global pooling make
# every score depend on the whole image besides.
@register_model(
    "lraspp_mobilenet_v3_large",
    paper="Howard et al. 2019, MobileNetV3 (LR-ASPP, torchvision variant)",
    output_stride=8,
    receptive_field=659,
    default_size=520,  # torchvision's evaluation size for its weights; the paper's inputs are 1024x2048
)
def lraspp_mobilenet_v3_large(
    *, num_classes: int = 21, in_channels: int = 3, pretrained: str | None = None, inter_channels: int = 128
) -> LRASPP:
    """LR-ASPP on dilated MobileNetV3-Large, taps at features 4 (low) and 16 (high), as torchvision
    (3,221,538 parameters for 21 classes)."""
    trunk = MobileNetV3Large(in_channels, dilated=True)
    # torchvision's taps: the 4th stage index from the end (stride 8) and the last layer.
    low, high = trunk.stage_indices[-4], trunk.stage_indices[-1]
    backbone = FeatureTaps(trunk, {"low": low, "high": high})
    return with_pretrained(LRASPP(backbone, num_classes, inter_channels=inter_channels), pretrained)


# torchvision's COCO_WITH_VOC_LABELS_V1 weights; the full sha256 as other projects record it in
# their download catalogues (torchvision publishes the first 8 hex digits, in the file name).
_BY = "other projects' download catalogues (byte count and sha256 recorded)"
register_weights(
    torchvision_coco_voc(
        "lraspp_mobilenet_v3_large",
        "lraspp_mobilenet_v3_large-d234d4ea.pth",
        sha256="d234d4eae9d55d5f76de18b77cf0dc62c66fe5c5482758209d00f950c92bb280",
        published_by=_BY,
        miou=57.9,
        pixel_acc=91.2,
        num_params=3_221_538,
        file_size=13_097_061,
    ),
)
