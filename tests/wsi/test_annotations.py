"""Annotations -> masks: the real reference masks as oracles, GeoJSON with holes against shapely, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
from PIL import Image
from shapely.geometry import Polygon as SPolygon
from shapely.geometry import shape

from wsi.annotations import load_annotation
from wsi.errors import AnnotationError

MONUSEG_XML = ["TCGA-21-5784-01Z-00-DX1", "TCGA-B0-5710-01Z-00-DX1", "TCGA-NH-A8F7-01A-01-TS1"]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def png_mask(path: Path) -> np.ndarray:
    a = np.asarray(Image.open(path))
    return (a[..., 0] if a.ndim == 3 else a) > 0


def _monuseg_dice(data_root: Path, name: str) -> float:
    ann = load_annotation(data_root / f"monuseg-train/annotations_xml/{name}.xml.gz")
    assert ann.kind == "aperio-xml" and len(ann) > 250
    got = ann.rasterize(0, 0, 1000, 1000, 1000, 1000)
    assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 1}
    return dice(got, png_mask(data_root / f"monuseg-train/masks/{name}.png"))


@pytest.mark.parametrize("name", MONUSEG_XML)
def test_monuseg_xml_reproduces_png_mask(data_root: Path, name: str) -> None:
    # The PNGs were drawn from these polygons (fill + outline, touching nuclei merged): near-exact.
    assert _monuseg_dice(data_root, name) > 0.999


@pytest.mark.slow
def test_monuseg_all_13_xmls(data_root: Path) -> None:
    names = sorted(
        p.name[: -len(".xml.gz")] for p in (data_root / "monuseg-train/annotations_xml").glob("*.xml.gz")
    )
    assert len(names) == 13
    assert min(_monuseg_dice(data_root, n) for n in names) > 0.999


@pytest.mark.parametrize("n", [1, 17, 40])
def test_gbm40_contours_reproduce_derived_masks(data_root: Path, n: int) -> None:
    ann = load_annotation(data_root / f"gbm40-emory/annotations_xml/{n:02d}_contour.xml.gz")  # gzip + BOM
    assert ann.kind == "contour-xml" and len(ann) > 20
    got = ann.rasterize(0, 0, 512, 512, 512, 512)
    assert dice(got, png_mask(data_root / f"gbm40-emory/masks_derived/{n:02d}.png")) > 0.999


def test_rasterize_at_tile_resolution_and_offset(data_root: Path) -> None:
    """A tile at half resolution agrees with the full-res mask pooled 2x2; offsets cut the right window."""
    name = MONUSEG_XML[1]
    ann = load_annotation(data_root / f"monuseg-train/annotations_xml/{name}.xml.gz")
    full = ann.rasterize(0, 0, 1000, 1000, 1000, 1000)
    win = ann.rasterize(300, 200, 256, 256, 256, 256)
    np.testing.assert_array_equal(win, full[200:456, 300:556])
    half = ann.rasterize(0, 0, 1000, 1000, 500, 500)
    pooled = full.reshape(500, 2, 500, 2).mean(axis=(1, 3)) >= 0.5
    assert dice(half, pooled) > 0.93
    # outside the annotated area: empty, and no error
    assert ann.rasterize(5000, 5000, 100, 100, 50, 50).sum() == 0


def test_mask_image_annotations(data_root: Path, tmp_path: Path) -> None:
    name = MONUSEG_XML[0]
    png = data_root / f"monuseg-train/masks/{name}.png"
    ann = load_annotation(png)
    ref = png_mask(png).astype(np.uint8)
    assert ann.kind == "mask-image"
    np.testing.assert_array_equal(ann.rasterize(0, 0, 1000, 1000, 1000, 1000), ref)
    np.testing.assert_array_equal(ann.rasterize(100, 50, 200, 200, 200, 200), ref[50:250, 100:300])
    # nearest-neighbour downsampling samples pixel centres
    np.testing.assert_array_equal(ann.rasterize(0, 0, 1000, 1000, 250, 250), ref[2::4, 2::4])
    # a TIFF mask at a quarter of the slide's size is scaled up to level 0
    small = ref[::4, ::4]
    tifffile.imwrite(tmp_path / "m.tif", small * 255)
    ann4 = load_annotation(tmp_path / "m.tif", slide_dimensions=(1000, 1000))
    np.testing.assert_array_equal(ann4.rasterize(0, 0, 1000, 1000, 250, 250), small)
    np.testing.assert_array_equal(
        ann4.rasterize(8, 8, 8, 8, 8, 8), np.repeat(np.repeat(small[2:4, 2:4], 4, 0), 4, 1)
    )


def _qupath_features() -> dict:
    square_with_hole = {
        "type": "Polygon",
        "coordinates": [
            [[10, 10], [90, 10], [90, 90], [10, 90], [10, 10]],
            [[30, 30], [70, 30], [70, 70], [30, 70], [30, 30]],
        ],
    }
    multi = {
        "type": "MultiPolygon",
        "coordinates": [
            [[[120.5, 20.2], [180.7, 25.1], [150.3, 95.8], [120.5, 20.2]]],
            [
                [[110, 110], [190, 110], [190, 190], [110, 190], [110, 110]],
                [[140, 140], [160, 140], [150, 170], [140, 140]],
            ],
        ],
    }
    return {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": square_with_hole, "properties": {"objectType": "annotation"}},
            {"type": "Feature", "geometry": multi, "properties": {"classification": {"name": "Tumor"}}},
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}},
        ],
    }


def test_geojson_polygons_with_holes_against_shapely(tmp_path: Path) -> None:
    fc = _qupath_features()
    p = tmp_path / "a.geojson"
    p.write_text(json.dumps(fc))
    ann = load_annotation(p)
    assert ann.kind == "geojson" and len(ann) == 3  # square-with-hole, triangle, square-with-triangle-hole
    got = ann.rasterize(0, 0, 200, 200, 200, 200).astype(bool)
    geom = shapely.union_all([shape(f["geometry"]) for f in fc["features"][:2]])
    yy, xx = np.mgrid[0:200, 0:200] + 0.5  # pixel centres
    centres = shapely.points(xx.ravel(), yy.ravel())
    # Oracle: pixels whose centre lies clearly inside are set, clearly outside are not; only the
    # one-pixel band along boundaries may go either way (the outline rule).
    inside = shapely.contains(geom.buffer(-1.0), centres).reshape(200, 200)
    outside = ~shapely.intersects(geom.buffer(1.0), centres).reshape(200, 200)
    assert got[inside].all() and not got[outside].any()
    assert not got[50, 50]  # in the hole
    assert got[50, 20] and got[150, 120] and not got[152, 150]
    assert abs(int(got.sum()) - geom.area) < 0.08 * geom.area
    # gzip, a bare Feature and a plain list give the same mask
    gz = tmp_path / "a.geojson.gz"
    gz.write_bytes(gzip.compress(json.dumps(fc).encode()))
    np.testing.assert_array_equal(load_annotation(gz).rasterize(0, 0, 200, 200, 200, 200), got)
    (tmp_path / "f.json").write_text(json.dumps(fc["features"][0]))
    (tmp_path / "l.json").write_text(json.dumps(fc["features"]))
    one = load_annotation(tmp_path / "f.json").rasterize(0, 0, 100, 100, 100, 100)
    np.testing.assert_array_equal(one, got[:100, :100])
    np.testing.assert_array_equal(
        load_annotation(tmp_path / "l.json").rasterize(0, 0, 200, 200, 200, 200), got
    )


def test_aperio_negative_region_is_subtracted(tmp_path: Path) -> None:
    xml = """<?xml version="1.0" encoding="UTF-8"?>
<Annotations MicronsPerPixel="0.5"><Annotation Id="1"><Regions>
<Region Id="1" NegativeROA="0"><Vertices><Vertex X="0" Y="0"/><Vertex X="100" Y="0"/><Vertex X="100" Y="100"/><Vertex X="0" Y="100"/></Vertices></Region>
<Region Id="2" NegativeROA="1"><Vertices><Vertex X="40" Y="40"/><Vertex X="60" Y="40"/><Vertex X="60" Y="60"/><Vertex X="40" Y="60"/></Vertices></Region>
<Region Id="3"><Vertices><Vertex X="5" Y="5"/></Vertices></Region>
</Regions></Annotation></Annotations>"""
    p = tmp_path / "a.xml"
    p.write_text(xml)
    m = load_annotation(p).rasterize(0, 0, 100, 100, 100, 100)
    assert m[10, 10] == 1 and m[50, 50] == 0 and m[39, 39] == 1
    assert SPolygon([(40, 40), (60, 40), (60, 60), (40, 60)]).area == 400
    assert abs(int((m == 0).sum()) - 400) < 100


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("broken.xml", b"<Annotations><Region><Vertices>", "XML does not parse"),
        ("other.xml", b"<html><body>hi</body></html>", "neither Aperio"),
        ("bad.json", b"{not json", "JSON does not parse"),
        (
            "odd.geojson",
            b'{"type": "Feature", "geometry": {"type": "Circle", "coordinates": [1, 2]}}',
            "unsupported GeoJSON",
        ),
        (
            "badcoords.geojson",
            b'{"type": "Polygon", "coordinates": [[["a", 1], [2, 3], [4, 5]]]}',
            "malformed GeoJSON",
        ),
        (
            "nan.xml",
            b'<Annotations><Region><Vertices><Vertex X="a" Y="1"/></Vertices></Region></Annotations>',
            "non-numeric X",
        ),
        ("x.bin", b"\x00\x01\x02garbage", "unrecognised annotation format"),
        ("e.xml", b"", "empty file"),
        ("m.png", b"\x89PNG\r\n\x1a\nnot really", "mask image does not decode"),
        ("c.xml.gz", b"\x1f\x8b\x08\x00garbage", "corrupt gzip"),
    ],
)
def test_unparsable_annotations(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(AnnotationError, match=reason) as e:
        load_annotation(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and "\n" not in msg


def test_missing_annotation(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="no such file"):
        load_annotation(tmp_path / "absent.xml.gz")


@pytest.mark.parametrize("island_first", [True, False])
def test_island_inside_a_hole_survives_in_either_order(tmp_path: Path, island_first: bool) -> None:
    """A ring's hole clears only the ring's own pixels: an island listed before the ring stays set."""
    ring = SPolygon([(10, 10), (90, 10), (90, 90), (10, 90)], [[(30, 30), (70, 30), (70, 70), (30, 70)]])
    island = SPolygon([(45, 45), (55, 45), (55, 55), (45, 55)])
    feats = [{"type": "Feature", "geometry": shapely.geometry.mapping(g), "properties": {}} for g in (ring, island)]
    if island_first:
        feats.reverse()
    p = tmp_path / "a.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    got = load_annotation(p).rasterize(0, 0, 100, 100, 100, 100).astype(bool)
    assert got[50, 50] and got[20, 20] and not got[40, 40] and not got[5, 5]
    assert abs(int(got.sum()) - (ring.area + island.area)) < 0.1 * (ring.area + island.area)
