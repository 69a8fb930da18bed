"""Segmentation metrics: Dice (MONAI's), Jaccard, pixel accuracy; AJI and PQ of instance label images.

Dice of a whole image goes through :func:`monai.metrics.compute_dice` (:func:`dice`); summed over tiles
it is the same ``2TP / (2TP + FP + FN)`` from pooled confusion counts (:func:`metrics_from_counts`).
"""

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


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Foreground Dice of two label maps of one image (non-zero = foreground) by MONAI's
    ``compute_dice``; an empty prediction of an empty mask is perfect (1.0)."""
    import torch
    from monai.metrics import compute_dice

    p, g = np.asarray(pred), np.asarray(gt)
    if p.shape != g.shape:
        raise ValueError(f"label images differ in size: {p.shape} vs {g.shape}")
    yp = torch.from_numpy(np.ascontiguousarray(p != 0))[None, None].float()
    y = torch.from_numpy(np.ascontiguousarray(g != 0))[None, None].float()
    return float(compute_dice(yp, y, include_background=True, ignore_empty=False).item())


#: label ids up to this use counting (``np.bincount``, linear) instead of sorting (``np.unique``)
_COUNT_IDS_MAX = 1 << 24
#: the (gt, pred) overlap table is counted densely up to this many cells
_COUNT_PAIRS_MAX = 1 << 25


def _ids_inverse_areas(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(x, return_inverse=True)`` and the areas, for a flat label array: by counting where the
    ids are small non-negative integers (label images: linear, where sorting a megapixel image was 80 % of
    scoring a model), else by sorting."""
    if x.size and 0 <= x.min() and x.max() < _COUNT_IDS_MAX:
        per_id = np.bincount(x)
        ids = np.flatnonzero(per_id)
        lut = np.zeros(len(per_id), dtype=np.int64)
        lut[ids] = np.arange(len(ids))
        return ids, lut[x], per_id[ids]
    ids, inv = np.unique(x, return_inverse=True)
    return ids, inv.reshape(-1), np.bincount(inv.reshape(-1))


def _contingency(g: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, ...]:
    """Instance ids, areas and the sparse (gt, pred) overlap table of two flat label arrays."""
    g_ids, g_inv, g_area = _ids_inverse_areas(g)
    p_ids, p_inv, p_area = _ids_inverse_areas(p)
    both = (g != 0) & (p != 0)
    pairs = g_inv[both] * len(p_ids) + p_inv[both]
    if len(g_ids) * len(p_ids) <= _COUNT_PAIRS_MAX:
        table = np.bincount(pairs, minlength=len(g_ids) * len(p_ids))
        keys = np.flatnonzero(table)
        counts = table[keys]
    else:
        keys, counts = np.unique(pairs, return_counts=True)
    kg, kp = keys // len(p_ids), keys % len(p_ids)
    return g_ids, p_ids, g_area, p_area, kg, kp, counts


def panoptic_quality(gt_labels: np.ndarray, pred_labels: np.ndarray) -> dict[str, float]:
    """PQ = DQ x SQ (Kirillov et al. 2019; Graham et al.'s HoVer-Net form for nuclei) of two instance label
    images (0 = background). A pair matches when its IoU exceeds 0.5 (unique by construction); DQ is the
    detection F1 ``TP / (TP + FP/2 + FN/2)``, SQ the mean IoU of the matched pairs. Also returns the
    counts (tp, fp, fn) so that images can be pooled. Both empty: PQ = 1."""
    g = np.asarray(gt_labels).ravel().astype(np.int64)
    p = np.asarray(pred_labels).ravel().astype(np.int64)
    if g.shape != p.shape:
        raise ValueError(f"label images differ in size: {np.shape(gt_labels)} vs {np.shape(pred_labels)}")
    g_ids, p_ids, g_area, p_area, kg, kp, counts = _contingency(g, p)
    n_g, n_p = int((g_ids != 0).sum()), int((p_ids != 0).sum())
    iou = counts / (g_area[kg] + p_area[kp] - counts) if len(counts) else np.zeros(0)
    matched = iou > 0.5
    tp = int(matched.sum())
    fp, fn = n_p - tp, n_g - tp
    return pq_from_counts(tp, fp, fn, float(iou[matched].sum()))


def pq_from_counts(tp: int, fp: int, fn: int, iou_sum: float) -> dict[str, float]:
    """DQ, SQ, PQ from matched-pair counts and the sum of the matched IoUs."""
    if tp + fp + fn == 0:
        return {"pq": 1.0, "dq": 1.0, "sq": 1.0, "tp": 0, "fp": 0, "fn": 0, "iou_sum": 0.0}
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = iou_sum / tp if tp else 0.0
    return {"pq": dq * sq, "dq": dq, "sq": sq, "tp": tp, "fp": fp, "fn": fn, "iou_sum": iou_sum}


def aji_sums(gt_labels: np.ndarray, pred_labels: np.ndarray) -> tuple[float, float]:
    """AJI's (intersection, union) sums, so that blocks of a large slide can be pooled."""
    g = np.asarray(gt_labels).ravel().astype(np.int64)
    p = np.asarray(pred_labels).ravel().astype(np.int64)
    g_ids, p_ids, g_area, p_area, kg, kp, counts = _contingency(g, p)
    g_fg = g_ids != 0
    p_fg = p_ids != 0
    if not g_fg.any():
        return 0.0, float(p_area[p_fg].sum())
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
    """(tp, fp, fn, tn) of foreground (any non-zero class: 1, or 1 and 2 of a 3-class inside/boundary
    map) for integer class maps of equal shape, as int64."""
    import torch

    p = pred.reshape(-1) != 0
    t = target.reshape(-1) != 0
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
