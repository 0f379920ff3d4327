"""The tests' tiny recipe: one iteration of a 4-channel padded U-Net on two 64x64 synthetic
scenes, so a test gets a real training checkpoint in about a second. Later overrides win, so
``tiny_checkpoint(folder, "model.name=fcn8s", "model.options={}")`` trains another model."""

from __future__ import annotations

from pathlib import Path

from densepred.config import Experiment, load_experiment

TINY_UNET = ["model.name=unet_padded", "model.options={base_channels: 4, depth: 2, batch_norm: false, dropout: 0.0}"]
TINY = [
    *TINY_UNET,
    "data.dataset=synthetic",
    "data.options={num_images: 2, size: 64}",
    "data.augment=none",
    "data.normalization=unit",
    "data.batch_size=1",
    "data.workers=0",
    "optim.name=sgd",
    "optim.lr=0.001",
    "optim.bias_lr_mult=1",
    "schedule.policy=constant",
    "train.iterations=1",
    "train.amp=none",  # the same numbers on every CPU (amp=auto is tested in test_precision.py)
    "eval.amp=none",
    "train.log_every=1",
    "train.checkpoint_every=0",
    "eval.max_images=1",
]


def tiny_experiment(*overrides: str) -> Experiment:
    return load_experiment(None, [*TINY, *overrides])


def tiny_checkpoint(folder: str | Path, *overrides: str) -> Path:
    from densepred.trainer import train

    return train(tiny_experiment(*overrides), folder, progress=False).checkpoint
