import gc
import os

import pytest
import torch

from densepred.admission import return_free_memory
from http_server import LoopbackServer

# The suite pins eager inference: choosing a backend by timing costs seconds per new model, and
# tests/test_backends.py checks the choice itself (it sets the variable back per test).
os.environ["DENSEPRED_BACKEND"] = "eager"


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 1 << 62  # unknown: collect every time


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
    # Full-size models (540 MB each for VGG16 FCNs) come and go test after test; give their
    # memory back to the OS so the suite's resident size stays that of one test, not the sum.
    # Only above 1 GiB: a full collection costs tens of ms, paid by 800 small tests otherwise.
    if _resident_bytes() > 1 << 30:
        gc.collect()
        return_free_memory()


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
