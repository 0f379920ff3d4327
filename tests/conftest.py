import ctypes
import ctypes.util
import gc

import pytest
import torch

from http_server import LoopbackServer

try:  # glibc only: returns freed heap pages to the OS
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):
    _LIBC = None


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
    # Full-size models (540 MB each for VGG16 FCNs) come and go test after test; give their
    # memory back to the OS so the suite's resident size stays that of one test, not the sum.
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@pytest.fixture
def http_server():
    """A :class:`http_server.LoopbackServer` on 127.0.0.1, stopped after the test."""
    with LoopbackServer() as server:
        yield server


def pytest_collection_modifyitems(config, items):
    """Run the registry-wide contracts model by model, so they can share one model at a time."""
    slots = [i for i, item in enumerate(items) if item.module.__name__ == "test_models_contract"]
    contract = [items[i] for i in slots]

    def model_first(item):
        spec = getattr(item, "callspec", None)
        return (str(spec.params.get("name", "")) if spec else "", contract.index(item))

    for slot, item in zip(slots, sorted(contract, key=model_first), strict=True):
        items[slot] = item
