"""Segmentation metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def aggregated_jaccard_index(gt_labels: np.ndarray, pred_labels: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al., 2017) of two instance label images (0 = background).

    Each ground-truth instance is matched to the predicted instance of highest IoU with it; the matched
    intersections are summed over the matched unions, and every predicted instance left unmatched adds
    its area to the denominator. Both empty: 1.0. Computed from the sparse contingency table of
    (gt, pred) label pairs, so it is linear in the pixel count.
    """
    g = np.asarray(gt_labels).ravel().astype(np.int64)
    p = np.asarray(pred_labels).ravel().astype(np.int64)
    if g.shape != p.shape:
        raise ValueError(f"label images differ in size: {np.shape(gt_labels)} vs {np.shape(pred_labels)}")
    inter, union = aji_sums(g, p)
    return 1.0 if union == 0 else inter / union


def aji_sums(gt_labels: np.ndarray, pred_labels: np.ndarray) -> tuple[float, float]:
    """AJI's (intersection, union) sums, so that blocks of a large slide can be pooled."""
    g = np.asarray(gt_labels).ravel().astype(np.int64)
    p = np.asarray(pred_labels).ravel().astype(np.int64)
    g_ids, g_inv = np.unique(g, return_inverse=True)
    p_ids, p_inv = np.unique(p, return_inverse=True)
    g_area = np.bincount(g_inv)
    p_area = np.bincount(p_inv)
    g_fg = g_ids != 0
    p_fg = p_ids != 0
    if not g_fg.any():
        return 0.0, float(p_area[p_fg].sum())
    # Sparse contingency table over pixels where both are foreground.
    both = (g != 0) & (p != 0)
    pairs = g_inv[both] * len(p_ids) + p_inv[both]
    keys, counts = np.unique(pairs, return_counts=True)
    kg, kp = keys // len(p_ids), keys % len(p_ids)
    iou = counts / (g_area[kg] + p_area[kp] - counts)
    # Best prediction per gt instance: sort by (gt, -iou) and keep the first of each gt.
    order = np.lexsort((-iou, kg))
    first = np.ones(len(order), dtype=bool)
    first[1:] = kg[order][1:] != kg[order][:-1]
    best = order[first]
    inter_total = float(counts[best].sum())
    union_total = float((g_area[kg[best]] + p_area[kp[best]] - counts[best]).sum())
    used = np.zeros(len(p_ids), dtype=bool)
    used[kp[best]] = True
    matched_g = np.zeros(len(g_ids), dtype=bool)
    matched_g[kg[best]] = True
    # Ground-truth instances with no overlapping prediction: their whole area is union.
    union_total += float(g_area[g_fg & ~matched_g].sum())
    union_total += float(p_area[p_fg & ~used].sum())
    return inter_total, union_total


# -- pixel metrics (FedDP reports Dice, Jaccard and pixel accuracy) -------------------------------------
def confusion_counts(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(tp, fp, fn, tn) of foreground (class 1) for integer class maps of equal shape, as int64."""
    import torch

    p = pred.reshape(-1) == 1
    t = target.reshape(-1) == 1
    tp = int(torch.count_nonzero(p & t))
    fp = int(torch.count_nonzero(p & ~t))
    fn = int(torch.count_nonzero(~p & t))
    return torch.tensor([tp, fp, fn, p.numel() - tp - fp - fn], dtype=torch.int64)


def dice_from_counts(tp: float, fp: float, fn: float) -> float:
    """2TP / (2TP + FP + FN); an empty prediction of an empty mask is perfect (1.0)."""
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2 * tp / denom


def jaccard_from_counts(tp: float, fp: float, fn: float) -> float:
    """TP / (TP + FP + FN); 1.0 when both are empty."""
    union = tp + fp + fn
    return 1.0 if union == 0 else tp / union


def pixel_accuracy_from_counts(tp: float, fp: float, fn: float, tn: float) -> float:
    total = tp + fp + fn + tn
    return 1.0 if total == 0 else (tp + tn) / total


def metrics_from_counts(counts: Sequence[float] | torch.Tensor) -> dict[str, float]:
    """Dice, Jaccard and pixel accuracy from (tp, fp, fn, tn)."""
    tp, fp, fn, tn = (float(v) for v in counts)
    return {
        "dice": dice_from_counts(tp, fp, fn),
        "jaccard": jaccard_from_counts(tp, fp, fn),
        "pixel_accuracy": pixel_accuracy_from_counts(tp, fp, fn, tn),
    }
