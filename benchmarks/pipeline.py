"""Where an image's time goes from file to mask: per-stage seconds of ``densepred predict``'s
path, for each inference mode.

    python -m benchmarks.pipeline [--model deeplab_v1_largefov] [--side 500] [--repeats 3]

Stages, as :func:`densepred.prediction.predict_files` runs them for one image: decode the file
(``read_image``), normalise to a tensor, the network (``predict_logits`` with the mode's
options: whole, sliding window, multi-scale + flip), softmax, the CRF (where the mode has it),
argmax, and writing the index PNG and the overlay. A model with random weights of the given
family does the same work as a trained one. Each stage: the median of ``--repeats`` runs after
a warm-up; the last column is the network's share of the total.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from densepred.config import EvalConfig
from densepred.crf import crf_params, dense_crf_any_channels
from densepred.data.io import read_image
from densepred.data.labels import bitwise_palette
from densepred.data.normalization import IMAGENET
from densepred.inference import predict_logits
from densepred.precision import machine_info
from densepred.prediction import overlay, save_index_png
from densepred.registry import create_model

MODES: dict[str, EvalConfig] = {
    "whole": EvalConfig(),
    "slide 321": EvalConfig(mode="slide", tile=321),
    "scales 0.75/1/1.25 + flip": EvalConfig(scales=[0.75, 1.0, 1.25], flip=True),
    "whole + CRF": EvalConfig(crf="deeplab_v2"),
}


def _median(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (and the value later stages use)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def profile(model: torch.nn.Module, file: Path, options: EvalConfig, out: Path, repeats: int) -> dict[str, float]:
    palette = bitwise_palette(model.num_classes)
    stages: dict[str, float] = {}
    stages["decode"], image = _median(lambda: read_image(file, channels=3), repeats)
    stages["normalise"], x = _median(lambda: IMAGENET(image)[None], repeats)
    with torch.inference_mode():
        stages["network"], logits = _median(lambda: predict_logits(model, x, options), repeats)
        stages["softmax"], probs = _median(lambda: torch.softmax(logits, 1)[0].numpy(), repeats)
    if options.crf:
        params = crf_params(options.crf, options.crf_params)
        stages["CRF"], probs = _median(lambda: dense_crf_any_channels(image, probs, params), repeats)
    stages["argmax"], labels = _median(lambda: probs.argmax(0).astype(np.uint8), repeats)
    stages["write PNGs"], _ = _median(
        lambda: (
            save_index_png(labels, palette, out / "mask.png"),
            Image.fromarray(overlay(image, labels, palette)).save(out / "overlay.png"),
        ),
        repeats,
    )
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deeplab_v1_largefov")
    parser.add_argument("--side", type=int, default=500, help="the test image's side (a JPEG photo-like image)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = create_model(args.model, num_classes=21).eval()
    m = machine_info()
    print(f"Machine: {m.cpu}, {m.capability}, {m.threads} threads, torch {m.torch}. {args.model}, eager fp32.")
    print(f"One {args.side}x{args.side} JPEG, seconds per stage (median of {args.repeats}).\n")
    rng = np.random.default_rng(0)
    # Smooth colour regions with noise: decodes and compresses like a photo, not like white noise.
    coarse = rng.integers(0, 256, (args.side // 20 + 1, args.side // 20 + 1, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((args.side, args.side), Image.BILINEAR), dtype=np.int16)
    photo = np.clip(base + rng.integers(-12, 13, base.shape), 0, 255).astype(np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        file = out / "photo.jpg"
        Image.fromarray(photo).save(file, quality=90)
        rows = {name: profile(model, file, options, out, args.repeats) for name, options in MODES.items()}
    names = list(dict.fromkeys(k for r in rows.values() for k in r))
    print("| mode | " + " | ".join(names) + " | total | network share |")
    print("|---|" + "---|" * (len(names) + 2))
    for mode, r in rows.items():
        total = sum(r.values())
        cells = [f"{r[k]:.3f}" if k in r else "-" for k in names]
        print(f"| {mode} | " + " | ".join(cells) + f" | {total:.3f} | {100 * r['network'] / total:.0f}% |")


if __name__ == "__main__":
    main()
