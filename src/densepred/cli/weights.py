"""``densepred weights list | show | fetch``: the catalogue of released weights."""

from __future__ import annotations

import argparse

__all__ = ["add_commands"]


def _cmd_list(args: argparse.Namespace) -> int:
    from ..catalogue import list_weights

    entries = list_weights(args.pattern)
    if not entries:
        print(f"no weights match {args.pattern!r}; `densepred weights list` shows all")
        return 2
    rows = [("name", "layout", "reported", "verified by")]
    for w in entries:
        figure = next(iter(w.metrics.items()), None)
        reported = f"{figure[0]} {figure[1]}" if figure else "-"
        check = w.digest.algorithm if w.digest and w.digest.complete else "sha256 prefix" if w.digest else "first use"
        rows.append((w.name, w.layout, reported, check))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(n) for c, n in zip(r, widths, strict=True)).rstrip())
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from ..catalogue import describe, weights_entry

    print(describe(weights_entry(args.name)))
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from ..weights import fetch_released

    path = fetch_released(args.name, cache_dir=args.cache_dir, progress=not args.no_progress)
    print(path)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from ..weights import convert_released

    out = convert_released(args.file, args.weights, args.out)
    print(f"wrote {out} ({args.weights}: loads with --weights {args.weights} --weights-file {out})")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="released weights by name: list, show, fetch")
    group = p.add_subparsers(dest="weights_command", required=True)
    q = group.add_parser("list", help="the catalogue, or the names matching PATTERN ('fcn*')")
    q.add_argument("pattern", nargs="?", default="*")
    q.set_defaults(func=_cmd_list)
    q = group.add_parser("show", help="everything known about NAME: url, hash, classes, preprocessing, figures")
    q.add_argument("name")
    q.set_defaults(func=_cmd_show)
    q = group.add_parser("fetch", help="download and verify NAME into the cache; prints the file's path")
    q.add_argument("name")
    q.add_argument("--cache-dir", default=None, help="default $DENSEPRED_CACHE or ~/.cache/densepred/weights")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=_cmd_fetch)
    q = group.add_parser("convert", help="a released file (e.g. a .caffemodel) -> .safetensors with its metadata")
    q.add_argument("file", help="the file as released (.caffemodel, .pth, ...)")
    q.add_argument("--weights", required=True, metavar="NAME", help="its catalogue entry, e.g. fcn8s.voc_caffe")
    q.add_argument("--out", required=True, help="the .safetensors file to write")
    q.set_defaults(func=_cmd_convert)
