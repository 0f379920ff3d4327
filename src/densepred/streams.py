"""Several frames at once, each on a thread of its own with an equal share of the cores: how
``predict`` and ``evaluate`` go through a folder or a dataset where
:func:`~densepred.backends.stream_models` measures it faster than one frame at a time on all
the cores (a small network keeps two cores only partly busy with one frame)."""

from __future__ import annotations

import collections
import contextlib
import itertools
import queue
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from .precision import torch_threads

__all__ = ["stream_share", "streamed"]

M = TypeVar("M")
T = TypeVar("T")
R = TypeVar("R")


def stream_share(streams: int) -> int:
    """torch's threads for each of ``streams`` frames segmented at once."""
    return max(1, torch.get_num_threads() // streams)


@contextlib.contextmanager
def streamed(work: Callable[[M, T], R], models: Sequence[M], items: Iterable[T]) -> Iterator[Iterator[R]]:
    """``work(model, item)`` for every item, the results in the items' order, with as many calls
    at once as ``models``: each call holds a model that no other call is using, on a thread of its
    own with :func:`stream_share` of torch's threads, in inference mode. With one model: on the
    calling thread, one item after another. A failed call, or leaving the block early, starts no
    more calls; those in flight finish."""
    if len(models) == 1:
        yield (work(models[0], item) for item in items)
        return
    idle: queue.SimpleQueue[M] = queue.SimpleQueue()
    for model in models:
        idle.put(model)
    share = stream_share(len(models))

    def call(item: T) -> R:
        model = idle.get()
        try:
            with torch_threads(share), torch.inference_mode():
                return work(model, item)
        finally:
            idle.put(model)

    pool = ThreadPoolExecutor(len(models), thread_name_prefix="densepred-stream")

    def in_order() -> Iterator[R]:
        # As many submitted as there are models, the next once the oldest's result is taken: after
        # a failure (a full disk), or a caller that stops at a result, only the calls in flight finish.
        remaining = iter(items)
        pending = collections.deque(pool.submit(call, item) for item in itertools.islice(remaining, len(models)))
        while pending:
            yield pending.popleft().result()
            pending.extend(pool.submit(call, item) for item in itertools.islice(remaining, 1))

    try:
        yield in_order()
    finally:
        pool.shutdown(cancel_futures=True)
