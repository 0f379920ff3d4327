"""Several frames at once: results in input order, each call with a model of its own on its
share of the threads, nothing more started after an early stop, and the same metrics as one at a
time; requests at once (``serve``'s lanes) each on a stream, a request alone on all the threads."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import densepred
from densepred.config import EvalConfig
from densepred.evaluation import evaluate
from densepred.precision import torch_threads
from densepred.streams import Lanes, stream_share, streamed


@pytest.fixture(autouse=True)
def _two_threads():
    with torch_threads(2):
        yield


def test_results_come_in_input_order_each_call_holding_a_model_no_other_call_uses():
    busy, lock, seen = set(), threading.Lock(), []

    def work(model: str, item: int) -> tuple[int, str]:
        with lock:
            assert model not in busy
            busy.add(model)
            seen.append((threading.get_ident(), torch.get_num_threads(), torch.is_inference_mode_enabled()))
        time.sleep(0.02 if item % 2 == 0 else 0.001)  # the even items finish after the odd ones started later
        with lock:
            busy.remove(model)
        return item, model

    with streamed(work, ["a", "b"], range(8)) as results:
        out = list(results)
    assert [item for item, _ in out] == list(range(8)) and {model for _, model in out} == {"a", "b"}
    assert {threads for _, threads, _ in seen} == {stream_share(2)} == {1}
    assert all(inference for _, _, inference in seen) and threading.get_ident() not in {t for t, _, _ in seen}


def test_one_model_works_on_the_calling_thread_one_item_after_another():
    calls = []
    with streamed(lambda model, item: calls.append((threading.get_ident(), item)) or item, ["m"], range(3)) as results:
        assert calls == []  # lazily: nothing runs before it is asked for
        assert list(results) == [0, 1, 2]
    assert calls == [(threading.get_ident(), k) for k in range(3)]


def test_a_failed_call_starts_no_more_than_those_in_flight():
    started = []

    def work(model: str, item: int) -> int:
        started.append(item)
        if item == 0:
            raise OSError("No space left on device")
        time.sleep(0.01)
        return item

    with pytest.raises(OSError, match="No space"), streamed(work, ["a", "b"], range(20)) as results:
        list(results)
    assert set(started) <= {0, 1}  # the one in flight beside it, if it had begun


def test_leaving_early_starts_no_more_calls():
    started = []

    def work(model: str, item: int) -> int:
        started.append(item)
        time.sleep(0.01)
        return item

    with pytest.raises(RuntimeError, match="stop"), streamed(work, ["a", "b"], range(50)) as results:
        for item in results:
            if item == 1:
                raise RuntimeError("stop")
    assert len(started) <= 3  # items 0 and 1, then the one refill taken before the stop


def test_evaluate_scores_the_same_with_several_images_at_once():
    model = densepred.create_model("unet_padded", num_classes=3, in_channels=3, base_channels=4, depth=2).eval()
    g = torch.Generator().manual_seed(0)
    samples = [
        {"image": torch.randn(3, 32, 40, generator=g), "mask": torch.randint(0, 3, (32, 40), generator=g)}
        for _ in range(5)
    ]
    dataset = type("Five", (list,), {"num_classes": 3, "ignore_index": 255})(samples)
    threads = set()

    class Recorded(torch.nn.Module):  # the model, noting the thread of each forward
        def __init__(self) -> None:
            super().__init__()
            self.model, self.num_classes, self.in_channels = model, 3, 3
            self.output_stride = model.output_stride

        def forward(self, x):
            threads.add(threading.get_ident())
            return model(x)

    one = evaluate(Recorded(), dataset, EvalConfig(streams=1), progress=False)
    assert threads == {threading.get_ident()}
    threads.clear()
    two = evaluate(Recorded(), dataset, EvalConfig(streams=2), progress=False)
    assert len(threads - {threading.get_ident()}) == 2  # the caller ran only the streams' parity check
    assert one == two


def _take_in_thread(lanes: Lanes, started: threading.Event, release: threading.Event, seen: list) -> threading.Thread:
    def hold() -> None:
        with lanes.take() as model:
            seen.append((model, torch.get_num_threads()))
            started.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    started.wait(10)
    return thread


def test_a_request_alone_runs_on_the_own_model_with_every_thread_one_beside_it_on_a_stream():
    lanes = Lanes("own", ["s1", "s2"])
    seen: list = []
    release = threading.Event()
    first = _take_in_thread(lanes, threading.Event(), release, seen)
    second = _take_in_thread(lanes, threading.Event(), release, seen)
    with lanes.take() as third:  # two running: the other stream, not one in use
        assert third in {"s1", "s2"} and third != seen[1][0] and torch.get_num_threads() == 1
    release.set()
    first.join(10), second.join(10)
    assert seen[0] == ("own", 2) and seen[1][0] in {"s1", "s2"} and seen[1][1] == 1
    assert torch.get_num_threads() == 2  # a stream's share is undone on leaving
    with lanes.take() as alone:  # alone again: the own model
        assert alone == "own" and torch.get_num_threads() == 2


def test_with_more_requests_than_streams_a_request_waits_for_a_free_one():
    lanes = Lanes("own", ["s1"])
    seen: list = []
    release = threading.Event()
    holders = [_take_in_thread(lanes, threading.Event(), release, seen) for _ in range(2)]
    got: list = []

    def third() -> None:
        with lanes.take() as model:
            got.append(model)

    waiting = threading.Thread(target=third)
    waiting.start()
    waiting.join(0.2)
    assert got == [], "the one stream is busy: the third request must wait"
    release.set()
    waiting.join(10)
    [h.join(10) for h in holders]
    assert [m for m, _ in seen] == ["own", "s1"] and got == ["s1"]  # it came beside others: a stream


def test_without_streams_every_request_runs_on_the_own_model_at_once():
    for streams in ([], ["own"]):
        lanes = Lanes("own", streams)
        seen: list = []
        release = threading.Event()
        holders = [_take_in_thread(lanes, threading.Event(), release, seen) for _ in range(2)]
        release.set()
        [h.join(10) for h in holders]
        assert seen == [("own", 2), ("own", 2)] and lanes.streams == []
        assert "share one model" in lanes.describe()
    own = [1]
    assert len(Lanes(own, [[1], [1]]).streams) == 2  # equal to the own model is not the own model
