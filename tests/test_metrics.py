"""Metrics against hand-computed confusion matrices and hand-worked ISBI segment examples."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from densepred.metrics import (
    ConfusionMatrix,
    adapted_rand_error,
    pixel_error,
    rand_scores,
    segmentation_metrics,
    segments_from_membrane_mask,
)

# Rows = ground truth, columns = prediction. t = (10, 6, 4), predicted = (10, 6, 4), diag = (8, 4, 2).
#   class 0: IoU 8 / (10 + 10 - 8) = 2/3, Dice 16/20 = 0.8, acc 8/10
#   class 1: IoU 4 / (6 + 6 - 4) = 1/2,  Dice 8/12 = 2/3,   acc 4/6
#   class 2: IoU 2 / (4 + 4 - 2) = 1/3,  Dice 4/8 = 1/2,    acc 2/4
HAND = np.array([[8, 1, 1], [1, 4, 1], [1, 1, 2]])


def test_fcn_metrics_match_hand_computation():
    m = segmentation_metrics(HAND)
    assert m["pixel_acc"] == pytest.approx(14 / 20)
    assert m["mean_acc"] == pytest.approx((8 / 10 + 4 / 6 + 2 / 4) / 3)
    assert m["iou"] == pytest.approx([2 / 3, 1 / 2, 1 / 3])
    assert m["miou"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 3) / 3)
    assert m["fwiou"] == pytest.approx((10 * 2 / 3 + 6 * 1 / 2 + 4 * 1 / 3) / 20)
    assert m["dice"] == pytest.approx([0.8, 2 / 3, 1 / 2])
    assert m["mean_dice"] == pytest.approx((0.8 + 2 / 3 + 0.5) / 3)
    assert m["acc"] == pytest.approx([0.8, 4 / 6, 0.5])


def test_absent_classes_are_nan_and_left_out_of_means():
    # Class 2 is absent from both ground truth and prediction; class 3 is predicted but absent
    # from the ground truth (false positives only).
    n = np.array([[3, 1, 0, 1], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    m = segmentation_metrics(n)
    assert math.isnan(m["iou"][2]) and math.isnan(m["dice"][2]) and math.isnan(m["acc"][2])
    assert m["iou"][3] == 0 and m["dice"][3] == 0 and math.isnan(m["acc"][3])
    iou0, iou1 = 3 / (5 + 3 - 3), 2 / (2 + 3 - 2)
    assert m["miou"] == pytest.approx((iou0 + iou1 + 0) / 3)  # n_cl = 3: class 2 does not count
    assert m["mean_acc"] == pytest.approx((3 / 5 + 2 / 2) / 2)
    assert m["fwiou"] == pytest.approx((5 * iou0 + 2 * iou1) / 7)
    empty = segmentation_metrics(np.zeros((2, 2)))
    assert all(math.isnan(empty[k]) for k in ("pixel_acc", "mean_acc", "miou", "fwiou", "mean_dice"))
    json.dumps(m)  # plain floats and lists


def test_update_counts_rows_as_ground_truth_and_drops_ignored_pixels():
    target = torch.tensor([[[0, 0, 1], [2, 255, 1]]])
    pred = torch.tensor([[[0, 1, 1], [0, 2, 2]]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    expected = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0]])
    assert torch.equal(cm.matrix, expected) and cm.matrix.dtype == torch.int64
    cm.update(pred, target)  # accumulates
    assert torch.equal(cm.matrix, 2 * expected)
    cm.reset()
    assert int(cm.matrix.sum()) == 0


def test_logits_are_argmaxed_over_dim_1():
    target = torch.randint(0, 4, (2, 5, 7))
    logits = torch.randn(2, 4, 5, 7)
    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    a.update(logits, target)
    b.update(logits.argmax(1), target)
    assert torch.equal(a.matrix, b.matrix) and int(a.matrix.sum()) == 70


def test_matrix_matches_numpy_reference_on_random_labels():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, (3, 16, 16))
    target[rng.random(target.shape) < 0.1] = 255
    pred = rng.integers(0, 5, (3, 16, 16))
    cm = ConfusionMatrix(5)
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    keep = target != 255
    reference = np.zeros((5, 5), dtype=np.int64)
    np.add.at(reference, (target[keep], pred[keep]), 1)
    np.testing.assert_array_equal(cm.matrix.numpy(), reference)


def test_out_of_range_target_values_raise_and_are_listed():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"\[3, 7\].*outside the classes 0\.\.2 or the ignore label 255"):
        cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 3], [7, 255]]]))
    with pytest.raises(ValueError, match="prediction has values"):
        cm.update(torch.tensor([[[5, 0]]]), torch.tensor([[[1, 0]]]))
    with pytest.raises(TypeError, match="integer class ids"):
        cm.update(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"prediction has values.*\[-1\]"):
        cm.update(torch.tensor([[[-1, 9]]]), torch.tensor([[[1, 255]]]))
    assert int(cm.matrix.sum()) == 0  # nothing was counted
    # Under an ignored pixel a prediction may hold anything: neither checked nor counted.
    cm.update(torch.tensor([[[2, 9, -4]]], dtype=torch.int16), torch.tensor([[[2, 255, 255]]], dtype=torch.uint8))
    assert int(cm.matrix.sum()) == 1 and int(cm.matrix[2, 2]) == 1
    scores = torch.zeros(1, 3, 1, 3)
    scores[0, 1] = 1.0  # class 1 everywhere
    cm.update(scores, torch.tensor([[[1, 255, 0]]]))
    assert int(cm.matrix.sum()) == 3 and int(cm.matrix[1, 1]) == 1 and int(cm.matrix[0, 1]) == 1


def test_shape_errors_name_both_shapes():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"\(1, 4, 4\).*\(1, 5, 5\)"):
        cm.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(1, 3, 4, 4\).*\(1, 5, 5\)"):
        cm.update(torch.zeros(1, 3, 4, 4), torch.zeros(1, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected \(1, 3, 5, 5\)"):
        cm.update(torch.zeros(1, 2, 5, 5), torch.zeros(1, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="real class id"):
        ConfusionMatrix(3, ignore_index=1)


def test_merge_state_dict_and_all_reduce_without_distributed():
    target = torch.randint(0, 3, (2, 4, 4))
    pred = torch.randint(0, 3, (2, 4, 4))
    whole, first, second = ConfusionMatrix(3), ConfusionMatrix(3), ConfusionMatrix(3)
    whole.update(pred, target)
    first.update(pred[:1], target[:1])
    second.update(pred[1:], target[1:])
    first += second
    assert torch.equal(first.matrix, whole.matrix)
    assert first.all_reduce() is first and torch.equal(first.matrix, whole.matrix)
    restored = ConfusionMatrix(3)
    restored.load_state_dict(whole.state_dict())
    assert restored.compute() == whole.compute()
    with pytest.raises(ValueError, match="num_classes=4"):
        ConfusionMatrix(4).load_state_dict(whole.state_dict())
    with pytest.raises(ValueError, match="cannot merge"):
        whole.merge(ConfusionMatrix(4))


def test_pixel_error_is_fraction_of_mislabelled_pixels():
    target = torch.tensor([[[0, 1, 1, 1], [0, 0, 1, 255]]])
    pred = torch.tensor([[[0, 1, 0, 1], [1, 0, 1, 0]]])
    assert pixel_error(pred, target) == pytest.approx(2 / 7)  # the ignored pixel does not count


def test_segments_from_membrane_mask_uses_4_connectivity():
    # Two cells meeting only at a corner across the membrane stay two segments.
    mask = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    seg = segments_from_membrane_mask(mask, membrane_class=0)
    assert seg[0, 0] == seg[1, 1] != 0 and seg[2, 2] not in (0, seg[0, 0]) and (seg[mask == 0] == 0).all()
    with pytest.raises(ValueError, match="2-D"):
        segments_from_membrane_mask(np.zeros((2, 3, 3)))


def test_rand_error_of_perfect_segmentation_is_zero_whatever_the_ids():
    gt = np.array([[1, 1, 0, 2, 2], [1, 1, 0, 2, 2]])
    pred = np.array([[7, 7, 0, 3, 3], [7, 7, 3, 3, 3]])  # the membrane pixels do not count
    assert adapted_rand_error(pred, gt) == 0.0


def test_rand_error_of_a_merge():
    # GT: two cells of 2 pixels apart a membrane pixel; prediction: one segment over all.
    # Foreground n_ij: (1,1)=2, (2,1)=2.  sum t^2 = 4 + 4 = 8, sum s^2 = 4^2 = 16, sum n_ij^2 = 8.
    # split = 8/8 = 1, merge = 8/16 = 1/2, V_rand = 2*8/(8+16) = 2/3, error = 1/3.
    s = rand_scores(np.array([1, 1, 1, 1, 1]), np.array([1, 1, 0, 2, 2]))
    assert s["rand_split"] == pytest.approx(1.0)
    assert s["rand_merge"] == pytest.approx(0.5)
    assert s["rand_error"] == pytest.approx(1 / 3)


def test_rand_error_of_a_split():
    # GT: one cell of 4 pixels; prediction: two halves.
    # sum t^2 = 16, sum s^2 = 4 + 4 = 8, sum n_ij^2 = 8: split = 1/2, merge = 1, error = 1/3.
    s = rand_scores(np.array([1, 1, 2, 2]), np.array([5, 5, 5, 5]))
    assert (s["rand_split"], s["rand_merge"]) == pytest.approx((0.5, 1.0))
    assert s["rand_error"] == pytest.approx(1 / 3)


def test_predicted_membrane_inside_a_cell_counts_as_singletons():
    # GT one cell of 4; prediction [1, 1, 0, 2]: the 0 pixel is a segment of its own.
    # sum t^2 = 16, sum s^2 = 2^2 + 1^2 + 1 = 6, sum n_ij^2 = 4 + 1 + 1 = 6; error = 1 - 12/22.
    assert adapted_rand_error(np.array([1, 1, 0, 2]), np.array([3, 3, 3, 3])) == pytest.approx(10 / 22)
    assert math.isnan(adapted_rand_error(np.ones(4, int), np.zeros(4, int)))  # no foreground


def test_rand_scores_match_pair_counting_definition():
    """V^Rand by brute force over ordered pixel pairs of the GT foreground (N^2 normalisation)."""
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 4, (6, 7))
    pred = rng.integers(0, 5, (6, 7))
    fg = gt != 0
    g, p = gt[fg], pred[fg]
    p = np.where(p == 0, -1 - np.arange(p.size), p)  # predicted 0: every pixel its own segment
    same_g, same_p = g[:, None] == g[None, :], p[:, None] == p[None, :]
    both, n_true, n_pred = (same_g & same_p).sum(), same_g.sum(), same_p.sum()
    s = rand_scores(pred, gt)
    assert s["rand_split"] == pytest.approx(both / n_true)
    assert s["rand_merge"] == pytest.approx(both / n_pred)
    assert s["rand_error"] == pytest.approx(1 - 2 * both / (n_true + n_pred))


def test_isbi_pipeline_from_class_maps():
    # Membrane class 0 between two cells; the prediction misses the membrane, merging them.
    gt_mask = np.array([[1, 1, 0, 1, 1]] * 2)
    pred_mask = np.ones_like(gt_mask)
    gt_seg = segments_from_membrane_mask(gt_mask)
    pred_seg = segments_from_membrane_mask(pred_mask)
    assert adapted_rand_error(pred_seg, gt_seg) == pytest.approx(1 / 3)  # as the merge above, scaled
    assert pixel_error(torch.from_numpy(pred_mask), torch.from_numpy(gt_mask)) == pytest.approx(0.2)


def test_class_map_is_argmax_with_the_first_maximum_on_ties():
    from densepred.metrics import class_map

    scores = torch.randn(2, 7, 9, 11)
    scores[:, 3] = scores[:, 5] = scores.amax(1) + 1  # a tie for the maximum at every pixel
    assert torch.equal(class_map(scores), scores.argmax(1))
    assert (class_map(scores) == 3).all()
