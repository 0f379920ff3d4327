"""Turning an :class:`~densepred.config.Experiment` into datasets, a model and a device.

Shared by training, evaluation and prediction so that each builds exactly what the recipe
(or the checkpoint's saved recipe) says.
"""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .config import Experiment
from .data import (
    CAFFE_BGR,
    IMAGENET,
    UNIT,
    Normalization,
    SegmentationDataset,
    create_dataset,
    deeplab_train,
    eval_transform,
    unet_train,
)
from .models.layers import FrozenBatchNorm2d
from .registry import create_model

__all__ = [
    "DistInfo",
    "setup_distributed",
    "resolve_device",
    "seed_everything",
    "build_dataset",
    "build_model",
    "freeze_batch_norm",
    "git_commit",
    "NORMALIZATIONS",
    "normalization_for",
]

NORMALIZATIONS = {"imagenet": IMAGENET, "caffe": CAFFE_BGR, "unit": UNIT}


def normalization_for(name: str, channels: int) -> Normalization:
    """The recipe's normalisation for images of ``channels`` channels.

    ImageNet statistics are per RGB channel, so gray images are scaled to [0, 1] instead;
    Caffe's BGR mean needs RGB images.
    """
    if name == "caffe" and channels != 3:
        raise ValueError(f"data.normalization=caffe needs RGB images; these have {channels} channel(s)")
    return UNIT if name == "imagenet" and channels != 3 else NORMALIZATIONS[name]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks this process's GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is available; use train.device=cpu")
    return device


def setup_distributed(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name, info.local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # Bit-exact reruns (and resumed runs equal to uninterrupted ones) need deterministic kernels.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def build_dataset(exp: Experiment, split: str, *, train: bool, seed: int | None = None) -> SegmentationDataset:
    """The recipe's dataset for ``split``, with training augmentation or the evaluation transform."""
    d = exp.data
    name, root = d.dataset, d.root
    if not train and d.val_dataset:
        name, root = d.val_dataset, d.val_root or d.root
    probe = create_dataset(name, root, split=split, **d.options)
    norm = normalization_for(d.normalization, probe.in_channels)
    if not train or d.augment == "none":
        transform = eval_transform(norm)
    elif d.augment == "deeplab":
        transform = deeplab_train(
            crop=d.crop or 321, scale=d.scale, flip=d.flip, normalization=norm, channels=probe.in_channels, seed=seed
        )
    else:
        transform = unet_train(crop=d.crop, flip=d.flip, normalization=norm, channels=probe.in_channels, seed=seed)
    probe.transform = transform
    return probe


def freeze_batch_norm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d with its statistics (Caffe ``use_global_stats``)."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                if child.affine:
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                if child.running_mean is not None:
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
            setattr(model, name, frozen.to(child.weight.device if child.affine else "cpu"))
        else:
            freeze_batch_norm(child)
    return model


def build_model(exp: Experiment, num_classes: int, in_channels: int) -> nn.Module:
    m = exp.model
    model = create_model(m.name, num_classes=num_classes, in_channels=in_channels, pretrained=m.pretrained, **m.options)
    if m.freeze_bn:
        freeze_batch_norm(model)
    return model


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


CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def resolve_config(name_or_path: str) -> Path:
    """A recipe file path, or the name of a shipped recipe (``synthetic_unet``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config {name_or_path!r} is neither a file nor a shipped recipe; shipped: {names}")


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
    normalization: str
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


def load_trained(path: str | Path, device: torch.device | str = "cpu") -> Trained:
    """Rebuild the model a checkpoint was trained as and load its weights (no code executed)."""
    from .checkpoint import CheckpointError, load_checkpoint
    from .config import experiment_from_dict

    state = load_checkpoint(path)
    for key in ("model", "config", "dataset"):
        if key not in state:
            raise CheckpointError(f"{path} is not a densepred training checkpoint (no {key!r} entry)")
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
    model = model.to(device).eval()
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
