"""Facts about the registered models, for ``densepred models`` and documentation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
