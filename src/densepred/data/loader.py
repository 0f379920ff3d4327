"""A DataLoader configured for this pipeline's CPU-bound workers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cv2
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["worker_init", "make_loader"]


def worker_init(worker_id: int) -> None:
    """One thread per worker: each worker is already one process per core, and nested OpenCV /
    torch thread pools only oversubscribe the CPU. (Augmentation seeds are handled by
    :class:`~densepred.data.transforms.JointTransform` itself.)"""
    cv2.setNumThreads(0)
    torch.set_num_threads(1)


def make_loader(
    dataset: Dataset,
    batch_size: int = 1,
    shuffle: bool = True,
    num_workers: int = 2,
    drop_last: bool = False,
    persistent_workers: bool = True,
    seed: int | None = None,
    *,
    batch_sampler: Sampler | None = None,
    collate_fn: Callable[[list], Any] | None = None,
) -> DataLoader:
    """A DataLoader with :func:`worker_init`; ``seed`` fixes the shuffling and the workers' seeds.

    With ``batch_sampler`` (training's resumable order) it decides the batches, and
    ``batch_size``, ``shuffle`` and ``drop_last`` do not apply. The generator is private: making a
    loader never consumes the global RNG (a resumed run's dropout masks must match an
    uninterrupted run's).
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    batching: dict[str, Any] = (
        {"batch_sampler": batch_sampler}
        if batch_sampler is not None
        else {"batch_size": batch_size, "shuffle": shuffle, "drop_last": drop_last}
    )
    return DataLoader(
        dataset,
        **batching,
        num_workers=num_workers,
        worker_init_fn=worker_init if num_workers > 0 else None,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=generator,
        collate_fn=collate_fn,
    )
