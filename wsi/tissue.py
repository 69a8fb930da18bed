"""Tissue detection at low resolution: Otsu on HSV saturation (with a floor), then morphology.

H&E tissue is coloured (saturated) while glass and background are near-white (unsaturated), so one
threshold on saturation separates them. The mask is computed on a downsampled copy of the slide
(``TissueConfig.detect_mpp`` µm/px, read block-wise from the coarsest suitable pyramid level), never
from the full-resolution image, so it costs the same for a 512-px tile and a 100k-px slide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import disk

from wsi.config import TissueConfig
from wsi.readers import SlideReader

#: The tissue mask has at least this many pixels along the slide's longer side (small tiles).
MIN_MASK_SIDE = 64
#: ... and at most this many pixels: huge slides are detected coarser than ``detect_mpp`` so that the
#: detection's memory does not grow with slide size (a 100k x 80k slide at 0.25 µm/px: ~22 µm/px; an 80k
#: x 80k one at 0.5 µm/px: ~39 µm/px, still three mask pixels across a 256-px tile).
MAX_MASK_PIXELS = 1024 * 1024


def saturation(rgb: np.ndarray, block: int = 512) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` (skimage's ``rgb2hsv`` S channel) quantised to uint8 (0..255),
    computed in row blocks: a 2048 x 2048 thumbnail costs 4 MB, not 16 MB of float32 (or 100 MB of
    float64 HSV). Otsu works on a 256-bin histogram anyway."""
    out = np.zeros(rgb.shape[:2], dtype=np.uint8)
    for r0 in range(0, rgb.shape[0], block):
        blk = rgb[r0 : r0 + block]
        mx = blk.max(axis=2).astype(np.uint16)
        mn = blk.min(axis=2).astype(np.uint16)
        num = (mx - mn) * np.uint16(255) + (mx >> 1)  # rounded (max - min) * 255 / max
        np.floor_divide(num, np.maximum(mx, 1), out=num)
        out[r0 : r0 + block] = num
    return out


@dataclass
class TissueMask:
    """A boolean tissue mask whose pixel (i, j) covers level-0 box
    ``[j*downsample_x, (j+1)*downsample_x) x [i*downsample_y, (i+1)*downsample_y)``."""

    mask: np.ndarray
    downsample_x: float
    downsample_y: float
    threshold: float
    mask_mpp: float

    def __post_init__(self) -> None:
        # Summed-area table (with a zero row/column) for O(1) box fractions, built in place: int32 holds
        # any count up to MAX_MASK_PIXELS, and no int64 temporaries are made for a big mask.
        h, w = self.mask.shape
        sat = np.zeros((h + 1, w + 1), dtype=np.int32)
        inner = sat[1:, 1:]
        np.cumsum(self.mask, axis=0, dtype=np.int32, out=inner)
        np.cumsum(inner, axis=1, out=inner)
        self._sat = sat

    @property
    def downsample(self) -> float:
        """Mean of the x and y downsample relative to level 0."""
        return (self.downsample_x + self.downsample_y) / 2.0

    @property
    def tissue_fraction_total(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def fraction(self, x0: float, y0: float, w0: float, h0: float) -> float:
        """Tissue fraction of a level-0 box (mask cells it touches; outside the slide is background)."""
        return float(self.fractions(np.array([[x0, y0, w0, h0]], dtype=np.float64))[0])

    def fractions(self, boxes: np.ndarray) -> np.ndarray:
        """Tissue fraction of each level-0 box ``(x0, y0, w0, h0)`` in an (N, 4) array (vectorised)."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        mh, mw = self.mask.shape
        c0 = np.floor(b[:, 0] / self.downsample_x).astype(np.int64)
        r0 = np.floor(b[:, 1] / self.downsample_y).astype(np.int64)
        c1 = np.ceil((b[:, 0] + b[:, 2]) / self.downsample_x - 1e-9).astype(np.int64)
        r1 = np.ceil((b[:, 1] + b[:, 3]) / self.downsample_y - 1e-9).astype(np.int64)
        c1, r1 = np.maximum(c1, c0 + 1), np.maximum(r1, r0 + 1)
        area = (c1 - c0) * (r1 - r0)
        cc0, cc1 = np.clip(c0, 0, mw), np.clip(c1, 0, mw)
        rr0, rr1 = np.clip(r0, 0, mh), np.clip(r1, 0, mh)
        s = self._sat
        inside = s[rr1, cc1].astype(np.int64) - s[rr0, cc1] - s[rr1, cc0] + s[rr0, cc0]
        return (inside / area).astype(np.float64)


def _pad_morph(mask: np.ndarray, radius: int, op: str) -> np.ndarray:
    """Binary opening/closing with edge padding, so the slide border is not treated as background."""
    if radius <= 0:
        return mask
    p = np.pad(mask, radius, mode="edge")
    fn = ndimage.binary_opening if op == "open" else ndimage.binary_closing
    return fn(p, structure=disk(radius))[radius:-radius, radius:-radius]


def tissue_mask_from_rgb(rgb: np.ndarray, cfg: TissueConfig, mask_mpp: float) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of a low-resolution RGB image and the saturation threshold used.

    Otsu's threshold is only trusted when its lower class looks like background (mean saturation under
    twice the floor); otherwise the view is (almost) all tissue and Otsu would split stroma from nuclei,
    so the floor ``cfg.min_saturation`` is used instead.
    """
    sat = saturation(rgb)  # uint8: saturation * 255
    hist = np.bincount(sat.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    floor = cfg.min_saturation
    thr = floor
    if sat.size and np.count_nonzero(hist) > 1:
        otsu = float(threshold_otsu(hist=(hist, levels))) / 255.0
        below = levels <= otsu * 255.0
        n_low = hist[below].sum()
        if n_low and float((hist[below] * levels[below]).sum() / n_low) / 255.0 <= 2 * floor:
            thr = max(otsu, floor)
    mask = sat > thr * 255.0
    mask = _pad_morph(mask, cfg.opening_radius, "open")
    mask = _pad_morph(mask, cfg.closing_radius, "close")
    min_px = cfg.min_object_area_um2 / (mask_mpp * mask_mpp)
    if min_px > 1 and mask.any():
        labels, n = ndimage.label(mask)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_px
        keep[0] = False
        mask = keep[labels]
    if cfg.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    return mask.astype(bool), thr


def detect_tissue(reader: SlideReader, cfg: TissueConfig | None = None) -> TissueMask:
    """Tissue mask of a slide at ``cfg.detect_mpp`` (finer for small images, see MIN_MASK_SIDE)."""
    cfg = cfg or TissueConfig()
    W, H = reader.dimensions
    ds = max(1.0, min(cfg.detect_mpp / reader.mpp, max(W, H) / MIN_MASK_SIDE))
    ds = max(ds, (W * H / MAX_MASK_PIXELS) ** 0.5)
    out_w, out_h = max(1, round(W / ds)), max(1, round(H / ds))
    rgb = reader.read_downsampled(out_w, out_h)
    dsx, dsy = W / out_w, H / out_h
    mask_mpp = reader.mpp * (dsx + dsy) / 2.0
    mask, thr = tissue_mask_from_rgb(rgb, cfg, mask_mpp)
    return TissueMask(mask=mask, downsample_x=dsx, downsample_y=dsy, threshold=thr, mask_mpp=mask_mpp)
