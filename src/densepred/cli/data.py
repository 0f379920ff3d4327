"""``densepred data download | stats | list``: thin commands over :mod:`densepred.data`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..data.errors import DataError, ManualDownloadRequired

__all__ = ["add_commands"]


def _cmd_download(args: argparse.Namespace) -> int:
    from ..data.download import download_dataset

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = download_dataset(args.name, args.root, progress=not args.no_progress, keep_archives=args.keep_archives)
    except ManualDownloadRequired as e:  # not an error: a step the user takes by hand (exit 1)
        print(e)
        return 1
    print(path)
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from ..data.factory import create_dataset, dataset_entry, detect_dataset
    from ..data.stats import compute_stats, format_stats, save_bar_chart

    name = args.dataset
    if name == "auto":
        if args.root is None:
            raise DataError("give ROOT, or --dataset synthetic for the built-in data")
        name = detect_dataset(args.root)
    root = None if name == "synthetic" else args.root
    split = args.split or dataset_entry(name).cls.default_split(None if root is None else Path(root))
    dataset = create_dataset(name, root=root, split=split)
    stats = compute_stats(dataset, progress=not args.no_progress, limit=args.limit)
    print(f"dataset: {name}   split: {split}")
    print(format_stats(stats))
    if args.chart:
        print(f"bar chart: {save_bar_chart(stats, args.chart)}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from ..data.factory import DATASETS
    from ..data.sources import SOURCES

    for entry in DATASETS.values():
        how = (
            "built in"
            if not entry.needs_root
            else (
                "manual download"
                if entry.name in SOURCES and SOURCES[entry.name].manual
                else "downloadable"
                if entry.name in SOURCES
                else "your files"
            )
        )
        print(f"{entry.name:<11} {how:<16} {entry.description}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``data {download,stats,list}``."""
    data = subparsers.add_parser(
        "data", help="datasets: download, statistics, list", description="Download datasets and inspect them."
    )
    sub = data.add_subparsers(dest="data_command", metavar="{download,stats,list}", required=True)

    p = sub.add_parser(
        "download",
        help="download, verify and extract a dataset into ROOT/NAME",
        description="Download a dataset with a public archive (voc, sbd, camvid, isbi2012, ade20k); "
        "for cityscapes, print how to get it by hand.",
    )
    p.add_argument("name", help="dataset name (see `densepred data list`)")
    p.add_argument("--root", default="data", help="folder that receives ROOT/NAME (default: data)")
    p.add_argument("--keep-archives", action="store_true", help="keep the downloaded archives in ROOT/.downloads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser(
        "stats",
        help="class pixel frequencies, image sizes, median-frequency weights",
        description="Print per-class pixel frequencies, image sizes and median-frequency class "
        "weights (as SegNet uses on CamVid); optionally save a bar chart.",
    )
    p.add_argument("root", nargs="?", help="dataset folder (omit for --dataset synthetic)")
    p.add_argument("--dataset", default="auto", help="dataset name, or 'auto' to detect it from ROOT's layout")
    p.add_argument(
        "--split", default=None, help="split to count (default: train; a folder without split sub-folders: all)"
    )
    p.add_argument("--chart", metavar="PNG", help="save a bar chart of class frequencies here")
    p.add_argument("--limit", type=int, help="count only the first N images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser("list", help="list the datasets and how to get each")
    p.set_defaults(func=_cmd_list)
