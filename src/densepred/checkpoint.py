"""Checkpoints that survive crashes and never execute code when loaded.

This module owns the checkpoint format: what a training checkpoint holds (:func:`training_state`),
reading it back for a resume or for use (:func:`load_trained`). Files are written whole by
:func:`densepred.atomic.write_atomic`: a crash at any moment leaves either the old file or the
new one, never a torn one. Loading uses
``torch.load(weights_only=True)``, which refuses pickled code; everything we store is plain
tensors, numbers, strings, lists and dicts (RNG states included) so that this always works.
"""

from __future__ import annotations

import pickle
import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import WriteError, write_atomic
from .build import build_model
from .config import Experiment, experiment_from_dict
from .data.normalization import Normalization

__all__ = [
    "CheckpointError",
    "save_atomic",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "CheckpointManager",
    "export_safetensors",
    "git_commit",
    "Trained",
    "load_trained",
    "load_training_checkpoint",
    "training_state",
    "restore_training_state",
    "ResumePoint",
]

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


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
    from safetensors import SafetensorError

    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _names_python_objects(path):  # an unknown opcode, a bad key: damage, not a payload
            raise CheckpointError(
                f"checkpoint {path} is corrupt: it is not a valid PyTorch file ({_first_line(exc)})"
            ) from None
        raise CheckpointError(
            f"refused to load {path}: it is unsafe, it names Python objects other than tensors and plain data "
            f"(loading it could execute code). Only load files you trust with other tools. Detail: {_first_line(exc)}"
        ) from None
    except SafetensorError as exc:
        raise CheckpointError(f"checkpoint {path} is a corrupt safetensors file: {exc}") from None
    except Exception as exc:  # noqa: BLE001 (damaged bytes make torch.load fail in many ways: IndexError, KeyError...)
        raise CheckpointError(f"checkpoint {path} is corrupt (unreadable or truncated): {_first_line(exc)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}


def _names_python_objects(path: Path) -> bool:
    """Whether a file the weights-only loader refused is a well-formed pickle that names Python
    callables (unsafe), as opposed to bytes that are no pickle at all (corrupt). Only parsed,
    never run (``pickletools.genops``)."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return False
                data = archive.read(name)
        else:
            data = path.read_bytes()
        ops = list(pickletools.genops(data))
        # A pickle ends at its STOP; bytes after it (random data that happens to parse) are no pickle.
        if not ops or ops[-1][0].name != "STOP" or ops[-1][2] != len(data) - 1:
            return False
        return any(op.name in _CODE_OPCODES for op, _, _ in ops)
    except Exception:  # noqa: BLE001 (any parse failure means: not a well-formed pickle)
        return False


def _first_line(exc: BaseException) -> str:
    """PyTorch's weights-only errors are paragraphs of advice; their first line says what happened."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = next((line for line in lines if "error:" in line.lower() or "unsupported" in line.lower()), None)
    return (detail or (lines[0] if lines else type(exc).__name__))[:300]


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
        """The newest checkpoint that loads (None in a folder without any); a damaged newer file
        is skipped with a warning. If there are checkpoints and none loads, resuming would
        silently start over: a :class:`CheckpointError` lists each file and why instead."""
        failures = []
        for path in reversed(self.iteration_files()):
            try:
                return path, load_checkpoint(path)
            except CheckpointError as exc:
                print(f"warning: skipping {path}: {exc}")
                failures.append(f"{path.name}: {exc}")
        if failures:
            raise CheckpointError(
                f"cannot resume: no checkpoint in {self.folder} loads ({'; '.join(failures)}). Nothing was "
                "changed; restore a good checkpoint there, or train into a new run folder"
            )
        return None


def export_safetensors(checkpoint: str | Path, out: str | Path) -> Path:
    """Write a checkpoint's model weights as a .safetensors file (no pickle at all)."""
    from safetensors.torch import save

    state = load_checkpoint(checkpoint).get("model")
    if not isinstance(state, dict):
        raise CheckpointError(f"{checkpoint} is not a densepred training checkpoint (no 'model' entry)")
    tensors = {k: v.contiguous() for k, v in state.items()}
    return write_atomic(out, lambda f: f.write(save(tensors)), what="safetensors file")


def git_commit(path: str | Path | None = None) -> str:
    """The source tree's commit (with ``-dirty`` if modified), or ``unknown`` outside git."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Trained:
    """A model restored from a training checkpoint, with what it needs to be used."""

    model: nn.Module
    experiment: Experiment
    num_classes: int
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    in_channels: int
    ignore_index: int
    normalization: str | Normalization  # a recipe's name, or a released net's own (densepred.catalogue)
    iteration: int


def _misfit(expected: dict, found: dict) -> str:
    """Missing, unexpected and mis-shaped keys of a state dict, a few of each."""

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    shapes = [
        f"{k} is {tuple(found[k].shape)}, expected {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    parts = [f"missing keys ({len(missing)}): {some(missing)}"] if missing else []
    parts += [f"unexpected keys ({len(unexpected)}): {some(unexpected)}"] if unexpected else []
    parts += [f"wrong shapes: {some(shapes)}"] if shapes else []
    return "; ".join(parts) or "the state dict does not load"


def training_state(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    experiment: Experiment,
    dataset: Any,
    commit: str,
    best_miou: float | None,
    train_seconds: float,
    metrics: dict[str, Any] | None,
    budget_fit: dict[str, Any] | None,
) -> dict[str, Any]:
    """A training checkpoint: everything a run needs to continue exactly (weights, optimiser, RNG
    states, time spent, the budget-fitted length) and a user needs to use the model (its recipe,
    classes, palette, input channels and normalisation). :meth:`CheckpointManager.save` adds the
    iteration and the format version."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "config": experiment.to_dict(),
        "git_commit": commit,
        "best_miou": best_miou,
        "train_seconds": train_seconds,
        "metrics": metrics or {},
        "budget_fit": budget_fit,
        "dataset": {
            "name": experiment.data.dataset,
            "num_classes": dataset.num_classes,
            "class_names": list(dataset.class_names),
            "palette": [list(c) for c in dataset.palette],
            "in_channels": dataset.in_channels,
            "ignore_index": dataset.ignore_index,
            "normalization": experiment.data.normalization,
        },
    }


@dataclass(frozen=True)
class ResumePoint:
    """Where a restored run continues."""

    iteration: int
    best_miou: float | None
    train_seconds: float  # time and budgets add up across resumes
    budget_fit: dict[str, Any] | None  # a fitted length is the run's length for good


def restore_training_state(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> ResumePoint:
    """Load a :func:`training_state` into the run's objects (and the RNGs) and say where it stood.

    A checkpoint of another model (the recipe changed since) is a :class:`CheckpointError` that
    says how they differ; nothing is loaded then.
    """
    expected = model.state_dict()
    found = state["model"]
    if set(found) != set(expected) or any(tuple(found[k].shape) != tuple(v.shape) for k, v in expected.items()):
        was = state.get("config", {}).get("model", {})
        raise CheckpointError(
            f"mismatched checkpoint: iteration {state.get('iteration')} was trained as {was.get('name')} with "
            f"model.options={was.get('options')}, which does not fit the model the recipe builds now "
            f"({_misfit(expected, found)}). Resume with the recipe the run was trained with (its config.yaml), "
            "or train the new recipe into a new run folder"
        )
    model.load_state_dict(found)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(
            f"mismatched checkpoint: its optimiser state does not fit optim.name={type(optimizer).__name__.lower()} "
            f"as the recipe sets it now ({exc}); resume with the recipe the run was trained with"
        ) from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return ResumePoint(
        int(state["iteration"]),
        state.get("best_miou"),
        float(state.get("train_seconds", 0.0)),
        state.get("budget_fit"),
    )


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint's contents, checked to hold a model, its recipe and its dataset facts."""
    state = load_checkpoint(path)
    for key in ("model", "config", "dataset"):
        if key not in state:
            raise CheckpointError(f"{path} is not a densepred training checkpoint (no {key!r} entry)")
    if not isinstance(state["model"], dict):
        raise CheckpointError(f"{path} is not a densepred training checkpoint ('model' is not a state dict)")
    return state


def load_released_trained(name: str, device: torch.device | str = "cpu", *, file: str | Path | None = None) -> Trained:
    """Released weights by name (``fcn8s.voc_caffe``, see ``densepred weights list``) as a
    :class:`Trained`: the entry's model, classes (VOC's palette) and its own preprocessing, for
    every command that takes a checkpoint."""
    from .build import NORMALIZATIONS
    from .catalogue import weights_entry
    from .data.labels import IGNORE_INDEX, bitwise_palette
    from .weights import load_released

    entry = weights_entry(name)
    model = load_released(name, file=file).to(device)
    experiment = Experiment(name=name)
    experiment.model.name, experiment.model.options = entry.model, dict(entry.model_kwargs)
    # A named normalisation where there is one (recipes and exports speak in names), else its own.
    named = next((k for k, v in NORMALIZATIONS.items() if v == entry.normalization), None)
    if named:
        experiment.data.normalization = named
    n = len(entry.classes)
    palette = bitwise_palette(n)
    return Trained(model, experiment, n, list(entry.classes), palette, 3, IGNORE_INDEX, named or entry.normalization, 0)


def load_trained(path: str | Path, device: torch.device | str = "cpu") -> Trained:
    """Rebuild the model a checkpoint was trained as and load its weights (no code executed)."""
    state = load_training_checkpoint(path)
    exp = experiment_from_dict(state["config"])
    meta = state["dataset"]
    exp.model.pretrained = None  # the checkpoint holds every weight
    with torch.device("meta"):
        model = build_model(exp, meta["num_classes"], meta["in_channels"])
    try:
        model.load_state_dict(state["model"], strict=True, assign=True)
    except RuntimeError:
        raise CheckpointError(
            f"{path}: weights do not fit {exp.model.name} with {meta['num_classes']} classes and "
            f"{meta['in_channels']} input channel(s), as the checkpoint's own config says: "
            f"{_misfit(model.state_dict(), state['model'])}. The file was edited or damaged; "
            "use a checkpoint as training wrote it"
        ) from None
    # Channels-first, however the recipe trained (model.channels_last keeps the weights in that
    # layout): inference, and the eager reference of the backends' parity rule, do not depend on it.
    model = model.to(device, memory_format=torch.contiguous_format).eval()
    return Trained(
        model,
        exp,
        meta["num_classes"],
        list(meta["class_names"]),
        [tuple(c) for c in meta["palette"]],
        meta["in_channels"],
        meta["ignore_index"],
        meta["normalization"],
        int(state.get("iteration", 0)),
    )
