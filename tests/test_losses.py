"""Losses: cross-entropy reductions against torch, U-Net weight-map facts, Dice, DeepLab MSC."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from densepred.data.labels import downsample_labels
from densepred.losses import (
    cross_entropy,
    dice_loss,
    multi_scale_loss,
    resize_labels,
    unet_weight_map,
    unet_weight_maps,
)


def _batch(n=2, c=4, h=6, w=5, ignore_fraction=0.2):
    logits = torch.randn(n, c, h, w, dtype=torch.float64)
    target = torch.randint(0, c, (n, h, w))
    target[torch.rand(n, h, w) < ignore_fraction] = 255
    return logits, target


def test_cross_entropy_mean_and_sum_match_torch():
    logits, target = _batch()
    valid = int((target != 255).sum())
    reference = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(cross_entropy(logits, target), reference)
    assert torch.allclose(cross_entropy(logits, target, reduction="sum"), reference * valid)


def test_cross_entropy_class_weights_match_torch_weighted_mean():
    logits, target = _batch()
    weights = [0.5, 1.0, 2.0, 4.0]
    reference = F.cross_entropy(logits, target, weight=torch.tensor(weights, dtype=torch.float64), ignore_index=255)
    assert torch.allclose(cross_entropy(logits, target, class_weights=weights), reference)
    with pytest.raises(ValueError, match="one weight per class"):
        cross_entropy(logits, target, class_weights=[1.0, 2.0])


def test_ignored_pixels_contribute_nothing():
    logits, target = _batch()
    changed = logits.clone()
    changed[(target == 255).unsqueeze(1).expand_as(logits)] = 1e3  # garbage where ignored
    for reduction in ("mean", "sum"):
        before = cross_entropy(logits, target, reduction=reduction)
        assert torch.allclose(before, cross_entropy(changed, target, reduction=reduction))
    logits.requires_grad_(True)
    cross_entropy(logits, target).backward()
    assert (logits.grad[(target == 255).unsqueeze(1).expand_as(logits)] == 0).all()
    all_ignored = cross_entropy(logits, torch.full_like(target, 255))
    assert all_ignored.item() == 0 and all_ignored.requires_grad  # not NaN


def test_pixel_weights_average_over_valid_pixels():
    logits, target = _batch()
    weights = torch.rand(target.shape, dtype=torch.float64)
    per_pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")
    valid = (target != 255).sum()
    assert torch.allclose(cross_entropy(logits, target, pixel_weights=weights), (weights * per_pixel).sum() / valid)
    summed = cross_entropy(logits, target, pixel_weights=weights, reduction="sum")
    assert torch.allclose(summed, (weights * per_pixel).sum())
    with pytest.raises(ValueError, match="not both"):
        cross_entropy(logits, target, pixel_weights=weights, class_weights=[1.0] * 4)


def test_cross_entropy_shape_and_label_errors_are_clear():
    logits = torch.randn(1, 3, 41, 41)
    target = torch.zeros(1, 321, 321, dtype=torch.long)
    with pytest.raises(ValueError, match=r"resize_target=True.*center_crop"):
        cross_entropy(logits, target)
    assert cross_entropy(logits, target, resize_target=True).isfinite()
    with pytest.raises(ValueError, match=r"\(N, \*spatial\)"):
        cross_entropy(logits, torch.zeros(2, 41, 41, dtype=torch.long))
    with pytest.raises(ValueError, match=r"values \[3\]"):
        cross_entropy(logits, torch.full((1, 41, 41), 3))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, torch.zeros(1, 41, 41, dtype=torch.long), reduction="none")


def test_resize_labels_is_corner_aligned_nearest():
    mask = torch.randint(0, 21, (2, 321, 321))
    mask[:, :5] = 255
    assert torch.equal(resize_labels(mask, (41, 41)), downsample_labels(mask, 8))  # stride 8: pixel 8i
    small = resize_labels(mask, (31, 21))  # MSC 0.75 / 0.5 sizes
    assert small.shape == (2, 31, 21)
    assert set(small.unique().tolist()) <= set(mask.unique().tolist())  # picked, never blended
    # index i -> round(i * 320 / 30): 0, 11, 21, 32, ..., 320
    rows = torch.tensor([round(i * 320 / 30 + 1e-9) for i in range(31)])
    assert torch.equal(small[0, :, 0], mask[0, rows, 0])
    assert torch.equal(resize_labels(mask, (1, 1)), mask[:, :1, :1])


def test_multi_scale_loss_sums_branches_on_shrunk_labels():
    target = torch.randint(0, 3, (2, 321, 321))
    sizes = {"fused": 41, "scale_1": 41, "scale_0.75": 31, "scale_0.5": 21}
    outputs = {k: torch.randn(2, 3, s, s, requires_grad=True) for k, s in sizes.items()}
    seen = {}

    def loss_fn(logits, labels):
        seen[tuple(logits.shape)] = tuple(labels.shape)
        return cross_entropy(logits, labels)

    total, parts = multi_scale_loss(outputs, target, loss_fn)
    assert seen == {(2, 3, s, s): (2, s, s) for s in sizes.values()}
    assert set(parts) == set(sizes)
    expected = sum(cross_entropy(o, resize_labels(target, o.shape[-2:])) for o in outputs.values())
    assert torch.allclose(total, expected)
    total.backward()
    assert all(o.grad is not None for o in outputs.values())
    with pytest.raises(TypeError, match="train\\(\\) mode"):
        multi_scale_loss(outputs["fused"], target)


def test_dice_loss_of_perfect_prediction_is_about_zero():
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, 0] = 255
    perfect = 100.0 * F.one_hot(target.clamp(max=2), 3).movedim(-1, 1).double()
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(-perfect, target).item() > 0.9
    changed = perfect.clone()
    changed[0, :, 0] = torch.randn(3, 8, dtype=torch.float64)  # only ignored pixels change
    assert torch.allclose(dice_loss(changed, target), dice_loss(perfect, target))


def _two_cells_and_far_background():
    # Rows 0-39; cols 0-19 cell A, col 20 a one-pixel membrane gap, cols 21-40 cell B,
    # cols 41-99 background far from the second cell.
    mask = np.ones((40, 100), dtype=np.int64)
    mask[:, 20] = 0
    mask[:, 41:] = 0
    return mask


def test_unet_weight_map_stresses_gaps_between_touching_cells():
    mask = _two_cells_and_far_background()
    w = unet_weight_map(mask, class_weights=None)
    assert w.dtype == np.float32 and w.shape == mask.shape
    # Gap pixel: d1 = d2 = 1, so w = 1 + 10 exp(-4 / 50) = 10.23; far pixel: ~ w_c = 1.
    assert w[20, 20] == pytest.approx(1 + 10 * np.exp(-4 / 50), rel=1e-5)
    assert w[20, 99] == pytest.approx(1.0, abs=1e-6)
    assert w[20, 70] < 1.001 < 9 < w[20, 20]
    assert (w[mask == 1] == 1).all()  # the border term is on background pixels only


def test_unet_weight_map_class_balance_and_ignore():
    mask = _two_cells_and_far_background()
    mask[0, :] = 255
    w = unet_weight_map(mask, w0=0.0)  # only w_c
    valid = mask != 255
    n0, n1 = (mask == 0).sum(), (mask == 1).sum()
    assert w[mask == 0] == pytest.approx(valid.sum() / (2 * n0))
    assert w[mask == 1] == pytest.approx(valid.sum() / (2 * n1))
    assert (w[~valid] == 0).all() and w[valid].mean() == pytest.approx(1.0)
    explicit = unet_weight_map(mask, w0=0.0, class_weights=[2.0, 0.5])
    assert (explicit[mask == 0] == 2.0).all() and (explicit[mask == 1] == 0.5).all()
    with pytest.raises(ValueError, match="one weight per class"):
        unet_weight_map(mask, class_weights=[1.0])


def test_unet_weight_map_matches_brute_force_eq_2():
    """Every cell's full distance transform, the two smallest per pixel, Eq. 2 on background."""
    rng = np.random.default_rng(0)
    mask = (ndimage.uniform_filter(rng.random((48, 48)), 5) > 0.5).astype(np.int64)
    mask[::9, :] = 0  # membranes that cut blobs into many cells
    cells, k = ndimage.label(mask == 1)
    assert k >= 3
    dists = np.stack([ndimage.distance_transform_edt(cells != i) for i in range(1, k + 1)])
    d1, d2 = np.sort(dists, axis=0)[:2]
    expected = np.where(mask == 0, 10 * np.exp(-((d1 + d2) ** 2) / 50), 0.0) + 1.0
    np.testing.assert_allclose(unet_weight_map(mask, class_weights=None), expected, atol=1e-4)


def test_unet_weight_maps_batch_and_errors():
    masks = torch.from_numpy(np.stack([_two_cells_and_far_background()] * 2))
    maps = unet_weight_maps(masks, class_weights=None)
    assert maps.shape == masks.shape and maps.dtype == torch.float32
    assert torch.equal(maps[0], torch.from_numpy(unet_weight_map(masks[0].numpy(), class_weights=None)))
    with pytest.raises(ValueError, match="2-D"):
        unet_weight_map(masks.numpy())
    with pytest.raises(ValueError, match="balance"):
        unet_weight_map(masks[0], class_weights="median")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighting", ["none", "class", "pixel"])
def test_channels_last_logits_give_the_same_loss_and_gradient(reduction, weighting):
    # Channels-last logits take the softmax along their class axis in place; the loss, its gradient
    # (in the logits' own layout) and the ignored pixels' zero gradient are those of channels-first.
    logits, target = _batch(n=2, c=5, h=7, w=6)
    target[0, 0, :3] = 255
    options = {"reduction": reduction}
    if weighting == "class":
        options["class_weights"] = [0.5, 1.0, 2.0, 4.0, 3.0]
    if weighting == "pixel":
        options["pixel_weights"] = torch.rand(target.shape, dtype=torch.float64)
    first = logits.clone().requires_grad_(True)
    last = logits.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    expected, got = cross_entropy(first, target, **options), cross_entropy(last, target, **options)
    torch.testing.assert_close(got, expected)
    expected.backward()
    got.backward()
    assert last.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(last.grad, first.grad)
    assert (last.grad[(target == 255).unsqueeze(1).expand_as(logits)] == 0).all()
