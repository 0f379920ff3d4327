"""MobileNetV3-Large (Howard et al. 2019, "Searching for MobileNetV3") as a named-feature backbone.

The net of the paper's Table 1: a 3x3 stride-2 stem, fifteen inverted-residual "bneck" blocks
(MobileNetV2's 1x1 expand -> depthwise -> 1x1 linear project) with squeeze-and-excite in
some (Sec. 5.3, squeezed to 1/4 of the expansion), hard-swish in the second half of the net
(Sec. 5.2) and a final 1x1 convolution to 960 channels. Module names and indices follow
torchvision's ``mobilenet_v3_large()`` (``features.N``, ``features.N.block.M``, SE ``fc1``/``fc2``,
``classifier.0/3``) so its files load strictly, key for key; batch norm uses its eps 0.001 and
momentum 0.01.

``dilated=True`` is torchvision's segmentation trunk (the paper applies atrous convolution to the
last block, Sec. 6.4): the blocks from index 13 on (the stride-32 stage) keep stride 1 and dilate
their depthwise convolutions by 2, for output stride 16. Like torchvision, the stride-2 block
itself is dilated too, and the channels are not halved (the paper's "RF2" reduced tail is not used).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...catalogue import imagenet_trunk, register_weights
from ..layers import Backbone, DilatedDepthwiseConv2d, FeatureSpec, check_input, global_average_pool

__all__ = ["MobileNetV3Large", "InvertedResidual", "SqueezeExcitation", "FeatureTaps", "Bneck", "BNECKS_LARGE"]

_BN_EPS, _BN_MOMENTUM = 0.001, 0.01  # torchvision's values (TensorFlow's 0.99 decay)


class Bneck(NamedTuple):
    """One row of Table 1: kernel, expansion ("exp size"), output channels, SE, activation, stride."""

    kernel: int
    expanded: int
    out: int
    se: bool
    act: Literal["RE", "HS"]
    stride: int


# Table 1 of Howard et al. (MobileNetV3-Large), the rows between the stem and the final 1x1 conv.
BNECKS_LARGE: tuple[Bneck, ...] = (
    Bneck(3, 16, 16, False, "RE", 1),
    Bneck(3, 64, 24, False, "RE", 2),
    Bneck(3, 72, 24, False, "RE", 1),
    Bneck(5, 72, 40, True, "RE", 2),
    Bneck(5, 120, 40, True, "RE", 1),
    Bneck(5, 120, 40, True, "RE", 1),
    Bneck(3, 240, 80, False, "HS", 2),
    Bneck(3, 200, 80, False, "HS", 1),
    Bneck(3, 184, 80, False, "HS", 1),
    Bneck(3, 184, 80, False, "HS", 1),
    Bneck(3, 480, 112, True, "HS", 1),
    Bneck(3, 672, 112, True, "HS", 1),
    Bneck(5, 672, 160, True, "HS", 2),
    Bneck(5, 960, 160, True, "HS", 1),
    Bneck(5, 960, 160, True, "HS", 1),
)
_STEM_CHANNELS, _LAST_CHANNELS, _HIDDEN = 16, 960, 1280


def make_divisible(value: float, divisor: int = 8) -> int:
    """The nearest multiple of ``divisor`` to ``value``, never more than 10% below it (MobileNet's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _activation(kind: Literal["RE", "HS"]) -> nn.Module:
    return nn.Hardswish(inplace=True) if kind == "HS" else nn.ReLU(inplace=True)


def conv_bn(
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    act: nn.Module | None = None,
) -> nn.Sequential:
    """Convolution (no bias) -> batch norm -> activation: ``.0``/``.1``/``.2`` as torchvision's
    ``Conv2dNormActivation``. Padding keeps the size ("same"), so every map's cell ``j`` is centred
    on input pixel ``stride * j``."""
    if dilation > 1 and stride == 1 and groups == in_ch == out_ch:  # the dilated stage's depthwise layers
        conv: nn.Conv2d = DilatedDepthwiseConv2d(out_ch, kernel, dilation)
    else:
        conv = nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2 * dilation, dilation, groups, bias=False)
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(out_ch, eps=_BN_EPS, momentum=_BN_MOMENTUM)]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excite (Hu et al. 2018) as MobileNetV3 uses it (Sec. 5.3): global average pool,
    1x1 to ``make_divisible(channels / 4)``, ReLU, 1x1 back, hard-sigmoid, channel-wise scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        squeezed = make_divisible(channels // 4, 8)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.fc2(self.relu(self.fc1(global_average_pool(x))))
        return x * F.hardsigmoid(scale)


class InvertedResidual(nn.Module):
    """A bneck block: [1x1 expand] -> kxk depthwise -> [SE] -> 1x1 linear projection, plus the
    identity when the block keeps stride and width (MobileNetV2, Sandler et al. 2018, Sec. 3.3).

    ``block`` holds the layers at torchvision's indices (the expansion is left out when it would
    not widen, as in the first block). ``strided`` marks a block that starts a new stage in Table 1
    (torchvision's ``_is_cn``), even when dilation keeps its output at stride 1.
    """

    def __init__(self, in_ch: int, spec: Bneck, *, dilation: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if spec.expanded != in_ch:
            layers.append(conv_bn(in_ch, spec.expanded, 1, act=_activation(spec.act)))
        stride = 1 if dilation > 1 else spec.stride
        layers.append(
            conv_bn(
                spec.expanded,
                spec.expanded,
                spec.kernel,
                stride=stride,
                dilation=dilation,
                groups=spec.expanded,
                act=_activation(spec.act),
            )
        )
        if spec.se:
            layers.append(SqueezeExcitation(spec.expanded))
        layers.append(conv_bn(spec.expanded, spec.out, 1))  # linear bottleneck: no activation
        self.block = nn.Sequential(*layers)
        self.use_residual = spec.stride == 1 and in_ch == spec.out
        self.strided = spec.stride > 1
        self.out_channels = spec.out

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return out + x if self.use_residual else out


class MobileNetV3Large(Backbone):
    """MobileNetV3-Large returning the output of the first layer of each stage and of the last.

    Keys are the module names ``features.{i}`` for ``i`` in :attr:`stage_indices` =
    ``[0, 2, 4, 7, 13, 16]`` (the stem, each block that strides, the final 1x1 conv), as
    torchvision's segmentation builders choose their taps: strides 2, 4, 8, 16, 32, 32 (16 and 16
    for the last two when ``dilated``), channels 16, 24, 40, 80, 160, 960.

    Args:
        in_channels: input image channels.
        dilated: torchvision's ``dilated=True`` (see the module docstring): output stride 16.
        with_classifier: add the ImageNet classifier (``avgpool``, ``classifier.0`` Linear
            960 -> 1280, hard-swish, dropout, ``classifier.3`` Linear 1280 -> ``num_classes``);
            with 1000 classes torchvision's ImageNet file (5,483,032 parameters) loads strictly.
        num_classes, dropout: of that classifier (torchvision: 1000 and 0.2).
    """

    def __init__(
        self,
        in_channels: int = 3,
        *,
        dilated: bool = False,
        with_classifier: bool = False,
        num_classes: int = 1000,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.in_channels, self.dilated = in_channels, dilated
        layers: list[nn.Module] = [conv_bn(in_channels, _STEM_CHANNELS, 3, stride=2, act=nn.Hardswish(inplace=True))]
        # ``strides``: the output stride of each layer; without dilation 32 is reached at index 13.
        in_ch, nominal, strides = _STEM_CHANNELS, 2, [2]
        for spec in BNECKS_LARGE:
            nominal *= spec.stride
            # torchvision dilates the whole stride-32 stage, its striding block included.
            dilation = 2 if dilated and nominal == 32 else 1
            layers.append(InvertedResidual(in_ch, spec, dilation=dilation))
            strides.append(min(nominal, 16) if dilated else nominal)
            in_ch = spec.out
        layers.append(conv_bn(in_ch, _LAST_CHANNELS, 1, act=nn.Hardswish(inplace=True)))
        strides.append(strides[-1])
        self.features = nn.Sequential(*layers)
        if with_classifier:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(
                nn.Linear(_LAST_CHANNELS, _HIDDEN),
                nn.Hardswish(inplace=True),
                nn.Dropout(dropout, inplace=True),
                nn.Linear(_HIDDEN, num_classes),
            )
        # torchvision's taps: the stem, every block that strides (its "C1 ... C4") and the last layer.
        self.stage_indices = (
            [0] + [i for i, m in enumerate(layers) if isinstance(m, InvertedResidual) and m.strided] + [len(layers) - 1]
        )
        channels = [_STEM_CHANNELS] + [spec.out for spec in BNECKS_LARGE] + [_LAST_CHANNELS]
        self.feature_info = {f"features.{i}": FeatureSpec(channels[i], strides[i]) for i in self.stage_indices}
        self.output_stride = strides[-1]
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation, so a fresh model matches one built there in distribution.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        check_input(x, self.in_channels, "MobileNetV3-Large")
        out: dict[str, Tensor] = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if f"features.{i}" in self.feature_info:
                out[f"features.{i}"] = x
        return out

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet class scores (needs ``with_classifier=True``): torchvision's ``forward``."""
        if not hasattr(self, "classifier"):
            raise ValueError("this MobileNetV3Large has no classifier; build it with with_classifier=True")
        check_input(x, self.in_channels, "MobileNetV3-Large")
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class FeatureTaps(Backbone):
    """A backbone's ``features`` up to the deepest tap, each layer under its index, returning the
    taps by name: torchvision's ``IntermediateLayerGetter``, so a segmentation model's state dict
    reads ``backbone.{i}.*`` as torchvision's does.

    Args:
        backbone: the trunk whose layers are taken (shared, not copied).
        taps: ``{name: index}``; each index must be one of ``backbone.stage_indices``.
    """

    def __init__(self, backbone: MobileNetV3Large, taps: Mapping[str, int]) -> None:
        super().__init__()
        bad = {name: i for name, i in taps.items() if i not in backbone.stage_indices}
        if not taps or bad or len(set(taps.values())) != len(taps):
            raise ValueError(
                f"taps must be indices among the stage indices {backbone.stage_indices}, each once, got {dict(taps)}"
            )
        self.in_channels, self.dilated = backbone.in_channels, backbone.dilated
        self.taps = dict(taps)
        for i in range(max(taps.values()) + 1):
            self.add_module(str(i), backbone.features[i])
        self.feature_info = {name: backbone.feature_info[f"features.{i}"] for name, i in taps.items()}
        self._names = {str(i): name for name, i in taps.items()}

    def feature_layers(self) -> list[str]:
        return [str(i) for i in sorted(self.taps.values())]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        check_input(x, self.in_channels, "MobileNetV3-Large")
        out: dict[str, Tensor] = {}
        for index, layer in self.named_children():
            x = layer(x)
            if index in self._names:
                out[self._names[index]] = x
        return out


# torchvision's ImageNet file (IMAGENET1K_V1); only the tag in its name is published.
register_weights(
    imagenet_trunk(
        "mobilenet_v3_large",
        "mobilenet_v3_large-8738ca79.pth",
        sha256=None,
        top1=74.042,
        top5=91.340,
        num_params=5_483_032,
    )
)
