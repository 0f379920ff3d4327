"""ResNet-50/101 (He et al. 2016) as a named-feature backbone, with DeepLab's dilation.

Module names follow torchvision's file layout (``conv1``, ``bn1``, ``layerK.M.*``) so its
ImageNet files load directly; :mod:`densepred.weights` maps the Caffe (MSRA) names onto them.

- ``output_stride`` 8 or 16 replaces the stride of layer3/layer4 by dilation, keeping the
  receptive field (DeepLab v2, Sec. 3.1: "atrous convolution ... in the last two blocks").
- ``caffe_style=True`` puts the stride in the first 1x1 convolution of a block, as in the
  original MSRA model that DeepLab v2 fine-tunes, and uses Caffe's ceil-mode max-pool;
  torchvision puts it in the 3x3 convolution ("ResNet v1.5").
- ``dilation_rule``: in DeepLab's nets every block of a dilated stage uses the stage's rate;
  torchvision's ``replace_stride_with_dilation`` keeps the previous rate in a stage's first
  block (the one that would have had the stride) - its segmentation weights need that variant.
- ``multi_grid`` (DeepLab v3, Sec. 3.2): block4's three units use rate x (1, 2, 4).
- ``deep_stem`` (PSPNet; "ResNet-C"): three 3x3 convolutions (64, 64, 128) replace the 7x7.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from ...catalogue import imagenet_trunk, register_weights
from ..layers import Backbone, FeatureSpec, FrozenBatchNorm2d, check_input

__all__ = ["ResNet", "Bottleneck", "RESNET_DEPTHS"]

# Bottleneck blocks per stage (Table 1 of He et al.).
RESNET_DEPTHS: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4), plus the identity or a projection shortcut."""

    expansion = 4

    def __init__(
        self,
        in_ch: int,
        width: int,
        *,
        stride: int,
        dilation: int,
        caffe_style: bool,
        norm: type[nn.Module],
    ) -> None:
        super().__init__()
        out_ch = width * self.expansion
        s1, s3 = (stride, 1) if caffe_style else (1, stride)
        self.conv1 = nn.Conv2d(in_ch, width, 1, stride=s1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=s3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = norm(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), norm(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(Backbone):
    """ResNet trunk returning ``{"layer1", "layer2", "layer3", "layer4"}`` (res2 ... res5).

    Args:
        depth: 50 or 101.
        output_stride: 32 (classification), 16 or 8 (DeepLab v2 uses 8).
        caffe_style: stride in the first 1x1 conv and ceil-mode pooling (MSRA/DeepLab weights).
        frozen_bn: use :class:`FrozenBatchNorm2d` (Caffe's ``use_global_stats``).
    """

    def __init__(
        self,
        depth: int = 101,
        in_channels: int = 3,
        *,
        output_stride: int = 32,
        caffe_style: bool = False,
        frozen_bn: bool = False,
        dilation_rule: Literal["deeplab", "torchvision"] = "deeplab",
        multi_grid: Sequence[int] | None = None,
        deep_stem: bool = False,
    ) -> None:
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_DEPTHS)}, got {depth}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if dilation_rule not in ("deeplab", "torchvision"):
            raise ValueError(f"dilation_rule must be 'deeplab' or 'torchvision', got {dilation_rule!r}")
        grid = tuple(multi_grid or [1] * RESNET_DEPTHS[depth][3])
        if len(grid) != RESNET_DEPTHS[depth][3] or min(grid) < 1:
            raise ValueError(f"multi_grid needs {RESNET_DEPTHS[depth][3]} positive multipliers (block4), got {grid}")
        self.depth, self.in_channels, self.output_stride = depth, in_channels, output_stride
        self.caffe_style, self.deep_stem = caffe_style, deep_stem
        norm: type[nn.Module] = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        if deep_stem:  # PSPNet's conv1_1 (stride 2), conv1_2, conv1_3
            widths = (in_channels, 64, 64, 128)
            for i in range(3):
                stride = 2 if i == 0 else 1
                self.add_module(f"conv1_{i + 1}", nn.Conv2d(widths[i], widths[i + 1], 3, stride, 1, bias=False))
                self.add_module(f"bn1_{i + 1}", norm(widths[i + 1]))
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        # Caffe rounds pooling up; with padding 1 a 321 input gives DeepLab's 41x41 scores.
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=caffe_style)

        # Stages 3/4 trade stride for dilation to reach the requested output stride.
        strides, dilations = [1, 2, 2, 2], [1, 1, 1, 1]
        if output_stride <= 16:
            strides[3], dilations[3] = 1, 2
        if output_stride == 8:
            strides[2], dilations[2], dilations[3] = 1, 2, 4
        in_ch, stride = (128 if deep_stem else 64), 4
        self.feature_info = {}
        for i, (blocks, width) in enumerate(zip(RESNET_DEPTHS[depth], (64, 128, 256, 512), strict=True)):
            layer = []
            for b in range(blocks):
                dilation = dilations[i] * (grid[b] if i == 3 else 1)
                if b == 0 and dilation_rule == "torchvision" and dilations[i] > 1:
                    dilation = dilations[i - 1]  # the rate before this stage traded its stride
                layer.append(
                    Bottleneck(
                        in_ch,
                        width,
                        stride=strides[i] if b == 0 else 1,
                        dilation=dilation,
                        caffe_style=caffe_style,
                        norm=norm,
                    )
                )
                in_ch = width * Bottleneck.expansion
            stride *= strides[i]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            self.feature_info[f"layer{i + 1}"] = FeatureSpec(in_ch, stride)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def feature_layers(self) -> list[str]:
        return [f"layer{i}" for i in range(1, 5)]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        check_input(x, self.in_channels, f"ResNet-{self.depth}")
        if self.deep_stem:
            for i in (1, 2, 3):
                x = self.relu(getattr(self, f"bn1_{i}")(getattr(self, f"conv1_{i}")(x)))
            x = self.maxpool(x)
        else:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out: dict[str, Tensor] = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            out[name] = x
        return out


# torchvision's ImageNet files (IMAGENET1K_V1: the "v1.5" stride placement, caffe_style=False).
_BY = "other projects that verify this download (e.g. LibreYOLO's provenance notes, zspacelabs/bunsen)"
register_weights(
    imagenet_trunk(
        "resnet50",
        "resnet50-0676ba61.pth",
        sha256="0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a",
        published_by=_BY,
        top1=76.130,
        top5=92.862,
        num_params=25_557_032,
        file_size=102_530_333,
    ),
    imagenet_trunk(
        "resnet101",
        "resnet101-63fe2227.pth",
        sha256="63fe2227b86e8f1f2063f43a75c84d195911b6a0eace650907dd3dc62dd49a0a",
        published_by="zspacelabs/bunsen (its pretrained-checkpoint table)",
        top1=77.374,
        top5=93.546,
        num_params=44_549_160,
    ),
)
