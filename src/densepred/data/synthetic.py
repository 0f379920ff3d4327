"""A built-in synthetic dataset: textured shapes on a smooth background, no files needed.

Every object's colour and texture come from one shared distribution, so classes differ only
in **shape** (disk, square, triangle, ring) or in **context**: a ``dot`` is a small disk lying
inside a square, and a free disk can be just as small. Objects do not overlap (a dot lies on
its square) and contrast with the background, so every shape is whole and visible. A model
therefore has to look beyond a pixel's colour, yet a small network learns the task on a CPU in
minutes. Example ``i`` of a
split is drawn from its own generator seeded by ``(seed, split, i)``: reproducible, any order,
any worker, and train/val/test never share an image.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from .base import Sample, SegmentationDataset, Transform, check_split

__all__ = ["SyntheticShapes", "SYNTHETIC_CLASSES", "render_scene"]

SYNTHETIC_CLASSES = ("background", "disk", "square", "triangle", "ring", "dot")
BACKGROUND, DISK, SQUARE, TRIANGLE, RING, DOT = range(len(SYNTHETIC_CLASSES))
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_DEFAULT_COUNTS = {"train": 1000, "val": 200, "test": 200}


@lru_cache(maxsize=8)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return yy, xx


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bicubically."""
    coarse = rng.random((cells, cells), dtype=np.float32)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def _colour(rng: np.random.Generator, avoid: tuple[np.ndarray, ...] = ()) -> np.ndarray:
    """A random colour at least ``_MIN_CONTRAST`` away from each colour in ``avoid`` (when possible).

    Objects share one colour distribution with each other, so colour never tells a class; but an
    object the colour of the background would have no visible boundary to learn from.
    """
    colour = rng.uniform(20, 235, size=3).astype(np.float32)
    for _ in range(20):
        if all(np.linalg.norm(colour - a) >= _MIN_CONTRAST for a in avoid):
            break
        colour = rng.uniform(20, 235, size=3).astype(np.float32)
    return colour


_MIN_CONTRAST = 80.0


def _texture(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, avoid: tuple[np.ndarray, ...] = ()
) -> np.ndarray:
    """A colour field ``(H, W, 3)``: base colour plus stripes, checks or blotches (or flat)."""
    h, w = yy.shape
    colour = _colour(rng, avoid)
    kind = rng.integers(4)
    if kind == 0:  # flat
        return np.broadcast_to(colour, (h, w, 3))
    amplitude = rng.uniform(10, 30)
    if kind == 1:  # stripes of random orientation and period
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 14)
        pattern = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period))
    elif kind == 2:  # checks
        period = rng.integers(3, 9)
        pattern = ((xx // period + yy // period) % 2) * 2 - 1
    else:  # blotches
        pattern = _smooth_noise(rng, h, w, int(rng.integers(6, 14))) * 2 - 1
    tint = rng.uniform(0.5, 1.0, size=3).astype(np.float32)
    return colour + (amplitude * pattern)[..., None] * tint


def _shape_mask(kind: int, dy: np.ndarray, dx: np.ndarray, radius: float, angle: float, inner: float) -> np.ndarray:
    """Pixels inside a shape centred at the origin of ``(dy, dx)``."""
    if kind in (DISK, DOT):
        return dx * dx + dy * dy <= radius * radius
    if kind == RING:
        d2 = dx * dx + dy * dy
        return (d2 <= radius * radius) & (d2 >= (inner * radius) ** 2)
    c, s = np.cos(angle), np.sin(angle)
    u, v = dx * c + dy * s, -dx * s + dy * c
    if kind == SQUARE:
        half = radius * 0.8  # about the area of a disk of the same radius
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # Equilateral triangle of circumradius ``radius``: inside all three edges at inradius r/2.
    inside = np.ones(dx.shape, dtype=bool)
    for k in range(3):  # three half-planes, not pixels
        a = 2 * np.pi * k / 3
        inside &= u * np.cos(a) + v * np.sin(a) <= radius / 2
    return inside


def render_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 ``(H, W, 3)``) and its mask (uint8 ``(H, W)``, ids of :data:`SYNTHETIC_CLASSES`)."""
    yy, xx = _grid(height, width)
    side = min(height, width)
    # Background: two colours blended by smooth noise; a quarter of the time textured as well.
    blend = _smooth_noise(rng, height, width, int(rng.integers(3, 7)))[..., None]
    first, second = _colour(rng), _colour(rng)
    base = _texture(rng, yy, xx) if rng.random() < 1 / 4 else np.broadcast_to(first, (height, width, 3))
    canvas = base * blend + second * (1 - blend)
    background = (first, second)
    mask = np.zeros((height, width), dtype=np.uint8)

    def paint(kind: int, cy: float, cx: float, radius: float, label: int, avoid: tuple[np.ndarray, ...]) -> bool:
        inside = _shape_mask(kind, yy - cy, xx - cx, radius, rng.uniform(0, 2 * np.pi), rng.uniform(0.45, 0.7))
        if label != DOT and (mask[inside] != BACKGROUND).any():
            return False  # objects do not overlap (only a dot lies on its square): shapes stay whole
        np.copyto(canvas, _texture(rng, yy, xx, avoid), where=inside[..., None])
        mask[inside] = label
        return True

    # Squares are painted last so that a small disk on a square is always a dot, never a free disk.
    kinds = rng.choice([DISK, TRIANGLE, RING, SQUARE], size=int(rng.integers(2, 7)))
    for kind in sorted(kinds, key=lambda k: k == SQUARE):
        for _attempt in range(10):  # a few tries to find a free spot, then skip the object
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            if kind == DISK:  # as small as a dot at times, so size alone cannot tell them apart
                placed = paint(DISK, cy, cx, rng.uniform(0.04, 0.2) * side, DISK, background)
            elif kind != SQUARE:
                placed = paint(kind, cy, cx, rng.uniform(0.08, 0.25) * side, kind, background)
            else:
                radius = rng.uniform(0.1, 0.25) * side
                placed = paint(SQUARE, cy, cx, radius, SQUARE, background)
            if placed:
                break
        if kind == SQUARE and placed:
            if rng.random() < 0.6:
                dot = rng.uniform(0.04, 0.07) * side
                room = max(0.8 * radius / np.sqrt(2) - dot, 0.0)  # keeps the dot inside the rotated square
                square_colour = canvas[int(np.clip(cy, 0, height - 1)), int(np.clip(cx, 0, width - 1))].copy()
                paint(DOT, cy + rng.uniform(-room, room), cx + rng.uniform(-room, room), dot, DOT, (square_colour,))
    canvas += rng.normal(0.0, rng.uniform(3, 12), size=canvas.shape).astype(np.float32)
    return np.clip(canvas, 0, 255).astype(np.uint8), mask


class SyntheticShapes(SegmentationDataset):
    """``num_images`` scenes of ``size`` pixels (int or ``(height, width)``), deterministic from ``seed``."""

    SPLITS = tuple(_SPLIT_CODES)
    class_names = SYNTHETIC_CLASSES
    palette = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48)]

    def __init__(
        self,
        split: str = "train",
        num_images: int | None = None,
        size: int | tuple[int, int] = 128,
        seed: int = 0,
        transform: Transform | None = None,
    ) -> None:
        super().__init__(transform)
        check_split("synthetic", split, self.SPLITS)
        self.split, self.seed = split, seed
        self.num_images = _DEFAULT_COUNTS[split] if num_images is None else num_images
        self.height, self.width = (size, size) if isinstance(size, int) else size
        if self.num_images < 1 or min(self.height, self.width) < 16:
            raise ValueError(f"synthetic: need num_images >= 1 and size >= 16, got {self.num_images} and {size}")

    def __len__(self) -> int:
        return self.num_images

    def load(self, index: int) -> Sample:
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index])
        image, mask = render_scene(rng, self.height, self.width)
        return Sample(image, mask, f"synthetic-{self.split}-{index:06d}")
