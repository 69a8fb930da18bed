"""Slide-level inference end to end: constant-model oracle, real slides, metrics, bad inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from infer_utils import write_constant_model, write_model, write_tissue_tiff

from fedcore.summary import read_summary
from pipeline.config import ExperimentConfig, ModelConfig
from pipeline.errors import FedpathError
from pipeline.infer import load_inference_model, run_infer
from pipeline.metrics import aggregated_jaccard_index
from wsi.manifest import make_row, write_manifest


def cfg_for(run_dir: Path, **inference: object) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {"run_dir": str(run_dir), "inference": {"batch_size": 4, "thumbnail_size": 256, **inference}}
    )


def test_constant_model_gives_a_constant_map_borders_included(tmp_path: Path) -> None:
    slide = write_tissue_tiff(tmp_path / "flat.tif", 437, 301, mpp=0.5)
    model = write_constant_model(tmp_path / "const.safetensors", p1=0.75, tile=64, mpp=1.0)
    cfg = cfg_for(tmp_path / "run", overlap=0.3, tissue_only=False, block_size=96, chunk_size=64)
    res = run_infer(cfg, model, [slide], None, None, None)
    assert res["n_failed"] == 0
    out = tmp_path / "run" / "predictions" / "flat"
    prob = np.asarray(zarr.open_group(str(out / "prob.ome.zarr"), mode="r")["0"][:])
    assert prob.shape == (1, 151, 219)  # ceil(301 / 2), ceil(437 / 2): the slide at 1 µm/px
    np.testing.assert_allclose(prob, 0.75, atol=1e-6)  # no seams, no holes at the edges or corners
    with tifffile.TiffFile(out / "mask.ome.tif") as tf:
        mask = tf.series[0].levels[0].asarray()
    assert mask.shape == (301, 437) and (mask == 255).all()


def test_both_real_slides_end_to_end(tmp_path: Path, data_root: Path) -> None:
    import openslide

    rows = [
        make_row(data_root, "a", "slides/CMU-1-Small-Region.svs", slide_id="cmu1", split="test"),
        # CropBreastSlide's TIFF tags claim 264.58 µm/px (a 96-dpi default): the manifest overrides it.
        make_row(data_root, "a", "slides/CropBreastSlide.tiff", slide_id="breast", split="test", mpp=0.5),
    ]
    manifest = write_manifest(rows, tmp_path / "a.csv")
    model = write_model(tmp_path / "m.safetensors", tile=64, mpp=4.0)
    cfg = cfg_for(tmp_path / "run")
    res = run_infer(cfg, model, [], manifest, "a", data_root)
    assert res["n_failed"] == 0, res["failed"]
    by_id = {s["slide_id"]: s for s in res["slides"]}
    expected = {"cmu1": ((2220, 2967), 0.499), "breast": ((2033, 1525), 0.5)}
    for sid, (dims, mpp) in expected.items():
        out = tmp_path / "run" / "predictions" / sid
        for name in ("prob.ome.zarr", "mask.ome.tif", "mask.geojson", "thumbnail.png", "run.json"):
            assert (out / name).exists(), name
        assert json.loads((out / "run.json").read_text())["complete"] is True
        s = openslide.OpenSlide(str(out / "mask.ome.tif"))
        assert s.dimensions == dims
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(mpp, rel=1e-3)
        s.close()
        assert by_id[sid]["windows"] > 0 and by_id[sid]["model_mpp"] == pytest.approx(4.0, rel=0.1)
        geo = json.loads((out / "mask.geojson").read_text())
        assert geo["type"] == "FeatureCollection" and len(geo["features"]) == by_id[sid]["polygons"]
    summary = read_summary(tmp_path / "run")["infer"]
    assert {s["slide_id"] for s in summary["slides"]} == {"cmu1", "breast"}

    # Same model and settings again: skipped; other settings into the same folder: refused, naming it.
    again = run_infer(cfg, model, [], manifest, "a", data_root)
    assert [s["status"] for s in again["slides"]] == ["skipped", "skipped"]
    other = run_infer(cfg_for(tmp_path / "run", threshold=0.7), model, [], manifest, "a", data_root)
    assert other["n_ok"] == 0 and other["n_failed"] == 2
    assert "predictions/cmu1: holds a different run" in other["failed"][0]["error"]


def test_metrics_against_ground_truth_with_a_constant_model(tmp_path: Path, data_root: Path) -> None:
    """All-foreground prediction: Dice = 2|G|/(|G|+N), Jaccard = accuracy = |G|/N, AJI = |G|/(n·N)."""
    import zarr
    from skimage.measure import label

    from pipeline.instances import upsample_labels
    from wsi.annotations import load_annotation

    img = "monuseg-train/images/TCGA-21-5784-01Z-00-DX1.tif"
    ann = "monuseg-train/annotations_xml/TCGA-21-5784-01Z-00-DX1.xml.gz"
    rows = [make_row(data_root, "m", img, ann, slide_id="tile", split="test", mpp=0.2527)]
    manifest = write_manifest(rows, tmp_path / "m.csv")
    model = write_constant_model(tmp_path / "c.safetensors", p1=0.9, tile=64, mpp=0.5)
    res = run_infer(cfg_for(tmp_path / "run", tissue_only=False), model, [], manifest, None, data_root)
    assert res["n_failed"] == 0, res["failed"]
    m = json.loads((tmp_path / "run" / "predictions" / "tile" / "metrics.json").read_text())
    H, W = res["slides"][0]["canvas"]
    sx = res["slides"][0]["model_mpp"] / 0.2527  # level-0 pixels per model pixel
    gt = load_annotation(data_root / ann).rasterize(0, 0, W * sx, H * sx, W, H) > 0
    g, n = int(gt.sum()), H * W
    assert m["dice"] == pytest.approx(2 * g / (g + n))
    assert m["jaccard"] == pytest.approx(g / n) and m["pixel_accuracy"] == pytest.approx(g / n)
    # AJI is against the annotated nuclei at the image's own resolution (issue 18), not against blobs of
    # the binary mask at the model's: the blob figure flattered, the instance one is lower
    blob_aji = g / (label(gt, connectivity=2).max() * n)
    a = load_annotation(data_root / ann)
    assert m["n_gt"] == len(a) and "full resolution" in m["aji_scope"]
    true = a.rasterize_instances(0, 0, 1000, 1000, 1000, 1000)
    pred = upsample_labels(
        np.asarray(zarr.open_array(str(tmp_path / "run" / "predictions" / "tile" / "instances.zarr" / "0"))[:]),
        (1000, 1000),
    )
    assert m["aji"] == pytest.approx(aggregated_jaccard_index(true, pred)) and m["aji"] < blob_aji
    assert res["slides"][0]["metrics"]["dice"] == m["dice"]


def brute_aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Kumar et al.'s loop: best-IoU prediction per ground-truth object, unmatched predictions added."""
    inter = union = 0.0
    used: set[int] = set()
    for gi in [i for i in np.unique(gt) if i]:
        g = gt == gi
        best, best_iou = None, -1.0
        for pj in [j for j in np.unique(pred) if j]:
            p = pred == pj
            iou = (g & p).sum() / (g | p).sum()
            if iou > best_iou:
                best, best_iou = pj, iou
        if best is None or best_iou == 0:
            union += g.sum()
            continue
        p = pred == best
        inter += (g & p).sum()
        union += (g | p).sum()
        used.add(int(best))
    for pj in [j for j in np.unique(pred) if j]:
        if int(pj) not in used:
            union += (pred == pj).sum()
    return 1.0 if union == 0 else inter / union


def test_aji_against_the_reference_loop() -> None:
    from skimage.measure import label

    rng = np.random.default_rng(1)
    for _ in range(5):
        gt = label(rng.random((40, 40)) > 0.7)
        pred = label(rng.random((40, 40)) > 0.6)
        assert aggregated_jaccard_index(gt, pred) == pytest.approx(brute_aji(gt, pred))
    gt = label(rng.random((30, 30)) > 0.5)
    assert aggregated_jaccard_index(gt, gt) == 1.0
    assert aggregated_jaccard_index(np.zeros((5, 5), int), np.zeros((5, 5), int)) == 1.0
    assert aggregated_jaccard_index(gt, np.zeros_like(gt)) == 0.0


def test_bad_inputs_name_the_file_and_the_others_go_on(tmp_path: Path) -> None:
    good = write_tissue_tiff(tmp_path / "good.tif", 300, 200, mpp=0.5)
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide at all")
    coarse = write_tissue_tiff(tmp_path / "coarse.tif", 100, 100, mpp=8.0)  # model at 1 µm/px
    model = write_model(tmp_path / "m.safetensors", tile=64, mpp=1.0)
    res = run_infer(cfg_for(tmp_path / "run"), model, [good, broken, coarse], None, None, None)
    assert [s["slide_id"] for s in res["slides"]] == ["good"]
    errors = {f["slide_id"]: f["error"] for f in res["failed"]}
    assert errors["broken"].startswith(str(broken)) and "unsupported format" in errors["broken"]
    assert errors["coarse"].startswith(str(coarse)) and "cannot be reached" in errors["coarse"]
    assert read_summary(tmp_path / "run")["infer"]["n_failed"] == 2

    # The failed attempt's folder does not block a corrected run; the finished one is protected.
    retry = run_infer(cfg_for(tmp_path / "run", max_upsample=10.0), model, [good, coarse], None, None, None)
    assert [s["slide_id"] for s in retry["slides"]] == ["coarse"]
    assert "predictions/good: holds a different run (differs in inference)" in retry["failed"][0]["error"]

    grey = write_model(tmp_path / "grey.safetensors", cfg=ModelConfig(in_channels=1, channels=[4, 8], strides=[2],
                                                                     num_res_units=0, groups=2))  # fmt: skip
    with pytest.raises(FedpathError, match=r"grey\.safetensors: model takes 1 input channel"):
        load_inference_model(grey)
    with pytest.raises(FedpathError, match="no global model"):
        run_infer(cfg_for(tmp_path / "run2"), None, [good], None, None, None)


def _models_loaded() -> int:
    import pipeline.infer

    return len(pipeline.infer._WORKER_MODELS)


def test_dask_cluster_gives_the_local_result_bit_for_bit(tmp_path: Path) -> None:
    """`fedpath infer --scheduler` on a LocalCluster of two worker processes: two slides at once, their
    blocks spread over both workers, and every output the same bytes as the local run's."""
    from distributed import LocalCluster

    from fedpath.cli import run

    slides = [write_tissue_tiff(tmp_path / "s.tif", 500, 380, mpp=0.5),
              write_tissue_tiff(tmp_path / "t.tif", 300, 420, mpp=0.5, seed=1)]  # fmt: skip
    model = write_model(tmp_path / "m.safetensors", tile=64, mpp=1.0)
    opts = {"block_size": 96, "chunk_size": 64, "thumbnail_size": 64}
    cfg = cfg_for(tmp_path / "local", **opts).model_copy(deep=True)
    cfg.train.threads = 1
    local = run_infer(cfg, model, slides, None, None, None)
    assert local["n_ok"] == 2 and sum(s["blocks"] for s in local["slides"]) >= 5
    (tmp_path / "dask.yaml").write_text(json.dumps(
        {"run_dir": str(tmp_path / "dask"), "train": {"threads": 1}, "inference": {"batch_size": 4, **opts}}
    ))  # fmt: skip
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        argv = ["infer", "--config", str(tmp_path / "dask.yaml"), "--model", str(model),
                "--scheduler", cluster.scheduler_address] + [a for p in slides for a in ("--slide", str(p))]  # fmt: skip
        assert run(argv) == 0
        with cluster.get_client() as client:
            loaded = client.run(_models_loaded)  # worker address -> models rebuilt there
    assert sorted(loaded.values()) == [1, 1]  # both workers took part
    for sid in ("s", "t"):
        a, b = tmp_path / "local/predictions" / sid, tmp_path / "dask/predictions" / sid
        za = zarr.open_group(str(a / "prob.ome.zarr"), mode="r")
        zb = zarr.open_group(str(b / "prob.ome.zarr"), mode="r")
        levels = sorted(k for k, _ in za.arrays())
        assert levels and levels == sorted(k for k, _ in zb.arrays())
        for lv in levels:
            assert np.array_equal(za[lv][:], zb[lv][:]), lv
        with tifffile.TiffFile(a / "mask.ome.tif") as ta, tifffile.TiffFile(b / "mask.ome.tif") as tb:
            la, lb = ta.series[0].levels, tb.series[0].levels
            assert len(la) == len(lb)
            assert all(np.array_equal(x.asarray(), y.asarray()) for x, y in zip(la, lb, strict=True))
            # the OME-XML differs only in the UUID tifffile draws for every file
            no_uuid = [re.sub('UUID="[^"]*"', "", t.ome_metadata or "") for t in (ta, tb)]
            assert no_uuid[0] and no_uuid[0] == no_uuid[1]
        assert (a / "mask.geojson").read_text() == (b / "mask.geojson").read_text()


@pytest.mark.parametrize("override", [0.5, 0.37])  # a pyramid level read as is; a resampled read
def test_blockwise_stitching_equals_monai_full_canvas_inference(
    tmp_path: Path, data_root: Path, override
) -> None:
    """Oracle: MONAI's in-memory SlidingWindowInferer (same windows, same Gaussian) over the whole canvas
    read in one go. Small blocks make many block borders, on a level whose downsample is not an integer."""
    import torch
    from monai.inferers import SlidingWindowInferer

    from pipeline.infer import plan_canvas, read_canvas
    from wsi.readers import open_slide

    slide = data_root / "slides" / "CropBreastSlide.tiff"
    model = write_model(tmp_path / "m.safetensors", tile=64, mpp=2.0)
    cfg = cfg_for(tmp_path / "run", tissue_only=False, block_size=100, chunk_size=64, overlap=0.25)
    rows = [make_row(data_root, "a", "slides/CropBreastSlide.tiff", slide_id="b", split="test", mpp=override)]
    res = run_infer(cfg, model, [], write_manifest(rows, tmp_path / "a.csv"), None, data_root)
    assert res["n_failed"] == 0 and res["slides"][0]["blocks"] > 4
    ours = zarr.open_group(str(tmp_path / "run/predictions/b/prob.ome.zarr"), mode="r")["0"][0]

    loaded = load_inference_model(model)
    with open_slide(slide, override) as reader:
        canvas = plan_canvas(reader, 2.0, 0.1)
        assert canvas.exact == (override == 0.5)
        img = read_canvas(reader, canvas, 0, 0, *canvas.shape)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
    inferer = SlidingWindowInferer(
        (64, 64), sw_batch_size=4, overlap=0.25, mode="gaussian", sigma_scale=0.125
    )
    with torch.inference_mode():
        ref = inferer(x, lambda t: torch.softmax(loaded.net(t), 1)[:, 1:2])[0, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-4)
