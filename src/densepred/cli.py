"""The ``densepred`` command line: a thin layer over the library API."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


def _cmd_models(args: argparse.Namespace) -> int:
    from .zoo import model_table

    print(model_table(args.pattern, num_classes=args.num_classes, in_channels=args.in_channels))
    return 0


def _cmd_configs(args: argparse.Namespace) -> int:
    import yaml

    from .runtime import CONFIG_DIR

    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        notes = (yaml.safe_load(path.read_text()) or {}).get("notes", "")
        print(f"{path.stem:32s} {notes}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_experiment
    from .runtime import resolve_config
    from .train import train

    exp = load_experiment(resolve_config(args.config), args.overrides)
    run_dir = Path(args.run_dir or Path("runs") / exp.name)
    result = train(exp, run_dir, resume=args.resume, progress=not args.no_progress)
    import torch.distributed as dist

    if dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return 0
    print(f"run folder: {run_dir}\n{_run_summary(result)}")
    if result.metrics:
        print(f"validation: mIoU {result.metrics['miou']:.4f}  pixel acc {result.metrics['pixel_acc']:.4f}")
    return 0


def _run_summary(result) -> str:
    """Iterations, time, precision and the machine: a figure holds for the CPU it was taken on."""
    r = result.resolved
    fit = r.get("budget_fit")
    fitted = f" (of {fit['requested']}, fitted to train.max_minutes={fit['budget_minutes']})" if fit else ""
    m = r.get("machine", {})
    return (
        f"trained {result.iterations} iterations{fitted} in {result.train_seconds:.0f} s, precision "
        f"{r.get('amp', '?')}, on {m.get('cpu', '?')} ({m.get('capability', '?')}, "
        f"{'native' if m.get('native_bf16') else 'no native'} bf16, {m.get('threads', '?')} threads)"
    )


def _cmd_eval(args: argparse.Namespace) -> int:
    from .config import apply_overrides, experiment_from_dict
    from .evaluate import evaluate
    from .metrics import ConfusionMatrix
    from .plots import plot_confusion_matrix, plot_per_class_iou
    from .runtime import build_dataset, load_trained, resolve_device

    device = resolve_device(args.device)
    trained = load_trained(args.checkpoint, device)
    exp = experiment_from_dict(apply_overrides(trained.experiment.to_dict(), args.overrides))
    if args.root:
        exp.data.root = args.root
    dataset = build_dataset(exp, args.split or exp.data.val_split, train=False)
    if dataset.num_classes != trained.num_classes:
        raise ValueError(
            f"{args.checkpoint} predicts {trained.num_classes} classes but the dataset has {dataset.num_classes}"
        )
    cm = ConfusionMatrix(trained.num_classes, ignore_index=dataset.ignore_index, device=device)
    metrics = evaluate(trained.model, dataset, exp.eval, device=device, confusion=cm)
    out = Path(args.out or Path(args.checkpoint).resolve().parent.parent / "eval")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"checkpoint": str(args.checkpoint), **metrics}, indent=2))
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


def _cmd_demo(args: argparse.Namespace) -> int:
    """The main job: train the default recipe on the built-in synthetic data and evaluate it."""
    from .config import load_experiment
    from .runtime import resolve_config
    from .train import train

    exp = load_experiment(resolve_config("synthetic_unet"), args.overrides)
    run_dir = Path(args.run_dir)
    print(f"densepred demo: {exp.notes}\nrun folder: {run_dir}")
    result = train(exp, run_dir, resume=args.resume, progress=not args.no_progress)
    m = result.metrics
    print(f"\n{_run_summary(result)}")
    print(f"synthetic val: mIoU {m['miou']:.4f}, pixel acc {m['pixel_acc']:.4f}, mean acc {m['mean_acc']:.4f}")
    try:
        from .predict import predict_dataset_figures

        predict_dataset_figures(run_dir)
    except ImportError:  # prediction figures arrive with the inference module
        pass
    print(f"outputs: {run_dir}/ (checkpoints/, log.jsonl, curves.png, metrics.json)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .config import EvalConfig
    from .predict import Predictor, predict_files
    from .runtime import resolve_device

    device = resolve_device(args.device)
    cfg = EvalConfig(
        mode=args.mode,
        tile=args.tile,
        overlap=args.overlap,
        blend=args.blend,
        scales=args.scales,
        flip=args.flip,
        fusion=args.fusion,
        batch_size=args.batch_size,
        crf=args.crf,
        crf_params=dict(_key_value(item) for item in args.crf_param),
    )
    cfg.validate()
    predictor = Predictor.from_checkpoint(args.checkpoint, str(device), cfg)
    written = predict_files(predictor, args.inputs, args.out, probabilities=args.probs, progress=not args.no_progress)
    print(f"wrote {len(written)} masks (+ overlays{' and probability maps' if args.probs else ''}) to {args.out}")
    return 0


def _key_value(item: str) -> tuple[str, float]:
    key, sep, value = item.partition("=")
    try:
        return key, float(value)
    except ValueError:
        raise ValueError(f"--crf-param {item!r} must look like name=number, e.g. w1=5") from None


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import DEFAULT_OPSET, export_checkpoint

    if args.opset is not None and args.format != "onnx":
        raise ValueError("--opset applies to --format onnx only")
    try:
        out = export_checkpoint(args.checkpoint, args.format, args.out, opset=args.opset or DEFAULT_OPSET)
    except ImportError as exc:
        print(
            f"densepred export: {exc.name} is missing; install the export extra: pip install 'densepred[export]'",
            file=sys.stderr,
        )
        return 2
    print(f"wrote {out}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .serve import create_app
    except ImportError as exc:
        print(
            f"densepred serve: {exc.name} is missing; install the web extra: pip install 'densepred[serve]'",
            file=sys.stderr,
        )
        return 2
    from .predict import Predictor
    from .runtime import resolve_device

    # The model is loaded once, before the server starts, and shared by every request.
    predictor = Predictor.from_checkpoint(args.checkpoint, str(resolve_device(args.device)))
    app = create_app(
        predictor,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_concurrency=args.concurrency,
        queue_size=args.queue,
    )
    print(f"densepred serve: {args.checkpoint} on http://{args.host}:{args.port}/ (API docs at /docs)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue from the run folder's newest good checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to log.jsonl)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.01")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densepred", description="Semantic segmentation: FCN, DeepLab, U-Net.")
    sub = parser.add_subparsers(dest="command", required=True)

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

    p = sub.add_parser("eval", help="evaluate a checkpoint: metrics JSON, per-class table, plots")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", help="dataset split (default: the recipe's validation split)")
    p.add_argument("--root", help="dataset folder, if it moved since training")
    p.add_argument("--out", help="output folder (default: <run folder>/eval)")
    p.add_argument("--device", default="auto")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. eval.mode=slide eval.tile=256")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="segment image files, folders or globs: masks, overlays, probabilities")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("inputs", nargs="+", help="image files, folders, or glob patterns ('photos/*.jpg')")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--probs", action="store_true", help="also write one probability map per class")
    p.add_argument("--mode", choices=["whole", "slide", "overlap_tile"], default="whole")
    p.add_argument("--tile", type=int, help="tile size for slide / overlap_tile")
    p.add_argument("--overlap", type=float, default=1 / 3, help="sliding-window overlap fraction")
    p.add_argument("--blend", choices=["uniform", "gaussian"], default="uniform")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="multi-scale inputs, e.g. 0.75 1 1.25")
    p.add_argument("--flip", action="store_true", help="add horizontally mirrored inputs")
    p.add_argument("--fusion", choices=["mean", "max"], default="mean")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass")
    p.add_argument("--crf", choices=["deeplab_v2", "deeplab_v1_largefov"], help="fully-connected CRF preset")
    p.add_argument(
        "--crf-param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a CRF parameter (w1, theta_alpha, theta_beta, w2, theta_gamma, iterations)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "export",
        help="export a checkpoint: ONNX or TorchScript (any input size, preprocessing in the file) or weights",
    )
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (run/checkpoints/*.pt)")
    p.add_argument("--format", choices=["onnx", "torchscript", "safetensors"], default="safetensors")
    p.add_argument(
        "--out", help="output file (default: next to the checkpoint, .onnx / .torchscript.pt / .safetensors)"
    )
    p.add_argument("--opset", type=int, help="ONNX opset, 11..20 (default 17)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("serve", help="a web page and HTTP API that segment uploaded images (needs [serve])")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload, in MiB")
    p.add_argument("--max-pixels", type=int, default=25_000_000, help="largest accepted image, width x height")
    p.add_argument("--concurrency", type=int, default=2, help="inferences run at once")
    p.add_argument("--queue", type=int, default=16, help="requests that may wait; more get 503")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("demo", help="the main job: train and evaluate on the built-in synthetic data")
    p.add_argument("--run-dir", default="runs/demo")
    _add_run_options(p)
    p.set_defaults(func=_cmd_demo)

    from .data.cli import add_data_commands
    from .visualize import add_visual_commands

    add_data_commands(sub)
    add_visual_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError, WriteError
    from .data.errors import DownloadError
    from .download import TransferError
    from .train import DataLoaderWorkerError, NonFiniteLossError

    # Errors that explain themselves (what failed, the file or option, how to resume) print as
    # one message; anything else keeps its traceback.
    expected = (ValueError, FileNotFoundError, CheckpointError, WriteError, DownloadError, TransferError)
    try:
        return int(args.func(args) or 0)
    except (*expected, NonFiniteLossError, DataLoaderWorkerError) as exc:
        print(f"densepred {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:  # not about a file of the user's: keep the traceback
            raise
        print(f"densepred {args.command}: error: {exc}", file=sys.stderr)  # e.g. a full disk, naming the file
        return 2
    except KeyboardInterrupt:
        print(f"densepred {args.command}: interrupted", file=sys.stderr)
        return 130
