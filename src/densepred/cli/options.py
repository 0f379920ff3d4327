"""Command-line options generated from the config dataclasses, so each option has one spelling
and one default: the field's (``EvalConfig`` for the inference options of predict, serve, ...)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from ..config import ConfigError, EvalConfig, coerce

if TYPE_CHECKING:
    from ..checkpoint import Trained

__all__ = [
    "add_inference_options",
    "inference_options",
    "INFERENCE_HELP",
    "in_range",
    "add_model_source",
    "load_source",
    "add_int8_options",
    "int8_requested",
]

# One line of help per EvalConfig field offered on the command line.
INFERENCE_HELP: dict[str, str] = {
    "mode": "whole image, sliding window, or overlap-tile (the valid U-Net)",
    "tile": "tile size in pixels for slide / overlap_tile",
    "overlap": "sliding-window overlap fraction",
    "blend": "how overlapping tiles are weighed",
    "scales": "multi-scale inputs, e.g. 0.75 1 1.25",
    "flip": "add horizontally mirrored inputs",
    "fusion": "how scales and flips are fused (DeepLab v2: max)",
    "crf": "fully-connected CRF preset",
    "crf_params": "override a CRF parameter, NAME=VALUE (w1, theta_alpha, theta_beta, w2, theta_gamma, iterations)",
    "batch_size": "tiles per forward pass",
    "amp": "precision: auto (fp16 on CUDA; fp32 on a CPU, where the backend probe also tries bf16 if the CPU "
    "computes it natively and keeps it only if faster with the same labels), none, bf16, fp16",
    "backend": "runtime: auto (the fastest measured here whose argmax matches eager), eager, channels_last, "
    "torchscript, onnxruntime (the export extra), openvino (the openvino extra)",
    "streams": "frames predict segments at once, each on a share of the cores (default: measured here, "
    "more than one only where it segments more frames a second)",
}


def _flag(name: str) -> str:
    return "--" + ("crf-param" if name == "crf_params" else name.replace("_", "-"))


def add_inference_options(parser: argparse.ArgumentParser) -> None:
    """``--mode --tile ... --amp``: one option per :class:`EvalConfig` field in :data:`INFERENCE_HELP`."""
    from ..crf import PRESETS

    defaults = EvalConfig()
    hints = typing.get_type_hints(EvalConfig)
    group = parser.add_argument_group("inference options (densepred.config.EvalConfig)")
    for f in dataclasses.fields(EvalConfig):
        if f.name not in INFERENCE_HELP:
            continue
        default = getattr(defaults, f.name)
        shown = f"{default:.3g}" if isinstance(default, float) else default
        kwargs: dict[str, Any] = {"dest": f.name, "help": f"{INFERENCE_HELP[f.name]} (default: {shown})"}
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if f.name == "crf":
            kwargs["choices"] = sorted(PRESETS)
        elif f.name == "crf_params":
            kwargs.update(action="append", metavar="NAME=VALUE", default=None)
        elif hint is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(hint) is Literal:
            kwargs["choices"] = list(typing.get_args(hint))
        elif typing.get_origin(hint) is list:
            kwargs.update(nargs="+", type=typing.get_args(hint)[0])
        else:
            kwargs["type"] = args[0] if args else hint
        kwargs.setdefault("default", None)  # unset: the config's value stands
        group.add_argument(_flag(f.name), **kwargs)


def inference_options(args: argparse.Namespace, base: EvalConfig | None = None) -> EvalConfig:
    """``base`` (default: ``EvalConfig()``) with the options given on the command line, validated."""
    values = dataclasses.asdict(base or EvalConfig())
    for name in INFERENCE_HELP:
        given = getattr(args, name, None)
        if given is None or given is False:
            continue
        if name == "crf_params":
            given = dict(_key_value(item) for item in given)
        values[name] = given
    hints = typing.get_type_hints(EvalConfig)
    try:
        options = EvalConfig(**{k: coerce(v, hints[k], _flag(k)) for k, v in values.items()})
        options.validate()
    except ConfigError as exc:
        raise ValueError(str(exc).replace("eval.", "--")) from None
    return options


def _key_value(item: str) -> tuple[str, float]:
    key, _, value = item.partition("=")
    try:
        return key, float(value)
    except ValueError:
        raise ValueError(f"--crf-param {item!r} must look like name=number, e.g. w1=5") from None


def in_range(kind: type, low: float, high: float | None = None) -> Callable[[str], Any]:
    """An argparse ``type`` that parses ``kind`` and refuses values outside ``[low, high]``,
    so a bad number is a usage error naming the option, never a traceback later."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (value >= low and (high is None or value <= high)) or value != value:
            bounds = f"between {low:g} and {high:g}" if high is not None else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {bounds}")
        return value

    return parse


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint CKPT`` or ``--weights NAME`` (released weights, ``densepred weights list``)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a training checkpoint (run/checkpoints/best.pt)")
    source.add_argument("--weights", metavar="NAME", help="released weights by name, e.g. fcn8s.voc_caffe")
    parser.add_argument("--weights-file", default=None, help="with --weights: a copy of the released file on disk")


def load_source(args: argparse.Namespace, device) -> Trained:  # noqa: ANN001 - a torch device or its name
    """The model the command runs: a checkpoint's, or released weights by name."""
    from ..checkpoint import load_released_trained, load_trained

    if args.weights:
        return load_released_trained(args.weights, device, file=args.weights_file)
    return load_trained(args.checkpoint, device)


def add_int8_options(parser: argparse.ArgumentParser) -> None:
    """``--int8 [N] --calibration-data ROOT --calibrate METHOD``: int8 static quantisation
    (densepred.quantize), calibrated on N training images of the recipe's dataset; one spelling
    for every command."""
    from ..quantize import CALIBRATIONS, DEFAULT_CALIBRATION_IMAGES

    group = parser.add_argument_group("int8 (densepred.quantize; opt-in: close to fp32, not equal)")
    group.add_argument(
        "--int8",
        nargs="?",
        const=DEFAULT_CALIBRATION_IMAGES,
        type=in_range(int, 1),
        metavar="N",
        help="run (or write) the model as int8 on ONNX Runtime, calibrated on N images of the recipe's "
        f"training split (N defaults to {DEFAULT_CALIBRATION_IMAGES})",
    )
    group.add_argument(
        "--calibration-data",
        metavar="ROOT",
        help="with --int8: the dataset folder to calibrate on (default: the recipe's data.root)",
    )
    group.add_argument(
        "--calibrate",
        choices=CALIBRATIONS,
        help="with --int8: how activation ranges come from the images: percentile (the default) clips at "
        "the 99.999th (it lost fewer mIoU points than minmax on CamVid's trained models; it falls back to "
        "minmax, and says so, where its histograms fail on a near-constant tensor), minmax the extremes "
        "seen, entropy minimises the KL divergence",
    )


def int8_requested(args: argparse.Namespace, *, data_named: bool = False) -> bool:
    """Whether ``--int8`` was given. ``--calibration-data`` without it is a usage error, and so is
    ``--weights`` unless the command names their dataset (``data_named``): released weights carry
    no recipe whose training images could calibrate them."""
    for option, value in (("--calibration-data", args.calibration_data), ("--calibrate", args.calibrate)):
        if value is not None and args.int8 is None:
            raise ValueError(f"{option} applies with --int8 only; add --int8 N")
    if args.int8 is not None and args.weights and not data_named:
        raise ValueError(f"--int8 calibrates on a recipe's training images; --weights {args.weights} has none")
    return args.int8 is not None
