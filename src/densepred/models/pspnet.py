"""PSPNet (Zhao, Shi, Qi, Wang & Jia, CVPR 2017, "Pyramid Scene Parsing Network").

- Backbone (Sec. 3.2 and 4): a ResNet-50/101 with the deep stem (three 3x3 convolutions
  replace the 7x7: the authors' "ResNet-C"), dilated to output stride 8 (layer3 at rate 2,
  layer4 at rate 4, every block).
- Pyramid pooling module (Sec. 3.3, Fig. 3): the last map average-pooled to 1x1, 2x2, 3x3 and
  6x6 bins, each reduced by a 1x1 convolution to 1/4 of the channels (512 of 2048) with batch
  norm, bilinearly upsampled to the map's size and concatenated with it (4096 channels); a 3x3
  convolution of 512 with batch norm, dropout 0.1 and the 1x1 class scores.
- Deep supervision (Sec. 3.4, Fig. 4): an auxiliary classifier on layer3 (res4b22), its loss
  weighted 0.4 (Sec. 4.1: "we set the auxiliary loss weight to 0.4").

Our variant's details follow the authors' PyTorch code (hszhao/semseg): the stride in the 3x3
convolution of a block, corner-aligned bilinear upsampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register_model
from ..weights import with_pretrained
from .backbones.resnet import ResNet
from .fcn_resnet import AuxiliaryHeadModel, FCNHead
from .layers import being_traced, in_layout_of

__all__ = ["PyramidPooling", "PSPNet", "PSP_BINS", "AUX_WEIGHT"]

PSP_BINS = (1, 2, 3, 6)  # Sec. 3.3
AUX_WEIGHT = 0.4  # Sec. 4.1


class BinPooling(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` whose traced graph (ONNX, TorchScript) pools any input size.

    Traced, PyTorch's adaptive pooling becomes a fixed-kernel average pool sized for the traced
    input; here bin ``i`` of ``b`` spans ``[floor(i n / b), ceil((i + 1) n / b))`` as in
    PyTorch's kernel, computed from the traced size, so exports agree at every size.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not being_traced():
            return super().forward(x)
        bins = self.output_size if isinstance(self.output_size, int) else self.output_size[0]
        h, w = x.shape[-2], x.shape[-1]
        rows = []
        for i in range(bins):
            top, bottom = (i * h) // bins, ((i + 1) * h + bins - 1) // bins
            cells = [
                x[:, :, top:bottom, (j * w) // bins : ((j + 1) * w + bins - 1) // bins].mean((2, 3), keepdim=True)
                for j in range(bins)
            ]
            rows.append(torch.cat(cells, 3))
        return torch.cat(rows, 2)


class PyramidPooling(nn.Module):
    """The pyramid pooling module (Fig. 3(c)): the map and its bins' upsampled features."""

    def __init__(self, in_channels: int, bins: Sequence[int] = PSP_BINS) -> None:
        super().__init__()
        self.bins = tuple(bins)
        reduced = in_channels // len(self.bins)  # 1/N of the channels for an N-level pyramid
        self.stages = nn.ModuleList(
            nn.Sequential(
                BinPooling(b), nn.Conv2d(in_channels, reduced, 1, bias=False), nn.BatchNorm2d(reduced), nn.ReLU()
            )
            for b in self.bins
        )
        self.out_channels = in_channels + reduced * len(self.bins)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [
            in_layout_of(F.interpolate(stage(x), size=size, mode="bilinear", align_corners=True), x)
            for stage in self.stages
        ]
        return torch.cat([x, *pooled], 1)


class PSPNet(AuxiliaryHeadModel):
    """Dilated ResNet, the pyramid pooling module and the scores, upsampled 8x to the input."""

    align_corners = True
    no_imagenet_weights = (
        "PSPNet's deep-stem ResNet has no torchvision ImageNet file (its stem is three 3x3 convolutions); "
        "give the authors' converted ImageNet weights as a file, or train from scratch"
    )

    def pyramid(self) -> PyramidPooling:
        return self.classifier[0]


@register_model("pspnet", paper="Zhao et al. 2017, PSPNet", output_stride=8, receptive_field=1039, default_size=473)
def pspnet(
    *,
    num_classes: int = 21,
    in_channels: int = 3,
    depth: Literal[50, 101] = 101,
    bins: Sequence[int] = PSP_BINS,
    aux: bool = True,
    pretrained: str | None = None,
) -> PSPNet:
    """PSPNet on a dilated ResNet-``depth`` with the deep stem (VOC: ResNet-101, 473 crops)."""
    backbone = ResNet(depth, in_channels, output_stride=8, deep_stem=True)
    ppm = PyramidPooling(2048, bins)
    model = PSPNet(
        backbone,
        nn.Sequential(ppm, *FCNHead(ppm.out_channels, num_classes, width=512)),  # flat: classifier.0 = the pyramid
        FCNHead(1024, num_classes) if aux else None,
        feature="layer4",
        aux_feature="layer3",
        num_classes=num_classes,
        aux_weight=AUX_WEIGHT,
    )
    return with_pretrained(model, pretrained)
