"""Segmentation metrics from one confusion matrix per dataset (docs/protocol.md, Per-dataset protocol).

Definitions (the ones mmsegmentation reports):
    intersect_k = C[k, k]               (C[gt, pred], pixels with gt == ignore_index left out)
    union_k     = sum_j C[k, j] + sum_i C[i, k] - C[k, k]
    IoU_k       = intersect_k / union_k      NaN when union_k == 0 (class absent from gt and prediction)
    Acc_k       = intersect_k / sum_j C[k, j] NaN when the class is absent from gt
    aAcc        = trace(C) / C.sum()
    mIoU, mAcc  = NaN-ignoring means of IoU_k, Acc_k
A class absent from the ground truth but predicted somewhere has IoU 0 (its union is the
false positives), so it does count in the mean, as in mmseg.

All reported numbers are percentages (0-100), as in the paper's tables.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

__all__ = ["confusion_matrix", "metrics_from_confusion"]


def confusion_matrix(
    pred: torch.Tensor, gt: torch.Tensor, num_classes: int, ignore_index: Optional[int] = 255
) -> torch.Tensor:
    """Confusion matrix ``C[gt, pred]`` of one image, shape ``(K, K)`` int64.

    pred, gt: integer tensors of the same shape (any shape, e.g. ``(H, W)``). Pixels whose
    ground truth equals ``ignore_index`` are left out. Every other ground-truth value and
    every prediction must lie in ``[0, num_classes)``; anything else is a ValueError (a
    label outside the class range must never be counted silently).
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != ground-truth shape {tuple(gt.shape)}")
    pred = pred.reshape(-1).to(torch.int64)
    gt = gt.reshape(-1).to(torch.int64)
    if ignore_index is not None:
        keep = gt != ignore_index
        pred, gt = pred[keep], gt[keep]
    if gt.numel():
        for name, t in (("ground truth", gt), ("prediction", pred)):
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(
                    f"{name} holds values in [{lo}, {hi}], outside the class range [0, {num_classes - 1}]"
                    + (f" (ignore index {ignore_index})" if ignore_index is not None else "")
                )
    counts = torch.bincount(gt * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def metrics_from_confusion(cm: torch.Tensor, class_names: Optional[Sequence[str]] = None) -> Dict:
    """aAcc, mIoU, mAcc and per-class IoU / Acc (percent) from a ``(K, K)`` confusion matrix ``C[gt, pred]``.

    Returns ``{"aAcc", "mIoU", "mAcc", "num_pixels", "per_class": [{"class", "IoU", "Acc",
    "gt_pixels", "pred_pixels"}, ...]}``; absent classes have ``IoU``/``Acc`` = NaN.
    """
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (K, K), got {tuple(cm.shape)}")
    k = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}x{k} confusion matrix")
    cm = cm.to(torch.float64)
    inter = cm.diagonal()
    gt_area = cm.sum(1)
    pred_area = cm.sum(0)
    union = gt_area + pred_area - inter
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, inter / union.clamp(min=1), nan)
    acc = torch.where(gt_area > 0, inter / gt_area.clamp(min=1), nan)
    total = gt_area.sum()
    out = {
        "aAcc": 100.0 * float(inter.sum() / total) if total > 0 else float("nan"),
        "mIoU": 100.0 * _nanmean(iou),
        "mAcc": 100.0 * _nanmean(acc),
        "num_pixels": int(total),
        "per_class": [
            {
                "class": names[i],
                "IoU": 100.0 * float(iou[i]),
                "Acc": 100.0 * float(acc[i]),
                "gt_pixels": int(gt_area[i]),
                "pred_pixels": int(pred_area[i]),
            }
            for i in range(k)
        ],
    }
    return out


def _nanmean(x: torch.Tensor) -> float:
    valid = ~torch.isnan(x)
    return float(x[valid].mean()) if bool(valid.any()) else float("nan")
