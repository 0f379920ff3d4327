"""Fully Convolutional Networks (Long, Shelhamer & Darrell, CVPR 2015) on VGG16.

FCN = a convolutionalized VGG16 (fc6/fc7 become 7x7 and 1x1 convolutions, Sec. 3.1), a 1x1
class scoring layer ``score_fr``, and in-network upsampling by "deconvolution" (Sec. 3.3).
The skip architecture (Sec. 4.2, Fig. 3) fuses the stride-32 scores with scores from pool4
(FCN-16s) and pool3 (FCN-8s). Layer names, conv1_1's padding of 100 and the crop offsets
follow the reference Caffe nets (voc-fcn32s/16s/8s/8s-atonce), so output pixels line up with
input pixels exactly for any input size.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..catalogue import VOC_CATEGORIES, Digest, Weights, register_weights
from ..data.normalization import CAFFE_BGR
from ..registry import register_model
from ..weights import with_pretrained
from .backbones.vgg import VGG16
from .base import CoarseScores, SegmentationModel
from .layers import BilinearDeconv, Im2colConv2d, centre_geometry, check_input, crop

__all__ = ["FCN", "FCN_CROP_OFFSETS"]

# Crop offsets of the reference nets: where the input's top-left pixel lands in each map,
# a consequence of conv1_1's padding of 100 (Caffe's "Crop" layers in voc-fcn*/net.py).
FCN_CROP_OFFSETS: dict[str, int] = {
    "upscore32": 19,  # FCN-32s: 64x64 stride-32 deconvolution -> input
    "score_pool4": 5,  # FCN-16s/8s: pool4 scores -> 2x upsampled stride-32 scores
    "upscore16": 27,  # FCN-16s: 32x32 stride-16 deconvolution -> input
    "score_pool3": 9,  # FCN-8s: pool3 scores -> 2x upsampled fused stride-16 scores
    "upscore8": 31,  # FCN-8s: 16x16 stride-8 deconvolution -> input
}


class FCN(SegmentationModel):
    """FCN-32s, FCN-16s or FCN-8s (``output_stride`` 32, 16 or 8).

    Args:
        num_classes: number of score channels (21 for PASCAL VOC).
        in_channels: input image channels.
        output_stride: 32, 16 or 8: how many skips are fused (Sec. 4.2).
        at_once: FCN-8s "at-once" (Sec. 4.2, trained in one stage, not stage-wise): pool4 and
            pool3 are scaled by fixed 0.01 and 0.0001 before scoring, as in voc-fcn8s-atonce.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, *, output_stride: int = 32, at_once: bool = False):
        super().__init__()
        if output_stride not in (32, 16, 8):
            raise ValueError(f"FCN output_stride must be 32, 16 or 8, got {output_stride}")
        if at_once and output_stride != 8:
            raise ValueError("at_once=True is defined for FCN-8s only (output_stride=8)")
        self.num_classes, self.in_channels = num_classes, in_channels
        self.output_stride, self.at_once = output_stride, at_once
        self.backbone = VGG16(in_channels, first_padding=100, pooling="fcn")
        feats = self.backbone.feature_info

        # Convolutionalized classifier (Sec. 3.1): fc6 is the 7x7 window of pool5 that the
        # ImageNet net's first fully connected layer saw; fc7 a 1x1 convolution. fc6 runs as
        # im2col GEMMs on CPU: its map is a few windows wide, where direct kernels are slow.
        self.fc6 = Im2colConv2d(feats["pool5"].channels, 4096, 7)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(0.5)
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(0.5)
        self.score_fr = nn.Conv2d(4096, num_classes, 1)

        # Final upsampling is fixed bilinear; intermediate 2x ones start bilinear and learn (Sec. 4.3).
        if output_stride == 32:
            self.upscore = BilinearDeconv(num_classes, 32, learnable=False)
        else:
            self.upscore2 = BilinearDeconv(num_classes, 2, learnable=True)
            self.score_pool4 = nn.Conv2d(feats["pool4"].channels, num_classes, 1)
        if output_stride == 16:
            self.upscore16 = BilinearDeconv(num_classes, 16, learnable=False)
        if output_stride == 8:
            self.upscore_pool4 = BilinearDeconv(num_classes, 2, learnable=True)
            self.score_pool3 = nn.Conv2d(feats["pool3"].channels, num_classes, 1)
            self.upscore8 = BilinearDeconv(num_classes, 8, learnable=False)

        for m in (self.fc6, self.fc7):
            nn.init.normal_(m.weight, std=0.005)
            nn.init.zeros_(m.bias)
        # "We zero-initialize the class scoring layer" (Sec. 4.3); the reference nets do the
        # same for the skip scoring layers, so a new skip starts as a no-op (Sec. 4.2).
        for m in (self.score_fr, getattr(self, "score_pool4", None), getattr(self, "score_pool3", None)):
            if m is not None:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def classifier_layers(self) -> list[nn.Module]:
        """The class-scoring layers (trained from zero; recipes may give them their own lr)."""
        return [m for m in (self.score_fr, getattr(self, "score_pool4", None), getattr(self, "score_pool3", None)) if m]

    def classifier_scores(self, pool5: Tensor) -> Tensor:
        """The coarse stride-32 class scores ("heat map") from pool5."""
        h = self.drop6(self.relu6(self.fc6(pool5)))
        h = self.drop7(self.relu7(self.fc7(h)))
        return self.score_fr(h)

    def coarse_scores(self, x: Tensor) -> CoarseScores:
        """``score_fr``: the convolutionalized classifier's stride-32 scores (Sec. 3.1). Cell
        centres follow from the layers' geometry, conv1_1's padding of 100 included (cell ``j``
        at pixel ``32 j + 12.5``)."""
        chain = [getattr(self.backbone, n) for n in self.backbone.layer_names]
        stride, offset = centre_geometry([*chain, self.fc6, self.fc7, self.score_fr])
        how = (
            "stride-32 scores upsampled x32 by a fixed bilinear deconvolution"
            if self.output_stride == 32
            else f"stride-32 scores fused with skips down to stride {self.output_stride}, then upsampled"
        )
        scores = self.classifier_scores(self.backbone(x)["pool5"])
        return CoarseScores(scores, int(stride), float(offset), f"FCN-{self.output_stride}s output: {how}")

    def feature_layers(self) -> list[str]:
        """conv1_2, conv3_3, conv5_3 and fc7: the rows ZFNet's Fig. 2 would show for this net."""
        return [f"backbone.{n}" for n in self.backbone.feature_layers()] + ["fc7"]

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.in_channels, type(self).__name__)
        height, width = x.shape[-2:]
        feats = self.backbone(x)
        score = self.classifier_scores(feats["pool5"])
        if self.output_stride == 32:
            return crop(self.upscore(score), FCN_CROP_OFFSETS["upscore32"], height, width)

        up = self.upscore2(score)
        pool4 = feats["pool4"] * 0.01 if self.at_once else feats["pool4"]
        up = up + crop(self.score_pool4(pool4), FCN_CROP_OFFSETS["score_pool4"], *up.shape[-2:])
        if self.output_stride == 16:
            return crop(self.upscore16(up), FCN_CROP_OFFSETS["upscore16"], height, width)

        up = self.upscore_pool4(up)
        pool3 = feats["pool3"] * 0.0001 if self.at_once else feats["pool3"]
        up = up + crop(self.score_pool3(pool3), FCN_CROP_OFFSETS["score_pool3"], *up.shape[-2:])
        return crop(self.upscore8(up), FCN_CROP_OFFSETS["upscore8"], height, width)


# Table 1 of the paper: FCN-VGG16 has receptive field 404 and max stride 32.
_FCN_FACTS = dict(paper="Long et al. 2015, FCN", receptive_field=404, default_size=500)


@register_model("fcn32s", output_stride=32, **_FCN_FACTS)
def fcn32s(*, num_classes: int = 21, in_channels: int = 3, pretrained: str | None = None) -> FCN:
    """FCN-32s: stride-32 scores upsampled in one fixed bilinear step (Sec. 4.1)."""
    return with_pretrained(FCN(num_classes, in_channels, output_stride=32), pretrained)


@register_model("fcn16s", output_stride=16, **_FCN_FACTS)
def fcn16s(*, num_classes: int = 21, in_channels: int = 3, pretrained: str | None = None) -> FCN:
    """FCN-16s: adds the pool4 skip (Sec. 4.2)."""
    return with_pretrained(FCN(num_classes, in_channels, output_stride=16), pretrained)


@register_model("fcn8s", output_stride=8, **_FCN_FACTS)
def fcn8s(*, num_classes: int = 21, in_channels: int = 3, pretrained: str | None = None) -> FCN:
    """FCN-8s: adds the pool4 and pool3 skips (Sec. 4.2), trained stage-wise in the paper."""
    return with_pretrained(FCN(num_classes, in_channels, output_stride=8), pretrained)


@register_model("fcn8s_atonce", output_stride=8, **_FCN_FACTS)
def fcn8s_atonce(*, num_classes: int = 21, in_channels: int = 3, pretrained: str | None = None) -> FCN:
    """FCN-8s trained all at once, with fixed pool4/pool3 scaling (0.01, 0.0001)."""
    return with_pretrained(FCN(num_classes, in_channels, output_stride=8, at_once=True), pretrained)


# The reference nets of fcn.berkeleyvision.org (Shelhamer, Long, Darrell): Caffe models trained
# on SBD train (8,498 images) and scored on seg11valid (README; paper Sec. 4.3, Table 3). Their
# layers carry our names (conv1_1 .. fc7, score_fr, upscore2, score_pool4, ...); at-once's fixed
# Scale layers hold the constants FCN.forward multiplies by. OpenCV's test-model list publishes
# SHA-1s for two of the four files; the others are checked by the sha256 of their first download.
def _berkeley(model: str, file: str, miou: float, sha1: str | None, **extra) -> Weights:
    return Weights(
        model=model,
        tag="voc_caffe",
        url=f"http://dl.caffe.berkeleyvision.org/{file}",
        digest=Digest("sha1", sha1, "OpenCV (opencv_extra testdata/dnn/download_models.py)") if sha1 else None,
        layout="caffe",
        classes=VOC_CATEGORIES,
        normalization=CAFFE_BGR,
        input_size="any: conv1_1's padding of 100 and the crops align the output with the input",
        metrics={"mean IU": miou},
        metrics_on="PASCAL VOC 2011 seg11valid (fcn.berkeleyvision.org README)",
        license="BSD-2-Clause, as Caffe and its bundled models: unrestricted use (fcn.berkeleyvision.org README)",
        source=f"https://github.com/shelhamer/fcn.berkeleyvision.org/tree/master/voc-{model.replace('_', '-')}",
        num_params=_FCN_PARAMS[model],
        **extra,
    )


_FCN_PARAMS = {"fcn32s": 136_152_917, "fcn16s": 134_815_994, "fcn8s": 134_489_759, "fcn8s_atonce": 134_489_759}
register_weights(
    _berkeley("fcn32s", "fcn32s-heavy-pascal.caffemodel", 63.6, "05eb922d7829c39448f57e5ab9d8cd75d6c0be6d"),
    _berkeley("fcn16s", "fcn16s-heavy-pascal.caffemodel", 65.0, None),
    _berkeley("fcn8s", "fcn8s-heavy-pascal.caffemodel", 65.5, "c449ea74dd7d83751d1357d6a8c323fcf4038962"),
    _berkeley(
        "fcn8s_atonce",
        "fcn8s-atonce-pascal.caffemodel",
        65.4,
        None,
        fixed_blobs={"scale_pool4": 0.01, "scale_pool3": 0.0001},
    ),
)
