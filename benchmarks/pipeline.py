"""Where an image's time goes from file to mask, and what ``densepred predict`` costs beyond
the network.

    python -m benchmarks.pipeline [--model lraspp_mobilenet_v3_large,deeplab_v1_largefov]
                                  [--checkpoint CKPT] [--data-root ../shared/data] [--repeats 5]
                                  [--frames 10]

The frame is CamVid's first val image (360x480) when ``--data-root`` holds CamVid, else a
photo-like synthetic 360x480 PNG. A model with random weights does the same work as a trained
one (``--checkpoint`` uses a trained one). Every model runs through :class:`Predictor`, so on
the inference backend ``predict`` would choose.

1. Per stage, for each inference mode: decode (``read_image``), normalise, the network
   (``predict_logits`` with the mode's options), softmax (only where the CRF needs it), the
   CRF, argmax, and writing the index PNG and the overlay (``--overlay``: JPEG, as ``predict``
   writes by default, or PNG). Each the median of ``--repeats`` after a warm-up.
2. ``predict`` end to end (``predict_files`` on the frame: read, network, argmax, both files),
   against the forward pass alone on the same normalised tensor: the ratio is what the
   pipeline adds to the network (target <= 1.15). Then ``predict`` on a folder of ``--frames``
   consecutive frames, per frame, with as many frames at once as ``predict`` measures best
   (``--streams`` sets it). The forward and both predicts take turns, round by round, as
   do a sliding window's tile and the whole slide: each ratio compares runs made side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from densepred.allocator import retain_freed_memory
from densepred.backends import torch_beside
from densepred.build import normalization_for
from densepred.checkpoint import Trained, load_trained
from densepred.config import EvalConfig, Experiment
from densepred.crf import crf_params, dense_crf_any_channels
from densepred.data.io import PNG_DECODER, read_image
from densepred.data.labels import IGNORE_INDEX, bitwise_palette
from densepred.inference import predict_logits, tile_starts
from densepred.metrics import class_map
from densepred.precision import MachineInfo, machine_info
from densepred.prediction import OVERLAY_FORMATS, Predictor, image_size_of, predict_files, save_index_png, save_overlay
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


def _interleaved(fns: list[Callable[[], object]], repeats: int, settle: frozenset[int] = frozenset()) -> list[float]:
    """Each function's median seconds over ``repeats`` rounds that call them in turn, after a warm-up.

    The functions at the indices in ``settle`` are called once untimed before each timed call: a
    runtime's forward timed straight after another thread pool's work (torch's argmax, OpenCV's
    colour conversions) shares the cores with that pool's spinning workers, ~3 ms on LR-ASPP.
    """
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for k, (fn, kept) in enumerate(zip(fns, times, strict=True)):
            if k in settle:
                fn()
            start = time.perf_counter()
            fn()
            kept.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def random_trained(name: str, classes: int = 11) -> Trained:
    """A randomly initialised ``name`` as a :class:`Trained`, with ImageNet normalisation."""
    experiment = Experiment(name=name)
    experiment.model.name = name
    model = create_model(name, num_classes=classes, in_channels=3).eval()
    names = [f"class{c}" for c in range(classes)]
    return Trained(model, experiment, classes, names, bitwise_palette(classes), 3, IGNORE_INDEX, "imagenet", 0)


def _file_writer(
    trained: Trained, image: np.ndarray, labels: np.ndarray, out: Path, overlay: str
) -> Callable[[], None]:
    """Writes the files predict writes for a frame: the index PNG and the ``overlay`` ("jpg",
    "png" or "none"), to new files each call (see end_to_end)."""
    folder, names = Path(tempfile.mkdtemp(dir=out)), itertools.count()

    def write() -> None:
        k = next(names)
        save_index_png(labels, trained.palette, folder / f"mask{k}.png")
        if overlay != "none":
            save_overlay(image, labels, trained.palette, folder / f"overlay{k}.{overlay}")

    return write


def stages(
    predictor: Predictor, file: Path, options: EvalConfig, out: Path, repeats: int, overlay: str
) -> dict[str, float]:
    """Seconds per stage of one image through ``predictor`` with inference ``options``."""
    trained = predictor.trained
    norm = normalization_for(trained.normalization, trained.in_channels)
    row: dict[str, float] = {}
    row["decode"], image = _median(lambda: read_image(file, channels=3), repeats)
    row["normalise"], x = _median(lambda: norm(image)[None], repeats)
    with torch.inference_mode():
        row["network"], logits = _median(lambda: predict_logits(predictor.model, x, options), repeats)
        if options.crf:
            params = crf_params(options.crf, options.crf_params)
            row["softmax"], probs = _median(lambda: torch.softmax(logits, 1)[0].numpy(), repeats)
            row["CRF"], refined = _median(lambda: dense_crf_any_channels(image, probs, params), repeats)
            row["argmax"], labels = _median(lambda: refined.argmax(0).astype(np.uint8), repeats)
        else:
            row["argmax"], labels = _median(lambda: class_map(logits)[0].numpy(), repeats)
    row["write files"], _ = _median(_file_writer(trained, image, labels, out, overlay), repeats)
    return row


def end_to_end(predictor: Predictor, frames: list[Path], out: Path, repeats: int, overlay: str) -> dict[str, float]:
    """``predict_files`` on the first frame, and on all ``frames`` per frame, against the forward
    pass alone (medians, seconds), writing ``overlay`` files as ``predict --overlay`` does."""
    trained = predictor.trained
    norm = normalization_for(trained.normalization, trained.in_channels)
    decode, image = _median(lambda: read_image(frames[0], channels=trained.in_channels), repeats)
    x = norm(image)[None]
    labels = predictor.labels(image)
    encode, _ = _median(_file_writer(trained, image, labels, out, overlay), repeats)
    mask, _ = _median(_file_writer(trained, image, labels, out, "none"), repeats)
    streams = len(predictor.in_streams(len(frames)))  # measured here (once), as predict does, not in the timing
    # A fresh folder per run, as predict writes new files: rewriting a file in place makes ext4
    # flush it on close (auto_da_alloc), ~30 ms a file here, which a first run never pays.
    folders = (out / f"run{k}" for k in itertools.count())

    def run(names: list[str]) -> object:
        return predict_files(predictor, names, next(folders), progress=False, overlay=overlay)

    def forward_alone() -> object:
        with torch.inference_mode():
            return predictor.model(x)

    # The forward and both predicts in turns: the ratios compare runs made side by side. The forward
    # alone is timed settled, at its best: after a predict's last steps it ran 30.2 ms against 27.8.
    forward, total, folder = _interleaved(
        [forward_alone, lambda: run([str(frames[0])]), lambda: run([str(f) for f in frames])],
        repeats,
        settle=frozenset({0}),
    )
    per_frame = folder / len(frames)
    return {
        "forward": forward,
        # Reading the file and writing its mask and overlay, which no backend speeds up: over 15% of the
        # forward, predict cannot come within 1.15x of it on one frame. Reading it and writing the
        # mask alone is the floor of any predict.
        "file_io": decode + encode,
        "read_and_mask": decode + mask,
        "predict": total,
        "ratio": total / forward,
        "frames": len(frames),
        "streams": streams,
        "predict_per_frame": per_frame,
        "ratio_per_frame": per_frame / forward,
    }


def slide_cost(predictor: Predictor, file: Path, tile: int, repeats: int) -> dict[str, float]:
    """Sliding-window inference against its covered area: seconds of the whole slide over the
    tiles' count times one tile's forward pass (1.0: the windows cost exactly their area)."""
    trained = predictor.trained
    norm = normalization_for(trained.normalization, trained.in_channels)
    x = norm(read_image(file, channels=trained.in_channels))[None]
    h, w = x.shape[-2:]
    th, tw = min(tile, h), min(tile, w)
    options = EvalConfig(mode="slide", tile=tile)
    count = len(tile_starts(h, th, math.ceil(th * (1 - options.overlap)))) * len(
        tile_starts(w, tw, math.ceil(tw * (1 - options.overlap)))
    )
    with torch.inference_mode(), torch_beside(predictor.model):  # as predict_logits runs the model
        # In turns, so that a change in the machine's speed between them (a noisy neighbour)
        # moves both: the ratio compares a tile and the slide measured side by side.
        one, slide = _interleaved(
            [lambda: predictor.model(x[:, :, :th, :tw]), lambda: predict_logits(predictor.model, x, options)],
            repeats,
        )
    return {"tiles": count, "tile_forward": one, "slide": slide, "ratio": slide / (count * one)}


def camvid_frames(data_root: Path | None, folder: Path, count: int) -> tuple[list[Path], str]:
    """CamVid's first ``count`` val frames (one sequence), or as many photo-like synthetic
    360x480 PNGs written to ``folder``."""
    if data_root is not None:
        frames = sorted((data_root / "camvid" / "val").glob("*.png"))[:count]
        if frames:
            return frames, f"CamVid val {frames[0].name} (and the next {len(frames) - 1} for the folder)"
    rng = np.random.default_rng(0)
    files = []
    for k in range(count):
        # Smooth colour regions with noise: decodes and compresses like a photo, not like white noise.
        coarse = rng.integers(0, 256, (19, 25, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((480, 360), Image.BILINEAR), dtype=np.int16)
        photo = np.clip(base + rng.integers(-12, 13, base.shape), 0, 255).astype(np.uint8)
        files.append(folder / f"frame{k:02d}.png")
        Image.fromarray(photo).save(files[-1])
    return files, "synthetic 360x480 PNGs (no CamVid under --data-root)"


def _at_once(row: dict) -> str:
    """How many frames predict segmented at once (results before streams lack it: one)."""
    streams = row.get("streams", 1)
    return f", {streams} at once" if streams > 1 else ""


def table(results: dict) -> str:
    """The benchmark's tables in Markdown, from its results."""
    # Results from before predict wrote JPEG overlays by default hold no "overlay": theirs were PNGs.
    written = {"jpg": "mask PNG + overlay JPEG", "png": "both PNGs", "none": "mask PNG"}[results.get("overlay", "png")]
    decoder = results.get("png_decoder", "OpenCV")
    settled = (
        " timed after an untimed call of its own"
        if results.get("forward_settled")
        else " timed straight after a predict (before 2026-12-07)"
    )
    lines = [
        f"Machine: {MachineInfo(**results['machine']).line()}. Frame: {results['frame']}, PNG decoded by {decoder}. "
        f"Seconds, median of {results['repeats']} after a warm-up; the backend is the one `predict` chose; "
        f"the forward alone{settled}.",
        "",
        f"| model | backend | forward alone | file I/O alone: reading + {written} (% of forward; reading + mask PNG) "
        f"| predict, one frame (file to {written}) "
        "| ratio | predict, per frame of a folder | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    models = results["models"]
    for name, r in models.items():
        folder = (
            f"{r['predict_per_frame']:.3f} ({r['frames']} frames{_at_once(r)}) | {r['ratio_per_frame']:.3f}x"
            if "frames" in r
            else "- | -"
        )
        # Reading the frame and writing its mask: what no predict can do without (older results lack it).
        floor = f"; reading + mask {100 * r['read_and_mask'] / r['forward']:.0f}%" if "read_and_mask" in r else ""
        io = f"{r['file_io']:.3f} ({100 * r['file_io'] / r['forward']:.0f}%{floor})" if "file_io" in r else "-"
        run = f"{r['predict']:.3f} | {r['ratio']:.3f}x"
        lines.append(f"| {name} | {r['backend']} | {r['forward']:.3f} | {io} | {run} | {folder} |")
    per = results.get("tiles_per_forward", 1)
    lines += [
        "",
        f"Sliding windows of 321, {per} tile{'s' * (per > 1)} per forward pass, against their area (the slide "
        "over tiles x one tile's forward):",
        "",
    ]
    lines += ["| model | tiles | one tile | slide | ratio |", "|---|---|---|---|---|"]
    for name, r in models.items():
        c = r["slide"]
        lines.append(f"| {name} | {c['tiles']} | {c['tile_forward']:.3f} | {c['slide']:.3f} | {c['ratio']:.2f} |")
    for name, r in models.items():
        if "modes" not in r:
            continue
        cols = list(dict.fromkeys(k for stage in r["modes"].values() for k in stage))
        lines += ["", f"{name}, per stage:", "", "| mode | " + " | ".join(cols) + " | total | network share |"]
        lines.append("|---|" + "---|" * (len(cols) + 2))
        for mode, stage in r["modes"].items():
            total = sum(stage.values())
            cells = [f"{stage[k]:.3f}" if k in stage else "-" for k in cols]
            share = 100 * stage["network"] / total
            lines.append(f"| {mode} | " + " | ".join(cells) + f" | {total:.3f} | {share:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lraspp_mobilenet_v3_large,deeplab_v1_largefov,unet_padded")
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint instead of random weights")
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--frames", type=int, default=10, help="frames in the folder that predict reads in one run")
    parser.add_argument("--backend", default="auto", help="eval.backend: auto (what predict uses) or one backend")
    parser.add_argument("--amp", default="auto", help="eval.amp: auto (what predict uses), none, bf16")
    parser.add_argument("--streams", type=int, help="eval.streams: frames at once (default: measured, as predict)")
    parser.add_argument("--modes", action="store_true", help="also the per-stage table of every inference mode")
    parser.add_argument("--overlay", choices=OVERLAY_FORMATS, default="jpg", help="as predict --overlay")
    parser.add_argument("--json", type=Path, default=Path("runs/bench/pipeline.json"))
    args = parser.parse_args()
    retain_freed_memory()  # as `densepred predict` runs
    results: dict = {"machine": dataclasses.asdict(machine_info()), "repeats": args.repeats, "overlay": args.overlay}
    # How this build reads PNGs and batches tiles, and that the forward alone is timed settled: older
    # results lack these keys (OpenCV, one tile per forward, a forward timed after a predict's last steps).
    results["png_decoder"] = PNG_DECODER
    results["tiles_per_forward"] = EvalConfig().batch_size
    results["forward_settled"] = True
    results["models"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        frames, what = camvid_frames(args.data_root if args.data_root.is_dir() else None, out, args.frames)
        frame = frames[0]
        sources = [args.checkpoint] if args.checkpoint else args.model.split(",")
        results["frame"] = what
        for source in sources:
            trained = load_trained(source) if isinstance(source, Path) else random_trained(source)
            options = EvalConfig(backend=args.backend, amp=args.amp, streams=args.streams)
            predictor = Predictor(trained, options=options, image_size=image_size_of(frame))  # as predict does
            timings = end_to_end(predictor, frames, out, args.repeats, args.overlay)
            row = {"backend": predictor.backend.backend, **timings}
            row["slide"] = slide_cost(predictor, frame, 321, args.repeats)
            if args.modes:
                row["modes"] = {
                    name: stages(predictor, frame, o, out, args.repeats, args.overlay) for name, o in MODES.items()
                }
            results["models"][trained.experiment.model.name] = row
            print(
                f"{trained.experiment.model.name}: predict / forward {row['ratio']:.3f} (one frame), "
                f"{row['ratio_per_frame']:.3f} (per frame of {row['frames']})",
                flush=True,
            )
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
