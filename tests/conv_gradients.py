"""A convolution layer with its own arithmetic must be ``F.conv2d``: the same output and the same
gradients for input, weight and bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def assert_is_the_convolution(
    conv: nn.Conv2d, x: Tensor, grad_fn_suffix: str, *, relu: bool = True
) -> tuple[Tensor, ...]:
    """``conv(x)`` ran through ``grad_fn_suffix`` and equals ``F.conv2d`` forward and backward;
    returns its gradients for input, weight and (where the layer has one) bias.

    With ``relu`` the output goes through an in-place ReLU first, as the layers after fc6 do."""
    y = conv(x)
    assert y.grad_fn.name().endswith(grad_fn_suffix)
    reference = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if relu:
        y, reference = y.relu_(), reference.relu()
    torch.testing.assert_close(y, reference)
    upstream = torch.randn_like(y)
    inputs = (x, conv.weight) if conv.bias is None else (x, conv.weight, conv.bias)
    ours = torch.autograd.grad(y, inputs, upstream)
    theirs = torch.autograd.grad(reference, inputs, upstream)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)
    return ours
