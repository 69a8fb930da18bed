"""Synthetic H&E slides with exact nucleus masks: fedpath's embedded default data.

Each slide is a procedural scene, a pure function of level-0 coordinates and the seed, so any tile of any
pyramid level can be rendered on its own: a slide far larger than memory is written tile by tile, and the
output is bit-identical for a given seed (the shipped manifests' sha256s depend on it).

The scene: irregular tissue blobs (fractal value noise thresholded at a quantile that gives the requested
tissue fraction, pushed to background at the slide border) with fat/lumen holes, eosin-stained stroma
with a fibrous texture, and hematoxylin-stained nuclei (jittered ellipses of varied size, elongation and
chromatin texture) whose density follows a slowly varying cellularity field. Colours come from
Beer-Lambert optical densities of per-site stain vectors, so sites differ in stain hue/intensity and in
nuclear morphology (size, shape, density): a federation over them faces real heterogeneity.

Determinism across machines: everything per-pixel uses only IEEE-exact operations (+, -, *, /, sqrt,
floor, integer hashing); the one transcendental function (10^-OD) is a lookup table built with Python's
``math``. No BLAS, no numpy transcendental ufuncs (their SIMD variants differ in the last bit between
CPUs). JPEG (libjpeg-turbo's integer DCT) and deflate are deterministic for a given imagecodecs build.

Output, per slide: ``slides/<id>.tiff`` (pyramidal tiled TIFF, 256-px JPEG tiles, successive
reduced-resolution pages, resolution tags in pixels/cm; OpenSlide opens it as generic-tiff) and
``masks/<id>_mask.tiff`` (level-0 tiled TIFF, 0/255, deflate). Manifests: ``manifests/<site>.csv``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import tifffile

from fedcore.summary import update_summary
from wsi.config import SynthConfig
from wsi.manifest import ManifestRow, read_manifest, sha256_file, write_manifest

log = logging.getLogger(__name__)

#: Bump when the scene changes: part of the fingerprint that lets a re-run skip finished slides.
SYNTH_VERSION = 1
TILE = 256

_MASK32 = np.uint64(0xFFFFFFFF)
_STATISTICAL_DS = 8  # pyramid levels this coarse draw nuclei as their expected coverage
_OD_STEPS = 1024  # LUT resolution: optical density steps per unit
_OD_MAX = 6.0


# ------------------------------------------------------------------------------------------------------
# Site styles: stain colour and nuclear morphology
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteStyle:
    """Stain vectors (RGB optical density per unit concentration) and nuclear morphology of one site."""

    h_vec: tuple[float, float, float]
    e_vec: tuple[float, float, float]
    h_strength: float  # hematoxylin concentration of an average nucleus
    e_strength: float  # eosin concentration of stroma
    radius_um: float  # mean nucleus radius
    radius_sd: float  # relative spread of the radius
    elongation: float  # largest axis ratio
    density_per_mm2: float  # nuclei per mm² of tissue at mean cellularity
    background_od: tuple[float, float, float] = (0.025, 0.03, 0.02)


def _unit(v: tuple[float, float, float]) -> tuple[float, float, float]:
    n = math.sqrt(sum(c * c for c in v))
    return (v[0] / n, v[1] / n, v[2] / n)


#: Three deliberately different sites: a classic H&E, a blue-haematoxylin lab with small dense
#: (lymphocyte-like) nuclei and pale eosin, and a strongly red eosin lab with large elongated sparse nuclei.
SITE_STYLES: dict[str, SiteStyle] = {
    "a": SiteStyle(_unit((0.65, 0.70, 0.29)), _unit((0.09, 0.86, 0.50)), 0.85, 0.36, 3.4, 0.18, 1.6, 4200),
    "b": SiteStyle(_unit((0.74, 0.64, 0.19)), _unit((0.22, 0.80, 0.48)), 1.0, 0.25, 2.6, 0.12, 1.25, 6500),
    "c": SiteStyle(_unit((0.55, 0.78, 0.31)), _unit((0.05, 0.90, 0.42)), 0.75, 0.46, 4.6, 0.25, 2.3, 2300),
}


def site_style(name: str) -> SiteStyle:
    """The style of a named site: the table above, else a seeded perturbation of site ``a``."""
    if name in SITE_STYLES:
        return SITE_STYLES[name]
    rng = np.random.default_rng([zlib.crc32(name.encode()), 7])
    base = SITE_STYLES["a"]
    j = rng.uniform(-1, 1, size=12)
    return replace(
        base,
        h_vec=_unit(tuple(max(0.05, c + 0.08 * d) for c, d in zip(base.h_vec, j[0:3], strict=True))),  # type: ignore[arg-type]
        e_vec=_unit(tuple(max(0.02, c + 0.08 * d) for c, d in zip(base.e_vec, j[3:6], strict=True))),  # type: ignore[arg-type]
        h_strength=base.h_strength * (1 + 0.2 * j[6]),
        e_strength=base.e_strength * (1 + 0.3 * j[7]),
        radius_um=base.radius_um * (1 + 0.3 * j[8]),
        elongation=1.2 + 0.6 * (j[9] + 1),
        density_per_mm2=base.density_per_mm2 * (1 + 0.4 * j[10]),
    )


# ------------------------------------------------------------------------------------------------------
# Deterministic noise
# ------------------------------------------------------------------------------------------------------
def _hash(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Integer hash of lattice coordinates to float32 in [0, 1) (broadcasting; exact on every CPU)."""
    x = np.asarray(ix).astype(np.int64).astype(np.uint64) & _MASK32
    y = np.asarray(iy).astype(np.int64).astype(np.uint64) & _MASK32
    h = (x * np.uint64(0x9E3779B1) + y * np.uint64(0x85EBCA77) + np.uint64(salt & 0xFFFFFFFF)) & _MASK32
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(0x2C1B3C6D)) & _MASK32
    h ^= h >> np.uint64(12)
    h = (h * np.uint64(0x297A2D39)) & _MASK32
    h ^= h >> np.uint64(15)
    return (h >> np.uint64(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * (np.float32(3.0) - np.float32(2.0) * t)


def _vnoise_grid(xs: np.ndarray, ys: np.ndarray, scale: float, salt: int) -> np.ndarray:
    """Value noise in [0, 1) on the grid ys x xs (level-0 coordinates), lattice spacing ``scale``."""
    gx = xs / scale
    gy = ys / scale
    ix = np.floor(gx).astype(np.int64)
    iy = np.floor(gy).astype(np.int64)
    tx = _fade((gx - ix).astype(np.float32))
    ty = _fade((gy - iy).astype(np.float32))[:, None]
    x0, y0 = int(ix.min()), int(iy.min())
    if int(ix.max()) - x0 > 2 * len(xs) or int(iy.max()) - y0 > 2 * len(ys):
        # Noise finer than the sampling (coarse pyramid levels): hash only the lattice points used.
        one = np.float32(1)
        ixr, iyc = ix[None, :], iy[:, None]
        top = _hash(ixr, iyc, salt) * (one - tx) + _hash(ixr + 1, iyc, salt) * tx
        bot = _hash(ixr, iyc + 1, salt) * (one - tx) + _hash(ixr + 1, iyc + 1, salt) * tx
        return top * (one - ty) + bot * ty
    lat = _hash(np.arange(x0, int(ix.max()) + 2)[None, :], np.arange(y0, int(iy.max()) + 2)[:, None], salt)
    jx, jy = ix - x0, iy - y0
    r0, r1 = lat[jy], lat[jy + 1]
    top = r0[:, jx] * (np.float32(1) - tx) + r0[:, jx + 1] * tx
    bot = r1[:, jx] * (np.float32(1) - tx) + r1[:, jx + 1] * tx
    return top * (np.float32(1) - ty) + bot * ty


def _vnoise_points(x: np.ndarray, y: np.ndarray, scale: float, salt: int) -> np.ndarray:
    """Value noise at scattered points (same field as :func:`_vnoise_grid`)."""
    gx, gy = np.asarray(x, dtype=np.float64) / scale, np.asarray(y, dtype=np.float64) / scale
    ix, iy = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    tx, ty = _fade((gx - ix).astype(np.float32)), _fade((gy - iy).astype(np.float32))
    one = np.float32(1)
    top = _hash(ix, iy, salt) * (one - tx) + _hash(ix + 1, iy, salt) * tx
    bot = _hash(ix, iy + 1, salt) * (one - tx) + _hash(ix + 1, iy + 1, salt) * tx
    return top * (one - ty) + bot * ty


def _od_lut() -> np.ndarray:
    """uint8 transmitted intensity for optical density index i (OD = (i + 0.5) / _OD_STEPS)."""
    n = int(_OD_MAX * _OD_STEPS)
    return np.array(
        [min(255, round(255.0 * math.pow(10.0, -(i + 0.5) / _OD_STEPS))) for i in range(n)], dtype=np.uint8
    )


_LUT = _od_lut()


# ------------------------------------------------------------------------------------------------------
# The scene of one slide
# ------------------------------------------------------------------------------------------------------
@dataclass
class _Nuclei:
    """Nuclei of one lattice cell, as parallel arrays (level-0 pixels)."""

    cx: np.ndarray
    cy: np.ndarray
    a: np.ndarray  # semi-axis along (c, s)
    b: np.ndarray
    c: np.ndarray  # unit direction of the long axis
    s: np.ndarray
    amp: np.ndarray  # (n, 3) boundary jitter amplitudes for harmonics 2, 3, 4
    pc: np.ndarray  # (n, 3) cos of the jitter phases
    ps: np.ndarray  # (n, 3) sin of the jitter phases
    dark: np.ndarray  # intensity factor


def _unit_pairs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n random unit vectors, without trigonometry (a normalised Gaussian pair)."""
    v = rng.normal(size=(n, 2))
    norm = np.sqrt(v[:, 0] * v[:, 0] + v[:, 1] * v[:, 1]) + 1e-12
    return v[:, 0] / norm, v[:, 1] / norm


class SlideScene:
    """Procedural H&E slide: ``render(ds, x, y, w, h)`` gives any box of any pyramid level."""

    #: Tissue-field octaves: (scale µm, weight).
    _OCTAVES = ((1600.0, 0.5), (800.0, 0.25), (400.0, 0.14), (150.0, 0.07), (50.0, 0.04))
    _CELL_UM = 48.0

    def __init__(
        self,
        site: str,
        index: int,
        width: int,
        height: int,
        mpp: float,
        seed: int,
        tissue_fraction: float = 0.5,
        style: SiteStyle | None = None,
    ) -> None:
        self.site, self.index = site, index
        self.width, self.height, self.mpp, self.seed = width, height, mpp, seed
        self.tissue_fraction = tissue_fraction
        self._site_code = zlib.crc32(site.encode())
        rng = np.random.default_rng([seed, self._site_code, index, 0])
        salts = rng.integers(0, 2**32, size=16, dtype=np.uint64)
        self._salts = [int(s) for s in salts]
        base = style or site_style(site)
        # Per-slide stain variation within a site (staining batches differ a little).
        jit = rng.uniform(-1, 1, size=8)
        self.style = replace(
            base,
            h_vec=_unit(tuple(max(0.02, c + 0.03 * d) for c, d in zip(base.h_vec, jit[0:3], strict=True))),  # type: ignore[arg-type]
            e_vec=_unit(tuple(max(0.02, c + 0.03 * d) for c, d in zip(base.e_vec, jit[3:6], strict=True))),  # type: ignore[arg-type]
            h_strength=base.h_strength * (1 + 0.06 * jit[6]),
            e_strength=base.e_strength * (1 + 0.08 * jit[7]),
        )
        d1, d2 = _unit_pairs(rng, 2)
        self._fiber_dirs = [(float(d1[0]), float(d2[0])), (float(d1[1]), float(d2[1]))]
        self._px_per_um = 1.0 / mpp
        self._cell = self._CELL_UM * self._px_per_um
        # Blob scales in µm, the coarse ones shrunk for small slides so tissue stays irregular.
        coarse = min(1.0, 0.45 * min(width, height) / (self._OCTAVES[0][0] * self._px_per_um))
        self._octaves = [(s * self._px_per_um * (coarse if s > 200 else 1.0), w) for s, w in self._OCTAVES]
        self._margin = 0.2 * min(width, height)
        self._threshold = self._tissue_threshold()
        r = self.style.radius_um * self._px_per_um
        self.max_extent = 2.0 * r * math.sqrt(self.style.elongation) * 1.3 + 2.0  # bound on a nucleus' reach
        self._cache: dict[tuple[int, int], _Nuclei] = {}
        self._bg_tiles: dict[int, np.ndarray] = {}

    # -- fields (level-0 coordinates) ----------------------------------------------------------------
    def _border_penalty(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        margin = self._margin
        dx = np.minimum(xs, self.width - xs)[None, :]
        dy = np.minimum(ys, self.height - ys)[:, None]
        d = np.minimum(dx, dy).astype(np.float32)
        q = np.clip(np.float32(1) - d / np.float32(margin), 0, 1)
        return q * q * np.float32(1.5)

    def _tissue_field(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        f = np.zeros((len(ys), len(xs)), dtype=np.float32)
        for k, (scale, weight) in enumerate(self._octaves):
            f += np.float32(weight) * _vnoise_grid(xs, ys, scale, self._salts[k])
        return f - self._border_penalty(xs, ys)

    def _tissue_threshold(self) -> float:
        n = 192
        xs = (np.arange(n) + 0.5) * (self.width / n)
        ys = (np.arange(n) + 0.5) * (self.height / n)
        f = self._tissue_field(xs, ys)
        return float(np.quantile(f, 1.0 - self.tissue_fraction))

    def _field_bound(self, step: float) -> float:
        """Largest change of the tissue field over ``step`` level-0 pixels (value noise slope <= 1.5/scale)."""
        b = sum(w * 1.5 * step / s for s, w in self._octaves)
        return b + 3.0 * step / self._margin

    def _tissue_alpha(self, f: np.ndarray) -> np.ndarray:
        return np.clip((f - np.float32(self._threshold)) / np.float32(0.015), 0, 1)

    def _hole_alpha(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        p = self._px_per_um
        h = np.float32(0.7) * _vnoise_grid(xs, ys, 70.0 * p, self._salts[6]) + np.float32(0.3) * _vnoise_grid(
            xs, ys, 25.0 * p, self._salts[7]
        )
        return np.clip((h - np.float32(0.74)) / np.float32(0.03), 0, 1)

    def _hole_points(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        p = self._px_per_um
        h = np.float32(0.7) * _vnoise_points(x, y, 70.0 * p, self._salts[6]) + np.float32(
            0.3
        ) * _vnoise_points(x, y, 25.0 * p, self._salts[7])
        return h

    def _tissue_points(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        f = np.zeros(np.shape(x), dtype=np.float32)
        for k, (scale, weight) in enumerate(self._octaves):
            f += np.float32(weight) * _vnoise_points(x, y, scale, self._salts[k])
        margin = self._margin
        d = np.minimum(np.minimum(x, self.width - x), np.minimum(y, self.height - y)).astype(np.float32)
        q = np.clip(np.float32(1) - d / np.float32(margin), 0, 1)
        return f - q * q * np.float32(1.5)

    # -- nuclei ----------------------------------------------------------------------------------------
    def _make_cells(self, keys: list[tuple[int, int]]) -> None:
        """Generate the nuclei of lattice cells ``keys`` (one RNG stream per cell, so the result does not
        depend on which cells are generated together); tissue/hole tests are vectorised over all of them."""
        st = self.style
        cell = self._cell
        p = self._px_per_um
        cxs = np.array([k[0] for k in keys], dtype=np.float64)
        cys = np.array([k[1] for k in keys], dtype=np.float64)
        cellularity = 0.35 + 1.3 * _vnoise_points(
            (cxs + 0.5) * cell, (cys + 0.5) * cell, 300.0 * p, self._salts[8]
        )
        mean_n = st.density_per_mm2 * (self._CELL_UM * self._CELL_UM / 1e6)
        raw = []
        for (cx, cy), cel in zip(keys, cellularity.tolist(), strict=True):
            rng = np.random.default_rng([self.seed, self._site_code, self.index, 1, cy + 1, cx + 1])
            n = int(rng.poisson(mean_n * cel))
            px = cx * cell + rng.random(n) * cell
            py = cy * cell + rng.random(n) * cell
            r = st.radius_um * p * np.clip(np.exp(rng.normal(0.0, st.radius_sd, n)), 0.55, 1.8)
            e = 1.0 + (st.elongation - 1.0) * rng.random(n) ** 2
            c, s = _unit_pairs(rng, n)
            amp = rng.uniform(0.0, 0.07, size=(n, 3))
            pcs = [_unit_pairs(rng, n) for _ in range(3)]
            dark = rng.uniform(0.8, 1.2, n)
            raw.append((px, py, r, e, c, s, amp, pcs, dark))
        allx = np.concatenate([r[0] for r in raw]) if raw else np.zeros(0)
        ally = np.concatenate([r[1] for r in raw]) if raw else np.zeros(0)
        ok = np.zeros(0, dtype=bool)
        if allx.size:
            ok = (self._tissue_points(allx, ally) > self._threshold + 0.01) & (
                self._hole_points(allx, ally) < 0.72
            )
            ok &= (allx < self.width) & (ally < self.height)
        rmin2 = (1.5 * st.radius_um * p) ** 2
        pos = 0
        for key, (px, py, r, e, c, s, amp, pcs, dark) in zip(keys, raw, strict=True):
            n = len(px)
            keep = ok[pos : pos + n].copy()
            pos += n
            # No two nuclei of a cell closer than 1.5 mean radii (real nuclei rarely overlap much).
            for i in range(n):
                if keep[i]:
                    for j in range(i):
                        if keep[j] and (px[i] - px[j]) ** 2 + (py[i] - py[j]) ** 2 < rmin2:
                            keep[i] = False
                            break
            sq = np.sqrt(e)
            self._cache[key] = _Nuclei(
                cx=px[keep],
                cy=py[keep],
                a=(r * sq)[keep],
                b=(r / sq)[keep],
                c=c[keep],
                s=s[keep],
                amp=amp[keep],
                pc=np.stack([q[0] for q in pcs], axis=1)[keep],
                ps=np.stack([q[1] for q in pcs], axis=1)[keep],
                dark=dark[keep],
            )

    def nuclei_in(self, x0: float, y0: float, x1: float, y1: float) -> list[_Nuclei]:
        """Nuclei of every cell whose nuclei can reach the level-0 box [x0, x1) x [y0, y1)."""
        m = self.max_extent
        c0, c1 = math.floor((x0 - m) / self._cell), math.floor((x1 + m) / self._cell)
        r0, r1 = math.floor((y0 - m) / self._cell), math.floor((y1 + m) / self._cell)
        keys = [(cx, cy) for cy in range(max(r0, 0), r1 + 1) for cx in range(max(c0, 0), c1 + 1)]
        if len(self._cache) + len(keys) > 50_000:
            self._cache.clear()
        missing = [k for k in keys if k not in self._cache]
        if missing:
            self._make_cells(missing)
        return [nuc for k in keys if len((nuc := self._cache[k]).cx)]

    # -- rendering -------------------------------------------------------------------------------------
    def level_shape(self, ds: int) -> tuple[int, int]:
        """(width, height) of the level with integer downsample ``ds``."""
        return max(1, -(-self.width // ds)), max(1, -(-self.height // ds))

    def background_flags(self, ds: int, row: int, cols: int) -> np.ndarray:
        """For each of the ``cols`` tiles of tile row ``row`` of level ``ds``: True when no tissue (nor a
        nucleus' reach) can fall in it. Sound: the field is sampled every 32 level-0 pixels (coarser on coarse levels) over the row
        (one vectorised evaluation) and its largest possible change between samples is added."""
        m = self.max_extent
        step = 32.0 * max(1, ds // 8)
        span = TILE * ds
        x_lo, x_hi = -m, cols * span + m
        y_lo, y_hi = row * span - m, (row + 1) * span + m
        xs = x_lo + np.arange(math.ceil((x_hi - x_lo) / step) + 1) * step
        ys = y_lo + np.arange(math.ceil((y_hi - y_lo) / step) + 1) * step
        colmax = self._tissue_field(xs, ys).max(axis=0)
        bound = self._field_bound(step)
        flags = np.empty(cols, dtype=bool)
        for c in range(cols):
            i0 = max(0, math.floor((c * span - m - x_lo) / step))
            i1 = min(len(xs), math.ceil(((c + 1) * span + m - x_lo) / step) + 1)
            flags[c] = float(colmax[i0:i1].max()) + bound < self._threshold
        return flags

    def tile_is_background(self, ds: int, x: int, y: int) -> bool:
        """Exact test for one tile of level ``ds``: no pixel (nor any nucleus' reach) has tissue, so
        :meth:`render` would give exactly :meth:`background_tile`."""
        e = math.ceil(self.max_extent / ds) + 1
        xs = (x - e + np.arange(TILE + 2 * e) + 0.5) * ds
        ys = (y - e + np.arange(TILE + 2 * e) + 0.5) * ds
        return bool(float(self._tissue_field(xs, ys).max()) <= self._threshold)

    def _background_od(self, ds: int, w: int, h: int, x: int, y: int) -> list[np.ndarray]:
        """Background optical density (with a periodic per-pixel grain, so background tiles repeat)."""
        grain = _hash(
            (x + np.arange(w))[None, :] % TILE, (y + np.arange(h))[:, None] % TILE, self._salts[9] + ds
        )
        g = (grain - np.float32(0.5)) * np.float32(0.006)
        return [np.float32(b) + g for b in self.style.background_od]

    def background_tile(self, ds: int) -> np.ndarray:
        """The (TILE, TILE, 3) tile every all-background tile of level ``ds`` is (cached)."""
        tile = self._bg_tiles.get(ds)
        if tile is None:
            od = self._background_od(ds, TILE, TILE, 0, 0)
            tile = self._compose(od, np.zeros((TILE, TILE), np.float32), np.zeros((TILE, TILE), np.float32))
            self._bg_tiles[ds] = tile
        return tile

    def _compose(self, bg: list[np.ndarray], hem: np.ndarray, eos: np.ndarray) -> np.ndarray:
        st = self.style
        out = np.empty(hem.shape + (3,), dtype=np.uint8)
        top = _LUT.shape[0] - 1
        for ch in range(3):
            od = bg[ch] + hem * np.float32(st.h_vec[ch]) + eos * np.float32(st.e_vec[ch])
            idx = np.clip((od * np.float32(_OD_STEPS)).astype(np.int32), 0, top)
            out[..., ch] = _LUT[idx]
        return out

    def render(
        self, ds: int, x: int, y: int, w: int, h: int, want_mask: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """RGB (h, w, 3) uint8 of a box of the level with downsample ``ds`` (level pixel coordinates) and,
        at level 0 with ``want_mask``, the exact nucleus mask (h, w) bool of the same pixels."""
        st = self.style
        p = self._px_per_um
        xs = (x + np.arange(w) + 0.5) * ds  # level-0 coordinates of pixel centres
        ys = (y + np.arange(h) + 0.5) * ds
        bg = self._background_od(ds, w, h, x, y)
        alpha = self._tissue_alpha(self._tissue_field(xs, ys))
        alpha *= np.float32(1) - np.float32(0.92) * self._hole_alpha(xs, ys)
        # Stroma: two families of warped fibres over a fine grain.
        warp = _vnoise_grid(xs, ys, 40.0 * p, self._salts[10]) * np.float32(2.5)
        fib = np.zeros((h, w), dtype=np.float32)
        for k, (dx, dy) in enumerate(self._fiber_dirs):
            proj = ((xs[None, :] * dx + ys[:, None] * dy) / (9.0 * p)).astype(np.float32) + warp * np.float32(
                k + 1
            )
            t = proj - np.floor(proj)
            tri = np.abs(np.float32(2) * t - np.float32(1))
            fib += np.float32(0.5) * tri * tri * tri
        grain = _vnoise_grid(xs, ys, 3.0 * p, self._salts[11])
        eos = (
            alpha
            * np.float32(st.e_strength)
            * (np.float32(0.5) + np.float32(0.45) * fib + np.float32(0.25) * grain)
        )
        hem = alpha * np.float32(0.05 * st.h_strength) * grain
        mask = np.zeros((h, w), dtype=bool) if want_mask else None
        # Nuclei with chromatin texture (fine value noise on global coordinates: seamless across tiles).
        if ds >= _STATISTICAL_DS:
            # Nuclei are (sub-)pixel sized here: draw their expected coverage instead of each of them.
            r_um = st.radius_um
            cover = st.density_per_mm2 * math.pi * r_um * r_um / 1e6
            cell = np.float32(0.35) + np.float32(1.3) * _vnoise_grid(xs, ys, 300.0 * p, self._salts[8])
            frac = np.clip(alpha * np.float32(cover) * cell, 0, 1)
            hem += frac * np.float32(0.85 * st.h_strength)
            eos *= np.float32(1) - np.float32(0.6) * frac
            return self._compose(bg, hem, eos), None
        nuclei = self.nuclei_in(xs[0] - ds, ys[0] - ds, xs[-1] + ds, ys[-1] + ds)
        if nuclei:
            chrom = np.float32(0.62) + np.float32(0.5) * _vnoise_grid(xs, ys, 0.9 * p, self._salts[12])
            self._draw_nuclei(nuclei, ds, x, y, w, h, hem, eos, chrom, mask)
        bg_rgb = self._compose(bg, hem, eos)
        return bg_rgb, mask

    def _draw_nuclei(
        self,
        groups: list[_Nuclei],
        ds: int,
        x: int,
        y: int,
        w: int,
        h: int,
        hem: np.ndarray,
        eos: np.ndarray,
        chrom: np.ndarray,
        mask: np.ndarray | None,
    ) -> None:
        hs = np.float32(self.style.h_strength)
        one = np.float32(1)
        for g in groups:
            for i in range(len(g.cx)):
                cx, cy, a, b = float(g.cx[i]), float(g.cy[i]), float(g.a[i]), float(g.b[i])
                reach = a * (1.0 + float(g.amp[i].sum())) + ds
                # level pixel range whose centres can be inside
                c0 = max(math.floor((cx - reach) / ds - 0.5), x)
                c1 = min(math.ceil((cx + reach) / ds + 0.5), x + w)
                r0 = max(math.floor((cy - reach) / ds - 0.5), y)
                r1 = min(math.ceil((cy + reach) / ds + 0.5), y + h)
                if c1 <= c0 or r1 <= r0:
                    continue
                px = ((np.arange(c0, c1) + 0.5) * ds - cx).astype(np.float32)[None, :]
                py = ((np.arange(r0, r1) + 0.5) * ds - cy).astype(np.float32)[:, None]
                cs, sn = np.float32(g.c[i]), np.float32(g.s[i])
                u = (px * cs + py * sn) / np.float32(a)
                v = (py * cs - px * sn) / np.float32(b)
                rho = np.sqrt(u * u + v * v)
                inv = one / np.maximum(rho, np.float32(1e-6))
                c1h, s1h = u * inv, v * inv
                # cos/sin of 2φ, 3φ, 4φ by the angle-addition recurrences (no trig calls).
                c2, s2 = c1h * c1h - s1h * s1h, np.float32(2) * c1h * s1h
                c3, s3 = c2 * c1h - s2 * s1h, s2 * c1h + c2 * s1h
                c4, s4 = c2 * c2 - s2 * s2, np.float32(2) * c2 * s2
                jit: Any = one
                for k, (ck, sk) in enumerate(((c2, s2), (c3, s3), (c4, s4))):
                    am = np.float32(g.amp[i, k])
                    jit = jit + am * (ck * np.float32(g.pc[i, k]) - sk * np.float32(g.ps[i, k]))
                edge = jit - rho  # > 0 inside
                if ds == 1:
                    wgt = (edge > 0).astype(np.float32)
                else:
                    # coverage-like soft edge one level pixel wide (lower pyramid levels only)
                    wgt = np.clip(edge * np.float32(a / ds) + np.float32(0.5), 0, 1)
                if not wgt.any():
                    continue
                sl = (slice(r0 - y, r1 - y), slice(c0 - x, c1 - x))
                rim = np.clip((rho - np.float32(0.75)) * np.float32(1.6), 0, np.float32(0.4))
                conc = hs * np.float32(g.dark[i]) * (chrom[sl] + rim)
                hem[sl] = np.maximum(hem[sl], conc * wgt)
                eos[sl] = eos[sl] * (one - np.float32(0.6) * wgt) + np.float32(0.12) * wgt
                if mask is not None:
                    mask[sl] |= wgt > 0.5


# ------------------------------------------------------------------------------------------------------
# Writing pyramidal TIFFs tile by tile
# ------------------------------------------------------------------------------------------------------
def _encode_jpeg(tile: np.ndarray, quality: int) -> bytes:
    # The exact call tifffile makes for compression='jpeg' on RGB: YCbCr with 2x2 chroma subsampling.
    return bytes(
        imagecodecs.jpeg8_encode(
            tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
        )
    )


def _encode_mask(tile: np.ndarray) -> bytes:
    return bytes(imagecodecs.zlib_encode(np.ascontiguousarray(tile), level=6))  # type: ignore[arg-type]


def _render_row(args: tuple[SlideScene, int, int, int, bool]) -> tuple[list[bytes], list[bytes] | None]:
    """Encoded tiles (and mask tiles at level 0) of one row of tiles of one level."""
    scene, ds, row, quality, want_mask = args
    lw, _ = scene.level_shape(ds)
    cols = -(-lw // TILE)
    bg_jpeg: bytes | None = None
    bg_mask: bytes | None = None
    tiles: list[bytes] = []
    masks: list[bytes] | None = [] if want_mask else None
    y = row * TILE
    background = scene.background_flags(ds, row, cols)
    for col in range(cols):
        x = col * TILE
        if background[col] or scene.tile_is_background(ds, x, y):
            if bg_jpeg is None:
                bg_jpeg = _encode_jpeg(scene.background_tile(ds), quality)
                bg_mask = _encode_mask(np.zeros((TILE, TILE), np.uint8))
            tiles.append(bg_jpeg)
            if masks is not None:
                assert bg_mask is not None
                masks.append(bg_mask)
            continue
        rgb, mask = scene.render(ds, x, y, TILE, TILE, want_mask=want_mask)
        tiles.append(_encode_jpeg(rgb, quality))
        if masks is not None:
            assert mask is not None
            masks.append(_encode_mask(mask.astype(np.uint8) * np.uint8(255)))
    return tiles, masks


def _pyramid(scene: SlideScene) -> list[int]:
    """Downsamples of the pyramid levels: halve until the level fits in one tile."""
    ds = [1]
    while max(scene.level_shape(ds[-1])) > TILE:
        ds.append(ds[-1] * 2)
    return ds


def write_slide(
    scene: SlideScene,
    slide_path: Path,
    mask_path: Path,
    quality: int = 85,
    workers: int = 1,
    pool: ProcessPoolExecutor | None = None,
) -> None:
    """Write the pyramidal slide TIFF and its level-0 mask TIFF, one row of tiles in memory at a time.

    Level-0 mask tiles are encoded alongside the image tiles and spooled to a temporary file, so the
    scene is rendered once; ``workers`` > 1 renders rows in processes (same bytes as one worker).
    """
    slide_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    levels = _pyramid(scene)
    own_pool = pool is None and workers > 1
    if own_pool:
        pool = ProcessPoolExecutor(max_workers=workers)
    desc = (
        f"fedpath synthetic H&E slide|site={scene.site}|index={scene.index}|seed={scene.seed}"
        f"|mpp={scene.mpp}|synth_version={SYNTH_VERSION}"
    )
    tmp_slide = slide_path.with_name(slide_path.name + ".part")
    tmp_mask = mask_path.with_name(mask_path.name + ".part")
    try:
        with (
            tempfile.TemporaryFile(dir=mask_path.parent) as spool,
            tifffile.TiffWriter(tmp_slide, bigtiff=_big(scene)) as tw,
        ):
            mask_lengths: list[int] = []
            for li, ds in enumerate(levels):
                lw, lh = scene.level_shape(ds)
                rows = -(-lh // TILE)
                jobs = [(scene, ds, r, quality, ds == 1) for r in range(rows)]
                results = pool.map(_render_row, jobs, chunksize=1) if pool else map(_render_row, jobs)

                def tiles(results: Iterator[Any] = iter(results)) -> Iterator[bytes]:
                    for row_tiles, row_masks in results:
                        if row_masks is not None:
                            for mb in row_masks:
                                spool.write(mb)
                                mask_lengths.append(len(mb))
                        yield from row_tiles

                mpp = scene.mpp * ds
                tw.write(
                    tiles(),
                    shape=(lh, lw, 3),
                    dtype=np.uint8,
                    tile=(TILE, TILE),
                    photometric="rgb",
                    compression="jpeg",
                    resolution=(1e4 / mpp, 1e4 / mpp),
                    resolutionunit="CENTIMETER",
                    subfiletype=1 if li else 0,
                    description=desc if li == 0 else None,
                    metadata=None,
                    software="fedpath",
                )
            spool.seek(0)

            def mask_tiles() -> Iterator[bytes]:
                for n in mask_lengths:
                    yield spool.read(n)

            with tifffile.TiffWriter(tmp_mask, bigtiff=_big(scene)) as mw:
                mw.write(
                    mask_tiles(),
                    shape=(scene.height, scene.width),
                    dtype=np.uint8,
                    tile=(TILE, TILE),
                    photometric="minisblack",
                    compression="zlib",
                    resolution=(1e4 / scene.mpp, 1e4 / scene.mpp),
                    resolutionunit="CENTIMETER",
                    description=f"fedpath nucleus mask (0/255) of {slide_path.name}",
                    metadata=None,
                    software="fedpath",
                )
        os.replace(tmp_slide, slide_path)
        os.replace(tmp_mask, mask_path)
    finally:
        if own_pool and pool is not None:
            pool.shutdown()
        for t in (tmp_slide, tmp_mask):
            if t.exists():
                t.unlink()


def _big(scene: SlideScene) -> bool:
    # Classic TIFF offsets are 32-bit; use BigTIFF when the raw level 0 could pass 4 GB.
    return scene.width * scene.height * 3 > 3_500_000_000


# ------------------------------------------------------------------------------------------------------
# Manifests and the CLI stage
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlidePlan:
    site: str
    index: int
    slide_id: str
    split: str


def plan_slides(cfg: SynthConfig) -> list[SlidePlan]:
    """Slides per site: ``slides_per_site`` train/val (the last ``val_slides`` are val) + held-out test."""
    out = []
    for site in cfg.sites:
        n = cfg.slides_per_site + cfg.held_out_slides
        for i in range(n):
            if i >= cfg.slides_per_site:
                split = "test"
            elif i >= cfg.slides_per_site - cfg.val_slides:
                split = "val"
            else:
                split = "train"
            out.append(SlidePlan(site, i, f"{site}_{i:03d}", split))
    return out


def scene_for(cfg: SynthConfig, plan: SlidePlan) -> SlideScene:
    return SlideScene(
        plan.site, plan.index, cfg.width, cfg.height, cfg.mpp, cfg.seed, tissue_fraction=cfg.tissue_fraction
    )


def _fingerprint(cfg: SynthConfig) -> dict[str, Any]:
    d = cfg.model_dump()
    d.pop("workers", None)
    return {"synth_version": SYNTH_VERSION, "tile": TILE, **d}


def run_synth(cfg: SynthConfig, out: Path, run_dir: Path | None = None) -> dict[str, Any]:
    """Generate every site's slides, masks and manifests under ``out`` (the data root of the default).

    A re-run with the same settings keeps slides whose files still match the previous manifest.
    Returns (and records in ``<run_dir>/summary.json`` under ``synth``) what was written.
    """
    out = Path(out)
    t0 = time.perf_counter()
    (out / "manifests").mkdir(parents=True, exist_ok=True)
    stamp_path = out / "synth.json"
    fp = _fingerprint(cfg)
    previous: dict[str, ManifestRow] = {}
    if stamp_path.exists() and json.loads(stamp_path.read_text()).get("fingerprint") == fp:
        for site in cfg.sites:
            mf = out / "manifests" / f"{site}.csv"
            if mf.exists():
                previous.update({r.slide_id: r for r in read_manifest(mf)})
    stamp_path.unlink(missing_ok=True)
    rows: dict[str, list[ManifestRow]] = {s: [] for s in cfg.sites}
    made = kept = 0
    from rich.console import Console
    from rich.progress import Progress

    plans = plan_slides(cfg)
    pool = ProcessPoolExecutor(max_workers=cfg.workers) if cfg.workers > 1 else None
    with pool or nullcontext(), Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("synthesising slides", total=len(plans))
        for plan in plans:
            rel_slide = f"slides/{plan.slide_id}.tiff"
            rel_mask = f"masks/{plan.slide_id}_mask.tiff"
            old = previous.get(plan.slide_id)
            if (
                old is not None
                and old.split == plan.split
                and (out / rel_slide).exists()
                and (out / rel_mask).exists()
                and sha256_file(out / rel_slide) == old.sha256
                and sha256_file(out / rel_mask) == old.annotation_sha256
            ):
                rows[plan.site].append(old)
                kept += 1
            else:
                write_slide(
                    scene_for(cfg, plan), out / rel_slide, out / rel_mask, cfg.jpeg_quality, cfg.workers, pool
                )
                rows[plan.site].append(
                    ManifestRow(
                        site=plan.site,
                        slide_id=plan.slide_id,
                        path=rel_slide,
                        annotation_path=rel_mask,
                        mpp=None,
                        split=plan.split,
                        sha256=sha256_file(out / rel_slide),
                        annotation_sha256=sha256_file(out / rel_mask),
                    )
                )
                made += 1
            progress.advance(task)
    for site, site_rows in rows.items():
        write_manifest(site_rows, out / "manifests" / f"{site}.csv")
    stamp_path.write_text(json.dumps({"fingerprint": fp}, indent=2))
    result = {
        "out": str(out),
        "sites": {s: [r.slide_id for r in rs] for s, rs in rows.items()},
        "manifests": {s: str(out / "manifests" / f"{s}.csv") for s in cfg.sites},
        "slides_written": made,
        "slides_kept": kept,
        "seconds": round(time.perf_counter() - t0, 2),
        "config": cfg.model_dump(),
    }
    log.info("synth: %d slides written, %d kept, in %.1f s -> %s", made, kept, result["seconds"], out)
    if run_dir is not None:
        update_summary(Path(run_dir), "synth", result)
    return result


