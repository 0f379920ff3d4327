"""Backbone contract: declared channels and strides match real outputs."""

import pytest
import torch

from densepred.models.backbones import VGG16, ResNet
from densepred.models.layers import FrozenBatchNorm2d

BACKBONES = {
    "vgg16_fcn": lambda: VGG16(first_padding=100, pooling="fcn"),
    "vgg16_plain": lambda: VGG16(pooling="fcn"),
    "vgg16_atrous": lambda: VGG16(pooling="deeplab"),
    "resnet50_os32": lambda: ResNet(50, output_stride=32),
    "resnet50_os16_caffe": lambda: ResNet(50, output_stride=16, caffe_style=True),
    "resnet101_os8_caffe": lambda: ResNet(101, output_stride=8, caffe_style=True, frozen_bn=True),
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_declared_features_match_outputs(name):
    net = BACKBONES[name]().eval()
    base = 64
    with torch.inference_mode():
        small = net(torch.randn(1, 3, base, base))
        # Growing the input by k*stride grows each map by exactly k: the declared stride is real.
        big = net(torch.randn(1, 3, base + 64, base + 2 * 64))
    assert set(small) == set(net.feature_info)
    for key, spec in net.feature_info.items():
        assert small[key].shape[1] == spec.channels, key
        dh = big[key].shape[-2] - small[key].shape[-2]
        dw = big[key].shape[-1] - small[key].shape[-1]
        assert (dh, dw) == (64 // spec.stride, 128 // spec.stride), (key, spec)


def test_vgg16_has_the_papers_13_convolutions():
    net = VGG16()
    assert net.conv_names == [
        f"conv{s}_{i}" for s, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1)
    ]
    assert sum(p.numel() for p in net.parameters()) == 14_714_688  # VGG16 conv layers


def test_resnet_strides_and_dilation_for_deeplab():
    net = ResNet(101, output_stride=8, caffe_style=True)
    assert {k: v.stride for k, v in net.feature_info.items()} == {"layer1": 4, "layer2": 8, "layer3": 8, "layer4": 8}
    # DeepLab v2: res4 dilated by 2, res5 by 4 (Sec. 3.1); Caffe style strides the 1x1 conv.
    assert net.layer3[0].conv2.dilation == (2, 2) and net.layer4[0].conv2.dilation == (4, 4)
    assert net.layer2[0].conv1.stride == (2, 2) and net.layer2[0].conv2.stride == (1, 1)
    tv = ResNet(101, output_stride=32)
    assert tv.layer2[0].conv1.stride == (1, 1) and tv.layer2[0].conv2.stride == (2, 2)


def test_resnet_parameter_counts():
    # ResNet-50 / ResNet-101 trunks without the ImageNet fc (25.557M / 44.549M with it).
    assert sum(p.numel() for p in ResNet(50).parameters()) == 25_557_032 - 2048 * 1000 - 1000
    assert sum(p.numel() for p in ResNet(101).parameters()) == 44_549_160 - 2048 * 1000 - 1000


def test_caffe_resnet_gives_deeplabs_41x41_scores_at_321():
    net = ResNet(101, output_stride=8, caffe_style=True).eval()
    with torch.inference_mode():
        assert net(torch.randn(1, 3, 321, 321))["layer4"].shape[-2:] == (41, 41)


def test_frozen_batch_norm_has_nothing_to_train_and_normalises():
    bn = FrozenBatchNorm2d(4)
    assert list(bn.parameters()) == []
    bn.running_mean.fill_(2.0)
    bn.running_var.fill_(4.0)
    bn.weight.fill_(3.0)
    x = torch.full((1, 4, 2, 2), 6.0)
    torch.testing.assert_close(bn(x), torch.full_like(x, 3.0 * 4.0 / (4.0 + 1e-5) ** 0.5))


def test_bad_backbone_options_are_errors():
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
        ResNet(50, output_stride=4)
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNet(34)
    with pytest.raises(ValueError, match="pooling must be"):
        VGG16(pooling="max")
