"""How much memory a model needs, known before any of it is allocated.

A model is built on PyTorch's ``meta`` device (shapes and dtypes, no storage), so a recipe or
a checkpoint's config that asks for a 10^11-parameter net is refused in milliseconds with the
figure, instead of being killed by the kernel at 22 GB. Running the meta model's forward pass
under :class:`LiveBytes` counts the bytes of every tensor alive at each moment: its peak is
the activation memory of that input size, exact for the tensors PyTorch creates (the kernels'
own scratch space comes on top; :mod:`densepred.serve` measures that share at start).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .config import ConfigError, Experiment
from .registry import create_model

__all__ = [
    "ModelTooLarge",
    "LiveBytes",
    "meta_model",
    "check_model_size",
    "parameter_count",
    "peak_bytes",
    "training_bytes",
    "physical_memory",
]


class ModelTooLarge(ConfigError):
    """A model config whose parameters or memory exceed what may be allocated; names the option."""


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(exp: Experiment, num_classes: int, in_channels: int) -> nn.Module:
    """The recipe's model on the meta device (no pretrained weights: only shapes matter)."""
    m = exp.model
    try:
        with torch.device("meta"):
            return create_model(m.name, num_classes=num_classes, in_channels=in_channels, **m.options)
    except (RuntimeError, OverflowError, MemoryError) as exc:  # sizes beyond int64 overflow even on meta
        raise ModelTooLarge(
            f"model {m.name} with model.options={m.options} cannot exist: its layer sizes overflow ({exc}); "
            "use smaller model.options"
        ) from None


def check_model_size(exp: Experiment, num_classes: int, in_channels: int) -> nn.Module:
    """Refuse a model above ``model.max_parameters`` before anything is allocated; returns it on meta."""
    model = meta_model(exp, num_classes, in_channels)
    count, limit = parameter_count(model), exp.model.max_parameters
    if count > limit:
        raise ModelTooLarge(
            f"model {exp.model.name} with model.options={exp.model.options} has {count:,} parameters "
            f"({count * 4 / 2**30:,.1f} GiB in float32), above model.max_parameters={limit:,}; use smaller "
            "model.options, or raise model.max_parameters if the machine really holds it"
        )
    return model


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors alive while it is active, and their peak.

    Storages are counted once however many views share them, and leave the count when the
    last tensor using them is freed (CPython frees at once, so the peak is the real one).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage id -> [tensors using it, bytes]

    def _track(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata  # the StorageImpl's address: the same for every view
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [0, storage.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._untrack, key)

    def _untrack(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (PyTorch's protocol)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self._track(t)
        return out


def peak_bytes(fn: Callable[..., Any], *args: Any) -> int:
    """The peak bytes of tensors created by ``fn(*args)`` and alive at once (its result included)."""
    counter = LiveBytes()
    with counter:
        result = fn(*args)
    del result
    return counter.peak


def training_bytes(model_on_meta: nn.Module, batch: int, channels: int, height: int, width: int) -> int:
    """Bytes one training step needs, counted on meta: the activations the forward pass keeps for
    backward (its peak with autograd on), as much again for their gradients, and the weights
    with their gradients and two optimiser states (Adam's; SGD's momentum needs one)."""
    x = torch.empty(batch, channels, height, width, device="meta")
    model_on_meta.train()

    def forward() -> object:
        with torch.enable_grad():
            out = model_on_meta(x)
        return out

    activations = peak_bytes(forward)
    weights = sum(p.numel() * p.element_size() for p in model_on_meta.parameters())
    return 2 * activations + 4 * weights


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
