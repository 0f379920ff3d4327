"""The built-in synthetic dataset: deterministic, split-disjoint, fast, and needing context."""

from __future__ import annotations

import time

import numpy as np
from scipy.ndimage import binary_dilation

from densepred.data import create_dataset, deeplab_train
from densepred.data.synthetic import DOT, SQUARE, SYNTHETIC_CLASSES


def test_deterministic_and_splits_differ():
    a = create_dataset("synthetic", split="train", num_images=5, size=64, seed=1)
    b = create_dataset("synthetic", split="train", num_images=5, size=64, seed=1)
    val = create_dataset("synthetic", split="val", num_images=5, size=64, seed=1)
    other_seed = create_dataset("synthetic", split="train", num_images=5, size=64, seed=2)
    for i in range(5):
        np.testing.assert_array_equal(a.load(i).image, b.load(i).image)
        assert not np.array_equal(a.load(i).image, val.load(i).image)
        assert not np.array_equal(a.load(i).image, other_seed.load(i).image)
    np.testing.assert_array_equal(a.load(3).mask, a.load(3).mask)  # any order, same result


def test_contract_and_class_coverage():
    ds = create_dataset("synthetic", split="train", num_images=60, size=(96, 128))
    assert ds.num_classes == len(SYNTHETIC_CLASSES) == 6 and len(ds.palette) == 6
    item = ds[0]
    assert item["image"].shape == (3, 96, 128) and item["mask"].shape == (96, 128)
    counts = sum(np.bincount(ds.load(i).mask.ravel(), minlength=6) for i in range(len(ds)))
    assert (counts > 0).all()  # every class occurs
    assert counts[0] / counts.sum() < 0.9  # objects are not a rounding error


def test_dots_are_only_inside_squares():
    """Context: a dot is a disk inside a square, so a dot's ring of neighbours is square (or dot)."""
    ds = create_dataset("synthetic", split="val", num_images=40, size=128)
    for i in range(len(ds)):
        mask = ds.load(i).mask
        for_dot = mask == DOT
        if for_dot.any():
            rim = binary_dilation(for_dot, iterations=1) & ~for_dot
            assert set(np.unique(mask[rim])) <= {SQUARE, DOT}


def test_generation_is_fast():
    ds = create_dataset("synthetic", split="train", num_images=100, size=128)
    start = time.perf_counter()
    for i in range(len(ds)):
        ds.load(i)
    rate = len(ds) / (time.perf_counter() - start)
    assert rate > 60, f"{rate:.0f} images/s"  # ~300/s on an idle core; loose for a busy CI machine


def test_works_with_training_transforms():
    ds = create_dataset("synthetic", split="train", num_images=2, size=64, transform=deeplab_train(crop=48))
    assert ds[1]["image"].shape == (3, 48, 48)
