"""Fully-connected CRF on a trained model's CamVid val predictions: mIoU with vs without, and a picture.

    python benchmarks/crf_camvid.py --checkpoint runs/bench/camvid_unet_padded/checkpoints/last.pt \
        --root ../shared/data/camvid --out runs/bench/crf_camvid

The network runs once per val image; its softmax feeds every CRF setting, so the comparison is
paired. Settings: none, the DeepLab v2 preset, and the best of a small grid over the appearance
kernel (w1, theta_alpha, theta_beta; w2=3, theta_gamma=1 fixed, as DeepLab cross-validates them)
chosen on ``--tune`` *train* images, never on val. Writes results.json and boundary.png (image |
without CRF | with CRF | ground truth, cropped where the CRF changed the most pixels).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from densepred.build import normalization_for
from densepred.checkpoint import load_trained
from densepred.config import EvalConfig
from densepred.crf import PRESETS, CRFParams, dense_crf
from densepred.data.factory import create_dataset
from densepred.data.labels import colorize
from densepred.inference import predict_logits
from densepred.metrics import ConfusionMatrix

GRID = {"w1": (3.0, 5.0), "theta_alpha": (20.0, 50.0, 80.0), "theta_beta": (3.0, 5.0, 10.0)}


def _probabilities(trained, dataset, index: int, options: EvalConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sample = dataset.load(int(index))
    norm = normalization_for(trained.normalization, trained.in_channels)
    with torch.inference_mode():
        logits = predict_logits(trained.model, norm(np.ascontiguousarray(sample.image))[None], options)
    return sample.image, sample.mask, torch.softmax(logits, 1)[0].numpy()


def _score(settings: dict[str, CRFParams | None], trained, dataset, indices, options, keep=None) -> dict:
    """Confusion matrices per setting over ``indices``; ``keep(i, image, mask, labels_by_setting)``."""
    matrices = {name: ConfusionMatrix(trained.num_classes, ignore_index=dataset.ignore_index) for name in settings}
    seconds = {name: 0.0 for name in settings}
    for i in indices:
        image, mask, probs = _probabilities(trained, dataset, i, options)
        labels = {}
        for name, params in settings.items():
            start = time.perf_counter()
            refined = probs if params is None else dense_crf(image, probs, params)
            seconds[name] += time.perf_counter() - start
            labels[name] = refined.argmax(0)
            matrices[name].update(torch.from_numpy(labels[name])[None], torch.from_numpy(mask.astype(np.int64))[None])
        if keep is not None:
            keep(i, image, mask, labels)
    return {
        name: {**cm.compute(), "crf_seconds_per_image": seconds[name] / len(indices)} for name, cm in matrices.items()
    }


def _tune(trained, root: str, count: int, options: EvalConfig) -> CRFParams:
    train = create_dataset("camvid", root, "train")
    indices = np.linspace(0, len(train) - 1, count).astype(int)
    base = PRESETS["deeplab_v2"]
    grid = {
        f"w1={w1},ta={ta},tb={tb}": replace(base, w1=w1, theta_alpha=ta, theta_beta=tb)
        for w1, ta, tb in itertools.product(*GRID.values())
    }
    scores = _score(grid, trained, train, indices, options)
    best = max(scores, key=lambda name: scores[name]["miou"])
    print(f"tuned on {count} train images: {best} (train mIoU {scores[best]['miou']:.4f})")
    return grid[best]


def _right(labels: np.ndarray, mask: np.ndarray, band: np.ndarray, window) -> float:
    return float((labels == mask)[window][band[window]].mean())


def _boundary_figure(best: dict, palette, class_names, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, mask, plain, refined = best["image"], best["mask"], best["plain"], best["refined"]
    from scipy.ndimage import binary_dilation, uniform_filter

    # Crop the window where the CRF fixes the most pixels within 4 px of a true class boundary.
    edges = np.zeros(mask.shape, bool)
    edges[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    edges[1:, :] |= mask[1:, :] != mask[:-1, :]
    band = binary_dilation(edges, iterations=4) & (mask != best["ignore"])
    fixed = band * ((refined == mask).astype(float) - (plain == mask).astype(float))
    size = min(160, *image.shape[:2])
    cy, cx = np.unravel_index(np.argmax(uniform_filter(fixed, size)), fixed.shape)
    y0 = int(np.clip(cy - size // 2, 0, image.shape[0] - size))
    x0 = int(np.clip(cx - size // 2, 0, image.shape[1] - size))
    window = (slice(y0, y0 + size), slice(x0, x0 + size))
    gt = np.where(mask < len(palette), mask, 0)
    panels = [
        ("image", image[window]),
        (
            f"without CRF ({(plain == mask)[window][band[window]].mean():.0%} right near edges)",
            colorize(plain[window], palette),
        ),
        (f"with CRF ({(refined == mask)[window][band[window]].mean():.0%})", colorize(refined[window], palette)),
        ("ground truth", colorize(gt[window], palette)),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    for ax, (title, panel) in zip(axes, panels, strict=True):
        ax.imshow(panel, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    shown = sorted(set(np.unique(plain[window])) | set(np.unique(refined[window])) | set(np.unique(gt[window])))
    handles = [plt.Rectangle((0, 0), 1, 1, color=np.array(palette[k]) / 255) for k in shown]
    fig.legend(handles, [class_names[k] for k in shown], loc="lower center", ncol=len(shown), frameon=False)
    fig.suptitle(
        f"CamVid val {best['name']}: {size}x{size} window at ({x0}, {y0}); boundary pixels = within 4 px of a true edge"
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def camvid_crf_scores(
    checkpoint: str | Path, root: str | Path, out: str | Path, *, tune: int = 12, max_images: int | None = None
) -> dict:
    """Score ``checkpoint`` on CamVid val without CRF, with the DeepLab v2 preset and with the
    setting tuned on ``tune`` train images; write results.json and boundary.png under ``out``."""
    trained = load_trained(checkpoint)
    options = trained.experiment.eval
    val = create_dataset("camvid", root, "val")
    count = len(val) if max_images is None else min(max_images, len(val))
    settings: dict[str, CRFParams | None] = {"no CRF": None, "deeplab_v2 preset": PRESETS["deeplab_v2"]}
    if tune > 0:
        settings["tuned on train"] = _tune(trained, root, tune, options)

    best: dict = {"gain": -1}

    def keep(i, image, mask, labels):
        # The image whose CRF output gains the most correct pixels makes the picture.
        final = labels[list(settings)[-1]]
        valid = mask != val.ignore_index
        gain = int(((final == mask) & valid).sum()) - int(((labels["no CRF"] == mask) & valid).sum())
        if gain > best["gain"]:
            best.update(
                gain=gain,
                image=image,
                mask=mask,
                plain=labels["no CRF"],
                refined=final,
                name=val.load(i).name,
                ignore=val.ignore_index,
            )

    scores = _score(settings, trained, val, range(count), options, keep)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"CamVid val, {count} images, checkpoint {checkpoint} (iteration {trained.iteration})")
    print(f"{'setting':<20} {'mIoU':>7} {'pixel acc':>9} {'CRF s/img':>9}")
    for name, s in scores.items():
        print(f"{name:<20} {s['miou']:7.4f} {s['pixel_acc']:9.4f} {s['crf_seconds_per_image']:9.3f}")
    results = {
        "checkpoint": str(checkpoint),
        "iteration": trained.iteration,
        "images": count,
        "settings": {name: (None if p is None else asdict(p)) for name, p in settings.items()},
        "class_names": trained.class_names,
        "scores": {
            name: {k: s[k] for k in ("miou", "pixel_acc", "mean_acc", "fwiou", "iou", "crf_seconds_per_image")}
            for name, s in scores.items()
        },
    }
    if best["gain"] >= 0:
        _boundary_figure(best, trained.palette, trained.class_names, out / "boundary.png")
        results["picture"] = str(out / "boundary.png")
        print(f"picture: {out / 'boundary.png'} ({best['name']}, {best['gain']} more correct pixels with the CRF)")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--root", default="../shared/data/camvid")
    parser.add_argument("--out", default="runs/bench/crf_camvid")
    parser.add_argument("--tune", type=int, default=12, help="train images for the grid search (0: preset only)")
    parser.add_argument("--max-images", type=int, default=None, help="val images to score (default all)")
    args = parser.parse_args()
    camvid_crf_scores(args.checkpoint, args.root, args.out, tune=args.tune, max_images=args.max_images)


if __name__ == "__main__":
    main()
