"""One registry of model builders: ``create_model(name, **kw)`` and ``list_models(pattern)``.

Plain data and the lowest layer: it imports nothing of densepred's. Each family registers its
builders when it is imported (``densepred`` imports them all), and a builder loads its own
weights (``pretrained=...``).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = [
    "UnknownModelError",
    "ModelEntry",
    "register_model",
    "create_model",
    "list_models",
    "model_entry",
    "set_released_loader",
]


class UnknownModelError(ValueError):
    """A model name that is not registered."""


@dataclass(frozen=True)
class ModelEntry:
    """A registered builder and the paper facts it declares (checked by tests)."""

    name: str
    builder: Callable[..., nn.Module]
    paper: str
    output_stride: int
    receptive_field: int  # theoretical, in input pixels, along one axis
    default_size: int  # the paper's input resolution (one side)


_REGISTRY: dict[str, ModelEntry] = {}
# Set by densepred.weights (imports point down: the registry calls the loader it is given).
_RELEASED_LOADER: Callable[[str], nn.Module] | None = None


def set_released_loader(loader: Callable[[str], nn.Module]) -> None:
    """How ``create_model(name, weights=TAG)`` loads the released weights ``name.TAG``."""
    global _RELEASED_LOADER
    _RELEASED_LOADER = loader


def register_model(
    name: str, *, paper: str, output_stride: int, receptive_field: int, default_size: int
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register ``builder`` under ``name``; a duplicate name is an error."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = ModelEntry(name, builder, paper, output_stride, receptive_field, default_size)
        return builder

    return wrap


def model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; an unknown name lists the close matches."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}.{hint} Known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_model(name: str, *, weights: str | None = None, **kwargs) -> nn.Module:
    """Build the registered model ``name``, e.g. ``create_model("fcn8s", num_classes=21)``.

    Every builder takes ``pretrained``: ImageNet backbone weights (``"imagenet"``) or a local
    weight file, loaded by :func:`densepred.weights.load_pretrained`. ``weights`` names released
    weights of this model (``create_model("fcn8s", weights="voc_caffe")``, see
    ``densepred weights list``): the model is built as they need (classes, options) and loaded.
    """
    entry = model_entry(name)
    if weights is not None:
        if kwargs:
            raise ValueError(
                f"create_model({name!r}, weights={weights!r}) builds the model the weights were trained as; "
                f"drop {', '.join(sorted(kwargs))}"
            )
        if _RELEASED_LOADER is None:  # only if densepred.weights was never imported
            raise RuntimeError("released weights need densepred.weights; import densepred first")
        return _RELEASED_LOADER(f"{name}.{weights}")
    return entry.builder(**kwargs)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))
