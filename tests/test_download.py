"""The shared transfer (:mod:`densepred.download`) against the loopback ``http_server`` fixture."""

from __future__ import annotations

import hashlib
import os
import pickle

import pytest

from densepred.download import TransferError, TransferFailed, TransferInterrupted, download_to_part, sha256_file

DATA = os.urandom(300_000)


@pytest.fixture
def served(http_server):
    http_server.files["/f.bin"] = DATA
    return http_server


def test_a_part_file_is_resumed_with_a_range_request(served, tmp_path):
    part = tmp_path / "f.bin.part"
    part.write_bytes(DATA[:100_000])
    download_to_part(served.url("/f.bin"), part, progress=False)
    assert part.read_bytes() == DATA
    assert served.requests == [("/f.bin", "bytes=100000-")] and served.sent == 200_000


def test_a_server_ignoring_range_restarts_the_file(served, tmp_path):
    served.ignore_range.add("/f.bin")
    part = tmp_path / "f.bin.part"
    part.write_bytes(b"stale bytes")
    download_to_part(served.url("/f.bin"), part, progress=True)
    assert part.read_bytes() == DATA and served.sent == len(DATA)


def test_a_wrong_content_range_restarts_without_range(served, tmp_path):
    served.wrong_range.add("/f.bin")
    part = tmp_path / "f.bin.part"
    part.write_bytes(DATA[:1000])
    download_to_part(served.url("/f.bin"), part, progress=False)
    assert part.read_bytes() == DATA
    assert served.requests == [("/f.bin", "bytes=1000-"), ("/f.bin", None)]


def test_416_leaves_a_whole_part_to_the_checksum(served, tmp_path):
    part = tmp_path / "f.bin.part"
    part.write_bytes(DATA)
    download_to_part(served.url("/f.bin"), part, progress=False)
    assert part.read_bytes() == DATA and served.requests == [("/f.bin", f"bytes={len(DATA)}-")]


def test_expected_size_skips_a_whole_part_and_restarts_a_longer_one(served, tmp_path):
    part = tmp_path / "f.bin.part"
    part.write_bytes(DATA)
    download_to_part(served.url("/f.bin"), part, progress=False, expected_size=len(DATA))
    assert served.requests == []
    part.write_bytes(DATA + b"junk")
    download_to_part(served.url("/f.bin"), part, progress=False, expected_size=len(DATA))
    assert part.read_bytes() == DATA and served.requests == [("/f.bin", None)]


def test_an_interrupted_transfer_keeps_the_part_and_the_next_call_resumes(served, tmp_path):
    served.interrupt("/f.bin", after=120_000)
    part = tmp_path / "f.bin.part"
    with pytest.raises(TransferInterrupted, match=r"f\.bin: stopped after 120000 of 300000 bytes") as err:
        download_to_part(served.url("/f.bin"), part, progress=False)
    assert isinstance(err.value, TransferError) and err.value.url == served.url("/f.bin")
    assert part.read_bytes() == DATA[:120_000]
    download_to_part(served.url("/f.bin"), part, progress=False)
    assert part.read_bytes() == DATA
    assert served.requests == [("/f.bin", None), ("/f.bin", "bytes=120000-")]


def test_a_refused_connection_is_an_interruption(http_server, tmp_path):
    http_server.stop()  # the port is closed now
    with pytest.raises(TransferInterrupted, match="cannot connect"):
        download_to_part(http_server.url("/f.bin"), tmp_path / "f.bin.part", progress=False, timeout=5)


def test_an_http_error_fails_and_writes_nothing(served, tmp_path):
    part = tmp_path / "nope.bin.part"
    with pytest.raises(TransferFailed, match=r"/nope\.bin: HTTP 404") as err:
        download_to_part(served.url("/nope.bin"), part, progress=False)
    assert err.value.status == 404 and err.value.reason.startswith("HTTP 404") and not part.exists()
    copy = pickle.loads(pickle.dumps(err.value))  # e.g. raised in a worker process
    assert str(copy) == str(err.value) and copy.status == 404


def test_sha256_file_is_the_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(DATA * 4)  # more than one 1 MiB chunk
    assert sha256_file(path) == hashlib.sha256(DATA * 4).hexdigest()
