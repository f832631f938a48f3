"""Confusion-matrix metrics against scikit-learn and a hand-worked example."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import jaccard_score

from proxyclip.metrics import confusion_matrix, metrics_from_confusion


def test_confusion_matrix_matches_sklearn_with_ignore_index():
    rng = np.random.default_rng(0)
    k = 7
    gt = rng.integers(0, k, size=(37, 53))
    gt[rng.random(gt.shape) < 0.2] = 255
    pred = rng.integers(0, k, size=gt.shape)
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), k, 255)
    keep = gt != 255
    expected = sk_confusion(gt[keep], pred[keep], labels=list(range(k)))
    assert cm.dtype == torch.int64
    np.testing.assert_array_equal(cm.numpy(), expected)


def test_per_class_iou_and_miou_match_sklearn_jaccard():
    rng = np.random.default_rng(1)
    k = 6
    gt = rng.integers(0, k - 1, size=4000)  # class 5 never in the ground truth ...
    pred = rng.integers(0, k, size=4000)  # ... but predicted: IoU 0, counted in the mean
    m = metrics_from_confusion(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), k, None))
    iou = jaccard_score(gt, pred, labels=list(range(k)), average=None, zero_division=0)
    np.testing.assert_allclose([r["IoU"] for r in m["per_class"]], 100 * iou, rtol=1e-12)
    assert m["per_class"][5]["IoU"] == 0.0
    assert math.isnan(m["per_class"][5]["Acc"])  # no ground truth: accuracy undefined
    assert m["mIoU"] == pytest.approx(100 * iou.mean())
    assert m["aAcc"] == pytest.approx(100 * (gt == pred).mean())


def test_hand_worked_example_with_absent_class():
    # 3 classes; class 2 appears in neither gt nor prediction -> NaN, excluded from the means
    gt = torch.tensor([[0, 0, 1, 1], [0, 255, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]])
    cm = confusion_matrix(pred, gt, 3, 255)
    # gt 0: pixels (0,0)->0, (0,1)->1, (1,0)->0 ; gt 1: (0,2)->1, (0,3)->1, (1,2)->0, (1,3)->1
    assert cm.tolist() == [[2, 1, 0], [1, 3, 0], [0, 0, 0]]
    m = metrics_from_confusion(cm, ["a", "b", "c"])
    iou0 = 2 / (3 + 3 - 2)  # 0.5
    iou1 = 3 / (4 + 4 - 3)  # 0.6
    assert m["per_class"][0]["IoU"] == pytest.approx(100 * iou0)
    assert m["per_class"][1]["IoU"] == pytest.approx(100 * iou1)
    assert math.isnan(m["per_class"][2]["IoU"])
    assert m["mIoU"] == pytest.approx(100 * (iou0 + iou1) / 2)
    assert m["mAcc"] == pytest.approx(100 * (2 / 3 + 3 / 4) / 2)
    assert m["aAcc"] == pytest.approx(100 * 5 / 7)
    assert m["num_pixels"] == 7


def test_dataset_matrix_is_the_sum_of_image_matrices_not_mean_of_image_mious():
    rng = np.random.default_rng(2)
    k = 4
    pairs = [(rng.integers(0, k, (8, 9)), rng.integers(0, k, (8, 9))) for _ in range(5)]
    total = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(g), k) for p, g in pairs)
    allp = np.concatenate([p.ravel() for p, _ in pairs])
    allg = np.concatenate([g.ravel() for _, g in pairs])
    np.testing.assert_array_equal(total.numpy(), sk_confusion(allg, allp, labels=list(range(k))))


def test_out_of_range_labels_are_an_error_not_counted():
    with pytest.raises(ValueError, match=r"ground truth holds values in \[0, 9\]"):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 9], [1, 255]]), 3, 255)
    with pytest.raises(ValueError, match="prediction"):
        confusion_matrix(torch.tensor([[0, -1]]), torch.tensor([[0, 1]]), 3, 255)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 3)
