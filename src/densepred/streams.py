"""Several frames at once, each on a thread of its own with an equal share of the cores: how
``predict`` and ``evaluate`` go through a folder or a dataset where
:func:`~densepred.backends.stream_models` measures it faster than one frame at a time on all
the cores (a small network keeps two cores only partly busy with one frame), and how ``serve``
runs requests that come at once (:class:`Lanes`)."""

from __future__ import annotations

import collections
import contextlib
import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

import torch

from .precision import torch_threads

__all__ = ["Lanes", "stream_share", "streamed"]

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


class Lanes(Generic[M]):
    """Which model a request runs on where requests come one by one or several at once (``serve``).

    Alone, ``own``, on all of torch's threads: the lowest latency for one image. Beside others,
    one of ``streams`` (:meth:`~densepred.prediction.Predictor.in_streams`), on its
    :func:`stream_share` of the threads: two runs on all the threads each fight for the same
    cores, and a runtime's session made for all of them starves a one-thread one beside it.
    A run keeps its lane to the end; with fewer streams than runs at once, a run waits for one.
    With no streams besides ``own``, every run takes ``own``, several at once as before.
    """

    def __init__(self, own: M, streams: Sequence[M] = ()) -> None:
        self.own = own
        streams = list(streams)
        # By identity: a stream predictor equals its own one (the same fields, another module).
        self.streams = [] if all(s is own for s in streams) else streams
        self._idle: queue.SimpleQueue[M] = queue.SimpleQueue()
        for model in self.streams:
            self._idle.put(model)
        self._share = stream_share(len(self.streams)) if self.streams else 0
        self._running = 0
        self._lock = threading.Lock()

    def describe(self) -> str:
        if not self.streams:
            return "requests at once share one model"
        share = self._share
        return (
            f"a request alone on all {torch.get_num_threads()} threads, requests at once on "
            f"{len(self.streams)} streams of {share} thread{'s' * (share > 1)}"
        )

    @contextlib.contextmanager
    def take(self) -> Iterator[M]:
        """A model to run one request on, in the threads' setting it is made for."""
        with self._lock:
            alone = self._running == 0 or not self.streams
            self._running += 1
        try:
            if alone:
                yield self.own
                return
            model = self._idle.get()
            try:
                with torch_threads(self._share):
                    yield model
            finally:
                self._idle.put(model)
        finally:
            with self._lock:
                self._running -= 1
