"""Evaluate a segmentation model: on the held-out tiles of a site store, or on whole held-out images at
full resolution with instance metrics (:func:`evaluate_images`).

Metrics are computed per slide from pixel confusion counts (foreground = class 1) and then averaged over
slides, the way FedDP reports Dice, Jaccard and pixel accuracy; the pooled (all pixels) figures are kept
too. Tiles are read from the zarr store one batch at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.metrics import metrics_from_counts
from pipeline.models import foreground_from_logits
from wsi.store import SiteStore


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        p = pred.astype(bool)
        g = gt.astype(bool)
        self.tp += int(np.count_nonzero(p & g))
        self.fp += int(np.count_nonzero(p & ~g))
        self.fn += int(np.count_nonzero(~p & g))
        self.tn += int(np.count_nonzero(~p & ~g))

    def metrics(self) -> dict[str, float]:
        # An empty slide predicted empty is a perfect segmentation.
        return metrics_from_counts((self.tp, self.fp, self.fn, self.tn))


@torch.no_grad()
def predict_tiles(net: nn.Module, images: np.ndarray) -> np.ndarray:
    """Foreground mask (:func:`pipeline.models.foreground_from_logits` above 0.5) of a batch of uint8 NHWC tiles."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return (foreground_from_logits(net(x)) > 0.5).numpy().astype(np.uint8)


def evaluate_store(
    net: nn.Module, store_path: Path, splits: set[str] | None = None, batch_size: int = 16
) -> dict[str, Any]:
    """Per-slide and mean metrics of ``net`` on a store's tiles of the given splits (default: test)."""
    splits = splits or {"test"}
    store = SiteStore(store_path)
    net.eval()
    per_slide: dict[str, dict[str, float]] = {}
    pooled = Counts()
    for sid in store.slides():
        if store.split(sid) not in splits:
            continue
        masks = store.masks(sid)
        if masks is None:
            continue
        images = store.images(sid)
        counts = Counts()
        n = images.shape[0]
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            pred = predict_tiles(net, np.asarray(images[start:stop]))
            gt = np.asarray(masks[start:stop])
            counts.add(pred, gt)
            pooled.add(pred, gt)
        per_slide[sid] = {**counts.metrics(), "tiles": n}
    if not per_slide:
        return {"slides": {}, "n_slides": 0}
    keys = ("dice", "jaccard", "pixel_accuracy")
    mean = {k: float(np.mean([m[k] for m in per_slide.values()])) for k in keys}
    return {"slides": per_slide, "n_slides": len(per_slide), **mean, "pooled": pooled.metrics()}


# ------------------------------------------------------------------------------------------------------
# Whole images at full resolution, with instances
# ------------------------------------------------------------------------------------------------------
_GT_CACHE: dict[tuple[str, int, int, int], tuple[np.ndarray, np.ndarray | None]] = {}


def _ground_truth(annotation: Path, W0: int, H0: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(binary mask, instance labels or None) of an annotation at full resolution; kept for the process,
    since every model of an experiment is scored against the same few test images."""
    from wsi.annotations import load_annotation

    key = (str(annotation.resolve()), annotation.stat().st_mtime_ns, W0, H0)
    if key not in _GT_CACHE:
        if len(_GT_CACHE) > 64:
            _GT_CACHE.clear()
        ann = load_annotation(annotation, slide_dimensions=(W0, H0))
        gt = ann.rasterize(0, 0, W0, H0, W0, H0) > 0
        inst = ann.rasterize_instances(0, 0, W0, H0, W0, H0) if ann.has_instances else None
        _GT_CACHE[key] = (gt, inst)
    return _GT_CACHE[key]


def evaluate_image(
    net: nn.Module,
    slide: Path,
    annotation: Path | None,
    *,
    target_mpp: float,
    window: int,
    mpp: float | None = None,
    default_mpp: float | None = None,
    mpp_tolerance: float = 0.05,
    threshold: float = 0.5,
    overlap: float = 0.25,
    tta: str = "none",
    precision: str = "float32",
) -> dict[str, Any]:
    """One whole image: the model runs at ``target_mpp`` (sliding windows of ``window`` px sharing
    ``overlap`` of their side, Gaussian blending), its
    class probabilities are resampled to the image's own pixels (bilinear); its foreground and its instances
    (:mod:`pipeline.instances`) are made there and scored against the annotation rasterised at full resolution: Dice
    (MONAI's), Jaccard; AJI and PQ (DQ = detection F1, SQ) against the annotation's own instances (one
    polygon per nucleus). A mask-image annotation has no instances: its AJI/PQ are None, never computed
    from merged blobs."""
    from pipeline.instances import (
        foreground,
        instances_from_probabilities,
        predict_probabilities,
        upsample_probabilities,
    )
    from pipeline.metrics import aggregated_jaccard_index, dice, panoptic_quality
    from wsi.readers import open_slide

    reader = open_slide(slide, mpp, default_mpp)
    try:
        W0, H0 = reader.dimensions
        w, h = reader.size_at_mpp(target_mpp, mpp_tolerance)
        pixels = reader.read_at_mpp(0, 0, w, h, target_mpp, mpp_tolerance)
    finally:
        close = getattr(reader, "close", None)
        if close is not None:
            close()
    probs = predict_probabilities(net, pixels, window, overlap=overlap, tta=tta, precision=precision)
    if (h, w) != (H0, W0):  # bilinear probabilities, then threshold and instances at the image's own pixels
        probs = upsample_probabilities(probs, (H0, W0))
    labels = instances_from_probabilities(probs, threshold, area_scale=(H0 * W0) / (h * w))
    fg_full = foreground(probs) > threshold
    out: dict[str, Any] = {"model_shape": [h, w], "shape": [H0, W0], "n_pred": int(labels.max())}
    if annotation is None:
        return out
    gt, gt_inst = _ground_truth(Path(annotation), W0, H0)
    c = Counts()
    c.add(fg_full, gt)
    out.update(c.metrics())
    out["dice"] = dice(fg_full, gt)  # MONAI's Dice (the same value as from the counts)
    if gt_inst is not None:
        out["aji"] = aggregated_jaccard_index(gt_inst, labels)
        out.update(panoptic_quality(gt_inst, labels))
        out["n_gt"] = int(len(np.unique(gt_inst)) - 1)
    else:
        out["aji"] = None
        out["pq"] = None
    return out


def evaluate_images(
    net: nn.Module, rows: list[Any], data_root: Path, *, target_mpp: float, window: int,
    overlap: float, default_mpp: float | None = None, mpp_tolerance: float = 0.05, tta: str = "none",
    precision: str = "float32",
) -> dict[str, Any]:  # fmt: skip
    """:func:`evaluate_image` over manifest rows (``wsi.manifest.ManifestRow``); per image and the mean
    over images (Dice, Jaccard, AJI, PQ/DQ/SQ over the images that have instance ground truth)."""
    per: dict[str, dict[str, Any]] = {}
    for row in rows:
        ann = row.annotation_file(data_root)
        per[row.slide_id] = evaluate_image(
            net, row.slide_path(data_root), ann, target_mpp=target_mpp, window=window, mpp=row.mpp,
            default_mpp=default_mpp, mpp_tolerance=mpp_tolerance, overlap=overlap, tta=tta,
            precision=precision,
        )  # fmt: skip
    if not per:
        return {"slides": {}, "n_slides": 0}
    res: dict[str, Any] = {"slides": per, "n_slides": len(per)}
    for k in ("dice", "jaccard", "pixel_accuracy", "aji", "pq", "dq", "sq"):
        vals = [m[k] for m in per.values() if m.get(k) is not None]
        res[k] = float(np.mean(vals)) if vals else None
    res["n_instance_slides"] = sum(1 for m in per.values() if m.get("aji") is not None)
    return res
