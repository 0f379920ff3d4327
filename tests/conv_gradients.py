"""A convolution layer with its own arithmetic must be ``F.conv2d``: the same output and the same
gradients for input, weight and bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def assert_is_the_convolution(conv: nn.Conv2d, x: Tensor, grad_fn_suffix: str) -> None:
    """``conv(x)`` ran through ``grad_fn_suffix`` and equals ``F.conv2d`` forward and backward.

    The output goes through an in-place ReLU first, as the layers after fc6 do."""
    y = conv(x)
    assert y.grad_fn.name().endswith(grad_fn_suffix)
    y = y.relu_()
    reference = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups).relu()
    torch.testing.assert_close(y, reference)
    upstream = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, conv.weight, conv.bias), upstream)
    theirs = torch.autograd.grad(reference, (x, conv.weight, conv.bias), upstream)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


def assert_is_the_unbiased_convolution(conv: nn.Conv2d, x: Tensor, grad_fn_suffix: str) -> tuple[Tensor, Tensor]:
    """As :func:`assert_is_the_convolution` for a layer without bias, straight from its output;
    returns its gradients for input and weight."""
    y = conv(x)
    assert y.grad_fn.name().endswith(grad_fn_suffix)
    reference = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    torch.testing.assert_close(y, reference)
    upstream = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, conv.weight), upstream)
    theirs = torch.autograd.grad(reference, (x, conv.weight), upstream)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)
    return ours
