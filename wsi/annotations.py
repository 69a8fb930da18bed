"""Annotations to binary masks, rasterised at a tile's resolution.

Formats (detected by content, gzip-compressed or not):

* Aperio ImageScope XML (MoNuSeg): ``<Annotations><Annotation><Regions><Region><Vertices><Vertex X= Y=>``;
  a region with ``NegativeROA="1"`` is subtracted.
* The GBM40 contour XML (UTF-8 with BOM): ``<Shape>`` elements holding ``<Point X= Y=>``.
* QuPath GeoJSON: a Feature, FeatureCollection, list of features or bare geometry; Polygon and
  MultiPolygon with holes (GeometryCollection members too).
* Mask images (PNG/TIFF/JPEG): non-zero = foreground (channel 0 of a multi-channel image).

Coordinates are level-0 pixels, pixel (c, r) covering ``[c, c+1) x [r, r+1)`` (QuPath's and ImageScope's
convention). Polygons are drawn with PIL's ``ImageDraw.polygon`` (fill plus outline) after mapping to the
output grid: that is how the MoNuSeg and GBM40 reference masks were made, so a full-resolution rasterisation
reproduces them (Dice 1.0 on the shipped data) and a downsampled one keeps the same rule.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from wsi.errors import AnnotationError


@dataclass
class Polygon:
    """A filled polygon (level-0 pixel coordinates, (N, 2) arrays of x, y) minus its holes."""

    exterior: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        return (
            float(self.exterior[:, 0].min()),
            float(self.exterior[:, 1].min()),
            float(self.exterior[:, 0].max()),
            float(self.exterior[:, 1].max()),
        )


class Annotation:
    """Foreground geometry of one slide: polygons (positive and negative) or a mask image."""

    def __init__(
        self,
        path: Path,
        kind: str,
        polygons: list[Polygon] | None = None,
        negative: list[Polygon] | None = None,
        mask: np.ndarray | None = None,
        mask_scale: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        self.path = Path(path)
        self.kind = kind
        self.polygons = polygons or []
        self.negative = negative or []
        self.mask = mask
        self.mask_scale = mask_scale  # level-0 pixels per mask pixel (x, y)
        self._bboxes = _bboxes(self.polygons)
        self._neg_bboxes = _bboxes(self.negative)

    def __len__(self) -> int:
        return len(self.polygons)

    def __repr__(self) -> str:
        what = f"mask {self.mask.shape}" if self.mask is not None else f"{len(self.polygons)} polygons"
        return f"Annotation({str(self.path)!r}, {self.kind}, {what})"

    def rasterize(
        self, x0: float, y0: float, w0: float, h0: float, out_w: int, out_h: int, classes: int = 2
    ) -> np.ndarray:
        """uint8 (out_h, out_w) 0/1 mask of the level-0 box (x0, y0, w0, h0) at out_w x out_h pixels.

        ``classes=3``: 0 background, 1 nucleus inside, 2 nucleus boundary (the inner boundary pixels of
        every instance, so two touching nuclei are parted by a boundary line): the target of a model that
        separates nuclei. Instances are the polygons; a mask image's instances are its connected blobs
        (merged where nuclei touch, so only polygon annotations teach the model to part them).

        Output pixel (i, j) covers level-0 ``[x0 + j*sx, x0 + (j+1)*sx) x [y0 + i*sy, ...)`` with
        ``sx = w0/out_w``. A polygon sets the pixels it covers plus those its outline passes through
        (the PIL ``ImageDraw.polygon`` rule the MoNuSeg and GBM40 reference masks were drawn with), so at
        full resolution the result reproduces those masks.
        """
        if out_w <= 0 or out_h <= 0 or w0 <= 0 or h0 <= 0:
            raise ValueError(f"{self.path}: empty box {w0}x{h0} -> {out_w}x{out_h}")
        sx, sy = w0 / out_w, h0 / out_h
        if classes == 3:
            return instance_classes(self.rasterize_instances(x0, y0, w0, h0, out_w, out_h))
        if classes != 2:
            raise ValueError(f"{self.path}: mask classes must be 2 or 3, not {classes}")
        if self.mask is not None:
            return self._sample_mask(x0, y0, sx, sy, out_w, out_h)
        canvas = Image.new("L", (out_w, out_h), 0)
        draw = ImageDraw.Draw(canvas)
        self._fill(draw, self.polygons, self._bboxes, x0, y0, w0, h0, sx, sy, 1)
        self._fill(draw, self.negative, self._neg_bboxes, x0, y0, w0, h0, sx, sy, 0)
        return np.asarray(canvas, dtype=np.uint8).copy()

    def rasterize_instances(
        self, x0: float, y0: float, w0: float, h0: float, out_w: int, out_h: int
    ) -> np.ndarray:
        """int32 (out_h, out_w) instance labels of the box: polygon k (in file order, from 1) is drawn
        with label k by the same pixel rule as :meth:`rasterize` (a later polygon overwrites an earlier
        one where they overlap; negative regions clear). A mask image has no instances of its own: its
        connected blobs (8-connectivity) are labelled instead, which merges touching nuclei; use polygon
        annotations (MoNuSeg XML, GBM40 contours, GeoJSON) for instance ground truth.
        """
        if out_w <= 0 or out_h <= 0 or w0 <= 0 or h0 <= 0:
            raise ValueError(f"{self.path}: empty box {w0}x{h0} -> {out_w}x{out_h}")
        sx, sy = w0 / out_w, h0 / out_h
        if self.mask is not None:
            from skimage.measure import label

            return label(self._sample_mask(x0, y0, sx, sy, out_w, out_h), connectivity=2).astype(np.int32)
        # PIL's "I" mode holds int32 labels; every polygon is filled with its own label.
        canvas = Image.new("I", (out_w, out_h), 0)
        draw = ImageDraw.Draw(canvas)
        hit = _hits(self._bboxes, x0, y0, w0, h0, sx, sy)
        for i in hit:
            self._fill(draw, [self.polygons[i]], self._bboxes[i : i + 1], x0, y0, w0, h0, sx, sy, int(i) + 1)
        self._fill(draw, self.negative, self._neg_bboxes, x0, y0, w0, h0, sx, sy, 0)
        return np.asarray(canvas, dtype=np.int32).copy()

    @property
    def has_instances(self) -> bool:
        """Whether the annotation holds true instances (polygons), not a mask image's merged blobs."""
        return self.mask is None and bool(self.polygons)

    def _fill(
        self,
        draw: ImageDraw.ImageDraw,
        polys: list[Polygon],
        bboxes: np.ndarray,
        x0: float,
        y0: float,
        w0: float,
        h0: float,
        sx: float,
        sy: float,
        value: int,
    ) -> None:
        if not polys:
            return
        hit = _hits(bboxes, x0, y0, w0, h0, sx, sy)

        def to_px(xy: np.ndarray) -> list[tuple[int, int]]:
            # Level-0 point x lies in output pixel floor((x - x0) / sx) (pixel j covers [j, j+1)).
            cols = np.floor((xy[:, 0] - x0) / sx).astype(np.int64)
            rows = np.floor((xy[:, 1] - y0) / sy).astype(np.int64)
            return list(zip(cols.tolist(), rows.tolist(), strict=True))

        for i in hit:
            poly = polys[i]
            if not poly.holes:
                draw.polygon(to_px(poly.exterior), fill=value, outline=value)
                continue
            # A polygon with holes is drawn on its own patch and pasted through itself as the mask, so its
            # holes clear only its own pixels, never another polygon's (an island inside a hole is drawn
            # in whatever order the file lists it).
            ext = to_px(poly.exterior)
            c0 = min(c for c, _ in ext)
            r0 = min(r for _, r in ext)
            pw = max(c for c, _ in ext) - c0 + 1
            ph = max(r for _, r in ext) - r0 + 1
            patch = Image.new("L", (pw, ph), 0)
            pd = ImageDraw.Draw(patch)
            pd.polygon([(c - c0, r - r0) for c, r in ext], fill=1, outline=1)
            for hole in poly.holes:
                # The hole's interior is background; its boundary pixels still touch the ring.
                pd.polygon([(c - c0, r - r0) for c, r in to_px(hole)], fill=0, outline=1)
            draw.bitmap((c0, r0), patch.point(lambda v: 255 * v), fill=value)

    def _sample_mask(self, x0: float, y0: float, sx: float, sy: float, out_w: int, out_h: int) -> np.ndarray:
        """Nearest-neighbour sampling of the mask image at the output pixel centres."""
        assert self.mask is not None
        mh, mw = self.mask.shape
        kx, ky = self.mask_scale
        xs = x0 + (np.arange(out_w) + 0.5) * sx  # level-0 coordinates of output pixel centres
        ys = y0 + (np.arange(out_h) + 0.5) * sy
        cols = np.floor(xs / kx).astype(np.int64)
        rows = np.floor(ys / ky).astype(np.int64)
        vc = (cols >= 0) & (cols < mw)
        vr = (rows >= 0) & (rows < mh)
        out = np.zeros((out_h, out_w), dtype=np.uint8)
        if vc.any() and vr.any():
            sub = self.mask[np.ix_(rows[vr], cols[vc])]
            out[np.ix_(vr, vc)] = sub
        return out


def _hits(bboxes: np.ndarray, x0: float, y0: float, w0: float, h0: float, sx: float, sy: float) -> np.ndarray:
    """Indices of the boxes that reach the output box (one output pixel of margin)."""
    return np.nonzero(
        (bboxes[:, 2] >= x0 - sx)
        & (bboxes[:, 0] <= x0 + w0 + sx)
        & (bboxes[:, 3] >= y0 - sy)
        & (bboxes[:, 1] <= y0 + h0 + sy)
    )[0]


def instance_classes(labels: np.ndarray) -> np.ndarray:
    """uint8 3-class map of an instance label image: 0 background, 1 inside, 2 boundary (each instance's
    inner boundary pixels: those with a 4-neighbour outside the instance)."""
    from skimage.segmentation import find_boundaries

    lab = np.asarray(labels)
    out = (lab > 0).astype(np.uint8)
    out[find_boundaries(lab, connectivity=1, mode="inner") & (lab > 0)] = 2
    return out


def _bboxes(polys: list[Polygon]) -> np.ndarray:
    if not polys:
        return np.zeros((0, 4))
    return np.array([p.bbox for p in polys], dtype=np.float64)


# ------------------------------------------------------------------------------------------------------
# Parsing
# ------------------------------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AnnotationError(f"{path}: no such file") from None
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read: {e.strerror or e}") from e
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise AnnotationError(f"{path}: corrupt gzip: {' '.join(str(e).split())}") from e
    return data


def _xy(points: list[tuple[float, float]], path: Path, what: str) -> np.ndarray:
    a = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(a).all():
        raise AnnotationError(f"{path}: {what} has non-finite coordinates")
    return a


def _attr_float(el: ET.Element, name: str, path: Path) -> float:
    v = el.get(name)
    if v is None:
        v = el.get(name.lower())
    if v is None:
        raise AnnotationError(f"{path}: <{el.tag}> without attribute {name}")
    try:
        return float(v)
    except ValueError:
        raise AnnotationError(f"{path}: <{el.tag}> has non-numeric {name}={v!r}") from None


def _parse_xml(path: Path, data: bytes) -> Annotation:
    try:
        root = ET.fromstring(data)  # bytes: the parser honours the BOM and the declared encoding
    except ET.ParseError as e:
        raise AnnotationError(f"{path}: XML does not parse: {e}") from e
    regions = root.findall(".//Region")
    if root.tag == "Annotations" or regions:
        pos: list[Polygon] = []
        neg: list[Polygon] = []
        for reg in regions:
            verts = [(_attr_float(v, "X", path), _attr_float(v, "Y", path)) for v in reg.iter("Vertex")]
            if len(verts) < 3:
                continue  # a point or line region has no area
            poly = Polygon(_xy(verts, path, f"Region {reg.get('Id')}"))
            (neg if reg.get("NegativeROA") == "1" else pos).append(poly)
        return Annotation(path, "aperio-xml", pos, neg)
    shapes = root.findall(".//Shape")
    if shapes:
        polys = []
        for i, shp in enumerate(shapes):
            pts = [(_attr_float(p, "X", path), _attr_float(p, "Y", path)) for p in shp.iter("Point")]
            if len(pts) >= 3:
                polys.append(Polygon(_xy(pts, path, f"Shape {i}")))
        return Annotation(path, "contour-xml", polys)
    raise AnnotationError(f"{path}: XML is neither Aperio ImageScope (<Region>) nor contour (<Shape>) markup")


def _geojson_polygons(geom: Any, path: Path, out: list[Polygon]) -> None:
    if geom is None:
        return
    if not isinstance(geom, dict) or "type" not in geom:
        raise AnnotationError(f"{path}: GeoJSON geometry without a type")
    t = geom["type"]
    try:
        if t == "Polygon":
            rings = geom["coordinates"]
            if rings:
                ext = _xy([tuple(p[:2]) for p in rings[0]], path, "Polygon")
                holes = [_xy([tuple(p[:2]) for p in r], path, "hole") for r in rings[1:]]
                out.append(Polygon(ext, holes))
        elif t == "MultiPolygon":
            for rings in geom["coordinates"]:
                _geojson_polygons({"type": "Polygon", "coordinates": rings}, path, out)
        elif t == "GeometryCollection":
            for g in geom.get("geometries", []):
                _geojson_polygons(g, path, out)
        elif t in ("Point", "MultiPoint", "LineString", "MultiLineString"):
            return  # no area
        else:
            raise AnnotationError(f"{path}: unsupported GeoJSON geometry type {t!r}")
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise AnnotationError(f"{path}: malformed GeoJSON {t}: {e}") from e


def _parse_geojson(path: Path, data: bytes) -> Annotation:
    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{path}: JSON does not parse: {e}") from e
    features: list[Any]
    if isinstance(obj, list):
        features = obj
    elif isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        features = obj.get("features") or []
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        features = [obj]
    elif isinstance(obj, dict) and "type" in obj:
        features = [{"type": "Feature", "geometry": obj}]
    else:
        raise AnnotationError(f"{path}: JSON is not GeoJSON (no Feature/FeatureCollection/geometry)")
    polys: list[Polygon] = []
    for f in features:
        if not isinstance(f, dict):
            raise AnnotationError(f"{path}: GeoJSON feature is not an object")
        _geojson_polygons(f.get("geometry") if f.get("type") == "Feature" else f, path, polys)
    return Annotation(path, "geojson", polys)


def _parse_mask_image(path: Path, data: bytes, slide_dimensions: tuple[int, int] | None) -> Annotation:
    try:
        if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            import tifffile

            arr = tifffile.imread(io.BytesIO(data))
        else:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                im.load()
                arr = np.asarray(im)
    except Exception as e:
        raise AnnotationError(f"{path}: mask image does not decode: {' '.join(str(e).split())}") from e
    if arr.ndim == 3:
        arr = arr[..., 0] if arr.shape[-1] <= 4 else arr[0]
    if arr.ndim != 2 or arr.size == 0:
        raise AnnotationError(f"{path}: mask image has unsupported shape {arr.shape}")
    mask = (arr > 0).astype(np.uint8)
    mh, mw = mask.shape
    scale = (1.0, 1.0)
    if slide_dimensions is not None and (mw, mh) != tuple(slide_dimensions):
        W, H = slide_dimensions
        scale = (W / mw, H / mh)
        if not math.isclose(scale[0], scale[1], rel_tol=0.02):
            raise AnnotationError(f"{path}: mask {mw}x{mh} does not match the slide's aspect ratio ({W}x{H})")
    return Annotation(path, "mask-image", mask=mask, mask_scale=scale)


#: Tiled TIFF masks above this many pixels are read on demand, tile by tile (never loaded whole).
LAZY_MASK_PIXELS = 16_000_000


class _TiledMaskImage:
    """A large tiled TIFF mask read on demand: indexing with ``np.ix_(rows, cols)`` decodes only the TIFF
    tiles under that box, so a slide-sized mask (e.g. fedpath synth's) never has to fit in memory."""

    def __init__(self, path: Path) -> None:
        from wsi.readers import TiffSlideReader

        self._reader = TiffSlideReader(path, default_mpp=1.0)
        w, h = self._reader.dimensions
        self.shape = (h, w)

    def __getitem__(self, key: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        rows, cols = (np.asarray(k).ravel() for k in key)
        r0, c0 = int(rows.min()), int(cols.min())
        box = self._reader._read_level(0, c0, r0, int(cols.max()) + 1 - c0, int(rows.max()) + 1 - r0)
        return (box[np.ix_(rows - r0, cols - c0)][..., 0] > 0).astype(np.uint8)


def _open_tiled_mask(path: Path, slide_dimensions: tuple[int, int] | None) -> Annotation | None:
    """A lazily read :class:`Annotation` for a large tiled TIFF mask, else None (parsed the usual way)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
                return None
        import tifffile

        with tifffile.TiffFile(str(path)) as tf:
            page = tf.pages.first
            if not page.is_tiled or page.imagewidth * page.imagelength <= LAZY_MASK_PIXELS:
                return None
    except Exception:
        return None  # the regular parser reports what is wrong with it
    try:
        lazy = _TiledMaskImage(path)
    except Exception as e:
        raise AnnotationError(f"{path}: mask image does not decode: {' '.join(str(e).split())}") from e
    mh, mw = lazy.shape
    scale = (1.0, 1.0)
    if slide_dimensions is not None and (mw, mh) != tuple(slide_dimensions):
        W, H = slide_dimensions
        scale = (W / mw, H / mh)
        if not math.isclose(scale[0], scale[1], rel_tol=0.02):
            raise AnnotationError(f"{path}: mask {mw}x{mh} does not match the slide's aspect ratio ({W}x{H})")
    return Annotation(path, "mask-image", mask=lazy, mask_scale=scale)  # type: ignore[arg-type]


def load_annotation(path: str | Path, slide_dimensions: tuple[int, int] | None = None) -> Annotation:
    """Parse an annotation file (format detected by content). ``slide_dimensions`` (level-0 W, H) lets a
    mask image smaller than the slide be scaled up; polygons are always in level-0 pixels.

    Raises :class:`wsi.errors.AnnotationError` ``"<path>: <reason>"`` for anything that does not parse.
    """
    p = Path(path)
    lazy = _open_tiled_mask(p, slide_dimensions) if p.is_file() else None
    if lazy is not None:
        return lazy
    data = _read_bytes(p)
    head = data[:64].lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head:
        raise AnnotationError(f"{p}: empty file")
    if head[:1] == b"<":
        return _parse_xml(p, data)
    if head[:1] in (b"{", b"["):
        return _parse_geojson(p, data)
    if head[:8] == b"\x89PNG\r\n\x1a\n" or head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _parse_mask_image(p, data, slide_dimensions)
    if data[:3] == b"\xff\xd8\xff":
        return _parse_mask_image(p, data, slide_dimensions)
    raise AnnotationError(f"{p}: unrecognised annotation format (expected XML, GeoJSON or a mask image)")
