"""Figures (Matplotlib, non-interactive backend): training curves and more."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed, ever
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["read_log", "plot_training_curves"]


def read_log(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Training and validation records of a run's ``log.jsonl``."""
    train, val = [], []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("split") == "val":
            val.append(record)
        elif "loss" in record:
            train.append(record)
    return train, val


def plot_training_curves(log: str | Path, out: str | Path) -> Path:
    """Loss, learning rate and validation metrics against iterations, in one PNG."""
    train, val = read_log(log)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    its = [r["iter"] for r in train]
    axes[0].plot(its, [r["loss"] for r in train], lw=1)
    axes[0].set(title="training loss", xlabel="iteration", ylabel="loss")
    if train and min(r["loss"] for r in train) > 0:
        axes[0].set_yscale("log")
    axes[1].plot(its, [r["lr"] for r in train], lw=1, color="tab:orange")
    axes[1].set(title="learning rate", xlabel="iteration")
    for key, label in (("miou", "mean IoU"), ("pixel_acc", "pixel accuracy"), ("mean_acc", "mean accuracy")):
        points = [(r["iter"], r[key]) for r in val if key in r]
        if points:
            axes[2].plot(*zip(*points, strict=True), marker="o", label=label)
    axes[2].set(title="validation", xlabel="iteration", ylim=(0, 1))
    if val:
        axes[2].legend(loc="lower right")
    for ax in axes:
        ax.grid(alpha=0.3)
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_confusion_matrix(matrix, class_names: list[str], out: str | Path, *, title: str = "") -> Path:
    """Row-normalised confusion matrix (rows: ground truth), with the class names."""
    import numpy as np

    m = np.asarray(matrix, dtype=np.float64)
    norm = m / np.clip(m.sum(1, keepdims=True), 1, None)
    n = len(class_names)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size), constrained_layout=True)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set(xlabel="predicted", ylabel="ground truth", title=title or "confusion matrix (row-normalised)")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.005:
                    ax.text(
                        j,
                        i,
                        f"{norm[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.6 else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.046)
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_per_class_iou(iou: list[float], class_names: list[str], palette, out: str | Path) -> Path:
    """Horizontal bars of per-class IoU in the dataset's colours."""
    import numpy as np

    values = np.nan_to_num(np.asarray(iou, dtype=np.float64), nan=0.0)
    colours = [tuple(c / 255 for c in palette[i]) if i < len(palette) else "grey" for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(values) + 1.2), constrained_layout=True)
    ax.barh(range(len(values)), values, color=colours, edgecolor="black", linewidth=0.5)
    ax.set_yticks(range(len(values)), class_names)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="IoU", title=f"per-class IoU (mean {np.nanmean(iou):.3f})")
    for i, v in enumerate(values):
        # A white label box stays readable on any class colour, black included.
        ax.text(
            min(v + 0.01, 0.9),
            i,
            f"{v:.2f}",
            va="center",
            fontsize=8,
            bbox=dict(facecolor="white", edgecolor="none", alpha=0.85, pad=1),
        )
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _legend(fig, class_names: list[str], palette) -> None:
    """Class colours as one row under the figure (never over a panel)."""
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor=tuple(c / 255 for c in palette[i]), edgecolor="black", label=name)
        for i, name in enumerate(class_names)
        if i < len(palette)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), fontsize=9, frameon=False)


def plot_side_by_side(rows, class_names: list[str], palette, out: str | Path) -> Path:
    """One row per example: image | ground truth | prediction | errors (red; ignored pixels grey).

    ``rows`` holds ``(name, image uint8 (H, W, 3), gt (H, W) ids, pred (H, W) ids)``.
    """
    import numpy as np

    from .data.labels import IGNORE_INDEX, colorize

    fig, axes = plt.subplots(len(rows), 4, figsize=(13, 3.1 * len(rows)), squeeze=False, constrained_layout=True)
    for r, (name, image, gt, pred) in enumerate(rows):
        errors = np.zeros((*gt.shape, 3), np.uint8) + 255
        errors[(pred != gt) & (gt != IGNORE_INDEX)] = (220, 30, 30)
        errors[gt == IGNORE_INDEX] = (170, 170, 170)
        valid = gt != IGNORE_INDEX
        acc = float((pred[valid] == gt[valid]).mean()) if valid.any() else float("nan")
        panels = (image, colorize(gt, palette), colorize(pred, palette), errors)
        titles = (name, "ground truth", "prediction", f"errors (pixel acc {acc:.3f})")
        for ax, panel, title in zip(axes[r], panels, titles, strict=True):
            ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    _legend(fig, class_names, palette)
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
