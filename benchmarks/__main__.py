"""``python -m benchmarks``: measure, then regenerate docs/benchmarks.md from the results.

    python -m benchmarks accuracy --data-root ../shared/data   # long: trains 8 models, resumable
    python -m benchmarks speed                                  # every model, variants side by side
    python -m benchmarks system                                 # loader, trainer overhead, CRF, large image
    python -m benchmarks roofline                               # fp32 peaks, FLOPs, % of peak per model
    python -m benchmarks int8 --data-root ../shared/data        # int8 speed-up and CamVid mIoU cost
    python -m benchmarks.pipeline --data-root ../shared/data    # predict's stages against the forward
    python -m benchmarks.train_layout                           # CPU recipes' step, channels-first / -last
    python -m benchmarks report                                 # docs/benchmarks.md from the results
    python -m benchmarks all --data-root ../shared/data         # all of the above, in that order

Results live in ``--out`` (default runs/bench) as JSON, written as each measurement finishes;
rerunning skips what is already there (``--force`` remeasures).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["accuracy", "speed", "system", "roofline", "int8", "report", "all"])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--minutes", type=float, default=None, help="training budget per accuracy run")
    parser.add_argument("--only", default=None, help="comma-separated run or model names")
    parser.add_argument("--force", action="store_true", help="remeasure results that exist")
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--checkpoint", type=Path, default=None, help="int8: the trained model (default: LR-ASPP's)")
    args = parser.parse_args()
    only = args.only.split(",") if args.only else None
    if args.what in ("accuracy", "all"):
        from .accuracy import run_all

        run_all(args.data_root, args.out, args.minutes, only)
    if args.what in ("speed", "all"):
        from .speed import run_speed

        run_speed(args.out / "speed.json", only=only, force=args.force)
    if args.what in ("system", "all"):
        from .system import run_system

        run_system(args.out / "system.json", args.data_root, force=args.force)
    if args.what == "roofline":
        from .roofline import run_roofline, table

        print(table(run_roofline(args.out / "roofline.json", only)))
    if args.what == "int8":
        from .int8 import DEFAULT_CHECKPOINT, run_int8

        run_int8(
            args.data_root, args.out / "int8.json", checkpoint=args.checkpoint or DEFAULT_CHECKPOINT, force=args.force
        )
    if args.what in ("report", "all"):
        from .report import write_report

        write_report(args.out, args.doc)


if __name__ == "__main__":
    main()
