"""Safe extraction of tar and zip archives: no absolute paths, no ``..``, no links, no bombs."""

from __future__ import annotations

import lzma
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .errors import DownloadError

__all__ = ["safe_extract", "MAX_MEMBER_BYTES", "MAX_EXPANSION", "MIN_BUDGET_BYTES"]

_CHUNK = 1 << 20
# zipfile raises NotImplementedError for an unknown compression method, RuntimeError for encryption.
_READ_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    lzma.LZMAError,
    struct.error,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,
    RuntimeError,
)
# Limits against archive bombs. Image datasets barely compress (JPEG/PNG inside), so an archive
# that expands 100x, or a single 4 GiB file, is not a dataset; the 1 GiB floor lets small archives
# of text or label files through.
MAX_MEMBER_BYTES = 1 << 32
MAX_EXPANSION = 100
MIN_BUDGET_BYTES = 1 << 30


def _member_path(name: str, prefix: str) -> PurePosixPath | None:
    """Safe relative path of an archive member under ``prefix`` (None: outside it); unsafe names raise."""
    clean = name.replace("\\", "/")
    parts = [p for p in clean.split("/") if p not in ("", ".")]
    if clean.startswith("/") or re.match(r"[A-Za-z]:", clean) or ".." in parts:
        raise DownloadError(f"archive member {name!r} points outside the extraction folder; refusing the archive")
    pre = [p for p in prefix.split("/") if p]
    if parts[: len(pre)] != pre:
        return None
    return PurePosixPath(*parts[len(pre) :])


class _Budget:
    """Bytes that may still be written: per member and in total, checked on declared and on real sizes."""

    def __init__(self, archive: Path, per_member: int, total: int) -> None:
        self.archive, self.per_member, self.left = archive, per_member, total

    def _refuse(self, name: str, size: int, why: str) -> DownloadError:
        return DownloadError(
            f"{self.archive}: member {name!r} ({size} bytes) {why} (archive-bomb guard); refusing the archive. "
            "If the archive is trusted, raise safe_extract's max_member_bytes / max_total_bytes"
        )

    def check(self, name: str, size: int) -> None:
        if size > self.per_member:
            raise self._refuse(name, size, f"is larger than the per-file limit of {self.per_member} bytes")
        if size > self.left:
            raise self._refuse(name, size, f"would exceed the extraction budget ({self.left} bytes left)")

    def copy(self, name: str, data: BinaryIO, target: Path) -> None:
        written = 0
        try:
            out = open(target, "wb")
        except OSError as e:
            raise DownloadError(f"cannot write {target} (archive member {name!r}): {e.strerror or e}") from None
        with out:
            while chunk := data.read(_CHUNK):  # read errors (a corrupt stream) are handled by the caller
                written += len(chunk)
                self.check(name, written)  # the declared size is not trusted either
                try:
                    out.write(chunk)
                except OSError as e:
                    raise DownloadError(f"cannot write {target}: {e.strerror or e}") from None
        self.left -= written


def _write_member(dest: Path, rel: PurePosixPath, data: BinaryIO, budget: _Budget, name: str) -> None:
    target = dest.joinpath(*rel.parts)
    if not target.resolve().is_relative_to(dest.resolve()):  # defence in depth: no links exist here
        raise DownloadError(f"archive member {rel} resolves outside {dest}; refusing the archive")
    target.parent.mkdir(parents=True, exist_ok=True)
    budget.copy(name, data, target)


def safe_extract(
    path: str | Path,
    dest: str | Path,
    prefix: str = "",
    *,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_total_bytes: int | None = None,
) -> int:
    """Extract the regular files and folders of a tar (any compression) or zip ``path`` into ``dest``.

    Absolute paths, ``..`` components, links and device files are refused (the caller discards
    ``dest``), and so are archive bombs: a member over ``max_member_bytes``, or more than
    ``max_total_bytes`` in all (default: ``MAX_EXPANSION`` x the archive's size, at least
    ``MIN_BUDGET_BYTES``), whether the sizes are declared in the headers or found while writing.
    A corrupt archive is a :class:`DownloadError`. Only members under ``prefix`` are written,
    with ``prefix`` removed. Returns the number of files written.
    """
    path, dest = Path(path), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if max_total_bytes is None:
        max_total_bytes = max(MAX_EXPANSION * path.stat().st_size, MIN_BUDGET_BYTES)
    budget = _Budget(path, max_member_bytes, max_total_bytes)
    try:
        if zipfile.is_zipfile(path):
            return _extract_zip(path, dest, prefix, budget)
        return _extract_tar(path, dest, prefix, budget)
    except DownloadError:
        raise
    except _READ_ERRORS as e:  # what the tar / zip / compression modules raise on damaged input
        raise DownloadError(
            f"{path}: corrupt or unreadable archive ({type(e).__name__}: {e}); delete it and download it again"
        ) from None


def _extract_zip(path: Path, dest: Path, prefix: str, budget: _Budget) -> int:
    written = 0
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            rel = _member_path(info.filename, prefix)
            if rel is None or not rel.parts:
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DownloadError(f"{path}: member {info.filename!r} is a symbolic link; refusing the archive")
            if info.is_dir():
                dest.joinpath(*rel.parts).mkdir(parents=True, exist_ok=True)
                continue
            budget.check(info.filename, info.file_size)
            with zf.open(info) as data:
                _write_member(dest, rel, data, budget, info.filename)
            written += 1
    return written


def _extract_tar(path: Path, dest: Path, prefix: str, budget: _Budget) -> int:
    try:
        tar = tarfile.open(path, "r:*")
    except tarfile.TarError as e:
        raise DownloadError(f"{path}: neither a zip nor a readable tar archive ({e})") from None
    written = 0
    with tar:
        for member in tar:  # one sequential pass: fast even for compressed tars
            rel = _member_path(member.name, prefix)
            if rel is None or not rel.parts:
                continue
            if member.isdir():
                dest.joinpath(*rel.parts).mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                budget.check(member.name, member.size)
                data = tar.extractfile(member)
                assert data is not None  # regular files always have data
                _write_member(dest, rel, data, budget, member.name)
                written += 1
            else:
                kind = "link" if member.issym() or member.islnk() else "special file"
                raise DownloadError(f"{path}: member {member.name!r} is a {kind}; refusing the archive")
    return written
