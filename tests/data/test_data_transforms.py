"""Transform invariants: mask values preserved, image and mask aligned, ignore padding, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from densepred.data import (
    CAFFE_BGR,
    IGNORE_INDEX,
    IMAGENET,
    UNIT,
    DataError,
    Normalization,
    build_transforms,
    create_dataset,
    deeplab_train,
    downsample_labels,
    eval_transform,
    make_loader,
    unet_train,
)
from densepred.data.elastic import elastic_maps

# Label k is drawn as a distinct, well separated grey level, so labels can be read back from pixels.
LEVELS = np.array([0, 40, 80, 120, 160, 200, 240], np.uint8)


def blocky_mask(rng: np.random.Generator, h: int, w: int, block: int, labels: int) -> np.ndarray:
    """Large constant blocks: few boundary pixels, so interpolated images still agree almost everywhere."""
    coarse = rng.integers(0, labels, size=(-(-h // block), -(-w // block)), dtype=np.uint8)
    return np.kron(coarse, np.ones((block, block), np.uint8))[:h, :w]


def labels_from_image(image: torch.Tensor, norm: Normalization = UNIT) -> np.ndarray:
    grey = norm.denormalize(image)[..., 0].astype(np.int64)
    return np.abs(grey[..., None] - LEVELS.astype(np.int64)).argmin(-1)


sizes = st.integers(8, 72)


@settings(max_examples=30, deadline=None)
@given(h=sizes, w=sizes, crop=st.integers(8, 96), labels=st.integers(1, 7), seed=st.integers(0, 2**31 - 1))
def test_deeplab_pad_crop_flip_is_exact(h, w, crop, labels, seed):
    """Without rescaling, pad/crop/flip move pixels without changing them: exact alignment."""
    rng = np.random.default_rng(seed)
    mask = blocky_mask(rng, h, w, 1, labels)
    image = np.repeat(LEVELS[mask][..., None], 3, 2)
    t = deeplab_train(crop=crop, scale=(1.0, 1.0), normalization=UNIT, seed=seed)
    out_image, out_mask = t(image, mask)
    assert out_image.shape == (3, crop, crop) and out_mask.shape == (crop, crop) and out_mask.dtype == torch.int64
    m = out_mask.numpy()
    valid = m != IGNORE_INDEX
    assert set(np.unique(m[valid])) <= set(np.unique(mask))
    np.testing.assert_array_equal(labels_from_image(out_image)[valid], m[valid])
    # Padding: ignore label in the mask, the mean pixel (0 after normalisation) in the image.
    assert (out_image[:, ~torch.from_numpy(valid)] == 0).all()
    assert valid.sum() == min(h, crop) * min(w, crop)


def near_boundary(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within ``radius`` of a label change: the only places resampling may differ."""
    from scipy.ndimage import maximum_filter, minimum_filter

    size = 2 * radius + 1
    near = maximum_filter(mask, size, mode="nearest") != minimum_filter(mask, size, mode="nearest")
    # A crop's edge may sit next to a label change that was cropped away: count the edge as near.
    near[:radius], near[-radius:], near[:, :radius], near[:, -radius:] = True, True, True, True
    return near


@settings(max_examples=25, deadline=None)
@given(h=st.integers(24, 80), w=st.integers(24, 80), crop=st.integers(16, 64), seed=st.integers(0, 2**31 - 1))
def test_deeplab_random_scale_keeps_image_and_mask_aligned(h, w, crop, seed):
    """Rescaled image (bilinear) and mask (nearest) may only disagree next to a label boundary."""
    mask = blocky_mask(np.random.default_rng(seed), h, w, 8, 5)
    image = np.repeat(LEVELS[mask][..., None], 3, 2)
    out_image, out_mask = deeplab_train(crop=crop, scale=(0.5, 2.0), normalization=IMAGENET, seed=seed)(image, mask)
    m = out_mask.numpy()
    valid = m != IGNORE_INDEX
    wrong = (labels_from_image(out_image, IMAGENET) != m) & valid
    # 2 px covers the bilinear blend at up to 2x scale; a misaligned mask would be off much further.
    assert not (wrong & ~near_boundary(m, 2)).any()


@settings(max_examples=25, deadline=None)
@given(h=st.integers(8, 80), w=st.integers(8, 80), crop=st.integers(8, 64), seed=st.integers(0, 2**31 - 1))
def test_deeplab_random_scale_keeps_mask_values(h, w, crop, seed):
    rng = np.random.default_rng(seed)
    mask = rng.choice(np.array([0, 2, 5, IGNORE_INDEX], np.uint8), size=(h, w))  # speckled: worst case
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    _, out_mask = deeplab_train(crop=crop, scale=(0.5, 2.0), seed=seed)(image, mask)
    assert set(np.unique(out_mask.numpy())) <= set(np.unique(mask)) | {IGNORE_INDEX}  # never a new label


def test_padding_is_bottom_right_with_caffe_mean():
    image = np.full((10, 12, 3), 7, np.uint8)
    mask = np.ones((10, 12), np.uint8)
    out_image, out_mask = deeplab_train(crop=16, scale=(1, 1), flip=False, normalization=CAFFE_BGR)(image, mask)
    assert (
        (out_mask[:10, :12] == 1).all()
        and (out_mask[10:] == IGNORE_INDEX).all()
        and (out_mask[:, 12:] == IGNORE_INDEX).all()
    )
    # The mean pixel, rounded to whole 0..255 values (padding happens on uint8, as in Caffe): |x| <= 0.5.
    assert out_image[:, 10:].abs().max() <= 0.5 and out_image[:, :, 12:].abs().max() <= 0.5
    np.testing.assert_allclose(out_image[:, 0, 0], [7 - 104.00699, 7 - 116.66877, 7 - 122.67892], atol=1e-4)


@settings(max_examples=20, deadline=None)
@given(h=st.integers(6, 10), w=st.integers(6, 10), seed=st.integers(0, 2**31 - 1))
def test_unet_elastic_keeps_labels_and_alignment(h, w, seed):
    # sigma = 10 px on a 3x3 grid is meant for U-Net's 572 px tiles; on a 72-120 px test image it
    # can fold space, where bicubic and nearest resampling legitimately differ. The property under
    # test (one field moves image and mask alike) does not depend on sigma, so a gentler one is used.
    rng = np.random.default_rng(seed)
    mask = blocky_mask(rng, 12 * h, 12 * w, 12, 4)
    image = LEVELS[mask][..., None]
    out_image, out_mask = unet_train(elastic_sigma=3.0, brightness_contrast=0.0, seed=seed)(image, mask)
    m = out_mask.numpy()
    assert out_image.shape[0] == 1 and out_image.shape[1:] == out_mask.shape
    assert set(np.unique(m)) <= set(np.unique(mask))
    wrong = labels_from_image(out_image.repeat(3, 1, 1)) != m
    assert not (wrong & ~near_boundary(m, 2)).any()  # bicubic vs nearest differ only at label edges


def test_unet_paper_defaults_keep_labels():
    rng = np.random.default_rng(0)
    mask = rng.choice(np.array([0, 1, IGNORE_INDEX], np.uint8), size=(64, 80))
    out_image, out_mask = unet_train(crop=48)(rng.integers(0, 256, (64, 80, 1), dtype=np.uint8), mask)
    assert out_image.shape == (1, 48, 48) and out_mask.shape == (48, 48)
    assert set(np.unique(out_mask.numpy())) <= {0, 1, IGNORE_INDEX}


def test_elastic_with_zero_sigma_is_identity():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 1), dtype=np.uint8)
    mask = rng.integers(0, 5, (40, 50), dtype=np.uint8)
    t = unet_train(elastic_sigma=0.0, flip=False, rotate90=False, brightness_contrast=0.0)
    out_image, out_mask = t(image, mask)
    np.testing.assert_array_equal(out_mask.numpy(), mask)
    np.testing.assert_allclose(out_image[0].numpy() * 255, image[..., 0], atol=1e-3)


def test_elastic_displacements_follow_the_paper():
    """Displacements at the 3x3 control points are Gaussian with 10 px standard deviation."""
    rng = np.random.default_rng(0)
    centre = []
    for _ in range(400):
        map_x, map_y = elastic_maps((300, 300), rng, grid=3, sigma=10.0)
        centre.append([map_x[150, 150] - 150, map_y[150, 150] - 150])
    assert 9.0 < np.std(centre) < 11.0 and abs(np.mean(centre)) < 1.5
    # Smooth: neighbouring pixels move almost alike.
    assert np.abs(np.diff(map_x - np.arange(300), axis=1)).max() < 1.0


def test_normalization_values():
    pixel = np.array([[[255, 0, 51]]], np.uint8)
    np.testing.assert_allclose(
        IMAGENET(pixel)[:, 0, 0], [(1 - 0.485) / 0.229, -0.456 / 0.224, (0.2 - 0.406) / 0.225], rtol=1e-5
    )
    # Caffe: BGR order, 0..255, mean subtraction only.
    np.testing.assert_allclose(CAFFE_BGR(pixel)[:, 0, 0], [51 - 104.00699, 0 - 116.66877, 255 - 122.67892], rtol=1e-6)
    assert CAFFE_BGR.fill_value() == pytest.approx((122.67892, 116.66877, 104.00699))  # RGB order
    image = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    for norm in (IMAGENET, CAFFE_BGR, UNIT):
        np.testing.assert_array_equal(norm.denormalize(norm(image)), image)
    with pytest.raises(DataError, match="1-channel Normalization"):
        IMAGENET(image[..., :1])


def test_eval_transform_is_normalisation_only():
    image = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    mask = np.zeros((7, 9), np.uint8)
    out_image, out_mask = eval_transform()(image, mask)
    torch.testing.assert_close(out_image, IMAGENET(image))
    assert out_mask.dtype == torch.int64 and out_mask.shape == (7, 9)


def test_downsample_labels_matches_deeplab_grid():
    mask = np.random.default_rng(0).choice(np.array([0, 3, 255], np.uint8), size=(321, 321))
    small = downsample_labels(mask, 8)
    assert small.shape == (41, 41)  # DeepLab: 321x321 crop -> 41x41 score map at stride 8
    np.testing.assert_array_equal(small, mask[::8, ::8])
    batch = torch.from_numpy(np.stack([mask, mask])).long()
    assert downsample_labels(batch, 8).shape == (2, 41, 41)
    assert set(np.unique(downsample_labels(mask, 3))) <= {0, 3, 255}
    with pytest.raises(ValueError):
        downsample_labels(mask, 0)


def test_seeded_transforms_repeat_and_workers_reseed():
    image = np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    mask = np.random.default_rng(1).integers(0, 4, (50, 60), dtype=np.uint8)
    a, b = deeplab_train(crop=32, seed=3), deeplab_train(crop=32, seed=3)
    runs_a = [a(image, mask)[1] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(runs_a, [b(image, mask)[1] for _ in range(3)], strict=True))
    assert not all(torch.equal(runs_a[0], r) for r in runs_a[1:])  # the stream moves on
    b._pid = -1  # as if forked into a worker: reseeds from torch.initial_seed() on first use
    torch.manual_seed(12345)
    after = b(image, mask)[1]
    c = deeplab_train(crop=32, seed=12345)
    torch.testing.assert_close(after, c(image, mask)[1])


def test_dataloader_workers_draw_different_augmentations():
    """Forked workers must not replay the same random crops (albumentations state is copied on fork)."""
    ds = create_dataset(
        "synthetic", split="train", num_images=4, size=64, seed=0, transform=deeplab_train(crop=48, scale=(0.5, 2.0))
    )
    ds.load = lambda i, load=ds.load: load(0)  # the same scene for every index
    loader = make_loader(ds, batch_size=1, shuffle=False, num_workers=2, persistent_workers=False)
    masks = [batch["mask"][0] for batch in loader]
    assert not torch.equal(masks[0], masks[1])  # index 0 -> worker 0, index 1 -> worker 1


def test_build_transforms_presets():
    assert "RandomCrop" in repr(build_transforms("deeplab_train", crop=65))
    assert "GridElastic" in repr(build_transforms("unet_train"))
    with pytest.raises(DataError, match="unknown transform preset 'deeplab'; choose one of deeplab_train"):
        build_transforms("deeplab")
