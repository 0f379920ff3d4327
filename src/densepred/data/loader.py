"""A DataLoader configured for this pipeline's CPU-bound workers."""

from __future__ import annotations

import cv2
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["worker_init", "make_loader"]


def worker_init(worker_id: int) -> None:
    """One thread per worker: each worker is already one process per core, and nested OpenCV /
    torch thread pools only oversubscribe the CPU. (Augmentation seeds are handled by
    :class:`~densepred.data.transforms.JointTransform` itself.)"""
    cv2.setNumThreads(0)
    torch.set_num_threads(1)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    num_workers: int = 2,
    drop_last: bool = False,
    persistent_workers: bool = True,
    seed: int | None = None,
) -> DataLoader:
    """A DataLoader with :func:`worker_init`; ``seed`` fixes the shuffling and the workers' seeds."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        worker_init_fn=worker_init if num_workers > 0 else None,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=generator,
    )
