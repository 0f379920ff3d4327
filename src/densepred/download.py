"""The one HTTP transfer behind every download: resumable, streamed, with a progress bar.

:mod:`densepred.weights` (the weight cache) and :mod:`densepred.data.download` (dataset
archives) both fetch through :func:`download_to_part` and check the result with
:func:`sha256_file`. This module only moves bytes into a ``.part`` file; the callers own the
policy: where files go, which digest is expected, whether to retry, and what to tell the user.

A ``.part`` file is always a prefix of the remote file or gone: a transfer that stops early
keeps what arrived, and the next call asks only for the rest (HTTP Range, RFC 9110 Sec. 14).
"""

from __future__ import annotations

import hashlib
import os
from http.client import HTTPException
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from tqdm.auto import tqdm

__all__ = ["TransferError", "TransferInterrupted", "TransferFailed", "sha256_file", "hash_file", "download_to_part"]

_CHUNK = 1 << 20


class TransferError(RuntimeError):
    """A download of ``url`` that did not complete; ``reason`` says why, without the URL."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(url, reason)
        self.url, self.reason = url, reason

    def __str__(self) -> str:
        return f"{self.url}: {self.reason}"


class TransferInterrupted(TransferError):
    """No connection, or it closed early. The ``.part`` file keeps what arrived; call again to resume."""


class TransferFailed(TransferError):
    """The server refused the request (``status`` is the HTTP code, e.g. 404); retrying will not help."""

    def __init__(self, url: str, reason: str, status: int) -> None:
        super().__init__(url, reason)
        self.args = (url, reason, status)  # so that a copy (pickle, multiprocessing) rebuilds it
        self.status = status


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    return hash_file(path, "sha256")


def hash_file(path: str | os.PathLike, algorithm: str) -> str:
    """The hex digest of a file by ``algorithm`` (``sha256``, ``sha1``, ``md5``), read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_to_part(
    url: str, part: Path, *, progress: bool, timeout: float = 60.0, expected_size: int | None = None
) -> None:
    """Fetch the rest of ``url`` into ``part``, resuming from the bytes already there.

    A non-empty ``part`` is continued with ``Range: bytes=<size>-``. A server that ignores the
    Range (200) sends the whole file, which then replaces ``part``; one that answers another range
    than asked has ``part`` deleted and the file fetched again from byte 0. HTTP 416 (nothing
    after that offset) leaves ``part`` as it is: it is taken to be whole, and the caller's checksum
    decides. ``expected_size``, when known, skips the request for a part that already has it,
    restarts one that is longer, and detects a short body when the server sends no length.

    Raises:
        TransferInterrupted: no connection, or the body stopped short; ``part`` keeps the bytes
            that arrived, so the next call resumes.
        TransferFailed: an HTTP error other than the 416 above (404, 403, 500, ...).
    """
    offset = part.stat().st_size if part.exists() else 0
    if part.exists() and expected_size is not None and offset >= expected_size:
        if offset == expected_size:
            return
        part.unlink()  # longer than the file: not a piece of it
        offset = 0
    headers = {"User-Agent": "densepred"} | ({"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            return
        raise TransferFailed(url, f"HTTP {e.code} {e.reason}", e.code) from None
    except (URLError, OSError, HTTPException) as e:
        raise TransferInterrupted(url, f"cannot connect: {getattr(e, 'reason', e)}") from None
    with response:
        partial = bool(offset) and response.status == 206  # status is None for file:// URLs
        if not partial or response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            _stream(response, url, part, offset if partial else 0, progress, expected_size)
            return
    # The server sent another range than asked: it does not continue the part, so start again.
    part.unlink()
    download_to_part(url, part, progress=progress, timeout=timeout, expected_size=expected_size)


def _stream(response, url: str, part: Path, offset: int, progress: bool, expected_size: int | None) -> None:
    """Write ``response``'s body to ``part`` from byte ``offset`` (0: a fresh file)."""
    length = response.headers.get("Content-Length")
    end = offset + int(length) if length is not None else expected_size
    error = None
    with (
        open(part, "ab" if offset else "wb") as out,
        tqdm(
            total=end,
            initial=offset,
            unit="B",
            unit_scale=True,
            desc=part.name.removesuffix(".part"),
            disable=not progress,
        ) as bar,
    ):
        try:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                bar.update(len(chunk))
        except (OSError, HTTPException) as e:  # a reset or a short body (IncompleteRead)
            error = f"{type(e).__name__}: {e}"
    size = part.stat().st_size
    if error is not None or (end is not None and size < end):
        of = f" of {end}" if end is not None else ""
        raise TransferInterrupted(url, f"stopped after {size}{of} bytes ({error or 'connection closed'})")
