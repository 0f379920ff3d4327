"""The ``densepred`` command line: a thin layer over the library API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def _cmd_models(args: argparse.Namespace) -> int:
    from .zoo import model_table

    print(model_table(args.pattern, num_classes=args.num_classes, in_channels=args.in_channels))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    # The main job: until training lands it shows the model zoo.
    print("densepred model zoo (parameters for 21 classes, RGB input):\n")
    return _cmd_models(argparse.Namespace(pattern="*", num_classes=21, in_channels=3))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densepred", description="Semantic segmentation: FCN, DeepLab, U-Net.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list registered models with parameters, output stride, receptive field")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'fcn*'")
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--in-channels", type=int, default=3)
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("demo", help="the main job on built-in data")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"densepred {args.command}: error: {exc}", file=sys.stderr)
        return 2
