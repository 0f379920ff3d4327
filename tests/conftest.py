import pytest
import torch

from http_server import LoopbackServer


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def http_server():
    """A :class:`http_server.LoopbackServer` on 127.0.0.1, stopped after the test."""
    with LoopbackServer() as server:
        yield server
