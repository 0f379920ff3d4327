"""Fully-connected CRF speed and agreement: densepred.crf vs pydensecrf, one thread.

    python benchmarks/crf_speed.py [--image PHOTO] [--bilateral-kernel {auto,lattice}] [--rounds N]
                                   [--save runs/bench/crf.json]

500x375 RGB image, 21 noisy classes, DeepLab v2 preset (10 iterations). The image is synthetic
(discs of noisy colour) unless ``--image`` names a photo, which is resized to 500x375; its
"classes" are then its 21 quantised colours, with the same noisy unaries.
pydensecrf (``pip install pydensecrf2``) is a benchmark-only dependency; without it ours runs alone.

A figure is a fact about one machine, so the first line names it: CPU model, the kernels
PyTorch dispatches to (``torch.backends.cpu.get_cpu_capability()``) and the threads. On an
AVX-512 CPU, ``ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2``
approximates an AVX2 one (the first alone leaves FBGEMM's embedding_bag, most of the CRF's time,
on AVX-512). The two implementations run in alternation, ``--rounds`` times each after a
warm-up, so that load from other processes on a shared machine slows both alike; the figures
are each one's best round, wall time and, in brackets, this process's CPU time. ``--save``
writes the synthetic input's figures with the machine to a results file, which
``python -m benchmarks report`` shows in a block per vector ISA (an AVX2 and an AVX-512 one).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from densepred.crf import PRESETS, dense_crf
from densepred.precision import cpu_flags, machine_info, torch_threads

# Environment variables that cap the instruction set of PyTorch's own kernels, of FBGEMM (its
# embedding_bag, which the CRF's filters run on) and of oneDNN: all three make an AVX-512 CPU
# approximate an AVX2 one.
ISA_OVERRIDES = ("ATEN_CPU_CAPABILITY", "FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def make_input(
    h: int = 375, w: int = 500, c: int = 21, seed: int = 0, noise: float = 10.0
) -> tuple[np.ndarray, np.ndarray]:
    """Discs of ``c`` colours with Gaussian colour noise (std ``noise``), and noisy unaries that favour the discs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    labels = np.zeros((h, w), int)
    for k in range(1, c):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(h // 8, h // 3)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = k
    image = np.clip(rng.integers(0, 256, (c, 3))[labels] + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8)
    logits = 2.0 * np.eye(c)[labels].transpose(2, 0, 1) + rng.normal(0, 1.5, (c, h, w))
    return image, (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32)


def input_from_photo(path: str, c: int = 21, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    image = Image.open(path).convert("RGB").resize((500, 375), Image.BILINEAR)
    labels = np.asarray(image.quantize(colors=c), dtype=int)
    rng = np.random.default_rng(seed)
    logits = 2.0 * np.eye(c)[labels].transpose(2, 0, 1) + rng.normal(0, 1.5, (c, *labels.shape))
    return np.array(image), (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32)


def best_of(run, repeats: int = 3):
    """Result and best wall time of ``repeats`` timed runs after one untimed warm-up run."""
    result, [best], _ = best_of_alternating([run], repeats)
    return result[0], best


def best_of_alternating(runs: list, rounds: int) -> tuple[list, list[float], list[float]]:
    """Each callable's result, best wall time and best CPU time (this process's, which excludes
    time spent waiting for a core) over ``rounds`` rounds that call them in turn, after one
    untimed warm-up call each."""
    results = [run() for run in runs]
    wall, cpu = [float("inf")] * len(runs), [float("inf")] * len(runs)
    for _ in range(rounds):
        for k, run in enumerate(runs):
            start, start_cpu = time.perf_counter(), time.process_time()
            results[k] = run()
            cpu[k] = min(cpu[k], time.process_time() - start_cpu)
            wall[k] = min(wall[k], time.perf_counter() - start)
    return results, wall, cpu


def measure(rounds: int = 7) -> dict:
    """The benchmark's figures as a results entry: ours and pydensecrf in alternation on the
    synthetic input, one thread, best of ``rounds``; the kernels PyTorch ran and any overrides."""
    with torch_threads(1):
        params = PRESETS["deeplab_v2"]
        image, probs = make_input()
        runs = [lambda: dense_crf(image, probs, params)]
        reference = pydensecrf_reference(image, probs, params)
        runs += [reference] if reference is not None else []
        results, wall, _ = best_of_alternating(runs, rounds)
    entry = {
        "image": f"{image.shape[1]}x{image.shape[0]} synthetic",
        "classes": probs.shape[0],
        "iterations": params.iterations,
        "rounds": rounds,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "overrides": {k: os.environ[k] for k in ISA_OVERRIDES if k in os.environ},
        "ours_s": wall[0],
    }
    if reference is not None:
        agreement = float((results[0].argmax(0) == results[1].argmax(0)).mean())
        entry.update(pydensecrf_s=wall[1], agreement=agreement)
    return entry


def machine() -> str:
    """CPU model and whether it has AVX-512, the CPU kernels PyTorch dispatches to, any
    environment override of the kernels' instruction sets, and the threads, as one line."""
    model, flags = machine_info().cpu_name, cpu_flags() or []
    avx512 = "AVX-512" if "avx512f" in flags else "no AVX-512" if flags else "AVX-512 unknown"
    overrides = " ".join(f"{k}={os.environ[k]}" for k in ISA_OVERRIDES if k in os.environ) or "no ISA overrides"
    return (
        f"{model} ({avx512}), torch {torch.__version__} kernels {torch.backends.cpu.get_cpu_capability()}, "
        f"{overrides}, {torch.get_num_threads()} thread(s)"
    )


def pydensecrf_reference(image: np.ndarray, probs: np.ndarray, params):
    """A no-argument callable running pydensecrf on the same input, or None if it is not installed."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        return None
    c, h, w = probs.shape
    unary = np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, None)).reshape(c, -1))

    def reference() -> np.ndarray:
        crf = dcrf.DenseCRF2D(w, h, c)
        crf.setUnaryEnergy(unary)
        crf.addPairwiseGaussian(sxy=params.theta_gamma, compat=params.w2)
        crf.addPairwiseBilateral(sxy=params.theta_alpha, srgb=params.theta_beta, rgbim=image, compat=params.w1)
        return np.array(crf.inference(params.iterations)).reshape(c, h, w)

    return reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", help="a photo to use instead of the synthetic image")
    parser.add_argument(
        "--bilateral-kernel",
        choices=["auto", "lattice"],
        default="auto",
        help="dense_crf's appearance kernel: auto (exact where features are sparse, else lattice) or lattice",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per implementation (default 5)")
    parser.add_argument("--json", action="store_true", help="print the synthetic input's figures as one JSON line")
    parser.add_argument("--save", type=Path, help="write the synthetic input's figures and the machine to this file")
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure(args.rounds)))
        return
    if args.save:
        entry = measure(args.rounds)
        with torch_threads(1):  # the machine as the CRF ran on it: one thread, as pydensecrf runs
            info, line = machine_info().to_dict(), machine()
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps({"machine": info, "crf": entry}, indent=1))
        print(f"{line}\n{json.dumps(entry)}\nwrote {args.save}")
        return
    torch.set_num_threads(1)
    print(machine())
    params = PRESETS["deeplab_v2"]
    image, probs = make_input() if args.image is None else input_from_photo(args.image)
    print(f"input: {args.image or 'synthetic discs'}, {image.shape[1]}x{image.shape[0]}, {probs.shape[0]} classes")
    runs = [lambda: dense_crf(image, probs, params, bilateral_kernel=args.bilateral_kernel)]
    reference = pydensecrf_reference(image, probs, params)
    if reference is not None:
        runs.append(reference)
    results, wall, cpu = best_of_alternating(runs, args.rounds)
    note = f"best of {args.rounds} after a warm-up run; CPU time in brackets"
    print(f"densepred.crf: {wall[0]:.3f} s [{cpu[0]:.3f} s] ({note})")
    if reference is None:
        print("pydensecrf not installed (pip install pydensecrf2); ours only")
        return
    print(f"pydensecrf:    {wall[1]:.3f} s [{cpu[1]:.3f} s] (in alternation with ours)")
    print(f"speed-up:      {wall[1] / wall[0]:.2f}x [{cpu[1] / cpu[0]:.2f}x] (pydensecrf time / ours)")
    print(f"label agreement: {(results[0].argmax(0) == results[1].argmax(0)).mean():.4%}")


if __name__ == "__main__":
    main()
