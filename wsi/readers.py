"""One slide-reader interface over OpenSlide, tifffile and plain images.

* :class:`OpenSlideReader`: vendor formats (Aperio SVS with JPEG or JPEG 2000 tiles, Hamamatsu NDPI,
  MIRAX MRXS, ...) through openslide-python.
* :class:`TiffSlideReader`: generic and OME pyramidal TIFF. It reads the compressed tiles (or strips)
  straight from the file (``os.pread`` at the IFD's offsets) and decodes only those overlapping a region
  with tifffile's codec pipeline (imagecodecs), keeping a small LRU of decoded tiles. That skips
  OpenSlide's cairo compositing and its RGBA round trip.
* :class:`ImageReader`: flat images (MoNuSeg/GBM40 TIFF tiles, PNG, JPEG) held in memory.

:func:`open_slide` chooses by content (magic bytes and OpenSlide's format detection), not by extension.
All coordinates given to ``read_region``/``read_at_mpp`` are level-0 pixels; outputs are ``(h, w, 3)``
uint8 RGB with white (255) outside the slide.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from scipy import ndimage

from wsi.errors import SlideOpenError
from wsi.mpp import MppResolution, RejectedMpp, resolve_mpp, tiff_tag_mpp, vendor_mpp

log = logging.getLogger(__name__)

#: Relative tolerance within which a pyramid level's MPP is used as is (tiling.mpp_tolerance default).
DEFAULT_MPP_TOLERANCE = 0.1
#: Flat (single-level, untiled) TIFFs up to this many pixels are loaded whole by :class:`ImageReader`.
FLAT_IMAGE_MAX_PIXELS = 64_000_000

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class MppPlan:
    """How a read at a target MPP is served: which level, and by how much it is resampled.

    ``resample_factor`` is level pixels per output pixel (1.0 when the level is used as is, > 1 when
    downsampling). ``effective_mpp`` is the output's true µm/px (the level's MPP when used as is).
    """

    level: int
    level_mpp: float
    target_mpp: float
    resample_factor: float
    exact: bool

    @property
    def effective_mpp(self) -> float:
        return self.level_mpp if self.exact else self.target_mpp


class SlideReader(ABC):
    """A slide: a pyramid of levels, a resolved MPP and region reads in level-0 coordinates."""

    reader_name: ClassVar[str] = "abstract"

    def __init__(self, path: Path, mpp_override: float | None, default_mpp: float | None) -> None:
        self.path = Path(path)
        self._mpp_override = mpp_override
        self._default_mpp = default_mpp
        self.level_dimensions: tuple[tuple[int, int], ...] = ()
        self.level_downsamples: tuple[float, ...] = ()
        self._mpp: MppResolution | None = None

    # -- geometry and resolution -------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def mpp(self) -> float:
        """Resolved µm per pixel at level 0."""
        assert self._mpp is not None
        return self._mpp.mpp

    @property
    def mpp_source(self) -> str:
        """Which fallback gave :attr:`mpp`: manifest, vendor, tiff_tags or config."""
        assert self._mpp is not None
        return self._mpp.source

    @property
    def mpp_rejected(self) -> list[RejectedMpp]:
        """Candidates present in the file (or given) but rejected as implausible."""
        assert self._mpp is not None
        return list(self._mpp.rejected)

    @property
    def vendor(self) -> str:
        """Short format name for provenance (e.g. ``aperio``, ``generic-tiff``, ``ome-tiff``, ``png``)."""
        return self.reader_name

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def _resolve_mpp(self, vendor: float | None, tiff_tags: float | None) -> None:
        self._mpp = resolve_mpp(
            self.path,
            manifest=self._mpp_override,
            vendor=vendor,
            tiff_tags=tiff_tags,
            config=self._default_mpp,
        )

    # -- reads ---------------------------------------------------------------------------------------
    @abstractmethod
    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of a box in ``level`` pixel coordinates that lies inside the level."""

    def _read_level_padded(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Like :meth:`_read_level` for any box: the part outside the level is white."""
        lw, lh = self.level_dimensions[level]
        if x >= 0 and y >= 0 and x + w <= lw and y + h <= lh and w > 0 and h > 0:
            return self._read_level(level, x, y, w, h)
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        ix0, iy0 = max(x, 0), max(y, 0)
        ix1, iy1 = min(x + w, lw), min(y + h, lh)
        if ix1 > ix0 and iy1 > iy0:
            out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = self._read_level(
                level, ix0, iy0, ix1 - ix0, iy1 - iy0
            )
        return out

    def read_region(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB at ``level``, its top-left at level-0 pixel (x0, y0) (OpenSlide semantics)."""
        self._check_level(level, w, h)
        ds = self.level_downsamples[level]
        return self._read_level_padded(level, math.floor(x0 / ds + 1e-9), math.floor(y0 / ds + 1e-9), w, h)

    def read_tiles_into(self, x0: int, y0: int, level: int, n: int, size: int, out: np.ndarray) -> bool:
        """Fill ``out[:n]`` with ``n`` horizontally adjacent ``size`` x ``size`` tiles of ``level``, the
        first with its top-left at level-0 pixel (x0, y0), when this reader has a faster route than
        :meth:`read_region` for them (decoding stored tiles straight into ``out``); return False, having
        written nothing, when it has not."""
        return False

    def _check_level(self, level: int, w: int, h: int) -> None:
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} out of range (0..{self.level_count - 1})")
        if w < 0 or h < 0:
            raise ValueError(f"{self.path}: negative region size {w}x{h}")

    def plan_mpp(self, mpp: float, tolerance: float = DEFAULT_MPP_TOLERANCE) -> MppPlan:
        """Choose the level for reads at ``mpp``: one within ``tolerance`` (relative) is used as is,
        else the coarsest level finer than ``mpp`` is downsampled (level 0 upsampled when even it is
        coarser)."""
        if mpp <= 0:
            raise ValueError(f"target mpp must be > 0, got {mpp}")
        mpps = [self.level_mpp(i) for i in range(self.level_count)]
        within = [i for i, m in enumerate(mpps) if abs(m / mpp - 1.0) <= tolerance]
        if within:
            best = min(within, key=lambda i: abs(mpps[i] / mpp - 1.0))
            return MppPlan(best, mpps[best], mpp, 1.0, True)
        finer = [i for i, m in enumerate(mpps) if m < mpp]
        level = max(finer, key=lambda i: mpps[i]) if finer else int(np.argmin(mpps))
        return MppPlan(level, mpps[level], mpp, mpp / mpps[level], False)

    def footprint(
        self, w: int, h: int, mpp: float, tolerance: float = DEFAULT_MPP_TOLERANCE
    ) -> tuple[float, float]:
        """Level-0 (width, height) covered by a ``w`` x ``h`` read at ``mpp`` (see :meth:`read_at_mpp`)."""
        plan = self.plan_mpp(mpp, tolerance)
        if plan.exact:
            ds = self.level_downsamples[plan.level]
            return w * ds, h * ds
        scale = mpp / self.mpp
        return w * scale, h * scale

    def size_at_mpp(self, mpp: float, tolerance: float = DEFAULT_MPP_TOLERANCE) -> tuple[int, int]:
        """(width, height) of the whole slide read at ``mpp``. A level within ``tolerance`` is read as
        is, so the size follows the µm/px it really has (a 0.2527 µm/px image "at" 0.25 stays 1000 px)."""
        eff = self.plan_mpp(mpp, tolerance).effective_mpp
        W0, H0 = self.dimensions
        return max(1, round(W0 * self.mpp / eff)), max(1, round(H0 * self.mpp / eff))

    def read_at_mpp(
        self,
        x0: float,
        y0: float,
        w: int,
        h: int,
        mpp: float,
        tolerance: float = DEFAULT_MPP_TOLERANCE,
    ) -> np.ndarray:
        """(h, w, 3) uint8 RGB at ``mpp`` µm/px whose top-left is level-0 (x0, y0).

        Served from the level chosen by :meth:`plan_mpp`; when no level matches within ``tolerance``
        the level is resampled (Gaussian anti-aliasing with sigma (s-1)/2 as in skimage, then bilinear
        sampling at the output pixel centres), reading only the level pixels under the footprint.
        """
        plan = self.plan_mpp(mpp, tolerance)
        if plan.exact:
            return self.read_region(round(x0), round(y0), plan.level, w, h)
        return self._resample(plan, x0, y0, w, h)

    def _resample(self, plan: MppPlan, x0: float, y0: float, w: int, h: int) -> np.ndarray:
        s = plan.resample_factor
        if abs(s - round(s)) < 1e-6:
            s = float(round(s))  # 1.497/0.499 is 2.9999999999999996: keep integer factors exact
        ds = self.level_downsamples[plan.level]
        # Level-space coordinate of output pixel (0, 0)'s centre (pixel centres at integer coordinates).
        u0 = x0 / ds + 0.5 * s - 0.5
        v0 = y0 / ds + 0.5 * s - 0.5
        sigma = max(0.0, (s - 1.0) / 2.0)
        k = int(s) if s >= 2.0 else 1
        pad = k * (int(math.ceil((4 * sigma + 2) / k)))
        # Box origin chosen so that, for integer factors on aligned coordinates, each output pixel is
        # exactly the mean of its k x k level pixels.
        rx = math.floor(u0 - (k - 1) / 2.0 + 1e-9) - pad
        ry = math.floor(v0 - (k - 1) / 2.0 + 1e-9) - pad
        rw = math.ceil(u0 + (w - 1) * s) + pad + k - rx
        rh = math.ceil(v0 + (h - 1) * s) + pad + k - ry
        raw = self._read_level_padded(plan.level, rx, ry, rw, rh)
        if k > 1:
            # Area-average by the integer part first (cheap, and itself an anti-aliasing filter), then
            # resample the small remainder: far faster than a wide Gaussian at large factors.
            ch, cw = (raw.shape[0] // k) * k, (raw.shape[1] // k) * k
            crop = raw[:ch, :cw].reshape(ch // k, k, cw // k, k, 3).mean(axis=(1, 3), dtype=np.float32)
            # reduced pixel i has its centre at level coordinate rx + i*k + (k-1)/2
            u0, v0 = (u0 - rx - (k - 1) / 2.0) / k, (v0 - ry - (k - 1) / 2.0) / k
            rx = ry = 0
            s = s / k
            sigma = max(0.0, (s - 1.0) / 2.0)
        else:
            crop = raw.astype(np.float32)
        if sigma > 0:
            crop = ndimage.gaussian_filter(crop, sigma=(sigma, sigma, 0), mode="nearest")
        out = ndimage.affine_transform(
            crop,
            matrix=np.array([s, s, 1.0]),
            offset=(v0 - ry, u0 - rx, 0.0),
            output_shape=(h, w, 3),
            order=1,
            mode="nearest",
            prefilter=False,
        )
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def read_downsampled(self, out_w: int, out_h: int, max_read_side: int = 4096) -> np.ndarray:
        """The whole slide resized to (out_h, out_w, 3), built block by block from the best level.

        Each block reads at most ``max_read_side`` x ``max_read_side`` level pixels, so memory is bounded
        by that, never by the slide size (even for a single-level slide).
        """
        W, H = self.dimensions
        if out_w < 1 or out_h < 1:
            raise ValueError(f"{self.path}: output size must be positive, got {out_w}x{out_h}")
        sx, sy = W / out_w, H / out_h
        target = self.mpp * max(sx, sy)
        factor = max(1.0, self.plan_mpp(target, 0.0).resample_factor)
        block = int(min(512, max(16, max_read_side // math.ceil(factor))))
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        for by in range(0, out_h, block):
            for bx in range(0, out_w, block):
                bw, bh = min(block, out_w - bx), min(block, out_h - by)
                # tolerance 0: a block must cover exactly its footprint so blocks tile seamlessly.
                out[by : by + bh, bx : bx + bw] = self.read_at_mpp(bx * sx, by * sy, bw, bh, target, 0.0)
        return out

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide with its longer side ``max_size`` pixels (never upsampled)."""
        W, H = self.dimensions
        f = min(1.0, max_size / max(W, H))
        return self.read_downsampled(max(1, round(W * f)), max(1, round(H * f)))

    # -- lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        # Re-open by path in another process (dask workers): handles are not picklable.
        return (open_slide, (self.path, self._mpp_override, self._default_mpp))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, {self.dimensions[0]}x{self.dimensions[1]}, "
            f"levels={self.level_count}, mpp={self.mpp:.4g} from {self.mpp_source})"
        )

    def describe(self) -> dict[str, Any]:
        """Provenance-friendly summary (reader, vendor, geometry, MPP and where it came from)."""
        return {
            "reader": self.reader_name,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "mpp_rejected": [r._asdict() for r in self.mpp_rejected],
        }


def _to_rgb(a: np.ndarray) -> np.ndarray:
    """Normalise a decoded array to (h, w, 3) uint8: drop alpha, grey to RGB, 16-bit to 8-bit."""
    if a.dtype != np.uint8:
        if a.dtype == np.uint16:
            a = (a.astype(np.uint32) * 255 // 65535).astype(np.uint8)
        elif a.dtype == bool:
            a = a.astype(np.uint8) * 255
        else:
            a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    if a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    if a.shape[2] == 2:  # grey + alpha
        return np.repeat(a[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


# ------------------------------------------------------------------------------------------------------
# OpenSlide
# ------------------------------------------------------------------------------------------------------
class OpenSlideReader(SlideReader):
    """Vendor formats through openslide-python (thread-safe; OpenSlide keeps its own tile cache)."""

    reader_name = "openslide"

    def __init__(self, path: Path, mpp_override: float | None = None, default_mpp: float | None = None):
        super().__init__(path, mpp_override, default_mpp)
        import openslide

        self._openslide_error: type[Exception] = openslide.OpenSlideError
        self._tiff: Any = None  # (TiffFile, fd, level 0) once looked up, False when there is none
        self._tiff_lock = threading.Lock()
        try:
            self._slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError, ValueError) as e:
            raise SlideOpenError(f"{path}: OpenSlide cannot open it: {_one_line(e)}") from e
        self.properties: dict[str, str] = dict(self._slide.properties)
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self._vendor = self.properties.get("openslide.vendor", "unknown")
        props_vendor = vendor_mpp(self.properties) if self._vendor != "generic-tiff" else None
        tags = tiff_tag_mpp(
            self.properties.get("tiff.XResolution"), self.properties.get("tiff.ResolutionUnit")
        )
        self._resolve_mpp(props_vendor, tags)

    @property
    def vendor(self) -> str:
        return self._vendor

    @staticmethod
    def _rgba_to_rgb(rgba: Any) -> np.ndarray:
        """RGB of OpenSlide's un-premultiplied RGBA, composited over white where alpha < 255 (outside the
        slide alpha is 0, giving white); only those pixels are touched."""
        a = np.asarray(rgba)
        rgb = np.ascontiguousarray(a[:, :, :3])
        alpha = a[:, :, 3]
        partial = alpha < 255
        if partial.any():
            al = alpha[partial].astype(np.uint16)[:, None]
            rgb[partial] = ((rgb[partial].astype(np.uint16) * al + 255 * (255 - al) + 127) // 255).astype(
                np.uint8
            )
        return rgb

    def _read(self, location: tuple[int, int], level: int, w: int, h: int) -> np.ndarray:
        if w == 0 or h == 0:
            return np.full((h, w, 3), 255, dtype=np.uint8)
        try:
            return self._rgba_to_rgb(self._slide.read_region(location, level, (w, h)))
        except self._openslide_error as e:
            raise SlideOpenError(
                f"{self.path}: read failed at level {level} {location} {w}x{h}: {_one_line(e)}"
            ) from e

    def read_region(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        self._check_level(level, w, h)
        return self._read((int(x0), int(y0)), level, w, h)

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        return self._read((round(x * ds), round(y * ds)), level, w, h)

    def _read_level_padded(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._read_level(level, x, y, w, h)  # OpenSlide pads outside the slide itself

    def _tiff_level0(self) -> tuple[int, _TiffLevel] | None:
        """(fd, level 0 as stored) for a TIFF-based vendor file (Aperio SVS, ...) whose first pyramid
        page is OpenSlide's level 0 as a tiled image; None otherwise. Opened once, on first use."""
        with self._tiff_lock:
            if self._tiff is None:
                self._tiff = False
                try:
                    import tifffile

                    if _sniff(self.path) == "tiff":
                        tf = tifffile.TiffFile(str(self.path))
                        page = tf.series[0].levels[0].keyframe
                        lv = _tiff_level(page)
                        # JPEG only: that decode is OpenSlide's own (libjpeg), so pixels agree; other
                        # codecs (Aperio's JPEG 2000 variants) stay with OpenSlide
                        same = (lv.width, lv.height) == self.level_dimensions[0]
                        if same and page.is_tiled and lv.jpeg_direct is not None:
                            _check_segments_in_file(self.path, [(lv.offsets, lv.counts)])
                            self._tiff = (tf, os.open(str(self.path), os.O_RDONLY), lv)
                        else:
                            tf.close()
                except Exception as e:  # any surprise: OpenSlide's own path serves every read
                    log.debug("%s: no direct tile path: %s", self.path, _one_line(e))
            return None if self._tiff is False else (self._tiff[1], self._tiff[2])

    def read_tiles_into(self, x0: int, y0: int, level: int, n: int, size: int, out: np.ndarray) -> bool:
        """Level-0 tiles that are exactly the file's own tiles (an Aperio SVS scanned with 256-px tiles
        and tiled at its scan resolution) are decoded straight into ``out`` from the TIFF, as
        :class:`TiffSlideReader` does: pixel-equal to OpenSlide's, which decodes the same JPEG tiles."""
        self._check_level(level, size, size)
        if level != 0:
            return False
        direct = self._tiff_level0()
        if direct is None:
            return False
        return _decode_tiles_into(self.path, direct[0], direct[1], 0, int(x0), int(y0), n, size, out)

    def close(self) -> None:
        self._slide.close()
        with self._tiff_lock:
            if self._tiff:
                self._tiff[0].close()
                os.close(self._tiff[1])
            self._tiff = False


# ------------------------------------------------------------------------------------------------------
# tifffile: direct tile decode
# ------------------------------------------------------------------------------------------------------
@dataclass
class _TiffLevel:
    page: Any  # tifffile.TiffPage (keyframe of the level)
    width: int
    height: int
    seg_w: int  # tile width, or image width for strips
    seg_h: int  # tile length, or rows per strip
    cols: int  # segments per row
    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    decode: Any
    jpegtables: bytes | None
    #: (colorspace, outcolorspace) when the level's tiles are 8-bit 3-sample JPEG that imagecodecs can
    #: decode straight into a caller's buffer (see TiffSlideReader.read_tiles_into); else None
    jpeg_direct: tuple[Any, Any] | None = None


class TiffSlideReader(SlideReader):
    """Generic and OME (pyramidal) TIFF: decode only the compressed tiles/strips a region touches."""

    reader_name = "tifffile"

    def __init__(
        self,
        path: Path,
        mpp_override: float | None = None,
        default_mpp: float | None = None,
        tile_cache: int = 256,
    ):
        super().__init__(path, mpp_override, default_mpp)
        import tifffile

        try:
            self._tf = tifffile.TiffFile(str(path))
        except Exception as e:  # tifffile raises TiffFileError, ValueError, struct.error, ...
            raise SlideOpenError(f"{path}: not a readable TIFF: {_one_line(e)}") from e
        try:
            self._init_levels()
            self._fd: int | None = os.open(str(path), os.O_RDONLY)
        except SlideOpenError:
            self._tf.close()
            raise
        except Exception as e:
            self._tf.close()
            raise SlideOpenError(f"{path}: unsupported TIFF layout: {_one_line(e)}") from e
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_size = tile_cache
        self._lock = threading.Lock()
        page0 = self._levels[0].page
        tags = page0.tags
        xres = tags["XResolution"].value if "XResolution" in tags else None
        unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else None
        self._resolve_mpp(self._ome_mpp(), tiff_tag_mpp(xres, unit))

    @property
    def vendor(self) -> str:
        return "ome-tiff" if self._tf.is_ome else "generic-tiff"

    def _init_levels(self) -> None:
        if len(self._tf.pages) == 0 or not self._tf.series:
            raise SlideOpenError(
                f"{self.path}: truncated or corrupt TIFF: no readable image directory "
                f"(file has {self.path.stat().st_size} bytes)"
            )
        series = self._tf.series[0]
        levels: list[_TiffLevel] = []
        for lvl in series.levels:
            page = lvl.keyframe
            if len(lvl.pages) != 1:
                raise SlideOpenError(
                    f"{self.path}: unsupported TIFF layout: {len(lvl.pages)} pages per level "
                    f"(planes/channels stored as separate pages)"
                )
            if page.imagedepth > 1 or (page.planarconfig == 2 and page.samplesperpixel > 1):
                raise SlideOpenError(f"{self.path}: unsupported TIFF layout: planar or volumetric image")
            if page.samplesperpixel not in (1, 2, 3, 4):
                raise SlideOpenError(f"{self.path}: unsupported TIFF layout: {page.samplesperpixel} samples")
            levels.append(_tiff_level(page))
        if not levels:
            raise SlideOpenError(f"{self.path}: TIFF has no image")
        _check_segments_in_file(self.path, [(lv.offsets, lv.counts) for lv in levels])
        # Keep decreasing sizes only (a stray larger page is not part of the pyramid).
        kept = [levels[0]]
        for lv in levels[1:]:
            if lv.width < kept[-1].width and lv.height < kept[-1].height:
                kept.append(lv)
        self._levels = kept
        W0, H0 = kept[0].width, kept[0].height
        self.level_dimensions = tuple((lv.width, lv.height) for lv in kept)
        # OpenSlide's convention: the mean of the x and y ratios.
        self.level_downsamples = tuple((W0 / lv.width + H0 / lv.height) / 2.0 for lv in kept)

    def _ome_mpp(self) -> float | None:
        """OME-XML ``Pixels/@PhysicalSizeX`` converted to µm (a vendor statement, not a TIFF tag)."""
        if not self._tf.is_ome or not self._tf.ome_metadata:
            return None
        try:
            root = ET.fromstring(self._tf.ome_metadata)
        except ET.ParseError:
            return None
        for el in root.iter():
            if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib:
                unit = el.attrib.get("PhysicalSizeXUnit", "µm")
                factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit)
                try:
                    return float(el.attrib["PhysicalSizeX"]) * factor if factor else None
                except ValueError:
                    return None
        return None

    def _segment(self, level: int, index: int) -> np.ndarray:
        """Decoded tile/strip ``index`` of ``level`` as (seg_h, seg_w, 3) uint8 (LRU cached)."""
        key = (level, index)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        lv = self._levels[level]
        seg: np.ndarray | None = None
        if lv.counts[index]:
            if self._fd is None:
                raise SlideOpenError(f"{self.path}: read after close")
            data = _segment_bytes(self.path, self._fd, lv, level, index)
            seg = _decode_segment(self.path, lv, level, index, data)
        if seg is None:  # an empty tile of a sparse TIFF, or no data: background
            seg = np.full((lv.seg_h, lv.seg_w, 3), 255, dtype=np.uint8)
        with self._lock:
            self._cache[key] = seg
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return seg

    def read_tiles_into(self, x0: int, y0: int, level: int, n: int, size: int, out: np.ndarray) -> bool:
        """When the tiles asked for are exactly the file's own tiles (same size, aligned, inside the
        level), decode each stored tile once, straight into its slot of ``out`` (see
        :func:`_decode_tiles_into`), bypassing the tile cache: the region path would decode into a cached
        tile, copy it into a region and the caller copy it again."""
        self._check_level(level, size, size)
        ds = self.level_downsamples[level]
        x, y = math.floor(x0 / ds + 1e-9), math.floor(y0 / ds + 1e-9)
        if self._fd is None:
            raise SlideOpenError(f"{self.path}: read after close")
        return _decode_tiles_into(self.path, self._fd, self._levels[level], level, x, y, n, size, out)

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        lv = self._levels[level]
        out = np.empty((h, w, 3), dtype=np.uint8)
        r0, r1 = y // lv.seg_h, (y + h - 1) // lv.seg_h
        c0, c1 = x // lv.seg_w, (x + w - 1) // lv.seg_w
        for r in range(r0, r1 + 1):
            for c in range(c0, c1 + 1):
                seg = self._segment(level, r * lv.cols + c)
                sx, sy = c * lv.seg_w, r * lv.seg_h
                ax0, ay0 = max(x, sx), max(y, sy)
                ax1, ay1 = min(x + w, sx + lv.seg_w), min(y + h, sy + lv.seg_h)
                out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = seg[ay0 - sy : ay1 - sy, ax0 - sx : ax1 - sx]
        return out

    def close(self) -> None:
        self._tf.close()
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _tiff_level(page: Any) -> _TiffLevel:
    """Geometry, segment offsets and decoder of one TIFF page (a pyramid level)."""
    W, H = int(page.imagewidth), int(page.imagelength)
    if page.is_tiled:
        seg_w, seg_h = int(page.tilewidth), int(page.tilelength)
    else:
        seg_w, seg_h = W, min(int(page.rowsperstrip), H)
    return _TiffLevel(
        page=page,
        width=W,
        height=H,
        seg_w=seg_w,
        seg_h=seg_h,
        cols=math.ceil(W / seg_w),
        offsets=tuple(int(o) for o in page.dataoffsets),
        counts=tuple(int(c) for c in page.databytecounts),
        decode=page.decode,
        jpegtables=page.jpegtables,
        jpeg_direct=_jpeg_direct(page),
    )


def _decode_tiles_into(
    path: Path, fd_: int, lv: _TiffLevel, level: int, x: int, y: int, n: int, size: int, out: np.ndarray
) -> bool:
    """Decode ``n`` stored tiles of ``lv``, the first with its top-left at level pixel (x, y), into
    ``out[:n]`` when they are exactly the file's own tiles (tiled TIFF, same size, on its grid, inside the
    level, ``out`` C-contiguous uint8 RGB); return False, having written nothing, when they are not.
    JPEG tiles are decoded by imagecodecs straight into ``out``; other codecs take one copy."""
    if (
        not lv.page.is_tiled
        or lv.seg_w != size
        or lv.seg_h != size
        or x % size
        or y % size
        or x < 0
        or y < 0
        or x + n * size > lv.width
        or y + size > lv.height
        or out.dtype != np.uint8
        or out.shape[1:] != (size, size, 3)
        or not out.flags.c_contiguous
    ):
        return False
    first = (y // size) * lv.cols + x // size
    tile_nbytes = size * size * 3
    base = out.ctypes.data  # once: each ndarray.ctypes access builds a ctypes object
    if lv.jpeg_direct is not None:
        import imagecodecs

        jpeg8_decode, tables = imagecodecs.jpeg8_decode, lv.jpegtables
        cs, outcs = lv.jpeg_direct
    for i in range(n):
        index = first + i
        dst = out[i]
        if not lv.counts[index]:  # sparse TIFF: an empty tile is background
            dst.fill(255)
            continue
        data = _segment_bytes(path, fd_, lv, level, index)
        if lv.jpeg_direct is None:
            seg = _decode_segment(path, lv, level, index, data)
            if seg is None:
                dst.fill(255)
            else:
                dst[:] = seg
            continue
        try:
            if (base + i * tile_nbytes) % 32:
                jpeg8_decode(data, tables=tables, colorspace=cs, outcolorspace=outcs, out=dst)
            else:  # a 32-byte aligned output gets non-temporal stores: decode beside it, copy
                scratch = _decode_scratch(dst.shape)
                jpeg8_decode(data, tables=tables, colorspace=cs, outcolorspace=outcs, out=scratch)
                dst[:] = scratch
        except Exception as e:
            raise _decode_error(path, level, index, e) from e
    return True


def _segment_bytes(path: Path, fd: int, lv: _TiffLevel, level: int, index: int) -> bytes:
    """The compressed bytes of (non-empty) segment ``index`` of ``lv``, read with pread."""
    count = lv.counts[index]
    data = os.pread(fd, count, lv.offsets[index])
    if len(data) != count:
        raise SlideOpenError(f"{path}: truncated: tile {index} of level {level} is cut short")
    return data


def _decode_error(path: Path, level: int, index: int, e: BaseException) -> SlideOpenError:
    return SlideOpenError(f"{path}: cannot decode tile {index} of level {level}: {_one_line(e)}")


def _decode_segment(path: Path, lv: _TiffLevel, level: int, index: int, data: bytes) -> np.ndarray | None:
    """Segment bytes decoded by tifffile to (h, w, 3) uint8 RGB; None where tifffile yields no data."""
    try:
        decoded, _, _ = lv.decode(data, index, jpegtables=lv.jpegtables)
    except Exception as e:
        raise _decode_error(path, level, index, e) from e
    return None if decoded is None else _to_rgb(np.asarray(decoded).reshape(decoded.shape[-3:]))


_SCRATCH = threading.local()


def _decode_scratch(shape: tuple[int, ...]) -> np.ndarray:
    """This thread's tile-sized decode buffer, deliberately 16 bytes off a 32-byte boundary.

    libjpeg-turbo's SIMD colour conversion writes a 32-byte aligned output with non-temporal stores
    that bypass the cache: measured here, decoding a 256-px tile that way takes 0.23 ms against 0.18 ms
    into a misaligned buffer, the difference being more than copying the (cache-hot) result into the
    aligned shard buffer afterwards."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.shape != shape:
        n = int(np.prod(shape))
        raw = np.empty(n + 64, dtype=np.uint8)
        off = (16 - raw.ctypes.data) % 32
        buf = _SCRATCH.buf = raw[off : off + n].reshape(shape)
    return buf


def _jpeg_direct(page: Any) -> tuple[Any, Any] | None:
    """(colorspace, outcolorspace) for decoding ``page``'s tiles with imagecodecs.jpeg8_decode into an
    (h, w, 3) uint8 buffer, exactly as tifffile's own JPEG decoder would; None when that does not apply
    (not baseline 8-bit JPEG, not 3 samples, planar, or an imagecodecs/tifffile without the pieces)."""
    try:
        import imagecodecs
        from tifffile.tifffile import jpeg_decode_colorspace

        if int(page.compression) != 7 or page.bitspersample != 8 or page.samplesperpixel != 3:
            return None
        if page.planarconfig != 1 or page.extrasamples or not hasattr(imagecodecs, "jpeg8_decode"):
            return None
        cs, outcs = jpeg_decode_colorspace(page.photometric, page.planarconfig, page.extrasamples, page.is_jfif)
        return cs, outcs
    except Exception:
        return None


def _check_segments_in_file(path: Path, segments: list[tuple[Any, Any]]) -> None:
    """Catch a truncated TIFF at open time: every tile/strip of every image (offsets, byte counts) must
    lie inside the file."""
    size = path.stat().st_size
    for i, (offsets, counts) in enumerate(segments):
        ends = [int(o) + int(c) for o, c in zip(offsets, counts, strict=False) if c]
        if ends and max(ends) > size:
            raise SlideOpenError(
                f"{path}: truncated: image {i} data ends at byte {max(ends)} but the file has {size} bytes"
            )


# ------------------------------------------------------------------------------------------------------
# Plain images
# ------------------------------------------------------------------------------------------------------
class ImageReader(SlideReader):
    """A flat image (TIFF, PNG, JPEG) loaded whole: one level."""

    reader_name = "image"

    def __init__(
        self,
        path: Path,
        mpp_override: float | None = None,
        default_mpp: float | None = None,
        kind: str | None = None,
    ):
        super().__init__(path, mpp_override, default_mpp)
        kind = kind or _sniff(path)
        tag_mpp: float | None = None
        try:
            if kind == "tiff":
                import tifffile

                with tifffile.TiffFile(str(path)) as tf:
                    page = tf.pages.first
                    _check_segments_in_file(Path(path), [(page.dataoffsets, page.databytecounts)])
                    arr = page.asarray()
                    tags = page.tags
                    xres = tags["XResolution"].value if "XResolution" in tags else None
                    unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else None
                    tag_mpp = tiff_tag_mpp(xres, unit)
            else:
                from PIL import Image

                with Image.open(path) as im:
                    im.load()
                    keep = im.mode in ("RGB", "RGBA", "L", "LA", "I;16")
                    arr = np.asarray(im if keep else im.convert("RGB"))
        except SlideOpenError:
            raise
        except Exception as e:
            raise SlideOpenError(f"{path}: cannot decode {kind or 'image'}: {_one_line(e)}") from e
        if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (1, 2, 3, 4):
            arr = np.moveaxis(arr, 0, -1)  # planar-separate TIFF
        if arr.ndim not in (2, 3):
            raise SlideOpenError(f"{path}: unsupported image shape {arr.shape}")
        self._kind = kind or "image"
        self._rgb = _to_rgb(arr)
        h, w = self._rgb.shape[:2]
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)
        self._resolve_mpp(None, tag_mpp)

    @property
    def vendor(self) -> str:
        return self._kind

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._rgb[y : y + h, x : x + w].copy()


# ------------------------------------------------------------------------------------------------------
# Choosing a reader
# ------------------------------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]


def _sniff(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    return None


def _openslide_vendor(path: Path) -> str | None:
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # detection must never fail the open: the readers report the real problem
        return None


def _tiff_is_flat_and_small(path: Path) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tf:
            series = tf.series[0]
            page = series.levels[0].keyframe
            return (
                len(series.levels) == 1
                and not page.is_tiled
                and page.imagewidth * page.imagelength <= FLAT_IMAGE_MAX_PIXELS
            )
    except Exception:
        return False  # let TiffSlideReader report why it cannot be read


def open_slide(
    path: str | os.PathLike[str],
    mpp_override: float | None = None,
    default_mpp: float | None = None,
) -> SlideReader:
    """Open ``path`` with the reader its content calls for.

    OpenSlide for vendor formats (not ``generic-tiff``); tifffile for generic/OME TIFF pyramids and large
    flat TIFFs; :class:`ImageReader` for small flat TIFFs, PNG and JPEG. MPP is resolved in the order
    ``mpp_override`` (manifest), vendor property, TIFF tags, ``default_mpp`` (config). Anything that
    cannot be opened raises :class:`SlideOpenError` ``"<path>: <reason>"``.
    """
    p = Path(path)
    if not p.exists():
        raise SlideOpenError(f"{p}: no such file")
    if not p.is_file():
        raise SlideOpenError(f"{p}: not a regular file")
    if p.stat().st_size == 0:
        raise SlideOpenError(f"{p}: empty file")
    kind = _sniff(p)
    vendor = _openslide_vendor(p)
    if vendor is not None and vendor != "generic-tiff":
        if kind == "tiff":
            _check_tiff_integrity(p)
        return OpenSlideReader(p, mpp_override, default_mpp)
    if kind == "tiff":
        if _tiff_is_flat_and_small(p):
            return ImageReader(p, mpp_override, default_mpp, kind="tiff")
        try:
            return TiffSlideReader(p, mpp_override, default_mpp)
        except SlideOpenError as e:
            if vendor == "generic-tiff" and "unsupported TIFF layout" in str(e):
                log.info("%s: %s; falling back to OpenSlide", p, e)
                return OpenSlideReader(p, mpp_override, default_mpp)
            raise
    if kind in ("png", "jpeg"):
        return ImageReader(p, mpp_override, default_mpp, kind=kind)
    raise SlideOpenError(
        f"{p}: unsupported format (not a TIFF, PNG, JPEG or OpenSlide vendor format such as SVS/NDPI/MRXS)"
    )


def _check_tiff_integrity(path: Path) -> None:
    """For vendor TIFFs (SVS, NDPI) opened by OpenSlide: fail at open, not mid-tiling, when truncated."""
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tf:
            _check_segments_in_file(path, [(pg.dataoffsets, pg.databytecounts) for pg in tf.pages])
    except SlideOpenError:
        raise
    except Exception as e:
        raise SlideOpenError(f"{path}: corrupt TIFF structure: {_one_line(e)}") from e
