"""``densepred export``: a checkpoint as ONNX or TorchScript (preprocessing in the file) or safetensors."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import add_int8_options, add_model_source, int8_requested, load_source

__all__ = ["add_commands"]


def _cmd_export(args: argparse.Namespace) -> int:
    from ..export import DEFAULT_OPSET, export_checkpoint, export_released, format_of

    fmt = args.format or format_of(args.out or "")
    int8 = int8_requested(args)
    if int8:
        if fmt not in (None, "onnx"):
            raise ValueError(f"--int8 writes ONNX, not {fmt}: use --format onnx and an --out ending in .onnx")
        fmt = "onnx"
    if args.opset is not None and fmt != "onnx":
        raise ValueError("--opset applies to --format onnx only")
    try:
        opset = args.opset or DEFAULT_OPSET
        if int8:
            out = _export_int8(args, opset)
        elif args.weights:
            out = export_released(args.weights, args.format, args.out, opset=opset, file=args.weights_file)
        else:
            out = export_checkpoint(args.checkpoint, args.format, args.out, opset=opset)
    except ImportError as exc:
        print(
            f"densepred export: {exc.name} is missing; install the export extra: pip install 'densepred[export]'",
            file=sys.stderr,
        )
        return 2
    print(f"wrote {out}")
    return 0


def _export_int8(args: argparse.Namespace, opset: int) -> Path:
    """``--int8 N``: the model calibrated on N training images of its recipe, as an int8 ONNX file."""
    from ..export import default_export_path
    from ..quantize import DEFAULT_CALIBRATION, export_int8_onnx, training_images

    out = Path(args.out) if args.out else default_export_path(args.checkpoint, "onnx").with_suffix(".int8.onnx")
    if out.resolve() == Path(args.checkpoint).resolve():
        raise ValueError(f"the output {out} would overwrite the checkpoint; choose another file name")
    trained = load_source(args, "cpu")
    images = training_images(trained, args.int8, root=args.calibration_data)
    written = export_int8_onnx(trained, out, images, opset=opset, calibrate=args.calibrate or DEFAULT_CALIBRATION)
    print(f"int8: calibrated on {len(images)} images of {trained.experiment.data.dataset}'s training split")
    return written


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint: ONNX or TorchScript (any input size, preprocessing in the file) or weights",
    )
    add_model_source(p)
    p.add_argument(
        "--format",
        choices=["onnx", "torchscript", "safetensors"],
        help="default: what --out's suffix says (.onnx, .pt, .safetensors), else safetensors",
    )
    p.add_argument(
        "--out", help="output file (default: next to the checkpoint, .onnx / .torchscript.pt / .safetensors)"
    )
    p.add_argument("--opset", type=int, help="ONNX opset, 11..20 (default 17)")
    add_int8_options(p)
    p.set_defaults(func=_cmd_export)
