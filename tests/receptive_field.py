"""Measuring a net's receptive field from its input gradients, for the tests that check the
registry's declared fields (FCN Table 1: 404 px for FCN-VGG16)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def theoretical_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Prepare ``model`` for a receptive-field probe: eval mode, max-pools -> average pools.

    Max-pooling routes gradients through one pixel per window, which would hide part of the
    theoretical field; zero-initialised score layers would hide all of it.
    """
    model.eval()
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.MaxPool2d):
                setattr(
                    module,
                    name,
                    torch.nn.AvgPool2d(child.kernel_size, child.stride, child.padding, ceil_mode=child.ceil_mode),
                )
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.01)
    return model


def measure_receptive_field(
    score_map: Callable[[Tensor], Tensor],
    in_channels: int,
    height: int,
    width: int = 256,
    *,
    phases: int = 1,
    max_width: int = 8192,
) -> int:
    """Measure the receptive field of ``score_map``'s centre pixels along the width.

    The support of the input gradient of one output value is its receptive field. A short,
    wide input keeps the cost low (the field along the width does not depend on the height);
    the width doubles until no field reaches the image border. Nets that pool and then
    up-convolve (U-Net) see a field that depends on the pixel's phase: ``phases`` consecutive
    pixels are probed and the largest field is returned.
    """
    while width <= max_width:
        x = torch.randn(1, in_channels, height, width, requires_grad=True)
        out = score_map(x)
        widest, inside = 0, True
        for k in range(phases):
            x.grad = None
            out[..., out.shape[-2] // 2, out.shape[-1] // 2 + k].sum().backward(retain_graph=k < phases - 1)
            cols = (x.grad.abs().sum(dim=(0, 1, 2)) > 0).nonzero().flatten()
            first, last = int(cols[0]), int(cols[-1])
            inside &= first > 0 and last < width - 1
            widest = max(widest, last - first + 1)
        if inside:
            return widest
        width *= 2
    raise ValueError(f"receptive field exceeds max_width={max_width}")
