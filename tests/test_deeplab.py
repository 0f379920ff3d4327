"""DeepLab v1/v2 paper facts: atrous VGG16, LargeFOV, ASPP, multi-scale inputs."""

import pytest
import torch

import densepred
from conv_gradients import assert_is_the_convolution
from densepred.models.deeplab import ASPP_RATES, MultiScaleInputs, caffe_resize
from densepred.models.layers import AtrousConv2d, RateClippedConv2d
from slim import slim


def _params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def test_largefov_has_20_5m_parameters():
    # v1 Table 2: DeepLab-CRF-LargeFOV, 20.5M parameters (21 classes).
    model = densepred.create_model("deeplab_v1_largefov", num_classes=21)
    assert _params(model) == 14_714_688 + (3 * 3 * 512 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 21 + 21)
    assert round(_params(model) / 1e5) == 205


def test_7x7_has_134_3m_parameters():
    # v1 Table 2: DeepLab-CRF-7x7, 134.3M parameters.
    assert round(_params(densepred.create_model("deeplab_v1_7x7", num_classes=21)) / 1e5) == 1343


def test_atrous_vgg16_geometry():
    model = densepred.create_model("deeplab_v1_largefov")
    vgg = model.backbone
    assert [getattr(vgg, f"conv5_{i}").dilation for i in (1, 2, 3)] == [(2, 2)] * 3
    assert vgg.pool4.stride == vgg.pool5.stride == 1 and vgg.pool3.stride == 2
    assert vgg.pool1.kernel_size == 3 and vgg.pool1.padding == 1
    assert model.head.fc6.dilation == (12, 12) and model.head.fc6.out_channels == 1024
    sevens = densepred.create_model("deeplab_v1_7x7").head.fc6
    assert sevens.kernel_size == (7, 7) and sevens.dilation == (4, 4) and sevens.out_channels == 4096


@pytest.mark.parametrize("name", ["deeplab_v1_largefov", "deeplab_v2_resnet101"])
@pytest.mark.parametrize("side,coarse", [(321, 41), (129, 17)])
def test_output_stride_8_and_upsampled_logits(name, side, coarse):
    model = densepred.create_model(name, num_classes=3).eval()
    x = torch.randn(1, 3, side, side)
    with torch.inference_mode():
        assert model.coarse_logits(x).shape[-2:] == (coarse, coarse)
        out = model(x)
    assert out.shape == (1, 3, side, side)


def test_upsampling_aligns_corners_like_caffe_interp():
    # An 8k+1 input maps corner-to-corner onto the stride-8 grid: corners are copied exactly.
    model = densepred.create_model("deeplab_v1_largefov", num_classes=2).eval()
    x = torch.randn(1, 3, 161, 161)
    with torch.inference_mode():
        coarse, dense = model.coarse_logits(x), model(x)
    torch.testing.assert_close(dense[..., ::8, ::8], coarse)


@pytest.mark.parametrize("aspp", ["L", "S"])
def test_aspp_rates_and_sum_fusion(aspp):
    model = densepred.create_model("deeplab_v2_resnet101", num_classes=3, aspp=aspp).eval()
    rates = [b.dilation[0] for b in model.head.branches]
    assert rates == list(ASPP_RATES[aspp]) == ([6, 12, 18, 24] if aspp == "L" else [2, 4, 8, 12])
    feats = torch.randn(1, 2048, 9, 9)
    with torch.inference_mode():
        torch.testing.assert_close(model.head(feats), sum(b(feats) for b in model.head.branches))


def test_vgg_aspp_branches_are_fc6_fc7_fc8_stacks():
    model = densepred.create_model("deeplab_v2_vgg16", num_classes=5)
    assert [b.fc6.dilation[0] for b in model.head.branches] == [6, 12, 18, 24]
    assert all(b.fc6.out_channels == b.fc7.out_channels == 1024 for b in model.head.branches)


def test_resnet_deeplab_defaults_to_the_released_models_choices():
    model = densepred.create_model("deeplab_v2_resnet101")
    assert model.backbone.caffe_style
    assert not any(p.requires_grad for n, p in model.backbone.named_parameters() if ".bn" in n or n.startswith("bn"))


def test_multi_scale_inputs_in_training_and_eval():
    base = slim(densepred.create_model("deeplab_v1_largefov", num_classes=3))  # the geometry, 1/16 the widths
    msc = MultiScaleInputs(base)
    x = torch.randn(2, 3, 321, 321)
    msc.train()
    out = msc(x)
    assert set(out) == {"fused", "scale_1", "scale_0.75", "scale_0.5"}
    # Caffe's (size - 1) * s + 1: 321 -> 241 -> 161, scored at stride 8.
    assert out["scale_1"].shape[-2:] == (41, 41)
    assert out["scale_0.75"].shape[-2:] == (31, 31)
    assert out["scale_0.5"].shape[-2:] == (21, 21)
    assert out["fused"].shape[-2:] == (41, 41)
    msc.eval()
    with torch.inference_mode():
        y = msc(x)
        branches = msc.branches(x)
        aligned = [caffe_resize(b, (41, 41)) for b in branches.values()]
        expected = caffe_resize(torch.stack(aligned).amax(0), (321, 321))
    assert y.shape == (2, 3, 321, 321)
    torch.testing.assert_close(y, expected)


def test_msc_registry_option_and_validation():
    model = densepred.create_model("deeplab_v2_resnet101", num_classes=3, msc=True)
    assert isinstance(model, MultiScaleInputs) and model.scales == (1.0, 0.75, 0.5) and model.fusion == "max"
    with pytest.raises(ValueError, match="aspp must be one of"):
        densepred.create_model("deeplab_v2_resnet101", aspp="M")
    with pytest.raises(ValueError, match="scales must be positive"):
        MultiScaleInputs(model.model, scales=(1.0, -0.5))


@pytest.mark.parametrize("kernel,dilation,stride,batch", [(3, 2, 1, 2), (7, 4, 1, 1), (3, 3, 2, 2)])
def test_atrous_conv_trains_with_the_plain_convolutions_gradients(kernel, dilation, stride, batch):
    # AtrousConv2d computes its weight gradient as an explicit im2col GEMM; it must be the
    # convolution's gradient, for every input, weight and bias, batched and strided.
    torch.manual_seed(0)
    conv = AtrousConv2d(3, 5, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation, stride=stride).double()
    x = torch.randn(batch, 3, 13, 11, dtype=torch.float64, requires_grad=True)
    assert_is_the_convolution(conv, x, "_GemmWeightGradConvBackward")


def test_atrous_conv_is_a_plain_convolution_outside_training():
    conv = AtrousConv2d(3, 4, 3, padding=2, dilation=2).eval()
    assert set(conv.state_dict()) == {"weight", "bias"}
    x = torch.randn(1, 3, 9, 9, requires_grad=True)
    assert conv(x).grad_fn.name() == "ConvolutionBackward0"  # what traced graphs and exports record
    with pytest.raises(ValueError, match="groups=1"):
        AtrousConv2d(4, 4, 3, groups=2)


def test_deeplab_fc6_is_atrous_and_the_7x7_trains_at_a_small_size():
    model = densepred.create_model("deeplab_v1_7x7", num_classes=3).train()
    assert isinstance(model.head.fc6, AtrousConv2d)
    model(model.example_input()).sum().backward()
    assert model.head.fc6.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("size,rate", [((5, 7), 6), ((10, 3), 3), ((4, 13), 4), ((9, 9), 2), ((5, 5), 6), ((11, 8), 5)])
def test_rate_clipped_conv_is_the_convolution_forward_and_backward(size, rate):
    # Taps that only read padding are left out (all, some along one axis, or none), and the taps
    # kept train through a backward that reads only the part of the map each reaches: the output
    # and all three gradients must still be the whole filter's, the left-out taps' gradient zero.
    torch.manual_seed(0)
    conv = RateClippedConv2d(3, 5, 3, rate).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    only_centre = min(size) <= rate and max(size) <= rate
    assert_is_the_convolution(conv, x, "ConvolutionBackward0" if only_centre else "_SameAtrousConvBackward")
    if min(size) <= rate:  # a tap outside on some axis: its column or row gets no gradient
        conv.weight.grad = None
        conv(x).sum().backward()
        outside = conv.weight.grad[:, :, 0] if size[0] <= rate else conv.weight.grad[:, :, :, 0]
        assert (outside == 0).all()


def test_rate_clipped_conv_trains_channels_last_without_bias_and_steps_aside_otherwise():
    torch.manual_seed(0)
    conv = RateClippedConv2d(6, 4, 3, 4, bias=False).double().to(memory_format=torch.channels_last)
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    ours = assert_is_the_convolution(conv, x, "_SameAtrousConvBackward", relu=False)
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert conv(x).grad_fn is None
    assert conv(x.contiguous()).grad_fn.name() == "ConvolutionBackward0"  # channels-first: oneDNN's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv.float()(x.float()).grad_fn.name() == "ConvolutionBackward0"


def test_rate_clipped_conv_keeps_the_whole_filter_in_traced_graphs():
    conv = RateClippedConv2d(3, 4, 3, 12).eval()
    assert set(conv.state_dict()) == {"weight", "bias"} and conv.padding == (12, 12) and conv.dilation == (12, 12)
    small, large = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 30, 30)
    traced = torch.jit.trace(conv, small, check_trace=False)  # traced where only the centre tap reaches
    full = torch.nn.functional.conv2d(large, conv.weight, conv.bias, padding=12, dilation=12)
    with torch.no_grad():
        torch.testing.assert_close(traced(large), full)  # and right where every tap does
        torch.testing.assert_close(
            conv(small), torch.nn.functional.conv2d(small, conv.weight[:, :, 1:2, 1:2], conv.bias)
        )
    with pytest.raises(ValueError, match="odd kernel"):
        RateClippedConv2d(3, 4, 2, 12)
    # DeepLab v2's ASPP and v3's atrous branches run through it
    v2 = densepred.create_model("deeplab_v2_resnet101", num_classes=3)
    v3 = densepred.create_model("deeplabv3_mobilenet_v3_large", num_classes=3)
    atrous = [m for model in (v2, v3) for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.dilation[0] > 1]
    assert sum(isinstance(m, RateClippedConv2d) for m in atrous) == 4 + 3
