"""Slide-level outputs that viewers open: OME-Zarr probability map, OME-TIFF mask, GeoJSON, thumbnail.

Every writer streams from the model-resolution probability map (a zarr array ``(C, H, W)``) block by
block, so memory is bounded by a block, never by the slide:

* :func:`create_prob_zarr` / :func:`finish_prob_zarr`: an OME-NGFF 0.5 multiscale image (zarr v3), written
  with plain zarr and the NGFF attributes (``ome.multiscales``: axes c/y/x in micrometres, one scale
  transform per level, 2x mean-downsampled levels).
* :func:`write_mask_ome_tiff`: the thresholded mask at the slide's level-0 size (0/255, nearest
  upsampling), a tiled pyramidal OME-TIFF (sub-resolutions in SubIFDs, as QuPath and Bio-Formats expect),
  PhysicalSizeX/Y in µm in the OME-XML and X/YResolution in pixels per centimetre (what OpenSlide reads
  for ``openslide.mpp-x``). OpenSlide opens it as a generic TIFF and sees level 0 only (it does not read
  SubIFDs).
* :func:`write_geojson`: one polygon per 8-connected component, holes kept, in level-0 pixel coordinates
  (pixel ``(c, r)`` covers ``[c, c+1) x [r, r+1)``: QuPath's convention and :mod:`wsi.annotations`'), a QuPath-importable
  FeatureCollection. Contours are traced per block (marching squares on the block plus a one-pixel
  overlap), clipped to the block's cell, and polygons cut by a block border are unioned at the end.
* :func:`write_thumbnail`: the slide thumbnail with the mask's coverage overlaid.

Coordinates: model pixel ``j`` covers level-0 ``[j*sx, (j+1)*sx)`` (``sx`` level-0 pixels per model
pixel), so level-0 pixel ``x`` takes model pixel ``floor((x + 0.5) / sx)``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import zarr
from shapely.geometry import Polygon as ShapelyPolygon
from shapely.geometry import box as shapely_box
from skimage.measure import find_contours
from zarr.codecs import BloscCodec

NGFF_VERSION = "0.5"
PROB_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


# ------------------------------------------------------------------------------------------------------
# OME-Zarr (NGFF) probability map
# ------------------------------------------------------------------------------------------------------
def pyramid_shapes(
    height: int, width: int, levels: int | None, min_side: int = 1024
) -> list[tuple[int, int]]:
    """(H, W) of each 2x level: ``levels`` of them, or (None) halving until the longer side <= min_side."""
    shapes = [(height, width)]
    while (levels is None and max(shapes[-1]) > min_side) or (levels is not None and len(shapes) < levels):
        h, w = shapes[-1]
        if h == 1 and w == 1:
            break
        shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return shapes


def create_prob_zarr(path: Path, shape: tuple[int, int, int], chunk: int = 512) -> zarr.Array:
    """Create ``path`` (an OME-Zarr group) with its full-resolution level ``0`` (float32, c/y/x) and
    return that array for the stitcher to finalise into. Call :func:`finish_prob_zarr` afterwards."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    c, h, w = shape
    return root.create_array(
        "0",
        shape=shape,
        chunks=(c, min(chunk, h), min(chunk, w)),
        dtype="float32",
        fill_value=0.0,
        compressors=PROB_CODEC,
        dimension_names=("c", "y", "x"),
    )


def _downsample2(a: np.ndarray) -> np.ndarray:
    """2x mean downsampling of (C, h, w); an odd last row/column is averaged with itself (edge pad)."""
    c, h, w = a.shape
    if h % 2 or w % 2:
        a = np.pad(a, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    return a.reshape(c, a.shape[1] // 2, 2, a.shape[2] // 2, 2).mean(axis=(2, 4), dtype=np.float32)


def finish_prob_zarr(
    path: Path,
    mpp: float,
    levels: int | None = None,
    channel_names: list[str] | None = None,
    name: str = "probability",
    block: int = 1024,
) -> dict[str, Any]:
    """Build the 2x mean pyramid of level ``0`` block by block (``block`` output pixels a side: 16 MB of
    float32 source per block) and write the NGFF 0.5 ``multiscales``
    metadata (scale and pixel-centre translation per level, in micrometres). Returns the metadata."""
    root = zarr.open_group(str(path), mode="a")
    base = root["0"]
    assert isinstance(base, zarr.Array)
    c, h, w = base.shape
    shapes = pyramid_shapes(h, w, levels)
    chunk = base.chunks
    datasets = []
    for k, (lh, lw) in enumerate(shapes):
        if k > 0:
            src = root[str(k - 1)]
            assert isinstance(src, zarr.Array)
            dst = root.create_array(
                str(k), shape=(c, lh, lw), chunks=(c, min(chunk[1], lh), min(chunk[2], lw)),
                dtype="float32", fill_value=0.0, compressors=PROB_CODEC, dimension_names=("c", "y", "x"),
            )  # fmt: skip
            sh, sw = src.shape[1:]
            for y in range(0, lh, block):
                for x in range(0, lw, block):
                    ys, xs = slice(2 * y, min(2 * (y + block), sh)), slice(2 * x, min(2 * (x + block), sw))
                    part = _downsample2(np.asarray(src[:, ys, xs]))
                    dst[:, y : y + part.shape[1], x : x + part.shape[2]] = part
        f = 2.0**k
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, mpp * f, mpp * f]},
                    {"type": "translation", "translation": [0.0, mpp * (f - 1) / 2, mpp * (f - 1) / 2]},
                ],
            }
        )
    multiscales = {
        "name": name,
        "axes": [
            {"name": "c", "type": "channel"},
            {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"},
        ],
        "datasets": datasets,
        "type": "mean",
        "metadata": {"description": "2x2 mean downsampling of the probability map", "method": "numpy.mean"},
    }
    names = channel_names or [f"class_{i}" for i in range(c)]
    omero = {
        "channels": [
            {"label": n, "color": "FF0000", "window": {"start": 0.0, "end": 1.0, "min": 0.0, "max": 1.0},
             "active": True}
            for n in names
        ],
        "rdefs": {"model": "greyscale"},
    }  # fmt: skip
    meta: dict[str, Any] = {"version": NGFF_VERSION, "multiscales": [multiscales], "omero": omero}
    root.attrs["ome"] = meta
    return meta


# ------------------------------------------------------------------------------------------------------
# Sampling the model-resolution map at another grid
# ------------------------------------------------------------------------------------------------------
def _source_index(n: int, start: int, f: float, s: float, limit: int) -> np.ndarray:
    """Model-grid index of output pixels ``start .. start+n`` of a grid ``f`` level-0 px per pixel."""
    idx = np.floor((np.arange(start, start + n) + 0.5) * f / s).astype(np.int64)
    return np.clip(idx, 0, limit - 1)


def _sample_mask(
    prob: zarr.Array, channel: int, threshold: float, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """uint8 0/255 of ``prob[channel, rows, cols] > threshold`` (orthogonal): each needed row/column is read
    once at model resolution, thresholded there, then repeated (nearest upsampling)."""
    ur, ri = np.unique(rows, return_inverse=True)
    uc, ci = np.unique(cols, return_inverse=True)
    sub = np.asarray(prob.get_orthogonal_selection((channel, ur, uc))) > threshold
    small = sub.view(np.uint8) * np.uint8(255)
    return np.take(np.take(small, ri, axis=0), ci, axis=1)


# ------------------------------------------------------------------------------------------------------
# OME-TIFF mask at level-0 size
# ------------------------------------------------------------------------------------------------------
def write_mask_ome_tiff(
    path: Path,
    prob: zarr.Array,
    *,
    channel: int,
    threshold: float,
    slide_size: tuple[int, int],
    scale: tuple[float, float],
    mpp: float,
    tile: int = 512,
    segment_tiles: int = 8,
    name: str = "mask",
) -> list[tuple[int, int]]:
    """Write the binary mask (0/255 uint8) of ``prob[channel] > threshold`` as a tiled pyramidal OME-TIFF
    whose level 0 is the slide's level 0 (``slide_size`` = (W, H), ``mpp`` µm/px); returns level sizes.

    Tiles are produced one row at a time, ``segment_tiles`` tiles per read of the model-resolution map,
    so memory is a few tiles whatever the slide size.
    """
    import tifffile

    W0, H0 = slide_size
    sx, sy = scale
    _, hm, wm = prob.shape
    levels = [(W0, H0)]
    while max(levels[-1]) > tile:
        w, h = levels[-1]
        levels.append((math.ceil(w / 2), math.ceil(h / 2)))

    import imagecodecs

    # Tiles are deflated here (TIFF compression 8, as tifffile's 'zlib'), the all-background and
    # all-foreground ones once: most of a slide's mask is one or the other.
    def encode(t: np.ndarray) -> bytes:
        return bytes(imagecodecs.zlib_encode(t, level=1))  # type: ignore[arg-type]  # takes arrays

    uniform = {0: encode(np.zeros((tile, tile), np.uint8)), 255: encode(np.full((tile, tile), 255, np.uint8))}

    def tiles(f: float, lw: int, lh: int) -> Iterator[bytes]:
        for ty in range(0, lh, tile):
            rows = _source_index(min(tile, lh - ty), ty, f, sy, hm)
            for tx0 in range(0, lw, tile * segment_tiles):
                seg_w = min(tile * segment_tiles, lw - tx0)
                cols = _source_index(seg_w, tx0, f, sx, wm)
                band = _sample_mask(prob, channel, threshold, rows, cols)
                for tx in range(0, seg_w, tile):
                    part = band[:, tx : tx + tile]
                    full = part.shape == (tile, tile)
                    lo, hi = int(part.min()), int(part.max())
                    if lo == hi and (full or lo == 0):
                        yield uniform[lo]
                        continue
                    out = np.zeros((tile, tile), dtype=np.uint8)
                    out[: part.shape[0], : part.shape[1]] = part
                    yield encode(out)

    tmp = path.with_name(path.name + ".part")
    big = W0 * H0 > 2_000_000_000
    common: dict[str, Any] = dict(
        dtype=np.uint8, tile=(tile, tile), photometric="minisblack", compression="zlib",
        resolutionunit="CENTIMETER",
    )  # fmt: skip
    with tifffile.TiffWriter(tmp, bigtiff=big, ome=True) as tw:
        for k, (lw, lh) in enumerate(levels):
            f = 2.0**k
            lmpp = mpp * W0 / lw if k else mpp
            kw: dict[str, Any] = dict(common, resolution=(1e4 / lmpp, 1e4 / lmpp))
            if k == 0:
                kw.update(
                    subifds=len(levels) - 1,
                    metadata={
                        "axes": "YX",
                        "Name": name,
                        "PhysicalSizeX": mpp,
                        "PhysicalSizeXUnit": "µm",
                        "PhysicalSizeY": mpp,
                        "PhysicalSizeYUnit": "µm",
                    },
                    software="fedpath",
                )
            else:
                kw.update(subfiletype=1, metadata=None)
            tw.write(tiles(f, lw, lh), shape=(lh, lw), **kw)
    os.replace(tmp, path)
    return levels


# ------------------------------------------------------------------------------------------------------
# GeoJSON polygons
# ------------------------------------------------------------------------------------------------------
def _block_polygons(mask: np.ndarray, oy: int, ox: int) -> list[ShapelyPolygon]:
    """Polygons (model-grid coordinates, pixel centres at integers) of a boolean block whose pixel (0, 0)
    is model pixel (oy, ox): marching squares at 0.5 on the zero-padded block, 8-connected foreground
    (``fully_connected='high'``), holes assigned to the smallest enclosing outer ring."""
    padded = np.pad(mask.astype(np.float32), 1)
    contours = find_contours(padded, 0.5, fully_connected="high", positive_orientation="high")
    outers: list[ShapelyPolygon] = []
    holes: list[ShapelyPolygon] = []
    for c in contours:
        if len(c) < 4:
            continue
        xy = np.column_stack([c[:, 1] + (ox - 1), c[:, 0] + (oy - 1)])
        ring = ShapelyPolygon(xy)
        if ring.area == 0:
            continue
        # positive_orientation='high' winds counter-clockwise (in row/col) around foreground, which
        # is clockwise once x/y are swapped: outer rings are clockwise, holes counter-clockwise.
        (holes if ring.exterior.is_ccw else outers).append(ring)
    if not holes or not outers:
        return outers
    # Each hole goes to the smallest outer ring around it (an island inside a hole has its own ring). One
    # vertex per hole is tested, against each outer ring prepared once: querying every hole against one
    # huge ring instead is quadratic (a noisy tissue blob has thousands of holes and 1e5 vertices).
    hole_pts = shapely.points(np.array([h.exterior.coords[0] for h in holes]))
    o_idx, h_idx = shapely.STRtree(hole_pts).query(np.asarray(outers, dtype=object), predicate="contains")
    areas = shapely.area(np.asarray(outers, dtype=object))
    owner: dict[int, int] = {}
    for o, h in zip(o_idx.tolist(), h_idx.tolist(), strict=True):
        if h not in owner or areas[o] < areas[owner[h]]:
            owner[h] = o
    owned: list[list[Any]] = [[] for _ in outers]
    for h in sorted(owner):
        owned[owner[h]].append(holes[h].exterior.coords)
    return [ShapelyPolygon(o.exterior.coords, hs) if hs else o for o, hs in zip(outers, owned, strict=True)]


def iter_polygons(
    prob: zarr.Array, channel: int, threshold: float, block: int = 2048
) -> Iterator[ShapelyPolygon]:
    """Every 8-connected foreground component of ``prob[channel] > threshold`` as one polygon (holes
    kept), in model-grid coordinates, block by block; components cut by block borders are merged.

    Pieces cut by a border are merged at the end of each row of blocks, and only those that reach the
    next row are kept: memory grows with the slide's width, never with its area."""
    _, H, W = prob.shape
    pending: list[ShapelyPolygon] = []
    eps = 1e-6
    for y0 in range(0, H, block):
        y1 = min(y0 + block, H)
        for x0 in range(0, W, block):
            x1 = min(x0 + block, W)
            ey0, ex0, ey1, ex1 = max(y0 - 1, 0), max(x0 - 1, 0), min(y1 + 1, H), min(x1 + 1, W)
            m = np.asarray(prob[channel, ey0:ey1, ex0:ex1]) > threshold
            if not m.any():
                continue
            cell = (x0 - 0.5, y0 - 0.5, x1 - 0.5, y1 - 0.5)
            inner = (x0 > 0, y0 > 0, x1 < W, y1 < H)  # which cell sides have a neighbouring block
            cell_box = shapely_box(*cell)
            for poly in _block_polygons(m, ey0, ex0):
                bx0, by0, bx1, by1 = poly.bounds
                if bx0 >= cell[0] and by0 >= cell[1] and bx1 <= cell[2] and by1 <= cell[3]:
                    parts: list[ShapelyPolygon] = [poly]
                else:
                    clipped = poly.intersection(cell_box)
                    parts = [
                        g for g in shapely.get_parts(clipped) if isinstance(g, ShapelyPolygon) and g.area > 0
                    ]
                for part in parts:
                    px0, py0, px1, py1 = part.bounds
                    touches = (
                        (inner[0] and px0 <= cell[0] + eps)
                        or (inner[1] and py0 <= cell[1] + eps)
                        or (inner[2] and px1 >= cell[2] - eps)
                        or (inner[3] and py1 >= cell[3] - eps)
                    )
                    if touches:
                        pending.append(part)
                    else:
                        yield part
        if not pending:
            continue
        merged = shapely.union_all(pending)
        pending = []
        for g in shapely.get_parts(merged):
            if not (isinstance(g, ShapelyPolygon) and g.area > 0):
                continue
            if y1 < H and g.bounds[3] >= y1 - 0.5 - eps:
                pending.append(g)  # reaches the next row of blocks: merged there
            else:
                yield g


def write_geojson(
    path: Path,
    prob: zarr.Array,
    *,
    channel: int,
    threshold: float,
    scale: tuple[float, float],
    mpp: float,
    object_type: str = "detection",
    class_name: str = "Foreground",
    color: tuple[int, int, int] = (255, 0, 0),
    simplify: float = 0.25,
    block: int = 2048,
) -> int:
    """Write the mask's polygons as a QuPath-importable GeoJSON FeatureCollection in level-0 pixel
    coordinates (streamed feature by feature); returns the number of features.

    ``simplify`` (model pixels) drops staircase vertices (topology preserved); ``object_type`` is
    QuPath's ``detection`` (light, many objects) or ``annotation``.
    """
    sx, sy = scale

    def to_level0(xy: np.ndarray) -> np.ndarray:
        # model-grid coordinate c (pixel centres at integers) -> level-0 edge coordinate (c + 0.5) * s:
        # a contour between model pixels j and j+1 lands exactly on the level-0 edge (j + 1) * s.
        return np.round(np.column_stack([(xy[:, 0] + 0.5) * sx, (xy[:, 1] + 0.5) * sy]), 2)

    props_head = json.dumps(
        {"objectType": object_type, "classification": {"name": class_name, "color": list(color)}}
    )
    tmp = path.with_name(path.name + ".part")
    n = 0

    def flush(batch: list[ShapelyPolygon], f: Any) -> int:
        polys = np.asarray(batch, dtype=object)
        geoms = polys
        if simplify > 0:
            # Douglas-Peucker drops the marching-squares staircase; the rare polygon it makes invalid is
            # simplified again with topology preserved.
            geoms = shapely.simplify(polys, simplify, preserve_topology=False)
            bad = ~shapely.is_valid(geoms) | shapely.is_empty(geoms)
            if bad.any():
                geoms[bad] = shapely.simplify(polys[bad], simplify, preserve_topology=True)
        geoms = shapely.transform(geoms, to_level0)
        texts = shapely.to_geojson(geoms)
        areas = shapely.area(polys) * sx * sy * mpp * mpp
        written = 0
        for text, area, g in zip(texts, areas, geoms, strict=True):
            if g is None or g.is_empty:
                continue
            props = props_head[:-1] + f', "measurements": {{"area_um2": {float(area):.3f}}}}}'
            f.write(
                ("," if n + written else "")
                + f'{{"type":"Feature","geometry":{text},"properties":{props}}}\n'
            )
            written += 1
        return written

    with open(tmp, "w") as f:
        f.write('{"type": "FeatureCollection", "features": [\n')
        batch: list[ShapelyPolygon] = []
        for poly in iter_polygons(prob, channel, threshold, block):
            batch.append(poly)
            if len(batch) >= 2000:
                n += flush(batch, f)
                batch = []
        if batch:
            n += flush(batch, f)
        f.write("]}\n")
    os.replace(tmp, path)
    return n


# ------------------------------------------------------------------------------------------------------
# Thumbnail
# ------------------------------------------------------------------------------------------------------
def mask_coverage(
    prob: zarr.Array, channel: int, threshold: float, out_shape: tuple[int, int], block: int = 1024
) -> np.ndarray:
    """Fraction of foreground model pixels under each pixel of an ``out_shape`` (h, w) grid spanning the
    map (area binning, block by block)."""
    _, H, W = prob.shape
    oh, ow = out_shape
    counts = np.zeros(oh * ow, dtype=np.float64)
    totals = np.zeros(oh * ow, dtype=np.float64)
    for y0 in range(0, H, block):
        for x0 in range(0, W, block):
            y1, x1 = min(y0 + block, H), min(x0 + block, W)
            m = np.asarray(prob[channel, y0:y1, x0:x1]) > threshold
            r = np.minimum(((np.arange(y0, y1) + 0.5) * oh / H).astype(np.int64), oh - 1)
            c = np.minimum(((np.arange(x0, x1) + 0.5) * ow / W).astype(np.int64), ow - 1)
            idx = (r[:, None] * ow + c[None, :]).ravel()
            counts += np.bincount(idx, weights=m.ravel(), minlength=oh * ow)
            totals += np.bincount(idx, minlength=oh * ow)
    return (counts / np.maximum(totals, 1)).reshape(oh, ow)


def write_thumbnail(
    path: Path,
    slide_rgb: np.ndarray,
    coverage: np.ndarray,
    color: tuple[int, int, int] = (255, 0, 0),
    alpha: float = 0.6,
) -> None:
    """PNG of the slide thumbnail with the mask coverage blended in ``color`` (opacity ``alpha`` where a
    thumbnail pixel is all foreground)."""
    from PIL import Image

    if coverage.shape != slide_rgb.shape[:2]:
        raise ValueError(f"coverage {coverage.shape} does not match the thumbnail {slide_rgb.shape[:2]}")
    a = (alpha * np.clip(coverage, 0, 1))[..., None]
    # Nuclei are small at thumbnail scale: any foreground shows at least faintly.
    a = np.where(coverage[..., None] > 0, np.maximum(a, 0.25), 0.0)
    out = slide_rgb.astype(np.float32) * (1 - a) + np.asarray(color, dtype=np.float32) * a
    Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8)).save(path)


# ------------------------------------------------------------------------------------------------------
# Per-nucleus GeoJSON (instances)
# ------------------------------------------------------------------------------------------------------
def instance_features(
    labels: np.ndarray,
    prob: np.ndarray,
    origin: tuple[int, int],
    scale: tuple[float, float],
    mpp: float,
    class_name: str = "Nucleus",
    color: tuple[int, int, int] = (255, 0, 0),
) -> list[dict[str, Any]]:
    """One QuPath "detection" Feature per instance of a label image (0 = background): its outline (the
    marching-squares contour at 0.5 of the instance's own mask, in level-0 pixel coordinates; the
    largest piece if an instance is not connected), and measurements QuPath lists with the object:
    ``area_um2`` (pixel count x pixel area) and ``mean_probability`` (of ``prob`` over its pixels).
    ``origin`` is the (row, column) of ``labels[0, 0]`` in the model-resolution canvas."""
    from scipy import ndimage as ndi

    oy, ox = origin
    sx, sy = scale
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if not len(ids):
        return []
    slices = ndi.find_objects(labels)
    areas = np.bincount(labels.ravel())
    sums = np.bincount(labels.ravel(), weights=np.asarray(prob, dtype=np.float64).ravel())
    feats: list[dict[str, Any]] = []
    for i in ids:
        sl = slices[int(i) - 1]
        if sl is None:
            continue
        sub = np.pad(labels[sl] == i, 1)
        contours = find_contours(sub.astype(np.float32), 0.5)
        if not contours:
            continue
        rc = max(contours, key=len)
        if len(rc) < 4:
            continue
        # sub-pixel (r, c) in the padded crop -> canvas grid -> level-0 edge coordinates (as write_geojson)
        rows = rc[:, 0] - 1 + sl[0].start + oy
        cols = rc[:, 1] - 1 + sl[1].start + ox
        xy = np.round(np.column_stack([(cols + 0.5) * sx, (rows + 0.5) * sy]), 2)
        ring = xy.tolist()
        if ring[0] != ring[-1]:
            ring.append(ring[0])
        area = float(areas[i]) * sx * sy * mpp * mpp
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": class_name, "color": list(color)},
                    "measurements": {
                        "area_um2": round(area, 3),
                        "mean_probability": round(float(sums[i] / areas[i]), 4),
                    },
                },
            }
        )
    return feats


class InstanceGeoJSONWriter:
    """A FeatureCollection streamed feature by feature to ``path`` (written as ``.part``, renamed on a
    clean exit), so a slide's nuclei never have to be held in memory at once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".part")
        self.n = 0
        self._f: Any = None

    def __enter__(self) -> InstanceGeoJSONWriter:
        self._f = open(self.tmp, "w")
        self._f.write('{"type": "FeatureCollection", "features": [\n')
        return self

    def write(self, features: list[dict[str, Any]]) -> None:
        for feat in features:
            self._f.write(("," if self.n else "") + json.dumps(feat, separators=(",", ":")) + "\n")
            self.n += 1

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._f.write("]}\n")
        self._f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
