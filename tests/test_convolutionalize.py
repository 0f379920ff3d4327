"""Convolutionalization (FCN Sec. 3.1) and bilinear deconvolution (FCN Sec. 3.3)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densepred import BilinearDeconv, bilinear_kernel, convolutionalize
from densepred.models.backbones import vgg16_classifier


def _textbook_classifier() -> nn.Sequential:
    # 10x10 RGB -> valid 3x3 conv -> 8x8x16 -> 2x2 pool -> 4x4x16 -> 10 classes.
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 16, 10)
    ).eval()


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_textbook_example_keeps_the_2560_weights():
    clf = _textbook_classifier()
    fcn = convolutionalize(clf, input_size=(10, 10))
    fc, conv = clf[4], fcn[3]  # Flatten is gone
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (4, 4)
    assert fc.weight.numel() == conv.weight.numel() == 4 * 4 * 16 * 10 == 2560
    assert _params(fcn) == _params(clf)


def test_identical_output_at_the_training_size():
    clf = _textbook_classifier()
    fcn = convolutionalize(clf, input_size=(10, 10))
    x = torch.randn(5, 3, 10, 10)
    torch.testing.assert_close(fcn(x).flatten(1), clf(x))


def test_larger_input_gives_a_heat_map_equal_to_sliding_the_classifier():
    clf = _textbook_classifier()
    fcn = convolutionalize(clf, input_size=(10, 10))
    x = torch.randn(2, 3, 16, 14)
    heat = fcn(x)
    assert heat.shape == (2, 10, 4, 3)  # the net's stride is 2: one score per 2 pixels
    for i in range(heat.shape[-2]):
        for j in range(heat.shape[-1]):
            window = x[:, :, 2 * i : 2 * i + 10, 2 * j : 2 * j + 10]
            torch.testing.assert_close(heat[:, :, i, j], clf(window))


def test_vgg16_classifier_becomes_fc6_7x7_and_1x1_convs():
    clf = vgg16_classifier(num_classes=7).eval()
    fcn = convolutionalize(clf, input_size=(224, 224))
    convs = [m for m in fcn if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(7, 7), (1, 1), (1, 1)]
    assert _params(fcn) == _params(clf)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(fcn(x).flatten(1), clf(x), rtol=1e-4, atol=1e-4)
        assert fcn(torch.randn(1, 3, 288, 256)).shape == (1, 7, 3, 2)  # stride 32 heat map


def test_convolutionalize_errors_name_the_problem():
    with pytest.raises(ValueError, match="no nn.Flatten"):
        convolutionalize(nn.Sequential(nn.Conv2d(3, 4, 3)), input_size=(8, 8))
    with pytest.raises(ValueError, match="expects 256 inputs .* has 576"):
        convolutionalize(_textbook_classifier(), input_size=(14, 14))
    with pytest.raises(TypeError, match="nn.Sequential"):
        convolutionalize(nn.Linear(3, 4), input_size=(8, 8))


@pytest.mark.parametrize("factor", [2, 4, 8, 16, 32])
def test_fixed_deconvolution_equals_bilinear_upsampling(factor):
    up = BilinearDeconv(3, factor, learnable=False)
    x = torch.randn(2, 3, 6, 5)
    y = up(x)
    assert y.shape[-2:] == ((6 + 1) * factor, (5 + 1) * factor)
    # Cropping factor/2 aligns it with half-pixel bilinear interpolation; borders differ only
    # because the deconvolution treats outside pixels as zero where interpolation clamps.
    c = factor // 2
    y = y[:, :, c : c + 6 * factor, c : c + 5 * factor]
    ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    inner = (slice(None), slice(None), slice(factor, -factor), slice(factor, -factor))
    torch.testing.assert_close(y[inner], ref[inner])


def test_deconvolution_is_fixed_or_learnable():
    assert not BilinearDeconv(4, 2, learnable=False).weight.requires_grad
    assert BilinearDeconv(4, 2, learnable=True).weight.requires_grad


def test_bilinear_kernel_keeps_classes_apart():
    w = bilinear_kernel(3, 4)
    off_diagonal = w.clone()
    off_diagonal[range(3), range(3)] = 0
    assert off_diagonal.abs().sum() == 0
    # The 2-D filter sums to factor**2 (each output pixel gets 1 from overlapping taps): constants stay constant.
    torch.testing.assert_close(w[0, 0].sum(), torch.tensor(4.0))
