"""Blending overlapping window predictions into one slide-level map.

The shape follows MONAI's ``Merger`` ABC (``aggregate(values, location)`` then ``finalize()``), with
numpy arrays so that ``wsi`` stays free of torch:

* :class:`WeightedMerger`: importance-weighted averaging. Each window's values are multiplied by an
  importance map (the caller passes MONAI's Gaussian ``compute_importance_map``), summed, and at the end
  divided by the summed weights. With Gaussian weights the centre of a window dominates its border, so
  no seam shows where windows meet, and every pixel covered by at least one window gets a value.
* :class:`ArrayMerger`: the sums held in memory (one inference block, or a small image).
* :class:`ZarrMerger`: the sums held in disk-backed zarr arrays chunked like the output, so a
  100k x 100k slide never has to fit in memory. Blocks are added with a read-add-write of the chunks they
  touch (sums are additive, so order does not matter) and :meth:`ZarrMerger.finalize` divides chunk by
  chunk into the output array.
"""

from __future__ import annotations

import math
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

#: Fast float codec for the accumulators (byte-shuffled LZ4: cheap to re-read and re-write).
ACCUMULATOR_CODEC = BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")


def window_positions(length: int, window: int, stride: int) -> list[int]:
    """Window origins along one axis covering ``[0, length)``: every ``stride``, plus a last window flush
    with the end (as MONAI's ``dense_patch_slices``), a single one at 0 when the axis is shorter."""
    if window <= 0 or stride <= 0:
        raise ValueError(f"window ({window}) and stride ({stride}) must be positive")
    if length <= window:
        return [0]
    pos = list(range(0, length - window + 1, stride))
    if pos[-1] != length - window:
        pos.append(length - window)
    return pos


def _clip(
    location: tuple[int, int], size: tuple[int, int], shape: tuple[int, int]
) -> tuple[slice, slice, slice, slice] | None:
    """Canvas and patch slices of a ``size`` patch at ``location`` clipped to a canvas of ``shape``."""
    y, x = location
    h, w = size
    H, W = shape
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
    if y1 <= y0 or x1 <= x0:
        return None
    return slice(y0, y1), slice(x0, x1), slice(y0 - y, y1 - y), slice(x0 - x, x1 - x)


class Merger(ABC):
    """Accumulates patch outputs at canvas locations and merges them into one map (MONAI's interface)."""

    def __init__(self, merged_shape: tuple[int, int, int]) -> None:
        c, h, w = (int(v) for v in merged_shape)
        if min(c, h, w) < 1:
            raise ValueError(f"merged shape must be positive, got {merged_shape}")
        self.merged_shape = (c, h, w)
        self.is_finalized = False

    @abstractmethod
    def aggregate(self, values: np.ndarray, location: tuple[int, int]) -> None:
        """Add a ``(C, h, w)`` patch whose top-left is canvas pixel ``location`` = (y, x)."""

    @abstractmethod
    def finalize(self) -> Any:
        """The merged ``(C, H, W)`` map (after which no more patches may be added)."""

    def _check_open(self) -> None:
        if self.is_finalized:
            raise RuntimeError(f"{type(self).__name__}: already finalized")


class WeightedMerger(Merger):
    """Importance-weighted average: ``sum(w * values) / sum(w)`` over all patches covering a pixel.

    ``importance`` is the ``(h, w)`` weight of a full-size patch (strictly positive, e.g. MONAI's Gaussian
    importance map). Patches of another size (cut at the canvas border) use its top-left part.
    """

    def __init__(self, merged_shape: tuple[int, int, int], importance: np.ndarray | None = None) -> None:
        super().__init__(merged_shape)
        if importance is not None:
            importance = np.asarray(importance, dtype=np.float32)
            if importance.ndim != 2 or not np.all(importance > 0):
                raise ValueError("importance map must be a 2-D array of strictly positive weights")
        self.importance = importance

    def aggregate(self, values: np.ndarray, location: tuple[int, int]) -> None:
        values = np.asarray(values, dtype=np.float32)
        if values.ndim != 3 or values.shape[0] != self.merged_shape[0]:
            raise ValueError(f"patch must be (C={self.merged_shape[0]}, h, w), got {values.shape}")
        h, w = values.shape[1:]
        if self.importance is None:
            weight = np.ones((h, w), dtype=np.float32)
        else:
            if h > self.importance.shape[0] or w > self.importance.shape[1]:
                raise ValueError(f"patch {h}x{w} is larger than the importance map {self.importance.shape}")
            weight = self.importance[:h, :w]
        self.add_weighted(values * weight, weight, location)

    @abstractmethod
    def add_weighted(self, weighted: np.ndarray, weight: np.ndarray, location: tuple[int, int]) -> None:
        """Add pre-weighted sums ``(C, h, w)`` and their weights ``(h, w)`` at ``location`` (clipped)."""


class ArrayMerger(WeightedMerger):
    """In-memory weighted merger (one inference block, or a small image)."""

    def __init__(self, merged_shape: tuple[int, int, int], importance: np.ndarray | None = None) -> None:
        super().__init__(merged_shape, importance)
        c, h, w = self.merged_shape
        self.sums = np.zeros((c, h, w), dtype=np.float32)
        self.weights = np.zeros((h, w), dtype=np.float32)

    def add_weighted(self, weighted: np.ndarray, weight: np.ndarray, location: tuple[int, int]) -> None:
        self._check_open()
        sl = _clip(location, weight.shape, self.weights.shape)
        if sl is None:
            return
        cy, cx, py, px = sl
        self.sums[:, cy, cx] += weighted[:, py, px]
        self.weights[cy, cx] += weight[py, px]

    def finalize(self) -> np.ndarray:
        self.is_finalized = True
        out = np.zeros_like(self.sums)
        np.divide(self.sums, self.weights[None], out=out, where=self.weights[None] > 0)
        return out


class ZarrMerger(WeightedMerger):
    """Disk-backed weighted merger: ``sum`` (C, H, W) and ``weight`` (H, W) float32 zarr arrays chunked
    ``chunk`` x ``chunk``, under ``workdir`` (removed by :meth:`finalize` unless ``keep``).

    Memory is bounded by the patches given to :meth:`add_weighted` plus one chunk at finalisation, never
    by the canvas. Not safe for concurrent writers: one process adds (parallel workers return block sums
    to it).
    """

    def __init__(
        self,
        merged_shape: tuple[int, int, int],
        workdir: Path | str,
        importance: np.ndarray | None = None,
        chunk: int = 512,
    ) -> None:
        super().__init__(merged_shape, importance)
        c, h, w = self.merged_shape
        self.chunk = int(chunk)
        self.workdir = Path(workdir)
        if self.workdir.exists():
            shutil.rmtree(self.workdir)  # a previous, interrupted run's partial sums must not be reused
        root = zarr.open_group(str(self.workdir), mode="w", zarr_format=3)
        ch = min(self.chunk, h), min(self.chunk, w)
        self.sum = root.create_array(
            "sum", shape=(c, h, w), chunks=(c, *ch), dtype="float32", fill_value=0.0,
            compressors=ACCUMULATOR_CODEC,
        )  # fmt: skip
        self.weight = root.create_array(
            "weight", shape=(h, w), chunks=ch, dtype="float32", fill_value=0.0,
            compressors=ACCUMULATOR_CODEC,
        )  # fmt: skip

    def add_weighted(self, weighted: np.ndarray, weight: np.ndarray, location: tuple[int, int]) -> None:
        self._check_open()
        sl = _clip(location, weight.shape, self.merged_shape[1:])
        if sl is None:
            return
        cy, cx, py, px = sl
        # Chunks never written read back as the fill value without touching the disk.
        self.sum[:, cy, cx] = self.sum[:, cy, cx] + weighted[:, py, px]
        self.weight[cy, cx] = self.weight[cy, cx] + weight[py, px]

    def chunk_boxes(self) -> Iterator[tuple[slice, slice]]:
        """(rows, cols) slices of every accumulator chunk, row-major."""
        _, h, w = self.merged_shape
        for y in range(0, h, self.chunk):
            for x in range(0, w, self.chunk):
                yield slice(y, min(y + self.chunk, h)), slice(x, min(x + self.chunk, w))

    def finalize(self, output: zarr.Array | None = None, keep: bool = False) -> zarr.Array:
        """Divide chunk by chunk into ``output`` (a zarr array of the merged shape; default: a float32
        array ``merged`` next to the sums). Pixels no patch covered are 0."""
        self._check_open()
        if output is None:
            root = zarr.open_group(str(self.workdir), mode="a")
            output = root.create_array(
                "merged", shape=self.merged_shape, chunks=self.sum.chunks, dtype="float32", fill_value=0.0
            )
            keep = True
        if tuple(output.shape) != self.merged_shape:
            raise ValueError(f"output shape {output.shape} != merged shape {self.merged_shape}")
        for ys, xs in self.chunk_boxes():
            w = np.asarray(self.weight[ys, xs])
            if not np.any(w > 0):
                continue  # leave the fill value (0): nothing was predicted here
            s = np.asarray(self.sum[:, ys, xs])
            out = np.zeros_like(s)
            np.divide(s, w[None], out=out, where=w[None] > 0)
            output[:, ys, xs] = out.astype(output.dtype, copy=False)
        self.is_finalized = True
        if not keep:
            self.cleanup()
        return output

    def cleanup(self) -> None:
        """Remove the accumulators from disk."""
        shutil.rmtree(self.workdir, ignore_errors=True)


def chunked_boxes(shape: tuple[int, int], block: int) -> Iterator[tuple[int, int, int, int]]:
    """(y0, x0, y1, x1) of ``block`` x ``block`` tiles of a ``shape`` (H, W) canvas, row-major."""
    H, W = shape
    for y in range(0, H, block):
        for x in range(0, W, block):
            yield y, x, min(y + block, H), min(x + block, W)


def n_blocks(shape: tuple[int, int], block: int) -> int:
    return math.ceil(shape[0] / block) * math.ceil(shape[1] / block)
