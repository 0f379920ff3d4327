"""``densepred predict``: segment image files, folders or globs into masks, overlays, probabilities."""

from __future__ import annotations

import argparse
import sys

from ..prediction import OVERLAY_FORMATS
from .options import (
    add_inference_options,
    add_int8_options,
    add_model_source,
    inference_options,
    int8_requested,
    load_source,
)

__all__ = ["add_commands"]


def _cmd_predict(args: argparse.Namespace) -> int:
    from ..distributed import resolve_device
    from ..prediction import Predictor, collect_inputs, image_size_of, predict_files
    from ..streams import stream_share

    device = resolve_device(args.device)
    int8 = int8_requested(args)
    trained = load_source(args, device)
    options = inference_options(args, None if args.weights else trained.experiment.eval)
    if int8:  # opt-in: it fails the argmax-parity rule that the automatic backends meet
        import dataclasses

        from ..quantize import int8_model

        model, options = int8_model(trained, args.int8, options, root=args.calibration_data, calibrate=args.calibrate)
        trained = dataclasses.replace(trained, model=model)
    inputs = collect_inputs(args.inputs)
    # The backend is chosen at the size of the first image's forward passes.
    predictor = Predictor(trained, device, options, image_size=image_size_of(inputs[0]))
    print(model.describe() if int8 else predictor.backend.describe())
    streams = len(predictor.in_streams(len(inputs)))
    if streams > 1:
        share = stream_share(streams)
        print(f"{streams} frames at once, {share} thread{'s' * (share > 1)} each")
    written, failed = predict_files(
        predictor,
        inputs,
        args.out,
        probabilities=args.probs,
        progress=not args.no_progress,
        fail_fast=args.fail_fast,
        overlay=args.overlay,
    )
    overlays = {"jpg": ["JPEG overlays"], "png": ["PNG overlays"], "none": []}[args.overlay]
    extras = overlays + ["probability maps"] * args.probs
    also = f" (+ {' and '.join(extras)})" if extras else ""
    print(f"wrote {len(written)} masks{also} to {args.out}")
    for path, reason in failed:  # the reader's errors name the file; others get it in front
        named = reason if str(path) in reason else f"{path}: {reason}"
        print(f"densepred predict: error: {named}", file=sys.stderr)
    if failed:
        print(f"densepred predict: {len(failed)} of {len(failed) + len(written)} inputs failed", file=sys.stderr)
        return 2
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="segment image files, folders or globs: masks, overlays, probabilities")
    add_model_source(p)
    p.add_argument("inputs", nargs="+", help="image files, folders, or glob patterns ('photos/*.jpg')")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--probs", action="store_true", help="also write one probability map per class")
    p.add_argument(
        "--overlay",
        choices=OVERLAY_FORMATS,
        default="jpg",
        help="NAME_overlay.jpg (default: 1 ms a frame), .png (lossless, 4-10 ms), or none; the mask is always a PNG",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first input that cannot be read")
    add_inference_options(p)
    add_int8_options(p)
    p.set_defaults(func=_cmd_predict)
