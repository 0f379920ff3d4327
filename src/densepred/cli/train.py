"""``densepred models | configs | train | demo``: the model zoo, the recipes, training."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_commands", "run_summary"]


def _cmd_models(args: argparse.Namespace) -> int:
    from ..zoo import model_table

    print(model_table(args.pattern, num_classes=args.num_classes, in_channels=args.in_channels))
    return 0


def _cmd_configs(args: argparse.Namespace) -> int:
    import yaml

    from ..config import CONFIG_DIR

    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        notes = (yaml.safe_load(path.read_text()) or {}).get("notes", "")
        print(f"{path.stem:32s} {notes}")
    return 0


def run_summary(result) -> str:
    """Iterations, time, precision and the machine: a figure holds for the CPU it was taken on."""
    from ..precision import cpu_name

    r = result.resolved
    fit = r.get("budget_fit")
    cut = fit and fit["iterations"] < fit["requested"]
    fitted = f" (of {fit['requested']}, fitted to train.max_minutes={fit['budget_minutes']})" if cut else ""
    m = r.get("machine", {})
    return (
        f"trained {result.iterations} iterations{fitted} in {result.train_seconds:.0f} s, precision "
        f"{r.get('amp', '?')}, on {cpu_name(m) if 'cpu' in m else '?'}, {m.get('capability', '?')}, "
        f"{'native' if m.get('native_bf16') else 'no native'} bf16, {m.get('threads', '?')} threads"
    )


def _cmd_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from ..config import load_experiment, resolve_config
    from ..trainer import train

    exp = load_experiment(resolve_config(args.config), args.overrides)
    run_dir = Path(args.run_dir or Path("runs") / exp.name)
    result = train(exp, run_dir, resume=args.resume, progress=not args.no_progress)
    if dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return 0
    print(f"run folder: {run_dir}\n{run_summary(result)}")
    if result.metrics:
        print(f"validation: mIoU {result.metrics['miou']:.4f}  pixel acc {result.metrics['pixel_acc']:.4f}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """The main job: train the default recipe on the built-in synthetic data and evaluate it."""
    from ..config import load_experiment, resolve_config
    from ..prediction import predict_dataset_figures
    from ..trainer import train

    exp = load_experiment(resolve_config("synthetic_unet"), args.overrides)
    run_dir = Path(args.run_dir)
    print(f"densepred demo: {exp.notes}\nrun folder: {run_dir}")
    result = train(exp, run_dir, resume=args.resume, progress=not args.no_progress)
    m = result.metrics
    print(f"\n{run_summary(result)}")
    print(f"synthetic val: mIoU {m['miou']:.4f}, pixel acc {m['pixel_acc']:.4f}, mean acc {m['mean_acc']:.4f}")
    predict_dataset_figures(run_dir)
    print(f"outputs: {run_dir}/ (checkpoints/, log.jsonl, curves.png, metrics.json)")
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue from the run folder's newest good checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to log.jsonl)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.01")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models with parameters, output stride, receptive field")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'fcn*'")
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--in-channels", type=int, default=3)
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("configs", help="list the shipped training recipes")
    p.set_defaults(func=_cmd_configs)

    p = sub.add_parser("train", help="train a recipe (works the same under torchrun)")
    p.add_argument("--config", required=True, help="a recipe file or a shipped recipe name (see `densepred configs`)")
    p.add_argument("--run-dir", help="output folder (default runs/<recipe name>)")
    _add_run_options(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="the main job: train and evaluate on the built-in synthetic data")
    p.add_argument("--run-dir", default="runs/demo")
    _add_run_options(p)
    p.set_defaults(func=_cmd_demo)
