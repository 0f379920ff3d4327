"""Dataset statistics: class pixel frequencies, image sizes, median-frequency class weights."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .base import SegmentationDataset
from .labels import IGNORE_INDEX, RGB

__all__ = ["DatasetStats", "compute_stats", "median_frequency_weights", "format_stats", "save_bar_chart"]


@dataclass
class DatasetStats:
    """Pixel counts per class over a dataset (ignored pixels counted apart)."""

    class_names: tuple[str, ...]
    palette: list[RGB]
    pixel_counts: np.ndarray  # (C,) labelled pixels of each class
    present_pixels: np.ndarray  # (C,) total pixels of the images in which each class occurs
    ignored_pixels: int = 0
    num_images: int = 0
    image_sizes: Counter = field(default_factory=Counter)  # (height, width) -> count

    @property
    def total_pixels(self) -> int:
        return int(self.pixel_counts.sum()) + self.ignored_pixels

    @property
    def frequencies(self) -> np.ndarray:
        """Share of each class among the labelled (non-ignored) pixels."""
        return self.pixel_counts / max(int(self.pixel_counts.sum()), 1)


def compute_stats(dataset: SegmentationDataset, progress: bool = False, limit: int | None = None) -> DatasetStats:
    """Count labels over ``dataset`` (masks only; images are not decoded), at most ``limit`` examples."""
    c = dataset.num_classes
    stats = DatasetStats(dataset.class_names, list(dataset.palette), np.zeros(c, np.int64), np.zeros(c, np.int64))
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for i in tqdm(range(n), desc="stats", unit="img", disable=not progress):
        mask = dataset.load_mask(i)
        counts = np.bincount(mask.ravel(), minlength=256)
        stats.pixel_counts += counts[:c]
        stats.present_pixels[counts[:c] > 0] += mask.size
        stats.ignored_pixels += int(counts[IGNORE_INDEX])
        stats.image_sizes[mask.shape[:2]] += 1
        stats.num_images += 1
    return stats


def median_frequency_weights(stats: DatasetStats) -> np.ndarray:
    """Median frequency balancing (Eigen & Fergus, ICCV 2015; used by SegNet on CamVid).

    ``weight_c = median(freq) / freq_c`` with ``freq_c`` = pixels of class ``c`` divided by the
    total pixels of the images in which ``c`` is present. A class that never occurs gets 0.
    """
    freq = np.divide(
        stats.pixel_counts, stats.present_pixels, out=np.zeros(len(stats.pixel_counts)), where=stats.present_pixels > 0
    )
    present = freq > 0
    if not present.any():
        return np.zeros_like(freq)
    return np.divide(np.median(freq[present]), freq, out=np.zeros_like(freq), where=present)


def format_stats(stats: DatasetStats) -> str:
    """A plain-text report: sizes, then one row per class (pixels, share, median-frequency weight)."""
    weights = median_frequency_weights(stats)
    sizes = ", ".join(f"{w}x{h}: {k}" for (h, w), k in stats.image_sizes.most_common(5))
    more = f" (+{len(stats.image_sizes) - 5} more sizes)" if len(stats.image_sizes) > 5 else ""
    width = max([len(n) for n in stats.class_names] + [5])
    lines = [
        f"images: {stats.num_images}   sizes (W x H: count): {sizes}{more}",
        f"pixels: {stats.total_pixels}   ignored: {stats.ignored_pixels} "
        f"({100 * stats.ignored_pixels / max(stats.total_pixels, 1):.2f} %)",
        f"{'id':>3}  {'class':<{width}}  {'pixels':>12}  {'share %':>8}  {'median-freq weight':>18}",
    ]
    for i, name in enumerate(stats.class_names):
        lines.append(
            f"{i:>3}  {name:<{width}}  {stats.pixel_counts[i]:>12}  "
            f"{100 * stats.frequencies[i]:>8.2f}  {weights[i]:>18.4f}"
        )
    return "\n".join(lines)


def save_bar_chart(stats: DatasetStats, path: str | Path) -> Path:
    """Save a bar chart of class frequencies (each bar in its class colour) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    path = Path(path)
    n = len(stats.class_names)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * n + 2), 4))
    colours = [tuple(v / 255 for v in stats.palette[i]) if i < len(stats.palette) else "grey" for i in range(n)]
    ax.bar(range(n), 100 * stats.frequencies, color=colours, edgecolor="black", linewidth=0.5)
    ax.set_xticks(range(n), stats.class_names, rotation=90, fontsize=7 if n > 30 else 9)
    ax.set_ylabel("share of labelled pixels (%)")
    ax.set_title(f"class frequencies over {stats.num_images} images")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
