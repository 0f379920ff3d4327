"""VGG16 (Simonyan & Zisserman 2015, configuration D) as a named-feature backbone.

Layer names follow the paper and the Caffe reference nets (``conv1_1`` ... ``pool5``) so that
FCN and DeepLab read like their prototxts. Two pooling geometries:

- ``"fcn"``: 2x2 max-pool, stride 2, ceil mode (Caffe's rounding), as in VGG16 itself and FCN.
- ``"deeplab"``: 3x3 max-pool with padding 1 (DeepLab v1, Sec. 3.1 and its released prototxt);
  pool4 and pool5 get stride 1 and conv5 dilation 2 so that the net has output stride 8
  ("atrous" VGG16).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from ...catalogue import imagenet_trunk, register_weights
from ..layers import Backbone, FeatureSpec, check_input

__all__ = ["VGG16", "VGG16_STAGES", "vgg16_classifier"]

# (stage, number of 3x3 convs, channels) of VGG16 (configuration D, Table 1 of the paper).
VGG16_STAGES: tuple[tuple[int, int, int], ...] = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))


class VGG16(Backbone):
    """VGG16 conv1_1 ... pool5, returning ``{"pool3", "pool4", "pool5"}``.

    Args:
        in_channels: input image channels.
        first_padding: padding of conv1_1; FCN uses 100 so that any input size survives the
            five poolings and fc6's 7x7 kernel (FCN reference nets; crops undo it later).
        pooling: ``"fcn"`` or ``"deeplab"`` geometry (see the module docstring).
    """

    def __init__(
        self,
        in_channels: int = 3,
        *,
        first_padding: int = 1,
        pooling: Literal["fcn", "deeplab"] = "fcn",
    ) -> None:
        super().__init__()
        if pooling not in ("fcn", "deeplab"):
            raise ValueError(f"pooling must be 'fcn' or 'deeplab', got {pooling!r}")
        self.in_channels = in_channels
        self.pooling = pooling
        self.layer_names: list[str] = []
        channels, stride = in_channels, 1
        self.feature_info = {}
        for stage, n_convs, width in VGG16_STAGES:
            # DeepLab: pool4 has stride 1, so conv5 sees stride 8 and is dilated by 2 (atrous).
            dilation = 2 if (pooling == "deeplab" and stage == 5) else 1
            for i in range(1, n_convs + 1):
                padding = first_padding if (stage, i) == (1, 1) else dilation
                conv = nn.Conv2d(channels, width, 3, padding=padding, dilation=dilation)
                self._add(f"conv{stage}_{i}", conv)
                self._add(f"relu{stage}_{i}", nn.ReLU(inplace=True))
                channels = width
            if pooling == "fcn":
                pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)
                stride *= 2
            else:
                pool_stride = 2 if stage <= 3 else 1
                pool = nn.MaxPool2d(3, stride=pool_stride, padding=1, ceil_mode=True)
                stride *= pool_stride
            self._add(f"pool{stage}", pool)
            self.feature_info[f"pool{stage}"] = FeatureSpec(width, stride)
        # Expose only the maps that heads read; shallower maps are reachable with hooks.
        self.feature_info = {k: self.feature_info[k] for k in ("pool3", "pool4", "pool5")}
        self.out_channels = channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def _add(self, name: str, module: nn.Module) -> None:
        self.add_module(name, module)
        self.layer_names.append(name)

    def feature_layers(self) -> list[str]:
        """Edges and colours (conv1_2), textures (conv3_3), parts (conv5_3): ZFNet's Fig. 2 rows."""
        return ["conv1_2", "conv3_3", "conv5_3"]

    @property
    def conv_names(self) -> list[str]:
        """The 13 convolution names in order (``conv1_1`` ... ``conv5_3``)."""
        return [n for n in self.layer_names if n.startswith("conv")]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        check_input(x, self.in_channels, "VGG16")
        out: dict[str, Tensor] = {}
        for name in self.layer_names:
            x = getattr(self, name)(x)
            if name in self.feature_info:
                out[name] = x
        return out


def vgg16_classifier(num_classes: int = 1000, in_channels: int = 3, *, dropout: float = 0.5) -> nn.Sequential:
    """The ImageNet VGG16 classifier as one ``nn.Sequential`` (224x224 in, scores out).

    ``features`` is conv1_1 ... pool5 (7x7x512 at 224), then ``fc6`` (25088 -> 4096), ``fc7``
    (4096 -> 4096) and ``fc8`` (4096 -> classes). :func:`densepred.convolutionalize` turns it
    into the fully convolutional net FCN starts from.
    """
    backbone = VGG16(in_channels)
    features = nn.Sequential(*[getattr(backbone, n) for n in backbone.layer_names])
    return nn.Sequential(
        features,
        nn.Flatten(1),
        nn.Linear(512 * 7 * 7, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(4096, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(4096, num_classes),
    )


# torchvision's ImageNet files. VGG16's full sha256 is recorded by projects that verify this
# download; for VGG16-BN only the tag in the file name is checked (with a warning).
register_weights(
    imagenet_trunk(
        "vgg16",
        "vgg16-397923af.pth",
        sha256="397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
        published_by="LibreYOLO (docs/provenance/vgg.md) and other projects that verify this download",
        top1=71.592,
        top5=90.382,
        num_params=138_357_544,
        file_size=553_433_881,
    ),
    # SegNet's encoder (Badrinarayanan et al. 2017, Sec. 3: VGG16 with batch norm).
    imagenet_trunk("vgg16_bn", "vgg16_bn-6c64b313.pth", sha256=None, top1=73.360, top5=91.516, num_params=138_365_992),
)
