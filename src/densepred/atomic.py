"""Whole files written atomically: a crash or a full disk leaves the old file or the new one.

The file is written to a temporary file in the same folder, flushed and fsync'ed, then renamed
over the target (atomic on POSIX), and the folder is fsync'ed. Every file densepred writes
whole (checkpoints, exports, a run's config and results) goes through :func:`write_atomic`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["write_atomic", "WriteError"]


def _default_mode() -> int:
    """What ``open()`` would give a new file: 0o666 less the umask (mkstemp's 0o600 would make
    checkpoints unreadable to the group that can read the rest of the run folder)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_MODE = _default_mode()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteError(OSError):
    """A file that could not be written (full disk, no permission); any previous version is intact."""

    def __str__(self) -> str:
        return str(self.strerror)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None], *, what: str = "file") -> Path:
    """Run ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    All-or-nothing, even on a crash or a full disk. Writers that accept a file object are given
    one on purpose: some C++ writers (``torch.jit.save`` with a path) abort the process on a
    failed write instead of raising.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise WriteError(exc.errno, f"cannot write {what} {path}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, _MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise WriteError(
                exc.errno, f"writing {what} {path} failed ({exc.strerror or exc}); any previous {what} is intact"
            ) from exc
        raise
    return path
