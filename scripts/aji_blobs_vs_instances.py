"""How much the old AJI flattered (issue 18): one model, the MoNuSeg test images with true nuclei (XML).

Old: connected blobs of the binary ground-truth mask against blobs of the thresholded prediction, at the
model's 0.5 µm/px (what `fedpath infer`'s metrics.json reported). New: the annotated nuclei against the
watershed instances, at the image's own 0.25 µm/px.

    python scripts/aji_blobs_vs_instances.py MODEL.safetensors [DATA_ROOT]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from pipeline.checkpoint import load_model
from pipeline.instances import (
    foreground,
    instances_from_probabilities,
    predict_probabilities,
    upsample_labels,
)
from pipeline.metrics import aggregated_jaccard_index
from wsi.annotations import load_annotation
from wsi.manifest import read_manifest
from wsi.readers import open_slide

EIGHT = np.ones((3, 3), dtype=bool)


def main() -> None:
    net, meta = load_model(Path(sys.argv[1]))
    net.eval()
    root = Path(sys.argv[2] if len(sys.argv) > 2 else "../shared/data")
    olds, news = [], []
    for man in sorted(Path("data_manifests/instances").glob("monuseg_*.csv")):
        for row in read_manifest(man):
            if row.split != "test":
                continue
            r = open_slide(row.slide_path(root), row.mpp)
            W0, H0 = r.dimensions
            w, h = r.size_at_mpp(meta.target_mpp)
            probs = predict_probabilities(net, r.read_at_mpp(0, 0, w, h, meta.target_mpp), meta.tile_size)
            ann = load_annotation(row.annotation_file(root))  # type: ignore[arg-type]
            gt_half = ann.rasterize(0, 0, W0, H0, w, h) > 0
            old = aggregated_jaccard_index(ndi.label(gt_half, EIGHT)[0], ndi.label(foreground(probs) > 0.5, EIGHT)[0])
            pred = upsample_labels(instances_from_probabilities(probs), (H0, W0))
            new = aggregated_jaccard_index(ann.rasterize_instances(0, 0, W0, H0, W0, H0), pred)
            olds.append(old)
            news.append(new)
            print(f"{row.slide_id}: old (blobs, half resolution) {old:.3f}  new (nuclei, full resolution) {new:.3f}")
    print(f"mean of {len(olds)}: old {np.mean(olds):.3f}  new {np.mean(news):.3f}  old - new {np.mean(olds) - np.mean(news):+.3f}")


if __name__ == "__main__":
    main()
