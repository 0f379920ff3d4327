"""The ``densepred`` command line: one thin module per command group over the library API.

One exit-code rule for every command: 0 when it did its work; 2 for a user error (a bad
option, file, recipe, checkpoint or dataset), printed as one line that names it and says the
fix; 1 when the work needs a step by hand first (a dataset that must be downloaded manually:
the instructions are printed); 130 when interrupted. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import data, evaluate, export, predict, serve, train, tutorial, visual, weights

__all__ = ["main", "build_parser"]

GROUPS = (train, evaluate, predict, export, serve, visual, data, weights, tutorial)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densepred", description="Semantic segmentation: FCN, DeepLab, U-Net.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that explain themselves: what failed, the file or option, how to go on."""
    from ..atomic import WriteError
    from ..checkpoint import CheckpointError
    from ..data.errors import DownloadError
    from ..download import TransferError
    from ..trainer import DataLoaderWorkerError, NonFiniteLossError

    return (
        ValueError,  # ConfigError, DataError, WeightsError and bad values
        FileNotFoundError,
        CheckpointError,
        WriteError,
        DownloadError,
        TransferError,
        NonFiniteLossError,
        DataLoaderWorkerError,
    )


# the commands that run passes over data in a loop; serve budgets its memory by measuring it
_RETAIN_MEMORY = ("train", "demo", "eval", "predict")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command in _RETAIN_MEMORY:  # run as a program: the process is ours
        from ..allocator import retain_freed_memory

        retain_freed_memory()
    sub = getattr(args, "data_command", None) or getattr(args, "weights_command", None)
    command = " ".join(filter(None, (args.command, sub)))
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        print(f"densepred {command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:  # not about a file of the user's: keep the traceback
            raise
        print(f"densepred {command}: error: {exc}", file=sys.stderr)  # e.g. a full disk, naming the file
        return 2
    except KeyboardInterrupt:
        print(f"densepred {command}: interrupted", file=sys.stderr)
        return 130
