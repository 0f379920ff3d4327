"""MobileNetV3-Large and LR-ASPP (Howard et al. 2019): torchvision's layout, sizes, parameter counts.

The expected state-dict keys and shapes are written out here from the paper's Table 1 (not read
from the modules), and a functional re-implementation with ``F.conv2d``/``F.batch_norm`` on the
loaded tensors checks the forward pass.
"""

import pytest
import torch
import torch.nn.functional as F

import densepred
import densepred.models.lraspp  # noqa: F401  (registers lraspp_mobilenet_v3_large)
from conv_gradients import assert_is_the_convolution
from densepred.models.backbones.mobilenetv3 import FeatureTaps, MobileNetV3Large, SqueezeExcitation
from densepred.models.layers import DilatedDepthwiseConv2d
from receptive_field import measure_receptive_field, theoretical_copy

NAME = "lraspp_mobilenet_v3_large"

# Table 1 of the paper, MobileNetV3-Large: (in, kernel, exp size, out, SE, activation, stride).
TABLE_1 = [
    (16, 3, 16, 16, False, "RE", 1),
    (16, 3, 64, 24, False, "RE", 2),
    (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2),
    (80, 3, 200, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 480, 112, True, "HS", 1),
    (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2),
    (160, 5, 960, 160, True, "HS", 1),
    (160, 5, 960, 160, True, "HS", 1),
]
# SE squeeze widths: exp / 4 rounded to a multiple of 8, not below 90% (72 / 4 = 18 -> 24).
SQUEEZE = {72: 24, 120: 32, 480: 120, 672: 168, 960: 240}


def _params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def _bn(prefix: str, c: int) -> dict:
    return {f"{prefix}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()
    }


def _conv_bn(prefix: str, cin: int, cout: int, k: int, groups: int = 1) -> dict:
    return {f"{prefix}.0.weight": (cout, cin // groups, k, k)} | _bn(f"{prefix}.1", cout)


def trunk_shapes(prefix: str = "features.") -> dict[str, tuple[int, ...]]:
    """torchvision's ``mobilenet_v3_large().features`` keys and shapes, from Table 1."""
    shapes = _conv_bn(f"{prefix}0", 3, 16, 3)
    for i, (cin, k, exp, out, se, _, _) in enumerate(TABLE_1, start=1):
        block, m = f"{prefix}{i}.block", 0
        if exp != cin:  # no expansion layer where it would not widen (the first block)
            shapes |= _conv_bn(f"{block}.{m}", cin, exp, 1)
            m += 1
        shapes |= _conv_bn(f"{block}.{m}", exp, exp, k, groups=exp)
        m += 1
        if se:
            sq = SQUEEZE[exp]
            shapes |= {f"{block}.{m}.fc1.weight": (sq, exp, 1, 1), f"{block}.{m}.fc1.bias": (sq,)}
            shapes |= {f"{block}.{m}.fc2.weight": (exp, sq, 1, 1), f"{block}.{m}.fc2.bias": (exp,)}
            m += 1
        shapes |= _conv_bn(f"{block}.{m}", exp, out, 1)
    return shapes | _conv_bn(f"{prefix}16", 160, 960, 1)


def imagenet_shapes() -> dict[str, tuple[int, ...]]:
    head = {"classifier.0.weight": (1280, 960), "classifier.0.bias": (1280,)}
    return trunk_shapes() | head | {"classifier.3.weight": (1000, 1280), "classifier.3.bias": (1000,)}


def lraspp_shapes(num_classes: int = 21) -> dict[str, tuple[int, ...]]:
    """torchvision's ``lraspp_mobilenet_v3_large()`` keys: features 0..16 as ``backbone.N``."""
    head = {"classifier.cbr.0.weight": (128, 960, 1, 1)} | _bn("classifier.cbr.1", 128)
    head |= {"classifier.scale.1.weight": (128, 960, 1, 1)}
    head |= {
        "classifier.low_classifier.weight": (num_classes, 40, 1, 1),
        "classifier.low_classifier.bias": (num_classes,),
    }
    head |= {
        "classifier.high_classifier.weight": (num_classes, 128, 1, 1),
        "classifier.high_classifier.bias": (num_classes,),
    }
    return trunk_shapes("backbone.") | head


def random_state(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A file of the given layout with non-trivial values (batch-norm statistics included)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(".1.weight") and len(shape) == 1:  # batch-norm gamma
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
            state[key] = torch.randn(shape, generator=g) * (0.1 if len(shape) == 1 else fan_in**-0.5)
    return state


def test_parameter_counts_are_torchvisions():
    # torchvision's meta: mobilenet_v3_large IMAGENET1K_V1 5,483,032; lraspp COCO_WITH_VOC_LABELS 3,221,538.
    assert _params(MobileNetV3Large(with_classifier=True)) == 5_483_032
    assert _params(densepred.create_model(NAME, num_classes=21)) == 3_221_538
    count = lambda shapes: sum(int(torch.tensor(s).prod()) for k, s in shapes.items() if "running" not in k and s)
    assert count(imagenet_shapes()) == 5_483_032 and count(lraspp_shapes()) == 3_221_538


def test_imagenet_layout_loads_strictly():
    net = MobileNetV3Large(with_classifier=True)
    expected = imagenet_shapes()
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == expected
    net.load_state_dict(random_state(expected), strict=True)
    assert net.classify(torch.randn(2, 3, 224, 224)).shape == (2, 1000)


def test_lraspp_layout_loads_strictly():
    model = densepred.create_model(NAME)
    expected = lraspp_shapes()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    model.load_state_dict(random_state(expected), strict=True)


# Functional re-implementation of torchvision's graph, from Table 1 and the loaded tensors.


def _f_conv_bn(x, s, p, *, stride=1, dilation=1, groups=1, act=None):
    w = s[f"{p}.0.weight"]
    pad = (w.shape[-1] - 1) // 2 * dilation
    x = F.conv2d(x, w, None, stride, pad, dilation, groups)
    x = F.batch_norm(
        x, s[f"{p}.1.running_mean"], s[f"{p}.1.running_var"], s[f"{p}.1.weight"], s[f"{p}.1.bias"], eps=1e-3
    )
    if act == "RE":
        return x.clamp(min=0)
    if act == "HS":  # hard-swish: x * relu6(x + 3) / 6 (Sec. 5.2)
        return x * (x + 3).clamp(0, 6) / 6
    return x


def _f_block(x, s, prefix, row, dilation):
    cin, _, exp, out, se, act, stride = row
    h, m = x, 0
    if exp != cin:
        h, m = _f_conv_bn(h, s, f"{prefix}.block.0", act=act), 1
    h = _f_conv_bn(
        h, s, f"{prefix}.block.{m}", stride=1 if dilation > 1 else stride, dilation=dilation, groups=exp, act=act
    )
    m += 1
    if se:
        p = f"{prefix}.block.{m}"
        z = h.mean((2, 3), keepdim=True)
        z = F.conv2d(z, s[f"{p}.fc1.weight"], s[f"{p}.fc1.bias"]).clamp(min=0)
        z = F.conv2d(z, s[f"{p}.fc2.weight"], s[f"{p}.fc2.bias"])
        h = h * (z + 3).clamp(0, 6) / 6  # hard-sigmoid
        m += 1
    h = _f_conv_bn(h, s, f"{prefix}.block.{m}")
    return h + x if stride == 1 and cin == out else h


def functional_lraspp(x, s):
    """torchvision's LR-ASPP forward: dilated trunk, low = features 4, high = features 16."""
    feats = [_f_conv_bn(x, s, "backbone.0", stride=2, act="HS")]
    nominal = 2
    for i, row in enumerate(TABLE_1, start=1):
        nominal *= row[-1]
        feats.append(_f_block(feats[-1], s, f"backbone.{i}", row, 2 if nominal == 32 else 1))
    low, high = feats[4], _f_conv_bn(feats[-1], s, "backbone.16", act="HS")
    c = "classifier"
    a = F.conv2d(high, s[f"{c}.cbr.0.weight"])
    bn = [s[f"{c}.cbr.1.{k}"] for k in ("running_mean", "running_var", "weight", "bias")]
    a = F.batch_norm(a, *bn, eps=1e-5).clamp(min=0)  # the head's batch norm has PyTorch's default eps
    w = torch.sigmoid(F.conv2d(high.mean((2, 3), keepdim=True), s[f"{c}.scale.1.weight"]))
    a = F.interpolate(a * w, size=low.shape[-2:], mode="bilinear", align_corners=False)
    score = F.conv2d(low, s[f"{c}.low_classifier.weight"], s[f"{c}.low_classifier.bias"])
    score = score + F.conv2d(a, s[f"{c}.high_classifier.weight"], s[f"{c}.high_classifier.bias"])
    return F.interpolate(score, size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_forward_matches_a_functional_reimplementation():
    state = random_state(lraspp_shapes(), seed=1)
    model = densepred.create_model(NAME).eval()
    model.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 65, 81)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), functional_lraspp(x, state), rtol=1e-4, atol=1e-4)


def test_one_se_block_matches_the_functional_one():
    # features.5: 40 -> 120 -> 40, 5x5 depthwise, SE, ReLU, identity shortcut.
    state = random_state(trunk_shapes(), seed=2)
    net = MobileNetV3Large().eval()
    net.load_state_dict(state, strict=True)
    assert isinstance(net.features[5].block[2], SqueezeExcitation)
    x = torch.randn(1, 40, 9, 11)
    with torch.inference_mode():
        torch.testing.assert_close(net.features[5](x), _f_block(x, state, "features.5", TABLE_1[4], 1))


@pytest.mark.parametrize("size", [(65, 81), (224, 224), (97, 131)])
def test_output_sizes(size):
    model = densepred.create_model(NAME, num_classes=5).eval()
    x = torch.randn(1, 3, *size)
    with torch.inference_mode():
        coarse, out = model.coarse_logits(x), model(x)
    assert out.shape == (1, 5, *size)
    assert coarse.shape[-2:] == tuple(-(-s // 8) for s in size)  # "same" padding: ceil(side / 8)
    assert model.output_stride == 8 and model.coarse_scores(x).stride == 8


@pytest.mark.parametrize("dilated,stride", [(False, 32), (True, 16)])
def test_backbone_strides_and_channels(dilated, stride):
    net = MobileNetV3Large(dilated=dilated).eval()
    assert net.stage_indices == [0, 2, 4, 7, 13, 16] and net.output_stride == stride
    with torch.inference_mode():
        out = net(torch.randn(1, 3, 224, 224))
    assert list(out) == list(net.feature_info)
    for key, spec in net.feature_info.items():
        assert out[key].shape[1:] == (spec.channels, 224 // spec.stride, 224 // spec.stride), key
    assert net.feature_info["features.16"].stride == stride and net.feature_info["features.4"].stride == 8
    dw = net.features[13].block[1][0]
    assert (dw.stride, dw.dilation, dw.padding) == (((1, 1), (2, 2), (4, 4)) if dilated else ((2, 2), (1, 1), (2, 2)))


def test_batch_norm_and_activations_follow_torchvision():
    net = MobileNetV3Large()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(bn.eps == 1e-3 and bn.momentum == 0.01 for bn in bns)
    acts = [type(net.features[i].block[0][2]).__name__ for i in range(1, 16)]
    assert acts == [("Hardswish" if row[5] == "HS" else "ReLU") for row in TABLE_1]
    assert isinstance(net.features[0][2], torch.nn.Hardswish) and isinstance(net.features[16][2], torch.nn.Hardswish)


def test_forward_and_backward():
    model = densepred.create_model(NAME, num_classes=3).train()
    x = model.example_input(batch=2)
    logits = model(x)
    assert logits.shape == (2, 3, *x.shape[-2:])
    F.cross_entropy(logits, torch.randint(0, 3, (2, *x.shape[-2:]))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_declared_receptive_field_is_that_of_the_convolutions():
    # SE and the head's global pooling see the whole image; without them the high branch's field
    # is the convolutions': 3 + 2*2 + 2*2 + ... with the last stage dilated by 2 at stride 16 = 659.
    model = theoretical_copy(densepred.create_model(NAME, num_classes=2))
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, SqueezeExcitation):
                setattr(parent, attr, torch.nn.Identity())
    head = model.classifier
    probe = lambda x: head.high_classifier(head.cbr(model.backbone(x)["high"]))
    assert measure_receptive_field(probe, 3, 33, 1024) == densepred.model_entry(NAME).receptive_field == 659


def test_bad_inputs_and_taps_are_clear_errors():
    model = densepred.create_model(NAME).eval()
    with pytest.raises(ValueError, match="in_channels=3 but the input has 1 channels"):
        model(torch.randn(1, 1, 33, 33))
    with pytest.raises(ValueError, match="no classifier"):
        MobileNetV3Large().classify(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="stage indices"):
        FeatureTaps(MobileNetV3Large(), {"low": 5})


@pytest.mark.parametrize("dilation,size,bias", [(2, (11, 9), False), (2, (8, 8), True), (3, (10, 13), False)])
def test_dilated_depthwise_conv_is_the_convolution_forward_and_backward(dilation, size, bias):
    # The polyphase weight gradient and the flipped-kernel input gradient must be the convolution's,
    # on maps whose sides are and are not multiples of the dilation.
    torch.manual_seed(0)
    conv = DilatedDepthwiseConv2d(6, 5, dilation, bias=bias).double()
    x = torch.randn(3, 6, *size, dtype=torch.float64, requires_grad=True)
    if bias:
        assert_is_the_convolution(conv, x, "_PolyphaseDepthwiseConvBackward")
        return
    assert_is_the_convolution(conv, x, "_PolyphaseDepthwiseConvBackward", relu=False)


def test_dilated_depthwise_conv_is_a_plain_convolution_where_it_should_be():
    conv = DilatedDepthwiseConv2d(4, 5, 2)
    assert set(conv.state_dict()) == {"weight"} and conv.padding == (4, 4) and conv.groups == 4
    x = torch.randn(1, 4, 9, 9, requires_grad=True)
    assert "aten::_convolution" in str(torch.jit.trace(conv, x).graph)  # what exports record
    with torch.no_grad():
        assert conv(x).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.grad_fn.name() == "ConvolutionBackward0"
    with pytest.raises(ValueError, match="odd kernel"):
        DilatedDepthwiseConv2d(4, 4, 2)
    # The backbone's dilated stage (LR-ASPP, DeepLab v3) trains through it; the rest is nn.Conv2d.
    net = MobileNetV3Large(dilated=True)
    dilated = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.dilation[0] > 1]
    assert len(dilated) == 3 and all(isinstance(m, DilatedDepthwiseConv2d) for m in dilated)
    assert not any(isinstance(m, DilatedDepthwiseConv2d) for m in MobileNetV3Large().modules())


def test_the_heads_keep_channels_last_forward_and_backward():
    """Global pooling upsampled from 1x1 comes out channels-first, and autograd's sum of gradients
    takes the layout of the first to arrive: LR-ASPP, ASPP and the pyramid pooling keep a
    channels-last model channels-last both ways (mixed layouts made a batch norm's backward 4x slower)."""
    from densepred.models.deeplabv3 import ASPP
    from densepred.models.lraspp import LRASPPHead
    from densepred.models.pspnet import PyramidPooling

    cl = torch.channels_last
    low = torch.randn(2, 8, 16, 16).contiguous(memory_format=cl)
    heads = {
        "LR-ASPP": (LRASPPHead(8, 16, 3, 8), lambda head, x: head(low, x)),
        "ASPP": (ASPP(16, [2, 3], 8), lambda head, x: head(x)),
        "pyramid pooling": (PyramidPooling(16, (1, 2)), lambda head, x: head(x)),
    }
    for name, (head, run) in heads.items():
        head = head.train().to(memory_format=cl)
        x = torch.randn(2, 16, 8, 8).contiguous(memory_format=cl).requires_grad_()
        y = run(head, x)
        (grad,) = torch.autograd.grad(y, x, torch.randn_like(y))
        assert y.is_contiguous(memory_format=cl) and grad.is_contiguous(memory_format=cl), name


def test_global_average_pool_is_pytorchs_with_a_broadcast_gradient():
    """Training through squeeze-and-excite adds the pooling's gradient to the product's: the pool's
    gradient is a stride-0 view, so the sum stays channels-last and costs a fraction of adding a
    dense channels-first map; the numbers are PyTorch's pooling's."""
    from densepred.models.deeplabv3 import ImagePooling
    from densepred.models.layers import GlobalAveragePool, global_average_pool
    from densepred.models.lraspp import LRASPPHead

    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = global_average_pool(x)
    torch.testing.assert_close(y, F.adaptive_avg_pool2d(x, 1))
    upstream = torch.randn_like(y)
    (ours,) = torch.autograd.grad(y, x, upstream)
    (theirs,) = torch.autograd.grad(F.adaptive_avg_pool2d(x, 1), x, upstream)
    torch.testing.assert_close(ours, theirs)
    assert ours.stride()[-2:] == (0, 0)
    # squeeze-and-excite: x feeds the pooling and the product; the summed gradient keeps the layout
    se = SqueezeExcitation(6).double().to(memory_format=torch.channels_last)
    out = se(x)
    (summed,) = torch.autograd.grad(out, x, torch.randn_like(out))
    assert summed.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert global_average_pool(x).grad_fn is None
    graph = str(torch.jit.trace(GlobalAveragePool(), x.detach()).graph)
    assert "adaptive_avg_pool2d" in graph  # what exports record
    assert isinstance(LRASPPHead(8, 16, 3, 8).scale[0], GlobalAveragePool)
    assert isinstance(ImagePooling(16, 8)[0], GlobalAveragePool)
