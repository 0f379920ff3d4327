"""Experiment configuration: one typed dataclass per concern, one flat YAML file per recipe.

A recipe file has the sections ``model``, ``data``, ``optim``, ``schedule``, ``train`` and
``eval``; every key is a field below. Command-line overrides use ``section.key=value``
(``optim.lr=0.01``); values are parsed as YAML and converted to the field's type. Unknown
keys, wrong types and out-of-range values are errors that list the valid choices. The
resolved config is saved with every run and checkpoint, so a result can always be rerun.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "EvalConfig",
    "Experiment",
    "load_experiment",
    "experiment_from_dict",
    "apply_overrides",
    "coerce",
    "CONFIG_DIR",
    "resolve_config",
]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says how to fix it."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    name: str = "unet_padded"
    options: dict[str, Any] = field(default_factory=dict)  # builder keywords, e.g. base_channels
    pretrained: str | None = None  # "imagenet" or a weight file / URL
    channels_last: bool = False
    freeze_bn: bool = False  # eval-mode batch norm, statistics and affine fixed
    sync_bn: bool = False  # SyncBatchNorm under torchrun
    # Checked on the meta device before anything is allocated (the largest net here: 134M).
    max_parameters: int = 1_000_000_000

    def validate(self) -> None:
        from .registry import UnknownModelError, model_entry

        _require(self.max_parameters >= 1, f"model.max_parameters must be >= 1, got {self.max_parameters}")
        try:
            entry = model_entry(self.name)
        except UnknownModelError as exc:  # unknown names list the close matches
            raise ConfigError(f"model.name: {exc}") from None
        params = inspect.signature(entry.builder).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return
        allowed = sorted(set(params) - {"num_classes", "in_channels", "pretrained"})
        unknown = sorted(set(self.options) - set(allowed))
        _require(
            not unknown,
            f"model.options.{', model.options.'.join(unknown)}: not an option of {self.name}; its options: "
            f"{', '.join(allowed)} (num_classes and in_channels come from the dataset)",
        )


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # dataset keywords, e.g. num_images
    train_split: str = "train"
    val_split: str = "val"
    val_dataset: str | None = None  # validate on another dataset (FCN: SBD train -> VOC seg11valid)
    val_root: str | None = None
    augment: Literal["deeplab", "unet", "none"] = "deeplab"
    crop: int | None = None  # square training crop; None trains on whole images
    scale: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    normalization: Literal["imagenet", "caffe", "caffe_deeplab", "unit"] = "imagenet"
    batch_size: int = 8
    workers: int = 2

    def validate(self) -> None:
        _require(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _require(self.workers >= 0, f"data.workers must be >= 0, got {self.workers}")
        _require(self.crop is None or self.crop >= 1, f"data.crop must be a positive size or null, got {self.crop}")
        lo, hi = self.scale
        _require(0 < lo <= hi, f"data.scale must be [min, max] with 0 < min <= max, got {list(self.scale)}")


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    bias_lr_mult: float = 2.0  # Caffe recipes: biases learn twice as fast ...
    bias_decay_mult: float = 0.0  # ... and are not decayed
    head_lr_mult: float = 1.0  # DeepLab: x10 on the classifier

    def validate(self) -> None:
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        # Float32 parameters overflow long before this (1e308 became inf at the first step).
        fastest = self.lr * max(1.0, self.bias_lr_mult, self.head_lr_mult)
        _require(
            fastest <= 1e3,
            f"optim.lr={self.lr} makes the fastest layers step at lr {fastest:g}, above 1e3; "
            "recipes train at 1e-10 (Caffe's summed loss) to 0.1",
        )
        _require(0 <= self.momentum < 1, f"optim.momentum must be in [0, 1), got {self.momentum}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for key in ("bias_lr_mult", "bias_decay_mult", "head_lr_mult"):
            _require(getattr(self, key) >= 0, f"optim.{key} must be >= 0, got {getattr(self, key)}")
        _require(
            all(0 <= b < 1 for b in self.betas), f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}"
        )


@dataclass
class ScheduleConfig:
    policy: Literal["poly", "step", "cosine", "constant"] = "poly"
    power: float = 0.9  # poly: lr * (1 - it / max_it) ** power (DeepLab v2)
    step_size: int = 2000  # step: lr * gamma ** (it // step_size) (DeepLab v1)
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_factor: float = 0.1  # lr multiplier at iteration 0 of the linear warm-up
    min_lr_factor: float = 0.0  # cosine floor

    def validate(self) -> None:
        _require(self.step_size >= 1, f"schedule.step_size must be >= 1, got {self.step_size}")
        _require(self.power >= 0, f"schedule.power must be >= 0, got {self.power}")
        _require(self.gamma > 0, f"schedule.gamma must be > 0, got {self.gamma}")
        _require(0 <= self.min_lr_factor <= 1, f"schedule.min_lr_factor must be in [0, 1], got {self.min_lr_factor}")
        _require(self.warmup_iters >= 0, f"schedule.warmup_iters must be >= 0, got {self.warmup_iters}")
        _require(0 < self.warmup_factor <= 1, f"schedule.warmup_factor must be in (0, 1], got {self.warmup_factor}")


@dataclass
class TrainConfig:
    iterations: int = 1000
    iter_size: int = 1  # gradient accumulation (Caffe's iter_size)
    loss: Literal["ce", "ce_sum", "unet_weighted", "dice", "ce_dice"] = "ce"
    # One weight per class, or median_frequency: computed from the training masks (Eigen & Fergus
    # 2015; SegNet on CamVid, Sec. 3.3), recorded in the run's config.
    class_weights: list[float] | Literal["median_frequency"] | None = None
    loss_at_output_stride: bool = False  # DeepLab v1: stride-8 scores vs labels sub-sampled by 8
    clip_grad_norm: float | None = None
    # auto: bf16 on a CPU with native bfloat16, fp16 on CUDA, else fp32 (densepred.precision)
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    skip_nonfinite: bool = False  # skip a step with a NaN/inf loss instead of stopping
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    checkpoint_every: int = 500
    keep_last: int = 2
    # A time budget, resumes included: the run times its first steps, fits the number of
    # iterations that fits the budget and lays the schedule over it (then stops there).
    max_minutes: float | None = None
    device: str = "auto"
    # Refuse a batch x crop x model whose step, counted on the meta device, exceeds the RAM.
    memory_check: bool = True

    def validate(self) -> None:
        _require(self.iterations >= 1, f"train.iterations must be >= 1, got {self.iterations}")
        _require(self.iter_size >= 1, f"train.iter_size must be >= 1, got {self.iter_size}")
        for key in ("log_every", "eval_every", "checkpoint_every"):
            _require(getattr(self, key) >= 0, f"train.{key} must be >= 0, got {getattr(self, key)}")
        _require(self.keep_last >= 1, f"train.keep_last must be >= 1, got {self.keep_last}")
        _require(0 <= self.seed < 2**63, f"train.seed must be in [0, 2**63), got {self.seed}")
        _require(
            self.max_minutes is None or self.max_minutes > 0,
            f"train.max_minutes must be > 0 or null, got {self.max_minutes}",
        )
        _require(
            self.class_weights in (None, "median_frequency") or all(w >= 0 for w in self.class_weights),
            f"train.class_weights must be >= 0 (one per class), got {self.class_weights}",
        )
        _require(
            self.clip_grad_norm is None or self.clip_grad_norm > 0,
            f"train.clip_grad_norm must be > 0 or null, got {self.clip_grad_norm}",
        )


@dataclass
class EvalConfig:
    mode: Literal["whole", "slide", "overlap_tile"] = "whole"
    tile: int | None = None
    overlap: float = 1 / 3
    blend: Literal["uniform", "gaussian"] = "uniform"  # sliding-window weighting of overlaps
    scales: list[float] = field(default_factory=lambda: [1.0])  # multi-scale test-time inputs
    flip: bool = False  # add horizontally mirrored inputs
    fusion: Literal["mean", "max"] = "mean"  # how scales/flips are fused (DeepLab v2: max)
    crf: str | None = None  # fully-connected CRF preset (deeplab_v2, deeplab_v1_largefov) or null
    crf_params: dict[str, float] = field(default_factory=dict)  # overrides, e.g. {w1: 5}
    # Tiles per forward pass (slide, overlap-tile). Four at once run a CamVid frame's 4 tiles of 321 in
    # 0.91x the time of 4 single tiles with LR-ASPP on ONNX Runtime (1.09x one by one), 0.99x on the
    # large nets (2-core Zen 2): small layers keep the cores busier on a batch.
    batch_size: int = 4
    max_images: int | None = None  # evaluate on a prefix of the split (quick checks)
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"  # precision of the forward passes, as train.amp
    # Where the forward passes run (densepred.backends): auto = the fastest that matches eager here.
    backend: Literal["auto", "eager", "channels_last", "torchscript", "onnxruntime", "openvino"] = "auto"
    # Frames predict segments at once, each on a share of the cores; null: measured per model and
    # machine (densepred.backends.stream_models), more than one only where it is faster.
    streams: int | None = None

    def validate(self) -> None:
        _require(0 <= self.overlap < 1, f"eval.overlap must be in [0, 1), got {self.overlap}")
        _require(self.tile is None or self.tile >= 1, f"eval.tile must be a positive size or null, got {self.tile}")
        _require(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        _require(
            self.max_images is None or self.max_images >= 1,
            f"eval.max_images must be >= 1 or null, got {self.max_images}",
        )
        _require(self.streams is None or self.streams >= 1, f"eval.streams must be >= 1 or null, got {self.streams}")
        _require(bool(self.scales) and min(self.scales) > 0, f"eval.scales must be positive numbers, got {self.scales}")
        if self.crf is not None:
            from .crf import crf_params

            try:
                crf_params(self.crf, self.crf_params)
            except ValueError as exc:
                raise ConfigError(f"eval.crf: {exc}") from None
        _require(self.mode != "slide" or (self.tile or 0) > 0, "eval.mode=slide needs eval.tile (the tile size)")


@dataclass
class Experiment:
    """A whole recipe. ``name`` and ``notes`` say what it reproduces (paper, section, figure)."""

    name: str = "experiment"
    notes: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # What a run decided on its machine (precision, CPU, budget-fitted iterations): written by
    # the trainer into the run's config.yaml and checkpoints, a record, never read as a setting.
    resolved: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> Experiment:
        for section in _SECTIONS:
            getattr(self, section).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_SECTIONS = ("model", "data", "optim", "schedule", "train", "eval")


def _plain(value: Any) -> Any:
    """Tuples become lists so the dict is YAML/JSON friendly and loads back unchanged."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert ``value`` to ``annotation`` or raise a ConfigError naming ``where``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {annotation}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where} must have {len(args)} values, got {len(value)}: {value!r}")
            return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        inner = args[0] if args else Any
        items = [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of key: value, got {value!r}")
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"{where}: keys must be names, got {bad!r}")
        inner = args[1] if len(args) == 2 else Any
        return {k: coerce(v, inner, f"{where}.{k}") for k, v in value.items()}
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where} must be a whole number, got {value!r}")
        try:
            number = annotation(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if isinstance(number, float) and not math.isfinite(number):  # .inf / .nan would pass "lr > 0"
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {annotation}")  # pragma: no cover - internal


def _build_section(cls: type, values: Any, section: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"section '{section}' must be a mapping of key: value, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    odd = [k for k in values if not isinstance(k, str)]
    if odd:
        raise ConfigError(f"section '{section}' has key(s) that are not names: {', '.join(map(repr, odd))}")
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"valid keys in '{section}': {', '.join(sorted(fields))}"
        )
    return cls(**{k: coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()})


def experiment_from_dict(raw: dict[str, Any]) -> Experiment:
    """Build and validate an :class:`Experiment` from a nested dict (a parsed recipe)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping with sections {', '.join(_SECTIONS)}; got {type(raw).__name__}")
    top = {"name", "notes", "resolved", *_SECTIONS}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {', '.join(unknown)}; valid: {', '.join(sorted(top))}")
    hints = typing.get_type_hints(Experiment)
    kwargs: dict[str, Any] = {k: coerce(raw[k], str, k) for k in ("name", "notes") if k in raw}
    if raw.get("resolved") is not None:
        kwargs["resolved"] = coerce(raw["resolved"], dict[str, Any], "resolved")
    for section in _SECTIONS:
        kwargs[section] = _build_section(hints[section], raw.get(section), section)
    return Experiment(**kwargs).validate()


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without aliases: nested ``*refs`` ("billion laughs") would expand exponentially when
    the resolved config is copied and saved. Recipes never need them. A key given twice in one
    mapping is an error too: YAML would keep the last silently, and a recipe says each thing once."""

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (first on line {seen[key].start_mark.line + 1}); keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"YAML aliases (*{event.anchor}) are not allowed in recipes; write the values out",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass: no arbitrary objects


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a raw config dict (values parsed as YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping with sections {', '.join(_SECTIONS)}; got {type(raw).__name__}")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. optim.lr=0.01")
        try:
            value = _load_yaml(text) if text != "" else None
        except (yaml.YAMLError, RecursionError) as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
        parts = key.split(".")
        if len(parts) == 1:
            raw[key] = value
            continue
        section, rest = parts[0], parts[1:]
        if section not in _SECTIONS:
            raise ConfigError(f"override {item!r}: unknown section {section!r}; sections: {', '.join(_SECTIONS)}")
        node = raw.setdefault(section, {}) or {}
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: section '{section}' must be a mapping of key: value, got {node!r}")
        raw[section] = node
        for p in rest[:-1]:  # nested dict options, e.g. model.options.base_channels=16
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a mapping")
        node[rest[-1]] = value
    return raw


def load_experiment(path: str | Path | None, overrides: list[str] = ()) -> Experiment:
    """Read a recipe file or a shipped recipe by name (or start from the defaults when ``path`` is
    None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file() and path.parent == Path(".") and (shipped := _shipped_recipe(path.name)):
            path = shipped  # a shipped recipe by name: load_experiment("synthetic_unet")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; shipped recipes are in configs/")
        try:
            raw = _load_yaml(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
            raise ConfigError(f"config file {path} is not valid UTF-8 YAML: {exc}") from None
    try:
        return experiment_from_dict(apply_overrides(raw, list(overrides)))
    except ConfigError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None


CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def resolve_config(name_or_path: str) -> Path:
    """A recipe file path, or the name of a shipped recipe (``synthetic_unet``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if shipped := _shipped_recipe(name_or_path):
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config {name_or_path!r} is neither a file nor a shipped recipe; shipped: {names}")


def _shipped_recipe(name: str) -> Path | None:
    path = CONFIG_DIR / f"{name.removesuffix('.yaml')}.yaml"
    return path if path.is_file() else None
