"""Exports against oracles: GeoJSON rasterised back, OME-TIFF read by OpenSlide/tifffile, NGFF metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
import zarr
from skimage.draw import disk, polygon
from skimage.measure import label

from wsi.annotations import load_annotation
from wsi.export import (
    create_prob_zarr,
    finish_prob_zarr,
    iter_polygons,
    mask_coverage,
    write_geojson,
    write_mask_ome_tiff,
    write_thumbnail,
)

H, W = 300, 500


def shapes_mask() -> np.ndarray:
    """A ring (disk with a hole and an island in the hole), a bar, a triangle and single pixels, several
    of them crossing the 64-px block borders used below."""
    m = np.zeros((H, W), np.float32)
    m[disk((150, 250), 100, shape=m.shape)] = 1
    m[disk((150, 250), 40, shape=m.shape)] = 0
    m[disk((150, 250), 15, shape=m.shape)] = 1
    m[10:30, 10:480] = 1
    m[polygon([200, 290, 290], [380, 380, 490], shape=m.shape)] = 1
    for i in range(12):
        m[40 + 5 * i, 20 + 3 * i] = 1
    return m


@pytest.fixture
def prob(tmp_path: Path) -> zarr.Array:
    arr = create_prob_zarr(tmp_path / "prob.ome.zarr", (1, H, W), chunk=64)
    arr[0] = shapes_mask() * 0.9
    return arr


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("scale", [(1.0, 1.0), (4.0, 4.0), (2.5, 2.5)])
def test_geojson_rasterised_back_matches_the_mask(tmp_path: Path, prob: zarr.Array, scale) -> None:
    W0, H0 = int(W * scale[0]) - 1, int(H * scale[1]) - 1  # slide a little smaller than the canvas
    n = write_geojson(tmp_path / "m.geojson", prob, channel=0, threshold=0.5, scale=scale, mpp=0.5, block=64)
    label_count = label(shapes_mask() > 0.5, connectivity=2).max()
    assert n == label_count  # one feature per 8-connected component, whatever the block borders

    levels = write_mask_ome_tiff(
        tmp_path / "mask.ome.tif", prob, channel=0, threshold=0.5, slide_size=(W0, H0), scale=scale, mpp=0.5,
        tile=256,
    )  # fmt: skip
    assert levels[0] == (W0, H0)
    with tifffile.TiffFile(tmp_path / "mask.ome.tif") as tf:
        mask0 = tf.series[0].levels[0].asarray() > 0
    # Oracle: a level-0 pixel is inside when its centre (x + 0.5, y + 0.5) lies in a polygon.
    geoms = shapely.from_geojson(
        [json.dumps(f["geometry"]) for f in json.loads((tmp_path / "m.geojson").read_text())["features"]]
    )
    yy, xx = np.mgrid[0:H0, 0:W0]
    inside = shapely.contains_xy(shapely.union_all(geoms), xx + 0.5, yy + 0.5)
    assert iou(mask0, inside) >= 0.98
    if scale[0] >= 2.5:
        # The project's own reader (QuPath convention, PIL fill-plus-outline rule) reads it back too.
        raster = load_annotation(tmp_path / "m.geojson").rasterize(0, 0, W0, H0, W0, H0) > 0
        assert iou(mask0, raster) >= 0.98

    data = json.loads((tmp_path / "m.geojson").read_text())
    assert data["type"] == "FeatureCollection"
    feats = data["features"]
    assert all(f["properties"]["objectType"] == "detection" for f in feats)
    holes = [f for f in feats if len(f["geometry"]["coordinates"]) > 1]
    assert len(holes) == 1  # the ring keeps its hole; the island inside it is its own feature


def test_blockwise_polygons_equal_whole_image_polygons(prob: zarr.Array) -> None:
    whole = shapely.union_all(list(iter_polygons(prob, 0, 0.5, block=4096)))
    for block in (64, 100):
        parts = list(iter_polygons(prob, 0, 0.5, block=block))
        merged = shapely.union_all(parts)
        assert shapely.symmetric_difference(whole, merged).area < 1e-6
        # every component comes out as exactly one polygon (no leftovers at block borders)
        assert len(parts) == len(list(iter_polygons(prob, 0, 0.5, block=4096)))


def test_ome_tiff_opens_in_openslide_with_size_and_mpp(tmp_path: Path, prob: zarr.Array) -> None:
    import openslide

    path = tmp_path / "mask.ome.tif"
    write_mask_ome_tiff(path, prob, channel=0, threshold=0.5, slide_size=(1999, 1197), scale=(4.0, 4.0),
                        mpp=0.2527, tile=256)  # fmt: skip
    slide = openslide.OpenSlide(str(path))
    assert slide.dimensions == (1999, 1197)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.2527, rel=1e-4)
    assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.2527, rel=1e-4)
    region = np.asarray(slide.read_region((900, 500), 0, (200, 100)))[..., 0]
    slide.close()
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome
        full = tf.series[0].levels[0].asarray()
        assert len(tf.series[0].levels) == 4 and tf.series[0].levels[1].shape == (599, 1000)
        px = tf.ome_metadata
        assert 'PhysicalSizeX="0.2527"' in px and "PhysicalSizeXUnit" in px
    np.testing.assert_array_equal(region, full[500:600, 900:1100])
    # nearest upsampling: level-0 pixel x takes model pixel floor((x + 0.5) / 4)
    m = shapes_mask() > 0.5
    ys, xs = np.arange(1197), np.arange(1999)
    expected = m[np.minimum((ys + 0.5) // 4, H - 1).astype(int)][
        :, np.minimum((xs + 0.5) // 4, W - 1).astype(int)
    ]
    np.testing.assert_array_equal(full > 0, expected)


def test_ngff_multiscales_metadata(tmp_path: Path, prob: zarr.Array) -> None:
    meta = finish_prob_zarr(tmp_path / "prob.ome.zarr", mpp=2.0, levels=3, channel_names=["foreground"])
    g = zarr.open_group(str(tmp_path / "prob.ome.zarr"), mode="r")
    ome = g.attrs["ome"]
    assert ome == json.loads(json.dumps(meta)) and ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    for k, d in enumerate(ms["datasets"]):
        arr = g[d["path"]]
        assert arr.metadata.dimension_names == ("c", "y", "x")
        assert d["coordinateTransformations"][0]["scale"] == [1.0, 2.0 * 2**k, 2.0 * 2**k]
        assert arr.shape == (1, -(-H // 2**k), -(-W // 2**k))
    lvl1 = np.asarray(g["1"][0])
    base = np.asarray(g["0"][0])
    np.testing.assert_allclose(
        lvl1[:10, :10], base[:20, :20].reshape(10, 2, 10, 2).mean(axis=(1, 3)), rtol=1e-6
    )


def test_coverage_and_thumbnail(tmp_path: Path, prob: zarr.Array) -> None:
    cov = mask_coverage(prob, 0, 0.5, (30, 50), block=64)
    m = shapes_mask() > 0.5
    np.testing.assert_allclose(cov, m.reshape(30, 10, 50, 10).mean(axis=(1, 3)))
    rgb = np.full((30, 50, 3), 240, np.uint8)
    write_thumbnail(tmp_path / "t.png", rgb, cov)
    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "t.png"))
    assert img.shape == (30, 50, 3)
    assert (img[cov == 0] == 240).all() and (img[cov == 1][:, 0] > img[cov == 1][:, 1]).all()
