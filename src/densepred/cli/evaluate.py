"""``densepred eval``: score a checkpoint on a dataset split (metrics JSON, per-class table, plots)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import add_int8_options, add_model_source, int8_requested, load_source

__all__ = ["add_commands"]


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..build import build_dataset
    from ..config import apply_overrides, experiment_from_dict
    from ..distributed import resolve_device
    from ..evaluation import evaluate
    from ..metrics import ConfusionMatrix
    from ..plots import plot_confusion_matrix, plot_per_class_iou

    device = resolve_device(args.device)
    int8 = int8_requested(args, data_named=True)  # --weights needs --data (next line)
    if args.weights and not args.data:  # before any download: the weights carry no recipe
        raise ValueError(f"--weights {args.weights} needs --data DATASET (e.g. voc) and --root")
    trained = load_source(args, device)
    if args.weights:  # the data is named on the command line
        if not isinstance(trained.normalization, str):
            raise ValueError(f"{args.weights}: its preprocessing has no data.normalization name; use the Python API")
        trained.experiment.data.dataset = args.data
    exp = experiment_from_dict(apply_overrides(trained.experiment.to_dict(), args.overrides))
    if args.root:
        exp.data.root = args.root
    dataset = build_dataset(exp, args.split or exp.data.val_split, train=False)
    source = args.weights or args.checkpoint
    if dataset.num_classes != trained.num_classes:
        raise ValueError(f"{source} predicts {trained.num_classes} classes but the dataset has {dataset.num_classes}")
    cm = ConfusionMatrix(trained.num_classes, ignore_index=dataset.ignore_index, device=device)
    if int8:  # opt-in: it fails the argmax-parity rule that the automatic backends meet
        from ..quantize import int8_model

        model, exp.eval = int8_model(
            trained, args.int8, exp.eval, experiment=exp, root=args.calibration_data, calibrate=args.calibrate
        )
        print(model.describe())
    else:
        from ..backends import accelerate, probe_input
        from ..inference import forward_size

        # The backend is chosen at the size of the first image's forward passes.
        size = forward_size(trained.model, tuple(dataset[0]["image"].shape[-2:]), exp.eval) if len(dataset) else None
        example = probe_input(trained.model, trained.in_channels, device, size)
        model, backend = accelerate(trained.model, exp.eval.backend, example, exp.eval.amp)
        print(backend.describe())
    metrics = evaluate(model, dataset, exp.eval, device=device, confusion=cm)
    default_out = (
        Path("runs/eval") / args.weights if args.weights else Path(args.checkpoint).resolve().parent.parent / "eval"
    )
    out = Path(args.out or default_out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(
        json.dumps(
            {
                "checkpoint" if args.checkpoint else "weights": source,
                **({"int8": model.details} if int8 else {}),
                **metrics,
            },
            indent=2,
        )
    )
    names = trained.class_names
    plot_confusion_matrix(cm.matrix.cpu().numpy(), names, out / "confusion.png")
    plot_per_class_iou(metrics["iou"], names, trained.palette, out / "per_class_iou.png")
    print(_metrics_table(metrics, names))
    print(f"\nwrote {out / 'metrics.json'}, confusion.png, per_class_iou.png")
    return 0


def _metrics_table(metrics: dict, names: list[str]) -> str:
    lines = [f"{'class':20s} {'IoU':>7s} {'Dice':>7s} {'acc':>7s}"]
    for i, name in enumerate(names):
        lines.append(f"{name:20s} {metrics['iou'][i]:7.4f} {metrics['dice'][i]:7.4f} {metrics['acc'][i]:7.4f}")
    lines.append("")
    for key, label in (
        ("pixel_acc", "pixel accuracy"),
        ("mean_acc", "mean accuracy"),
        ("miou", "mean IoU"),
        ("fwiou", "f.w. IoU"),
        ("mean_dice", "mean Dice"),
    ):
        lines.append(f"{label:20s} {metrics[key]:7.4f}")
    return "\n".join(lines)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: metrics JSON, per-class table, plots")
    add_model_source(p)
    p.add_argument("--data", help="with --weights: the dataset (voc, cityscapes, camvid, ...)")
    p.add_argument("--split", help="dataset split (default: the recipe's validation split)")
    p.add_argument("--root", help="dataset folder, if it moved since training")
    p.add_argument("--out", help="output folder (default: <run folder>/eval)")
    p.add_argument("--device", default="auto")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. eval.mode=slide eval.tile=256")
    add_int8_options(p)
    p.set_defaults(func=_cmd_eval)
