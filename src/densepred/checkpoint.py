"""Checkpoints that survive crashes and never execute code when loaded.

A checkpoint is written to a temporary file in the same folder, flushed and fsync'ed, then
renamed over the target (atomic on POSIX), and the folder is fsync'ed: a crash at any moment
leaves either the old file or the new one, never a torn one. Loading uses
``torch.load(weights_only=True)``, which refuses pickled code; everything we store is plain
tensors, numbers, strings, lists and dicts (RNG states included) so that this always works.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "save_atomic",
    "write_atomic",
    "WriteError",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "CheckpointManager",
    "export_safetensors",
]

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


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


def save_atomic(obj: dict[str, Any], path: str | Path) -> Path:
    """``torch.save(obj, path)`` that is all-or-nothing, even on a crash or a full disk."""
    try:
        return write_atomic(path, lambda f: torch.save(obj, f), what="checkpoint")
    except WriteError as exc:
        raise CheckpointError(str(exc)) from exc.__cause__


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {path}: it contains objects other than tensors and plain data "
            f"(loading it could execute code). Only load files you trust with other tools. Detail: {exc}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated: {exc}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain data (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_ITER_FILE = re.compile(r"^iter_(\d+)\.pt$")
_TEMP_FILE = re.compile(r"^\.(iter_\d+|best)\.pt\..+\.tmp$")  # what save_atomic writes before its rename


class CheckpointManager:
    """``iter_NNNNNNN.pt`` files in a run folder: keep the last K, plus ``best.pt``."""

    def __init__(self, folder: str | Path, keep_last: int = 2) -> None:
        self.folder, self.keep_last = Path(folder), keep_last

    def iteration_files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _ITER_FILE.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, state: dict[str, Any], iteration: int, *, best: bool = False) -> Path:
        state = {**state, "format_version": FORMAT_VERSION, "iteration": iteration}
        path = save_atomic(state, self.folder / f"iter_{iteration:07d}.pt")
        if best:
            save_atomic(state, self.folder / "best.pt")
        for old in self.iteration_files()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files of writes that a killed process never finished (never a checkpoint)."""
        if not self.folder.is_dir():
            return []
        stale = [p for p in self.folder.iterdir() if _TEMP_FILE.match(p.name)]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads; a damaged newer file is skipped with a warning."""
        for path in reversed(self.iteration_files()):
            try:
                return path, load_checkpoint(path)
            except CheckpointError as exc:
                print(f"warning: skipping {path}: {exc}")
        return None


def export_safetensors(checkpoint: str | Path, out: str | Path) -> Path:
    """Write a checkpoint's model weights as a .safetensors file (no pickle at all)."""
    from safetensors.torch import save

    state = load_checkpoint(checkpoint)["model"]
    tensors = {k: v.contiguous() for k, v in state.items()}
    return write_atomic(out, lambda f: f.write(save(tensors)), what="safetensors file")
