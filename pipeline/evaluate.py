"""Evaluate a segmentation model on the held-out tiles of one or more site stores.

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
        tp, fp, fn, tn = self.tp, self.fp, self.fn, self.tn
        denom = 2 * tp + fp + fn
        union = tp + fp + fn
        total = tp + fp + fn + tn
        return {
            # An empty slide predicted empty is a perfect segmentation.
            "dice": 1.0 if denom == 0 else 2 * tp / denom,
            "jaccard": 1.0 if union == 0 else tp / union,
            "pixel_accuracy": 1.0 if total == 0 else (tp + tn) / total,
        }


@torch.no_grad()
def predict_tiles(net: nn.Module, images: np.ndarray) -> np.ndarray:
    """Argmax class map for a batch of uint8 NHWC tiles."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    logits = net(x)
    return logits.argmax(dim=1).numpy().astype(np.uint8)


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
