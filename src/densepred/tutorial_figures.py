"""The tutorial's figures, one per step of :mod:`densepred.tutorial` (Matplotlib, Agg backend).

Each function draws one :class:`Step`'s ``panels`` into a small PNG;
:func:`draw` picks the function by step number. Label maps use the synthetic data's palette.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data.synthetic import SyntheticShapes

SYNTHETIC_CLASS_NAMES = ("background", "disk", "square", "triangle", "ring", "dot")
OBJECT_CLASS_NAMES = ("background", "object")


@dataclass
class Step:
    """One step's results: ``facts`` fill the text's templates, ``panels`` feed its figure."""

    number: int
    title: str
    facts: dict[str, Any]
    panels: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


__all__ = ["draw", "FILES"]

FILES = {
    1: "01_pixels.png",
    2: "02_heatmap.png",
    3: "03_deconvolution.png",
    4: "04_skips.png",
    5: "05_features.png",
    6: "06_field_of_view.png",
    7: "07_crf.png",
    8: "08_unet.png",
}
_PALETTE = np.array(SyntheticShapes.palette, dtype=np.uint8)
_OBJECT_PALETTE = np.array([(0, 0, 0), (255, 225, 25)], dtype=np.uint8)
_DPI = 90


def _colour(labels: np.ndarray, palette: np.ndarray = _PALETTE) -> np.ndarray:
    return palette[np.asarray(labels)]


def _bare(ax, title: str = "") -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def _legend(fig, names, palette, **kw) -> None:
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor=np.array(c) / 255, edgecolor="0.5", label=n) for n, c in zip(names, palette, strict=True)
    ]
    fig.legend(handles=handles, fontsize=8, frameon=False, **kw)


def _save(fig, path: Path) -> Path:
    from .plots import plt

    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return _compact(path)


def _compact(path: Path, scale: float = 1.0) -> Path:
    """Re-save ``path`` (resized by ``scale``) with a 256-colour palette: a figure has few
    colours, and a palette PNG is a third of the size of an RGB one."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
    if scale != 1.0:
        rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.LANCZOS)
    rgb.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


def draw(step: Step, folder: str | Path) -> Path:
    """Draw ``step``'s figure as ``folder/FILES[step.number]``; returns the path."""
    path = Path(folder) / FILES[step.number]
    return _DRAW[step.number](step, path)


def _pixels(step: Step, path: Path) -> Path:
    from .plots import plt

    p, f = step.panels, step.facts
    fig = plt.figure(figsize=(10.5, 5.4))
    grid = fig.add_gridspec(2, 6, height_ratios=(1.35, 1))
    top = [fig.add_subplot(grid[0, 2 * i : 2 * i + 2]) for i in range(3)]
    top[0].imshow(p["image"])
    _bare(top[0], f"image {f['width']}x{f['height']}")
    top[1].imshow(_colour(p["mask"]), interpolation="nearest")
    _bare(top[1], "ground truth: a class per pixel")
    top[2].imshow(_colour(p["pred"]), interpolation="nearest")
    _bare(top[2], f"argmax of the softmax\n(pixel acc {f['pixel_acc']:.2f}, mIoU {f['miou']:.2f})")
    for c, name in enumerate(SYNTHETIC_CLASS_NAMES):
        ax = fig.add_subplot(grid[1, c])
        im = ax.imshow(p["probs"][c], cmap="magma", vmin=0, vmax=1)
        _bare(ax, f"P({name})")
    _legend(fig, SYNTHETIC_CLASS_NAMES, _PALETTE, loc="upper center", ncol=6, bbox_to_anchor=(0.47, 0.995))
    fig.suptitle(
        f"per-pixel softmax of a {f['patch']}x{f['patch']} patch classifier slid over all {f['pixels']:,} pixels",
        fontsize=11,
        y=0.93,
    )
    fig.subplots_adjust(left=0.02, right=0.91, top=0.82, bottom=0.03, wspace=0.1, hspace=0.25)
    cax = fig.add_axes((0.925, 0.05, 0.012, 0.3))
    fig.colorbar(im, cax=cax, label="probability")
    return _save(fig, path)


def _heatmap(step: Step, path: Path) -> Path:
    from .visualize import plot_heatmaps

    f, p = step.facts, step.panels
    title = f"the {f['patch']}x{f['patch']} classifier, convolutionalized: P({f['heat_class']}) for every window"
    plot_heatmaps(p["image"], p["maps"], path, title=title, class_name=f["heat_class"])
    return _shrink(path)


def _shrink(path: Path, dpi_from: int = 110) -> Path:
    """Re-save a PNG drawn by a library function at this module's resolution."""
    return _compact(path, _DPI / dpi_from)


def _deconvolution(step: Step, path: Path) -> Path:
    from .plots import plt

    p, f = step.panels, step.facts
    fig, axes = plt.subplots(2, 3, figsize=(10.5, 6.6))
    k = f["kernel_size"]
    ax = axes[0, 0]
    ax.imshow(p["kernel"], cmap="viridis")
    _bare(ax, f"bilinear kernel {k}x{k} (factor {f['factor']})\nouter product of a triangle")
    axes[0, 1].imshow(p["coarse"], cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    _bare(axes[0, 1], f"coarse scores {f['coarse_grid']}\n(one class, stride {f['factor']})")
    axes[0, 2].imshow(p["up"], cmap="magma", vmin=0, vmax=1)
    _bare(axes[0, 2], f"fixed transposed conv, stride {f['factor']}\n(output {f['out_size']} px, crop {f['crop']})")
    diff = np.abs(p["up"] - p["reference"])
    im = axes[1, 0].imshow(diff, cmap="Reds", vmin=0, vmax=max(float(diff.max()), 1e-6))
    _bare(
        axes[1, 0],
        f"|deconv - F.interpolate|\ninterior max {f['interior_diff']:.1g}, border max {f['border_diff']:.2f}",
    )
    fig.colorbar(im, ax=axes[1, 0], shrink=0.8)
    lim = max(float(np.abs(p["learned"]).max()), 1e-6)
    im = axes[1, 1].imshow(p["learned"], cmap="RdBu_r", vmin=-lim, vmax=lim)
    _bare(axes[1, 1], "learned kernel (same class)\nafter training from bilinear")
    fig.colorbar(im, ax=axes[1, 1], shrink=0.8)
    lim = max(float(np.abs(p["learned_cross"]).max()), 1e-6)
    im = axes[1, 2].imshow(p["learned_cross"], cmap="RdBu_r", vmin=-lim, vmax=lim)
    _bare(axes[1, 2], "learned kernel (background -> class)\nbilinear starts it at zero")
    fig.colorbar(im, ax=axes[1, 2], shrink=0.8)
    fig.suptitle(
        "deconvolution: a stride-f transposed convolution with a bilinear kernel is bilinear upsampling", fontsize=11
    )
    fig.tight_layout()
    return _save(fig, path)


def _skips(step: Step, path: Path) -> Path:
    from .plots import plt

    p, f = step.panels, step.facts
    fig, axes = plt.subplots(2, 5, figsize=(12, 5.6))
    axes[0, 0].imshow(p["image"])
    _bare(axes[0, 0], "image")
    axes[1, 0].imshow(_colour(p["mask"], _OBJECT_PALETTE), interpolation="nearest")
    axes[1, 0].contour(p["band"], levels=[0.5], colors="tab:cyan", linewidths=0.7)
    _bare(axes[1, 0], f"ground truth, and the\nboundary band (+-{f['band']} px)")
    for col, (name, stride) in enumerate((("fcn32s", 32), ("fcn16s", 16), ("fcn8s", 8)), start=1):
        axes[0, col].imshow(_colour(p["preds"][name], _OBJECT_PALETTE), interpolation="nearest")
        _bare(
            axes[0, col],
            f"FCN-{stride}s (trained)\nmIoU {f[name + '_miou']:.3f}, boundary {f[name + '_boundary_acc']:.3f}",
        )
        axes[1, col].imshow(_colour(p["ideal"][stride], _OBJECT_PALETTE), interpolation="nearest")
        _bare(axes[1, col], f"exact stride-{stride} scores, upsampled\nboundary {f[f'ideal{stride}_boundary']:.3f}")
    axes[0, 4].axis("off")
    axes[1, 4].axis("off")
    text = (
        f"slim copies (1/{f['slim']} of the channels)\nof the same graphs,\n{f['iterations']} iterations, "
        f"batch {f['batch']},\n{f['train_images']} training scenes\n\nscores over {f['val_images']} val scenes"
    )
    axes[0, 4].text(0, 0.5, text, fontsize=9, va="center")
    axes[1, 4].text(
        0,
        0.5,
        "bottom row: what a fixed\nbilinear upsampling makes of\nthe true class frequencies\nof each cell",
        fontsize=9,
        va="center",
    )
    _legend(fig, OBJECT_CLASS_NAMES, _OBJECT_PALETTE, loc="lower right", ncol=2)
    fig.suptitle("the skip architecture: coarse (stride 32) to fine (stride 8)", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def _features(step: Step, path: Path) -> Path:
    from .visualize import plot_feature_grid

    title = "slim FCN-8s (step 4): shallow layers are fine and local, deep layers coarse (stride measured)"
    plot_feature_grid(step.panels["image"], step.panels["features"], path, title=title)
    return _shrink(path, dpi_from=100)


def _field_of_view(step: Step, path: Path) -> Path:
    from .plots import plt

    p, f = step.panels, step.facts
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 5.0), gridspec_kw={"width_ratios": (1, 1.3)})
    image = p["image"]
    side = image.shape[0]
    centre = (side - 1) / 2
    left.imshow(image.mean(-1), cmap="gray", vmin=0, vmax=255)
    colours = ["tab:red", "tab:orange", "tab:green", "tab:blue"]
    for rate, colour in zip(p["rates"], colours, strict=True):
        d = 8 * rate  # a dilation of r on the stride-8 map: taps 8 r pixels apart on the image
        taps = [(centre + i * d, centre + j * d) for i in (-1, 0, 1) for j in (-1, 0, 1)]
        ys, xs = zip(*taps, strict=True)
        left.scatter(xs, ys, s=30, color=colour, label=f"rate {rate}: taps {d} px apart", zorder=3)
        left.add_patch(plt.Rectangle((centre - d, centre - d), 2 * d, 2 * d, fill=False, color=colour, lw=1))
    pad = 8 * max(p["rates"]) - side / 2 + 20
    left.set_xlim(-pad, side + pad)
    left.set_ylim(side + pad, -pad)
    left.add_patch(plt.Rectangle((-0.5, -0.5), side, side, fill=False, color="k", lw=1.2))
    left.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=2, frameon=False)
    _bare(left, f"ASPP-L on a {side}x{side} image: four 3x3 atrous branches\n(taps outside the image read padding)")
    for key, label, colour in (
        ("largefov", "LargeFOV (fc6 3x3, rate 12)", "tab:blue"),
        ("fc7x7", "fc6 7x7, rate 4", "tab:red"),
    ):
        prof = p["profiles"][key]
        x = np.arange(len(prof)) - (len(prof) - 1) / 2
        right.semilogy(x, np.where(prof > 0, prof, np.nan), color=colour, lw=1, label=f"{label}: {f[key + '_rf']} px")
    right.set_xlabel("input column relative to the output pixel (px)")
    right.set_ylabel("|d score / d input| (log)")
    right.legend(fontsize=8)
    right.set_title(
        "measured receptive field: where the input gradient of one score is non-zero\n"
        f"{f['largefov_params'] / 1e6:.1f}M vs {f['fc7x7_params'] / 1e6:.1f}M parameters",
        fontsize=9,
    )
    fig.suptitle("atrous convolution: a large field of view without large kernels", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def _crf(step: Step, path: Path) -> Path:
    from .plots import plt

    p, f = step.panels, step.facts
    fig = plt.figure(figsize=(12, 5.2))
    grid = fig.add_gridspec(2, 4, height_ratios=(1.4, 1))
    image, mask = p["image"], p["mask"]
    # The row that crosses the most boundary pixels: where the CRF has work to do.
    row = int(np.argmax(p["band"].sum(1)))
    panels = (
        (image, "image", None),
        (_colour(mask, _OBJECT_PALETTE), "ground truth", None),
        (p["before"], f"FCN-32s P(object)\nboundary acc {f['before_boundary_acc']:.3f}", "magma"),
        (p["after"], f"after the CRF\nboundary acc {f['after_boundary_acc']:.3f}", "magma"),
    )
    for i, (data, title, cmap) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(data, cmap=cmap, vmin=0 if cmap else None, vmax=1 if cmap else None, interpolation="nearest")
        ax.axhline(row, color="tab:cyan", lw=0.8)
        _bare(ax, title)
    ax = fig.add_subplot(grid[1, :])
    ax.plot(p["before"][row], label="P(object), FCN-32s", color="tab:purple")
    ax.plot(p["after"][row], label="P(object) after the CRF", color="tab:orange")
    ax.step(np.arange(mask.shape[1]), mask[row], where="mid", label="ground truth", color="k", lw=0.8)
    ax.set_xlim(0, mask.shape[1] - 1)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(f"column along row {row} (the cyan line)")
    ax.legend(fontsize=8, loc="upper right", ncol=3)
    fig.suptitle(
        f"fully-connected CRF on validation scene {f['shown_scene']} (the median change of the scenes)\n"
        f"w1={f['w1']:g}, theta_alpha={f['theta_alpha']:g}, theta_beta={f['theta_beta']:g}, "
        f"w2={f['w2']:g}, theta_gamma={f['theta_gamma']:g}, {f['iterations']} mean-field steps",
        fontsize=11,
    )
    fig.tight_layout()
    return _save(fig, path)


def _unet(step: Step, path: Path) -> Path:
    from .plots import plt

    p, f = step.panels, step.facts
    fig, axes = plt.subplots(1, 3, figsize=(12.5, 4.6), gridspec_kw={"width_ratios": (1.25, 1, 1.1)})
    image, m, tile, out, stepsize, count = p["image"], p["margin"], p["tile"], p["out_tile"], p["step"], p["count"]
    side = image.shape[0]
    gray = image.mean(-1)
    # Mirror the image as overlap-tile does, so the context of the border tiles is visible.
    extent = (count - 1) * stepsize + out
    mirrored = np.pad(gray, ((m, m + extent - side), (m, m + extent - side)), mode="reflect")
    ax = axes[0]
    ax.imshow(mirrored, cmap="gray", extent=(-m - 0.5, extent + m - 0.5, extent + m - 0.5, -m - 0.5))
    ax.add_patch(plt.Rectangle((-0.5, -0.5), side, side, fill=False, color="white", lw=1.2, ls="--"))
    for i in range(count):
        for j in range(count):
            ax.add_patch(plt.Rectangle((j * stepsize, i * stepsize), out, out, fill=False, color="gold", lw=0.8))
    ax.add_patch(plt.Rectangle((-m, -m), tile, tile, fill=False, color="tab:blue", lw=2))
    ax.add_patch(plt.Rectangle((0, 0), out, out, fill=False, color="gold", lw=2))
    title = (
        f"overlap-tile: {tile} px input tile (blue) -> {out} px output (yellow)\n"
        f"{f['tiles']} tiles cover the {side} px image (dashed); the rest is mirrored"
    )
    _bare(ax, title)
    axes[1].imshow(p["mask"], cmap="gray", interpolation="nearest")
    _bare(axes[1], "toy cell mask (white: cells,\nblack: gaps of 1 to 12 px)")
    im = axes[2].imshow(p["weights"], cmap="jet", interpolation="nearest")
    fig.colorbar(im, ax=axes[2], shrink=0.85, label="w(x)")
    _bare(axes[2], f"weight map w = w_c + w0 exp(-(d1+d2)^2 / 2 sigma^2)\nw0={f['w0']:g}, sigma={f['sigma']:g} px")
    fig.suptitle(
        f"U-Net: valid convolutions ({f['tile']} -> {f['out_tile']}), overlap-tile, border weights", fontsize=11
    )
    fig.tight_layout()
    return _save(fig, path)


_DRAW = {1: _pixels, 2: _heatmap, 3: _deconvolution, 4: _skips, 5: _features, 6: _field_of_view, 7: _crf, 8: _unet}
