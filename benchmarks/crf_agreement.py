"""How closely dense_crf's labels follow the exact O(N^2) CRF, input family by input family.

    python benchmarks/crf_agreement.py

For each input, the share of pixels whose label equals :func:`densepred.crf.dense_crf_exact`'s,
for the default appearance kernel ("auto": exact truncated sums where features are sparse, the
permutohedral lattice elsewhere; the column ``path`` says which ran), the lattice alone, and
pydensecrf when installed (``pip install pydensecrf2``). Inputs: uniform random colours with
random unaries (24x20, 32 seeds), and 64x64 noisy discs at colour noise 8-80 (3 seeds each),
under narrow widths scaled to the image and both DeepLab presets. 10 iterations, one thread.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from densepred.crf import (
    CANDIDATE_BUDGET,
    PRESETS,
    CRFParams,
    TruncatedGaussian,
    crf_features,
    dense_crf,
    dense_crf_exact,
)

try:
    from .crf_speed import make_input, pydensecrf_reference
except ImportError:  # run as a script, python benchmarks/crf_agreement.py: its folder is on sys.path
    from crf_speed import make_input, pydensecrf_reference

# DeepLab v2's widths scaled to small images (theta_alpha 67 px would make a 24x20 image global).
NARROW = replace(PRESETS["deeplab_v2"], theta_alpha=5.0, theta_beta=10.0, theta_gamma=1.0)
PARAMS = {"narrow": NARROW, "deeplab_v2": PRESETS["deeplab_v2"], "deeplab_v1_largefov": PRESETS["deeplab_v1_largefov"]}


def random_input(h: int, w: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    logits = rng.normal(0, 2.0, (c, h, w))
    return image, (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32)


def agreement(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> tuple[str, float, float, float | None]:
    """(path the default took, default, lattice-only, pydensecrf) label agreement with the exact CRF."""
    exact = dense_crf_exact(image, probs, params).argmax(0)
    features, _ = crf_features(torch.from_numpy(image).permute(2, 0, 1)[None], params)
    groups = torch.zeros(features.shape[0], dtype=torch.int64)
    path = "exact sums" if TruncatedGaussian.build(features, groups, CANDIDATE_BUDGET) else "lattice"
    auto = (dense_crf(image, probs, params).argmax(0) == exact).mean()
    lattice = (dense_crf(image, probs, params, bilateral_kernel="lattice").argmax(0) == exact).mean()
    run_reference = pydensecrf_reference(image, probs, params)
    reference = None if run_reference is None else float((run_reference().argmax(0) == exact).mean())
    return path, float(auto), float(lattice), reference


def agreement_table() -> list[str]:
    """The agreement per (widths, input family) as Markdown lines, then a line listing the inputs below 99%."""
    rows = []
    for name, params in PARAMS.items():
        cases = [("random 24x20", s, random_input(24, 20, 4, s)) for s in range(32)] if name == "narrow" else []
        for noise in (8, 20, 40, 80):
            cases += [(f"discs 64x64 noise {noise}", s, make_input(64, 64, 5, s, noise=noise)) for s in range(3)]
        for family, seed, (image, probs) in cases:
            rows.append((name, family, seed, *agreement(image, probs, params)))
    lines = [
        "| widths | input | seeds | default kernel ran | default: min / mean | lattice only | pydensecrf |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in dict.fromkeys((r[0], r[1]) for r in rows):
        group = [r for r in rows if (r[0], r[1]) == key]
        paths = " / ".join(sorted({r[3] for r in group}))
        cols = [np.array([r[i] for r in group]) for i in (4, 5)]
        ref = [r[6] for r in group]
        ref_text = "-" if None in ref else f"{min(ref):.2%} / {np.mean(ref):.2%}"
        stats = " | ".join(f"{c.min():.2%} / {c.mean():.2%}" for c in cols)
        lines.append(f"| {key[0]} | {key[1]} | {len(group)} | {paths} | {stats} | {ref_text} |")
    below = [r for r in rows if r[4] < 0.99]
    listed = ", ".join(f"{r[0]} {r[1]} seed {r[2]}" for r in below) or "none"
    lines += ["", f"Default kernel below 99% on {len(below)} of {len(rows)} inputs: {listed}."]
    return lines


def main() -> None:
    torch.set_num_threads(1)
    print("\n".join(agreement_table()))


if __name__ == "__main__":
    main()
