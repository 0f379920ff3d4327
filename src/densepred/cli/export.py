"""``densepred export``: a checkpoint as ONNX or TorchScript (preprocessing in the file) or safetensors."""

from __future__ import annotations

import argparse
import sys

from .options import add_model_source

__all__ = ["add_commands"]


def _cmd_export(args: argparse.Namespace) -> int:
    from ..export import DEFAULT_OPSET, export_checkpoint, export_released, format_of

    if args.opset is not None and (args.format or format_of(args.out or "")) != "onnx":
        raise ValueError("--opset applies to --format onnx only")
    try:
        opset = args.opset or DEFAULT_OPSET
        if args.weights:
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
    p.set_defaults(func=_cmd_export)
