"""Fully-connected CRF speed and agreement: densepred.crf vs pydensecrf, one thread, one run.

    python benchmarks/crf_speed.py [--image PHOTO] [--bilateral-kernel {auto,lattice}]

500x375 RGB image, 21 noisy classes, DeepLab v2 preset (10 iterations). The image is synthetic
(discs of noisy colour) unless ``--image`` names a photo, which is resized to 500x375; its
"classes" are then its 21 quantised colours, with the same noisy unaries.
pydensecrf (``pip install pydensecrf2``) is a benchmark-only dependency; without it ours runs alone.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from densepred.crf import PRESETS, dense_crf


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
    result = run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return result, best


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
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = PRESETS["deeplab_v2"]
    image, probs = make_input() if args.image is None else input_from_photo(args.image)
    ours, ours_s = best_of(lambda: dense_crf(image, probs, params, bilateral_kernel=args.bilateral_kernel))
    print(f"densepred.crf: {ours_s:.3f} s (best of 3, after a warm-up run)")
    reference = pydensecrf_reference(image, probs, params)
    if reference is None:
        print("pydensecrf not installed (pip install pydensecrf2); ours only")
        return
    ref, ref_s = best_of(reference)
    print(f"pydensecrf:    {ref_s:.3f} s (best of 3, after a warm-up run)")
    print(f"label agreement: {(ours.argmax(0) == ref.argmax(0)).mean():.4%}")


if __name__ == "__main__":
    main()
