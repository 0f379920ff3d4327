"""SegNet (Badrinarayanan, Kendall & Cipolla, TPAMI 2017): an encoder-decoder with pooling indices.

Sec. 3: the encoder is the 13 convolutional layers of VGG16, each followed by batch
normalization and ReLU, with five 2x2 stride-2 max-poolings and no fully connected layers. Each
pooling stores its max locations ("pooling indices"). The decoder mirrors the encoder: each
stage upsamples with the indices of the matching encoder pooling (Fig. 2 and Fig. 3: the value
goes back to where its maximum was, zeros elsewhere, nothing to learn), then convolves the sparse
map with trainable filters to make it dense. The last decoder layer scores the classes for a
pixel-wise soft-max.

Layer names: the encoder keeps torchvision's ``vgg16_bn().features`` indices (``encoder.0`` is
conv1_1, ``encoder.1`` its batch norm, ``encoder.6`` pool1, ...), so ImageNet ``features.*``
weights load by index (:func:`load_vgg16_bn_features`); the decoder uses the names of the
reference Caffe model (SegNet-Tutorial ``segnet_train.prototxt``: ``upsample5``,
``conv5_3_D``, ``conv5_3_D_bn``, ``relu5_3_D``, ..., ``conv1_1_D``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register_model
from ..weights import PRETRAINED, WeightsError, detect_layout, fetch, load_pretrained, read_state_dict
from .backbones.vgg import VGG16_STAGES
from .base import InputRule, SegmentationModel
from .layers import check_input

__all__ = ["SegNet", "SegNetEncoder", "SegNetDecoder", "VGG16_BN_CONVS", "VGG16_BN_POOLS", "load_vgg16_bn_features"]

# torchvision vgg16_bn().features: conv, bn, relu per layer and a pool after each stage.
VGG16_BN_CONVS: tuple[int, ...] = (0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40)
VGG16_BN_POOLS: tuple[int, ...] = (6, 13, 23, 33, 43)

# (pooling indices, pre-pool size) per pooling, shallow first; while exporting to ONNX the indices
# are ONNX's own and the size is the pre-pool shape as a tensor (see _OnnxMaxPool).
Switches = list[tuple[Tensor, torch.Size | Tensor]]


class SegNetEncoder(nn.Sequential):
    """VGG16's 13 convolutions with batch norm, in torchvision's ``vgg16_bn().features`` layout.

    ``forward`` returns pool5 and, for each pooling, its indices and the size of its input
    (the decoder unpools to exactly that size, so odd sides survive). Pooling rounds up (ceil
    mode) as Caffe's does: the reference model's ``upsample4`` restores 45x60 from pool4's 23x30
    on CamVid's 360x480, and every side >= 1 stays >= 1 through five poolings.
    """

    def __init__(self, in_channels: int = 3) -> None:
        layers: list[nn.Module] = []
        channels = in_channels
        for _stage, n_convs, width in VGG16_STAGES:
            for _ in range(n_convs):
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True, return_indices=True))
        super().__init__(*layers)
        self.in_channels, self.out_channels = in_channels, channels

    def forward(self, x: Tensor) -> tuple[Tensor, Switches]:  # type: ignore[override]
        switches: Switches = []
        for layer in self:
            if isinstance(layer, nn.MaxPool2d) and layer.return_indices:
                if torch.onnx.is_in_onnx_export():  # ONNX's indices, and the pre-pool shape as a tensor
                    x, indices, size = _OnnxMaxPool.apply(x, layer.kernel_size, layer.stride, layer.ceil_mode)
                else:
                    size = x.shape[-2:]
                    x, indices = layer(x)
                switches.append((indices, size))
            else:  # also a pooling swapped for an average pool (receptive-field probes): no indices
                x = layer(x)
        return x, switches


class SegNetDecoder(nn.Sequential):
    """The mirror of the encoder (Sec. 3, Fig. 2): per stage, deepest first, a max-unpooling
    with the matching encoder indices, then as many conv+BN+ReLU layers as the encoder stage had.

    The stage's last convolution narrows to the next (shallower) stage's width (conv4_1_D:
    512 -> 256); in the final stage conv1_1_D scores the classes, without BN or ReLU, for the
    soft-max classifier.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        stages = list(reversed(VGG16_STAGES))
        for k, (stage, n_convs, width) in enumerate(stages):
            self.add_module(f"upsample{stage}", nn.MaxUnpool2d(2, stride=2))
            out_width = stages[k + 1][2] if k + 1 < len(stages) else num_classes
            for i in range(n_convs, 0, -1):  # conv5_3_D, conv5_2_D, conv5_1_D
                name = f"conv{stage}_{i}_D"
                last = i == 1
                self.add_module(name, nn.Conv2d(width, out_width if last else width, 3, padding=1))
                if not (last and stage == 1):  # conv1_1_D feeds the soft-max directly
                    self.add_module(f"{name}_bn", nn.BatchNorm2d(out_width if last else width))
                    self.add_module(f"relu{stage}_{i}_D", nn.ReLU(inplace=True))

    def forward(self, x: Tensor, switches: Switches) -> Tensor:  # type: ignore[override]
        pending = list(switches)
        for layer in self:
            if isinstance(layer, nn.MaxUnpool2d):
                indices, size = pending.pop()  # the deepest pooling not yet undone (Fig. 3)
                x = _unpool(layer, x, indices, size)
            else:
                x = layer(x)
        return x


_Size = int | tuple[int, ...]  # a pooling's kernel or stride, as nn.MaxPool2d keeps it


def _pair(value: _Size) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


class _OnnxMaxPool(torch.autograd.Function):
    """A max pooling with indices that exports as one ONNX ``MaxPool`` with ONNX's own indices
    (flat over the whole tensor), plus the pre-pool shape for :class:`_OnnxMaxUnpool`.

    PyTorch's exporter turns per-plane indices into ONNX's by a second, 1x1 ``MaxPool`` over the
    whole pre-pool map (with an int64 index per value) and a subtraction, and unpools with a
    ``ScatterElements`` into a zero map; ONNX's ``MaxUnpool`` reads the pooling's indices as they
    are. On ONNX Runtime at 360x480 (2-core AVX2 EPYC) the float graph went from 1.53 to 1.41 s.
    Used only while exporting; the pair is consistent within PyTorch (per-plane indices) and
    within ONNX (flat ones).
    """

    @staticmethod
    def forward(ctx, x: Tensor, kernel: _Size, stride: _Size, ceil: bool) -> tuple[Tensor, Tensor, Tensor]:  # noqa: ANN001
        pooled, indices = F.max_pool2d(x, kernel, stride, ceil_mode=ceil, return_indices=True)
        return pooled, indices, torch.tensor(x.shape)

    @staticmethod
    def symbolic(g, x, kernel, stride, ceil):  # noqa: ANN001, ANN205 - the TorchScript exporter's graph
        pooled, indices = g.op(
            "MaxPool", x, kernel_shape_i=_pair(kernel), strides_i=_pair(stride), ceil_mode_i=int(ceil), outputs=2
        )
        return pooled, indices, g.op("Shape", x)


class _OnnxMaxUnpool(torch.autograd.Function):
    """ONNX ``MaxUnpool`` to the pre-pool shape, with :class:`_OnnxMaxPool`'s indices."""

    @staticmethod
    def forward(ctx, x: Tensor, indices: Tensor, shape: Tensor, kernel: _Size, stride: _Size) -> Tensor:  # noqa: ANN001
        return F.max_unpool2d(x, indices, kernel, stride, output_size=shape.tolist()[-2:])

    @staticmethod
    def symbolic(g, x, indices, shape, kernel, stride):  # noqa: ANN001, ANN205
        # With output_shape given, ONNX ignores pads; ONNX Runtime still checks output_shape against
        # the size they imply. Ending pads of kernel - 1 imply (n - 1) * stride + 1, the smallest
        # side a ceil-mode pooling takes to n (SegNet: 2n - 1), so odd sides pass too.
        kernel, stride = _pair(kernel), _pair(stride)
        pads = [0, 0] + [k - 1 for k in kernel]
        out = g.op("MaxUnpool", x, indices, shape, kernel_shape_i=kernel, strides_i=stride, pads_i=pads)
        # From a computed output_shape ONNX infers no rank, so no shape for any layer after it, and
        # ONNX Runtime's layout passes skip them (its int8 convolutions stay channels-first). A
        # reshape to the same shape, free at run time, gives the rank back.
        return g.op("Reshape", out, shape)


def _unpool(layer: nn.MaxUnpool2d, x: Tensor, indices: Tensor, size: torch.Size | Tensor) -> Tensor:
    """``layer(x, indices, output_size=size)``; while tracing (ONNX, TorchScript) the same, exportable.

    ``F.max_unpool2d`` checks ``output_size`` with Python comparisons, which traced sizes fail.
    ONNX has the operation itself (:class:`_OnnxMaxUnpool`); for TorchScript, scattering each
    value to its flat index ``h * W + w`` of a zero map is what it computes.
    """
    if isinstance(size, Tensor):  # the ONNX export's switches
        return _OnnxMaxUnpool.apply(x, indices, size, layer.kernel_size, layer.stride)
    if not torch.jit.is_tracing():
        return layer(x, indices, output_size=size)
    n, c = x.shape[0], x.shape[1]
    height, width = size[0], size[1]
    out = x.new_zeros(n, c, height * width).scatter(2, indices.flatten(2), x.flatten(2))
    return out.view(n, c, height, width)


class SegNet(SegmentationModel):
    """SegNet (Sec. 3): ``encoder`` (VGG16-BN convolutions) and ``decoder`` (indices-driven upsampling).

    The output has the input's size for every input size (Sec. 3: the decoder maps the encoder
    features back to full input resolution).

    Parameters for 11 classes: 29,449,355 (encoder convolutions 14,714,688, the paper's 14.7M;
    decoder convolutions 14,718,795; BN scale and shift 15,872), against the paper's 29.5M. That
    is 0.17 % less, and one decimal of it is 29.4M; adding BN's running mean and variance (15,872
    more, which Caffe stores as layer blobs) gives 29,465,227 = 29.5M. The paper has no layer
    table, so which count it rounded is not known; tests/test_segnet.py recounts from the layers.

    Args:
        num_classes: classes of the soft-max (11 for CamVid, Sec. 3.3).
        in_channels: input image channels.
    """

    no_imagenet_weights = (
        "SegNet's encoder takes torchvision's vgg16_bn ImageNet file through its builder: "
        "create_model('segnet', pretrained='imagenet') (its features.* keys go to the encoder, "
        "densepred.models.segnet.load_vgg16_bn_features). Sec. 3.3 trains from He initialisation."
    )

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        self.output_stride = 1
        self.encoder = SegNetEncoder(in_channels)
        self.decoder = SegNetDecoder(num_classes)
        # Sec. 3.3: "initialized using the technique described in He et al." (Caffe's msra filler).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def input_rule(self) -> InputRule:
        """Any size: ceil-mode pooling keeps every side >= 1 and unpooling restores the exact size."""
        return InputRule("any")

    def classifier_layers(self) -> list[nn.Module]:
        """conv1_1_D, the decoder's last convolution, whose scores go to the soft-max."""
        return [self.decoder.conv1_1_D]

    def feature_layers(self) -> list[str]:
        """Encoder conv1_2, conv3_3 and conv5_3 after BN and ReLU (``features.5/22/42``), shallow to deep."""
        return ["encoder.5", "encoder.22", "encoder.42"]

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.in_channels, type(self).__name__)
        pool5, switches = self.encoder(x)
        return self.decoder(pool5, switches)


def load_vgg16_bn_features(segnet: SegNet, state_dict: Mapping[str, Tensor]) -> tuple[str, ...]:
    """Load torchvision ``vgg16_bn`` ImageNet weights into ``segnet.encoder``, strictly; returns the keys filled.

    ``features.N.*`` (conv weight/bias, BN weight/bias/running_mean/running_var) go to
    ``encoder.N.*``; ``classifier.*`` (the ImageNet fully connected layers, which SegNet drops,
    Sec. 3) is ignored; ``num_batches_tracked`` is optional (older files lack it). The decoder
    keeps its initialisation. Nothing is written unless every key fits.

    Raises:
        WeightsError: missing, unexpected or wrongly shaped keys, named in the message.
    """
    targets = segnet.encoder.state_dict(keep_vars=True)
    features = {k.removeprefix("features."): v for k, v in state_dict.items() if k.startswith("features.")}
    stray = sorted(k for k in state_dict if not k.startswith(("features.", "classifier.")))
    required = {k for k in targets if not k.endswith("num_batches_tracked")}
    missing = sorted(required - features.keys(), key=_by_index)
    unexpected = sorted(features.keys() - targets.keys(), key=_by_index)
    shapes = [
        f"features.{k} {tuple(v.shape)} vs encoder.{k} {tuple(targets[k].shape)}"
        for k, v in features.items()
        if k in targets and v.shape != targets[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing features.* keys ({len(missing)}): {', '.join('features.' + k for k in missing[:10])}")
    if unexpected or stray:
        extra = [f"features.{k}" for k in unexpected] + stray
        problems.append(f"unexpected keys ({len(extra)}): {', '.join(extra[:10])}")
    if shapes:
        problems.append(f"shape mismatch: {'; '.join(shapes[:10])}")
    if problems:
        hint = (
            f"expected torchvision's vgg16_bn layout (features.N at conv {VGG16_BN_CONVS[0]}, bn 1, ..., pools at "
            f"{', '.join(map(str, VGG16_BN_POOLS))}) for in_channels={segnet.in_channels}"
        )
        raise WeightsError("the state dict does not fit SegNet's encoder: " + "; ".join(problems) + f". {hint}")
    with torch.no_grad():
        for key, value in features.items():
            targets[key].copy_(value)
    return tuple(f"encoder.{k}" for k in sorted(features, key=_by_index))


def _by_index(key: str) -> tuple[int, str]:
    index, _, rest = key.partition(".")
    return (int(index) if index.isdigit() else -1, rest)


# Receptive field of pool5, the deepest encoder feature: 3x3 convolutions add 2 * jump, 2x2
# poolings add 1 * jump and double it: 1 + 2*2 + 1 -> 6 (pool1, jump 2); + 2*2*2 + 2 -> 16
# (pool2, jump 4); + 3*2*4 + 4 -> 44 (pool3, jump 8); + 3*2*8 + 8 -> 100 (pool4, jump 16);
# + 3*2*16 + 16 -> 212 (pool5, jump 32). The output's field is larger: the decoder's 13
# convolutions add 3*2*16 + 3*2*8 + 3*2*4 + 2*2*2 + 2*2*1 = 180 more, 392 px if an unpooling is
# counted as an upsampling (each output cell comes from the one pooled cell whose window holds it).
_SEGNET_FACTS = dict(paper="Badrinarayanan et al. 2017, SegNet", receptive_field=212, default_size=360)


@register_model("segnet", output_stride=1, **_SEGNET_FACTS)
def segnet(*, num_classes: int = 11, in_channels: int = 3, pretrained: str | None = None) -> SegNet:
    """SegNet (Sec. 3) for CamVid's 11 classes by default.

    ``pretrained``: a torchvision ``vgg16_bn`` file (path or URL; its ``features.*`` go to the
    encoder, :func:`load_vgg16_bn_features`) or a densepred SegNet state dict.
    """
    model = SegNet(num_classes, in_channels)
    if pretrained is None:
        return model
    if os.fspath(pretrained) == "imagenet":  # torchvision's vgg16_bn, checked by its name's hash tag
        spec = PRETRAINED["vgg16_bn"]
        path = fetch(spec.url, digest=spec.digest)
    else:
        path = fetch(pretrained)
    state = read_state_dict(path)
    if detect_layout(state) == "torchvision-vgg16":
        try:
            load_vgg16_bn_features(model, state)
        except WeightsError as exc:
            raise WeightsError(f"{path.name}: {exc}") from None
        return model
    return _load(model, path)


def _load(model: SegNet, source: str | os.PathLike) -> SegNet:
    load_pretrained(model, source)
    return model
