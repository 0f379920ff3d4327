"""``densepred tutorial``: regenerate the dense-prediction tutorial (text and figures) from scratch."""

from __future__ import annotations

import argparse

__all__ = ["add_commands"]


def _cmd_tutorial(args: argparse.Namespace) -> int:
    from ..tutorial import FULL, TINY, run_tutorial

    result = run_tutorial(args.out, size=TINY if args.tiny else FULL)
    for path in result.files:
        print(f"  {path}  {path.stat().st_size / 1024:.0f} KiB")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tutorial",
        help="compute the dense-prediction tutorial on the synthetic data: tutorial.md, tutorial.ko.md, figures",
        description="Run the tutorial's eight steps (pixel classification, convolutionalization, deconvolution, "
        "FCN skips, feature maps, atrous convolution, CRF, U-Net) on the built-in synthetic scenes and write "
        "DIR/tutorial.md, DIR/tutorial.ko.md and DIR/tutorial/*.png with the numbers of this run "
        "(a few minutes on a 2-core CPU).",
    )
    p.add_argument("--out", default="docs", help="output folder (default: docs)")
    p.add_argument("--tiny", action="store_true", help="every step at a tiny size (seconds; the numbers mean little)")
    p.set_defaults(func=_cmd_tutorial)
