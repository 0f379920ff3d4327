"""Resumable, distributed, deterministic batch order for training.

Training consumes an endless stream of global batches. Global batch ``b`` of epoch
``e = b // batches_per_epoch`` is a slice of a permutation seeded by ``(seed, e)``; under
``torchrun`` each rank takes its share of that slice. Each sample carries its own augmentation
seed, derived from ``(seed, b, position)``, so augmentations depend neither on the number of
DataLoader workers nor on where a run was interrupted: a resumed run sees exactly the batches
an uninterrupted one would, and one process with batch 8 sees what two with batch 4 see.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Dataset, Sampler

__all__ = ["ResumableBatchSampler", "SeededSamples"]


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's ``[(index, sample_seed), ...]`` for global batches ``start, start+1, ...``."""

    def __init__(
        self, num_samples: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0
    ) -> None:
        if num_samples < batch_size * world_size:
            raise ValueError(
                f"the training set has {num_samples} images, fewer than one global batch "
                f"({batch_size} x {world_size} processes); lower data.batch_size"
            )
        self.n, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = num_samples // self.global_batch  # drop the ragged tail, as DDP needs

    def global_batch_indices(self, b: int) -> np.ndarray:
        epoch, pos = divmod(b, self.batches_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return perm[pos * self.global_batch : (pos + 1) * self.global_batch]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.start
        while True:
            indices = self.global_batch_indices(b)
            lo = self.rank * self.batch_size
            yield [
                (int(indices[lo + k]), int(np.random.default_rng([self.seed, b, lo + k, 1]).integers(2**62)))
                for k in range(self.batch_size)
            ]
            b += 1

    def __len__(self) -> int:  # endless; DataLoader only needs a length for progress reports
        return 2**62


class SeededSamples(Dataset):
    """``dataset[(index, seed)]``: the sample with its augmentation reseeded by ``seed``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        transform = getattr(self.dataset, "transform", None)
        if transform is not None and hasattr(transform, "reseed"):
            transform.reseed(seed)
        return self.dataset[index]
