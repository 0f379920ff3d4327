"""The figures: heat maps beside the image, feature maps one layer per row."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .features import LayerFeatures
from .heatmaps import HeatMaps

__all__ = ["plot_heatmaps", "plot_feature_grid"]


def _display_image(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    return (image[..., 0], "gray") if image.ndim == 3 and image.shape[-1] == 1 else (image, None)


def plot_heatmaps(
    image: np.ndarray,
    maps: HeatMaps,
    out: str | Path,
    *,
    title: str = "",
    class_name: str = "",
    vmax: float | None = 1.0,
) -> Path:
    """Three panels: the image | the coarse grid over it | the dense map over it.

    The coarse grid is drawn as blocks (nearest neighbour), one per score cell at its true
    position and size, with the cell borders; the dense map is per pixel. Both share one
    colour scale of the class probability, so coarse and dense compare directly: 0..1 by
    default, 0..peak with ``vmax=None`` (a 1000-way softmax rarely comes near 1).
    """
    from ..plots import plt

    height, width = image.shape[:2]
    shown, cmap = _display_image(image)
    if vmax is None:
        vmax = max(float(np.nanmax([np.nanmax(maps.coarse), np.nanmax(maps.dense)])), 1e-6)
    aspect = width / height
    fig, axes = plt.subplots(1, 3, figsize=(3 * 3.6 * min(max(aspect, 0.6), 2.0) + 1.2, 4.3), constrained_layout=True)
    h, w = maps.coarse.shape
    s, o = maps.stride, maps.offset
    label = f"P({class_name})" if class_name else "probability"

    axes[0].imshow(shown, cmap=cmap)
    axes[0].set_title(f"input {width}x{height}", fontsize=10)
    # Under a heat map the image is shown in gray: its own colours would blend with the map's.
    gray = image.reshape(height, width, -1).mean(-1)
    for ax in axes[1:]:
        ax.imshow(gray, cmap="gray", vmin=0, vmax=255)
    # Cell j covers input pixels centred on s * j + o, +- s / 2 (pixel i spans i +- 0.5).
    extent = (o - s / 2, o - s / 2 + s * w, o - s / 2 + s * h, o - s / 2)
    axes[1].imshow(maps.coarse, cmap="turbo", vmin=0, vmax=vmax, alpha=0.6, extent=extent, interpolation="nearest")
    if s >= 4 and max(h, w) <= 40:  # cell borders; on a finer grid they would hide the map
        for i in range(h + 1):
            axes[1].axhline(o - s / 2 + s * i, color="white", lw=0.5, alpha=0.45)
        for j in range(w + 1):
            axes[1].axvline(o - s / 2 + s * j, color="white", lw=0.5, alpha=0.45)
    if s > 1:
        axes[1].set_title(f"coarse: {w}x{h} score cells, stride {s}\n(one block = one window of the net)", fontsize=10)
    else:
        axes[1].set_title("coarse = dense: scores at stride 1\n(this model has no coarse grid)", fontsize=10)
    axes[2].imshow(maps.dense, cmap="turbo", vmin=0, vmax=vmax, alpha=0.6, interpolation="nearest")
    axes[2].set_title(f"dense: {width}x{height}\n{_wrap(maps.note, 48)}", fontsize=10)
    for ax in axes:
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
    scale = plt.cm.ScalarMappable(norm=plt.Normalize(0, vmax), cmap="turbo")  # opaque, unlike the overlays
    fig.colorbar(
        scale, ax=axes, shrink=0.85, label=label + ("" if vmax == 1.0 else f"\n(scale 0 to its maximum, {vmax:.2g})")
    )
    if title:
        fig.suptitle(title, fontsize=12)
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _stride_text(stride: float) -> str:
    if math.isnan(stride):
        return "stride unknown"
    if stride >= 1:
        return f"stride {stride:g}" if stride == round(stride) else f"stride {stride:.2f}"
    return f"upsampled x{1 / stride:g}"


def plot_feature_grid(
    image: np.ndarray, features: dict[str, LayerFeatures], out: str | Path, *, title: str = ""
) -> Path:
    """One row per layer, shallow first: the image at the layer's resolution, then its channels.

    Each channel is normalised to its own range (a weak channel's pattern stays visible); the
    panel title gives its index and mean activation. The first column shows how much of the
    image a map of that size can resolve: the image resampled to the layer's grid.
    """
    import cv2

    from ..plots import plt

    if not features:
        raise ValueError("no feature maps to plot")
    cols = 1 + max(f.channels.shape[0] for f in features.values())
    rows = len(features)
    fig, axes = plt.subplots(rows, cols, figsize=(1.55 * cols + 1.4, 1.75 * rows + 0.6), squeeze=False)
    shown, cmap = _display_image(image)
    for r, (name, f) in enumerate(features.items()):
        h, w = f.channels.shape[-2:]
        # INTER_AREA averages the pixels each cell covers: what that resolution can resolve.
        small = cv2.resize(np.ascontiguousarray(shown), (w, h), interpolation=cv2.INTER_AREA)
        axes[r, 0].imshow(small, cmap=cmap, interpolation="nearest")
        axes[r, 0].set_ylabel(
            f"{name}\n{f.num_channels} ch, {w}x{h}\n{_stride_text(f.stride)}",
            rotation=0,
            ha="right",
            va="center",
            fontsize=9,
        )
        if r == 0:
            axes[r, 0].set_title("image at\nthis resolution", fontsize=8)
        for c in range(1, cols):
            ax = axes[r, c]
            if c - 1 < f.channels.shape[0]:
                ch = f.channels[c - 1]
                lo, hi = float(ch.min()), float(ch.max())
                norm = (ch - lo) / (hi - lo) if hi > lo else np.zeros_like(ch)
                ax.imshow(norm, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
                ax.set_title(f"ch {int(f.indices[c - 1])}, mean {float(f.strength[c - 1]):.2g}", fontsize=7)
            else:
                ax.axis("off")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    note = "bright = strong activation; each channel scaled to its own range; strongest (highest mean) first"
    fig.suptitle(f"{title}\n{note}" if title else f"the strongest channels per layer\n{note}", fontsize=11)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
