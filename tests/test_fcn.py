"""FCN paper facts (Long et al. 2015): parameters, crops, initialisation, skips."""

import pytest
import torch
from torch import nn

import densepred
from conv_gradients import assert_is_the_convolution
from densepred.models.fcn import FCN, FCN_CROP_OFFSETS
from densepred.models.layers import BilinearDeconv, Im2colConv2d

VGG16_CONV_PARAMS = 14_714_688


def _geometry(module: nn.Module) -> tuple[float, float]:
    """(a, b) with x_in = a * x_out + b for the centre of a conv/pool/deconv window."""
    if isinstance(module, nn.ConvTranspose2d):
        k, s, p = module.kernel_size[0], module.stride[0], module.padding[0]
        return 1 / s, (p - (k - 1) / 2) / s
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
        as_int = lambda v: v[0] if isinstance(v, tuple) else v  # noqa: E731
        k, s, p, d = (
            as_int(module.kernel_size),
            as_int(module.stride),
            as_int(module.padding),
            as_int(module.dilation),
        )
        return s, (k - 1) / 2 * d - p
    return 1, 0  # element-wise layers


def _coord_map(layers: list[nn.Module]) -> tuple[float, float]:
    """Compose geometries from the input (first layer) to the output (last layer)."""
    a_total, b_total = 1.0, 0.0
    for m in layers:
        a, b = _geometry(m)
        a_total, b_total = a_total * a, a_total * b + b_total
    return a_total, b_total


def _backbone_until(model: FCN, last: str) -> list[nn.Module]:
    names = model.backbone.layer_names
    return [getattr(model.backbone, n) for n in names[: names.index(last) + 1]]


def _score_path(model: FCN) -> list[nn.Module]:
    return _backbone_until(model, "pool5") + [model.fc6, model.fc7, model.score_fr]


def test_crop_offsets_follow_from_the_geometry():
    """Recompute the reference nets' crop offsets from layer geometry (Caffe's coord_map)."""
    m32 = densepred.create_model("fcn32s")
    a, b = _coord_map(_score_path(m32) + [m32.upscore])
    assert (a, -b) == (1, FCN_CROP_OFFSETS["upscore32"]) == (1, 19)

    m8 = densepred.create_model("fcn8s")
    up2 = _coord_map(_score_path(m8) + [m8.upscore2])
    pool4 = _coord_map(_backbone_until(m8, "pool4") + [m8.score_pool4])
    assert up2[0] == pool4[0] == 16
    assert (up2[1] - pool4[1]) / 16 == FCN_CROP_OFFSETS["score_pool4"] == 5
    up4 = _coord_map(_score_path(m8) + [m8.upscore2, m8.upscore_pool4])
    pool3 = _coord_map(_backbone_until(m8, "pool3") + [m8.score_pool3])
    assert (up4[1] - pool3[1]) / 8 == FCN_CROP_OFFSETS["score_pool3"] == 9
    final = _coord_map(_score_path(m8) + [m8.upscore2, m8.upscore_pool4, m8.upscore8])
    assert (final[0], -final[1]) == (1, FCN_CROP_OFFSETS["upscore8"]) == (1, 31)

    m16 = densepred.create_model("fcn16s")
    final16 = _coord_map(_score_path(m16) + [m16.upscore2, m16.upscore16])
    assert (final16[0], -final16[1]) == (1, FCN_CROP_OFFSETS["upscore16"]) == (1, 27)


@pytest.mark.parametrize("size", [(1, 1), (31, 47), (64, 64), (100, 75), (500, 500)])
def test_output_matches_any_input_size(size):
    model = densepred.create_model("fcn8s", num_classes=4).eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 3, *size)).shape == (1, 4, *size)


def test_parameter_counts_match_table_1():
    # Table 1: FCN-VGG16 has 134M parameters: VGG16 convs + fc6/fc7 convolutionalized + score_fr.
    classifier = 512 * 7 * 7 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 21 + 21
    for name, extra in {
        "fcn32s": 21 * 21 * 64 * 64,
        "fcn16s": (512 * 21 + 21) + 21 * 21 * (4 * 4 + 32 * 32),
        "fcn8s": (512 * 21 + 21) + (256 * 21 + 21) + 21 * 21 * (4 * 4 * 2 + 16 * 16),
    }.items():
        model = densepred.create_model(name)
        total = sum(p.numel() for p in model.parameters())
        assert total == VGG16_CONV_PARAMS + classifier + extra, name
        without_deconv = sum(
            p.numel()
            for n, m in model.named_modules()
            if not isinstance(m, BilinearDeconv)
            for p in m.parameters(recurse=False)
        )
        assert round(without_deconv / 1e6) in (134, 135)


def test_initialisation_follows_the_paper():
    model = densepred.create_model("fcn8s")
    for layer in (model.score_fr, model.score_pool4, model.score_pool3):
        assert layer.weight.abs().sum() == 0 and layer.bias.abs().sum() == 0  # Sec. 4.3
    assert not model.upscore8.weight.requires_grad  # final upsampling fixed
    assert model.upscore2.weight.requires_grad and model.upscore_pool4.weight.requires_grad
    # Freshly built, the skips are no-ops: the net outputs zeros until trained.
    with torch.inference_mode():
        assert model.eval()(torch.randn(1, 3, 40, 40)).abs().max() == 0


def test_at_once_scaling_is_a_fixed_rescale_of_the_skips():
    """FCN-8s at-once scales pool4 by 0.01 and pool3 by 1e-4: equivalent to scaled weights."""
    staged = densepred.create_model("fcn8s", num_classes=3).eval()
    atonce = densepred.create_model("fcn8s_atonce", num_classes=3).eval()
    with torch.no_grad():
        for layer in (staged.score_fr, staged.score_pool4, staged.score_pool3):
            layer.weight.normal_(std=0.01)
            layer.bias.normal_(std=0.01)
        atonce.load_state_dict(staged.state_dict())
        atonce.score_pool4.weight.mul_(100)
        atonce.score_pool3.weight.mul_(10000)
        x = torch.randn(1, 3, 48, 40)
        torch.testing.assert_close(atonce(x), staged(x), rtol=1e-4, atol=1e-5)


def test_fcn_options_are_validated():
    with pytest.raises(ValueError, match="output_stride must be 32, 16 or 8"):
        FCN(21, output_stride=4)
    with pytest.raises(ValueError, match="FCN-8s only"):
        FCN(21, output_stride=16, at_once=True)


@pytest.mark.parametrize(
    "kernel,stride,padding,dilation,batch",
    [(7, 1, 0, 1, 1), (7, 1, 0, 1, 3), (3, 2, 1, 1, 2), (3, 1, 2, 2, 2), (1, 1, 0, 1, 2)],
)
def test_im2col_conv_is_the_convolution_forward_and_backward(kernel, stride, padding, dilation, batch):
    # fc6's GEMM form must give the convolution's output and all three gradients, for any
    # batch, stride, padding and dilation, on a map that is not square.
    torch.manual_seed(0)
    conv = Im2colConv2d(4, 6, kernel, stride=stride, padding=padding, dilation=dilation).double()
    x = torch.randn(batch, 4, 11, 9, dtype=torch.float64, requires_grad=True)
    assert_is_the_convolution(conv, x, "_Im2colConvBackward")


def test_im2col_conv_is_a_plain_convolution_where_it_should_be(monkeypatch):
    conv = Im2colConv2d(3, 4, 3, padding=1)
    assert set(conv.state_dict()) == {"weight", "bias"}
    x = torch.randn(1, 3, 9, 9, requires_grad=True)
    traced = torch.jit.trace(conv, x)
    assert "aten::_convolution" in str(traced.graph)  # what exports record
    monkeypatch.setattr(Im2colConv2d, "max_columns_bytes", 27 * 81 * 4 - 1)  # one byte short
    assert conv(x).grad_fn.name() == "ConvolutionBackward0"
    monkeypatch.setattr(Im2colConv2d, "max_columns_bytes", 27 * 81 * 4)
    assert conv(x).grad_fn.name().endswith("_Im2colConvBackward")
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 training, where the CPU has it
        y = conv(x)
    assert y.dtype == torch.bfloat16 and y.grad_fn.name() == "ConvolutionBackward0"
    y.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32
    with pytest.raises(ValueError, match="groups=1"):
        Im2colConv2d(4, 4, 3, groups=2)


def test_fcn_fc6_runs_as_gemms_and_keeps_its_parameter_names():
    model = densepred.create_model("fcn32s", num_classes=3)
    assert type(model.fc6) is Im2colConv2d and model.fc6.kernel_size == (7, 7)
    assert {"fc6.weight", "fc6.bias"} <= set(model.state_dict())
