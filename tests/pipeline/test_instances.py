"""Nuclei as instances: ground truth from the annotations' own polygons, instances from class
probabilities (watershed), AJI/PQ, per-nucleus GeoJSON, whole-image evaluation at full resolution."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage as ndi

from pipeline.config import ModelConfig
from pipeline.evaluate import evaluate_image
from pipeline.instances import instances_from_probabilities, upsample_labels
from pipeline.metrics import aggregated_jaccard_index, panoptic_quality
from pipeline.models import build_model
from wsi.annotations import instance_classes, load_annotation
from wsi.export import InstanceGeoJSONWriter, instance_features

XML = "monuseg-train/annotations_xml/TCGA-21-5784-01Z-00-DX1.xml.gz"
PNG = "monuseg-train/masks/TCGA-21-5784-01Z-00-DX1.png"


def test_instance_ground_truth_from_monuseg_xml(data_root: Path) -> None:
    ann = load_annotation(data_root / XML)
    assert ann.has_instances
    lab = ann.rasterize_instances(0, 0, 1000, 1000, 1000, 1000)
    mask = np.asarray(Image.open(data_root / PNG))[..., 0] > 0
    # the union of the instances is the shipped binary mask (the same drawing rule) ...
    assert ((lab > 0) == mask).mean() > 0.9999
    # ... but the binary mask merges touching nuclei: far fewer blobs than nuclei
    n_true = len(np.unique(lab)) - 1
    _, n_blobs = ndi.label(mask, structure=np.ones((3, 3)))
    assert n_true == len(ann) and n_blobs < 0.9 * n_true
    # AJI of the blobs against the true nuclei is well below 1: blobs are not nuclei
    blob_lab, _ = ndi.label(mask, structure=np.ones((3, 3)))
    assert aggregated_jaccard_index(lab, blob_lab) < 0.9
    # the 3-class target parts touching nuclei: no 4-connected path of "inside" pixels joins two nuclei
    cls = ann.rasterize(0, 0, 1000, 1000, 500, 500, classes=3)
    inside, n_inside = ndi.label(cls == 1)
    half = ann.rasterize_instances(0, 0, 1000, 1000, 500, 500)
    merged = sum(len(np.unique(half[inside == k])) > 1 for k in range(1, n_inside + 1))
    assert set(np.unique(cls)) == {0, 1, 2} and merged == 0


def test_gbm40_contours_are_instances(data_root: Path) -> None:
    ann = load_annotation(data_root / "gbm40-emory/annotations_xml/01_contour.xml.gz")
    lab = ann.rasterize_instances(0, 0, 512, 512, 512, 512)
    assert ann.has_instances and len(np.unique(lab)) - 1 == len(ann) > 50
    m = load_annotation(data_root / "gbm40-emory/masks_derived/01.png")
    assert not m.has_instances  # a mask image: merged blobs, never used as instance ground truth


def _two_touching_nuclei() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:40, :60]
    gt = np.zeros((40, 60), np.int32)
    gt[(yy - 20) ** 2 + (xx - 20) ** 2 <= 81] = 1
    gt[(yy - 20) ** 2 + (xx - 37) ** 2 <= 81] = 2  # overlaps/touches the first
    return gt, instance_classes(gt)


def test_watershed_parts_touching_nuclei() -> None:
    gt, cls = _two_touching_nuclei()
    probs = np.stack([(cls == k).astype(np.float32) for k in range(3)])
    probs = 0.9 * probs + 0.1 / 3  # confident, not certain
    pred = instances_from_probabilities(probs)
    assert pred.max() == 2
    assert aggregated_jaccard_index(gt, pred) > 0.85
    pq = panoptic_quality(gt, pred)
    assert pq["tp"] == 2 and pq["fp"] == 0 and pq["fn"] == 0 and pq["pq"] > 0.85
    # a 2-class map of the same pixels (no boundary channel) is one blob without the distance watershed
    merged = (gt > 0).astype(np.int32)
    pq_merged = panoptic_quality(gt, merged)
    assert pq_merged["tp"] <= 1 and pq_merged["pq"] < pq["pq"]


def test_panoptic_quality_by_hand() -> None:
    gt = np.zeros((10, 10), np.int32)
    gt[0:4, 0:4] = 1  # 16 px
    gt[6:10, 6:10] = 2  # 16 px, missed
    pred = np.zeros_like(gt)
    pred[0:4, 0:3] = 5  # IoU 12/16 with gt 1
    pred[6:8, 0:2] = 7  # a false positive
    pq = panoptic_quality(gt, pred)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (1, 1, 1)
    assert pq["sq"] == pytest.approx(0.75)
    assert pq["dq"] == pytest.approx(1 / (1 + 0.5 + 0.5))
    assert pq["pq"] == pytest.approx(0.75 * 0.5)
    assert panoptic_quality(np.zeros((3, 3), int), np.zeros((3, 3), int))["pq"] == 1.0


def test_counted_overlap_table_equals_the_sorted_one() -> None:
    """AJI/PQ's overlap table by counting (label images) and by sorting (huge or negative ids) agree, and
    so do the metrics, on random instance images with gaps in their ids."""
    from pipeline import metrics

    rng = np.random.default_rng(0)
    for trial in range(6):
        gt = ndi.label(rng.random((120, 90)) > 0.6)[0] * (1 + 7 * (trial % 2))  # ids 0, 8, 16, ...
        pred = ndi.label(ndi.binary_dilation(gt > 0) & (rng.random(gt.shape) > 0.2))[0]
        g, p = gt.ravel().astype(np.int64), pred.ravel().astype(np.int64)
        fast = metrics._contingency(g, p)
        slow_ids = np.unique(g), np.unique(p)
        assert all(np.array_equal(a, b) for a, b in zip(fast[:2], slow_ids, strict=True))
        shifted = metrics._contingency(g + (1 << 40) * (g != 0), p)  # ids too large to count: sorted
        for a, b in zip(fast[2:], shifted[2:], strict=True):
            assert np.array_equal(a, b)
        aji = aggregated_jaccard_index(gt, pred)
        assert 0 < aji < 1
        assert aji == pytest.approx(aggregated_jaccard_index(gt + (1 << 40) * (gt != 0), pred))
        assert panoptic_quality(gt, pred) == panoptic_quality(gt + (1 << 40) * (gt != 0), pred)


def test_per_nucleus_geojson(tmp_path: Path) -> None:
    gt, _ = _two_touching_nuclei()
    prob = np.where(gt > 0, 0.8, 0.1).astype(np.float32)
    feats = instance_features(gt, prob, (100, 200), (2.0, 2.0), 0.25, "Nucleus")
    assert len(feats) == 2
    for f, k in zip(feats, (1, 2), strict=True):
        assert f["properties"]["objectType"] == "detection"
        assert f["properties"]["classification"]["name"] == "Nucleus"
        m = f["properties"]["measurements"]
        assert m["area_um2"] == pytest.approx((gt == k).sum() * 4 * 0.0625, rel=1e-3)
        assert m["mean_probability"] == pytest.approx(0.8)
        ring = np.asarray(f["geometry"]["coordinates"][0])
        # level-0 coordinates: canvas origin (row 100, col 200) times 2 level-0 px per model px
        assert ring[:, 0].min() >= 400 and ring[:, 1].min() >= 200
    with InstanceGeoJSONWriter(tmp_path / "n.geojson") as w:
        w.write(feats)
    geo = json.loads((tmp_path / "n.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == 2


def test_upsample_labels_nearest() -> None:
    lab = np.array([[1, 2], [3, 0]], np.int32)
    up = upsample_labels(lab, (4, 4))
    assert (up[:2, :2] == 1).all() and (up[2:, 2:] == 0).all() and up.shape == (4, 4)


def test_upsampled_probabilities_outline_nuclei_better_than_copied_pixels(data_root: Path) -> None:
    """A real GBM40 nucleus mask brought to 0.5 µm/px (area-averaged, as a model's probability would be)
    and back: bilinear probabilities then threshold recover the 0.25 µm/px outlines closer than copying
    the thresholded model pixels, and keep every class map a distribution."""
    from pipeline.instances import upsample_probabilities
    from pipeline.metrics import dice

    ann = load_annotation(data_root / "gbm40-emory/annotations_xml/03_contour.xml.gz", slide_dimensions=(512, 512))
    gt = ann.rasterize(0, 0, 512, 512, 512, 512) > 0
    fg = gt.reshape(256, 2, 256, 2).mean(axis=(1, 3)).astype(np.float32)
    probs = np.stack([1 - fg, fg])
    up = upsample_probabilities(probs, (512, 512))
    assert up.shape == (2, 512, 512) and np.allclose(up.sum(axis=0), 1.0, atol=1e-5)
    bilinear = dice(up[1] > 0.5, gt)
    copied = dice(upsample_labels((fg > 0.5).astype(np.uint8), (512, 512)) > 0, gt)
    assert bilinear > copied + 0.01 and bilinear > 0.97, (bilinear, copied)


def test_evaluate_image_full_resolution(data_root: Path) -> None:
    """A (untrained) 3-class model on a real GBM40 image: scored at the image's own 512x512 pixels against
    its contours' instances; the figures are in range and the instance count is the annotation's."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(out_channels=3, channels=[8, 16], strides=[2], groups=4))
    ann = data_root / "gbm40-emory/annotations_xml/03_contour.xml.gz"
    res = evaluate_image(
        net, data_root / "gbm40-emory/images/03.tif", ann, target_mpp=0.5, window=64, mpp=0.25
    )
    assert res["shape"] == [512, 512] and res["model_shape"] == [256, 256]
    assert res["n_gt"] == len(load_annotation(ann))
    for k in ("dice", "aji", "pq", "dq", "sq"):
        assert 0.0 <= res[k] <= 1.0, (k, res[k])
    # a mask-image annotation: Dice, but no instance metrics
    res2 = evaluate_image(
        net, data_root / "gbm40-emory/images/03.tif", data_root / "gbm40-emory/masks_derived/03.png",
        target_mpp=0.5, window=64, mpp=0.25,
    )  # fmt: skip
    assert res2["aji"] is None and res2["pq"] is None
    assert res2["dice"] == pytest.approx(res["dice"], abs=1e-3)


def test_evaluate_image_near_target_mpp_is_not_stretched(data_root: Path, tmp_path: Path) -> None:
    """A 0.2527 µm/px MoNuSeg image scored "at" 0.25 µm/px: the level is read as is (within the tolerance),
    so the model map must be the image's own 1000 px, not 1011 px read past its edge and squeezed back
    (which displaced the nuclei by up to 11 px). An oracle 1x1 model on an image that draws the annotated
    nuclei dark scores Dice ~1."""
    import tifffile

    mask = np.asarray(Image.open(data_root / PNG))[..., 0] > 0
    img = np.where(mask[..., None], 40, 230).astype(np.uint8).repeat(3, axis=2)
    tif = tmp_path / "drawn.tif"
    tifffile.imwrite(tif, img)
    oracle = torch.nn.Conv2d(3, 2, kernel_size=1)
    with torch.no_grad():  # background logit rises with brightness, nucleus logit falls
        oracle.weight.copy_(torch.tensor([[20.0, 20.0, 20.0], [-20.0, -20.0, -20.0]])[..., None, None])
        oracle.bias.copy_(torch.tensor([-26.0, 26.0]))
    res = evaluate_image(oracle, tif, data_root / XML, target_mpp=0.25, window=128, mpp=0.2527)
    assert res["model_shape"] == [1000, 1000] and res["shape"] == [1000, 1000]
    assert res["dice"] > 0.99, res["dice"]
    # the whole image in one window larger than it (the experiment's `inference.tile_size`), padded by reflection
    whole = evaluate_image(oracle, tif, data_root / XML, target_mpp=0.25, window=1024, mpp=0.2527, overlap=0.5)
    assert whole["dice"] == pytest.approx(res["dice"], abs=1e-3)
