"""Prediction with a trained checkpoint: arrays in, label maps, overlays and figures out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.labels import colorize
from .inference import predict_logits
from .runtime import NORMALIZATIONS, Trained, build_dataset, load_trained

__all__ = ["Predictor", "save_index_png", "overlay", "predict_dataset_figures"]


@dataclass
class Predictor:
    """Segment uint8 images (H, W, C) with a trained model: ``labels, probabilities = p(image)``."""

    trained: Trained
    device: torch.device = torch.device("cpu")
    mode: str = "whole"
    tile: int | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", **kw) -> Predictor:
        return cls(load_trained(path, device), torch.device(device), **kw)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if image.ndim == 2:
            image = image[..., None]
        channels = self.trained.in_channels
        if image.shape[-1] != channels:
            raise ValueError(f"the model takes {channels}-channel images, got shape {image.shape}")
        norm = NORMALIZATIONS[self.trained.normalization]
        if self.trained.normalization == "imagenet" and channels != 3:
            norm = NORMALIZATIONS["unit"]
        x = norm(np.ascontiguousarray(image))[None].to(self.device)
        logits = predict_logits(self.trained.model, x, mode=self.mode, tile=self.tile)
        probs = torch.softmax(logits, 1)[0]
        return probs.argmax(0).cpu().numpy().astype(np.uint8), probs.cpu().numpy()


def save_index_png(labels: np.ndarray, palette, path: str | Path) -> Path:
    """An 8-bit palette PNG: pixel values are class ids, viewers show the dataset's colours."""
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = [v for colour in palette for v in colour]
    img.putpalette(flat + [0] * (768 - len(flat)))
    img.save(path)
    return Path(path)


def overlay(image: np.ndarray, labels: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    """Colour labels blended over the image (gray images are shown in gray)."""
    rgb = np.repeat(image, 3, axis=-1) if image.ndim == 3 and image.shape[-1] == 1 else image
    rgb = np.stack([rgb] * 3, -1) if rgb.ndim == 2 else rgb
    return (rgb * (1 - alpha) + colorize(labels, palette) * alpha).astype(np.uint8)


def predict_dataset_figures(run_dir: str | Path, count: int = 4) -> Path:
    """Predict the first ``count`` validation images of a run: index PNGs, overlays, one figure."""
    from .plots import plot_side_by_side

    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoints" / "best.pt"
    if not ckpt.is_file():
        ckpt = sorted((run_dir / "checkpoints").glob("iter_*.pt"))[-1]
    predictor = Predictor.from_checkpoint(ckpt)
    trained = predictor.trained
    dataset = build_dataset(trained.experiment, trained.experiment.data.val_split, train=False)
    out = run_dir / "predictions"
    out.mkdir(exist_ok=True)
    rows = []
    for i in range(min(count, len(dataset))):
        image, gt, name = dataset.load(i)
        labels, _ = predictor(image)
        save_index_png(labels, trained.palette, out / f"{name}.png")
        Image.fromarray(overlay(image, labels, trained.palette)).save(out / f"{name}_overlay.png")
        if gt.shape != labels.shape:  # valid U-Net: compare on the centre it predicts
            top, left = (gt.shape[0] - labels.shape[0]) // 2, (gt.shape[1] - labels.shape[1]) // 2
            gt = gt[top : top + labels.shape[0], left : left + labels.shape[1]]
            image = image[top : top + labels.shape[0], left : left + labels.shape[1]]
        rows.append((name, image.squeeze(), gt, labels))
    return plot_side_by_side(rows, trained.class_names, trained.palette, run_dir / "predictions.png")
