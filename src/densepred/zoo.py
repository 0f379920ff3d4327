"""Facts about the registered models, for ``densepred models`` and documentation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .registry import create_model, list_models, model_entry

__all__ = ["ModelSummary", "summarize", "format_table"]


@dataclass(frozen=True)
class ModelSummary:
    name: str
    params: int
    output_stride: int
    receptive_field: int
    default_size: int
    paper: str


def summarize(name: str, num_classes: int = 21, in_channels: int = 3) -> ModelSummary:
    """Parameter count (built on the meta device: no memory, no time) and declared facts."""
    entry = model_entry(name)
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, in_channels=in_channels)
    params = sum(p.numel() for p in model.parameters())
    return ModelSummary(name, params, entry.output_stride, entry.receptive_field, entry.default_size, entry.paper)


def format_table(rows: list[ModelSummary]) -> str:
    header = ("model", "params", "out stride", "recept. field", "paper size", "paper")
    body = [
        (
            r.name,
            f"{r.params / 1e6:.2f}M",
            str(r.output_stride),
            f"{r.receptive_field} px",
            str(r.default_size),
            r.paper,
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def model_table(pattern: str = "*", num_classes: int = 21, in_channels: int = 3) -> str:
    return format_table([summarize(n, num_classes, in_channels) for n in list_models(pattern)])


def _theoretical_copy(model: torch.nn.Module) -> torch.nn.Module:
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
