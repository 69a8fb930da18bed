"""The disk-backed Gaussian stitcher against a naive full-canvas merge (the oracle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.infer import importance_map
from wsi.stitch import ArrayMerger, ZarrMerger, window_positions


def naive_merge(patches: list[tuple[np.ndarray, int, int]], shape: tuple[int, int, int], weight: np.ndarray):
    """Full-canvas float64 accumulation, pixel loop free but no cleverness: sum(w*v)/sum(w)."""
    c, H, W = shape
    num = np.zeros((c, H, W))
    den = np.zeros((H, W))
    for v, y, x in patches:
        h, w = v.shape[1:]
        hh, ww = min(h, H - y), min(w, W - x)
        num[:, y : y + hh, x : x + ww] += v[:, :hh, :ww] * weight[:hh, :ww]
        den[y : y + hh, x : x + ww] += weight[:hh, :ww]
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 0)
    return out


def test_window_positions_cover_the_axis() -> None:
    assert window_positions(10, 16, 8) == [0]
    assert window_positions(100, 32, 24) == [0, 24, 48, 68]
    for length in (33, 64, 100, 257):
        pos = window_positions(length, 32, 20)
        covered = np.zeros(length, bool)
        for p in pos:
            covered[p : p + 32] = True
        assert covered.all() and pos[-1] + 32 == length


@pytest.mark.parametrize("chunk", [16, 40, 512])
def test_zarr_merger_matches_naive_full_canvas_merge(tmp_path: Path, chunk: int) -> None:
    rng = np.random.default_rng(0)
    shape = (2, 97, 131)
    win = 32
    weight = importance_map(win, 0.125)
    patches = []
    for y in window_positions(shape[1], win, 24):
        for x in window_positions(shape[2], win, 24):
            patches.append((rng.random((2, win, win), dtype=np.float32), y, x))
    expected = naive_merge(patches, shape, weight)

    zm = ZarrMerger(shape, tmp_path / "acc", importance=weight, chunk=chunk)
    for v, y, x in patches:
        zm.aggregate(v, (y, x))
    out = np.asarray(zm.finalize(keep=True))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

    # Same result when windows are first merged into blocks (what inference does) in any order.
    zb = ZarrMerger(shape, tmp_path / "acc2", chunk=chunk)
    blocks: dict[tuple[int, int], list] = {}
    for v, y, x in patches:
        blocks.setdefault((y // 50, x // 50), []).append((v, y, x))
    for key in sorted(blocks, reverse=True):
        grp = blocks[key]
        by, bx = min(p[1] for p in grp), min(p[2] for p in grp)
        bh, bw = max(p[1] for p in grp) + win - by, max(p[2] for p in grp) + win - bx
        am = ArrayMerger((2, bh, bw), weight)
        for v, y, x in grp:
            am.aggregate(v, (y - by, x - bx))
        zb.add_weighted(am.sums, am.weights, (by, bx))
    target = zarr.create_array(str(tmp_path / "out.zarr"), shape=shape, chunks=(2, 32, 32), dtype="float32")
    out2 = np.asarray(zb.finalize(target)[:])
    np.testing.assert_allclose(out2, expected, rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "acc2").exists()  # accumulators removed after finalisation


def test_uncovered_pixels_are_zero_and_patches_are_clipped(tmp_path: Path) -> None:
    zm = ZarrMerger((1, 50, 50), tmp_path / "acc", importance=np.ones((20, 20)), chunk=16)
    zm.aggregate(np.full((1, 20, 20), 0.7, np.float32), (40, 40))  # hangs over the corner
    out = np.asarray(zm.finalize(keep=True))
    assert np.allclose(out[0, 40:, 40:], 0.7)
    assert out[0, :40].max() == 0 and out[0, :, :40].max() == 0
    with pytest.raises(RuntimeError):
        zm.aggregate(np.zeros((1, 20, 20), np.float32), (0, 0))


def test_importance_map_is_positive_gaussian() -> None:
    imp = importance_map(64, 0.125)
    assert imp.shape == (64, 64) and imp.min() > 0
    assert imp[32, 32] == pytest.approx(imp.max()) and imp[0, 0] < 0.01 * imp.max()


def test_memory_and_disk_accumulators_give_the_same_map_bit_for_bit(tmp_path: Path) -> None:
    """stitch_slide blends a canvas that fits ``inference.memory_accumulator_mb`` in memory, a larger one on
    disk: the same blocks added in the same order must give the same float32 map either way."""
    from pipeline.config import InferenceConfig
    from pipeline.infer import _canvas_merger

    rng = np.random.default_rng(3)
    shape = (700, 900)
    mem = _canvas_merger(shape, tmp_path / "m", InferenceConfig())
    disk = _canvas_merger(shape, tmp_path / "d", InferenceConfig(memory_accumulator_mb=0, chunk_size=128))
    assert isinstance(mem, ArrayMerger) and isinstance(disk, ZarrMerger)
    for _ in range(40):  # overlapping blocks, some cut by the canvas border
        h, w = (int(v) for v in rng.integers(50, 300, 2))
        y, x = int(rng.integers(0, shape[0] - 20)), int(rng.integers(0, shape[1] - 20))
        weights = rng.random((h, w), dtype=np.float32) + 0.1
        sums = (rng.random((1, h, w), dtype=np.float32) * weights).astype(np.float32)
        mem.add_weighted(sums, weights, (y, x))
        disk.add_weighted(sums, weights, (y, x))
    out = zarr.create_array(str(tmp_path / "out.zarr"), shape=(1, *shape), chunks=(1, 128, 128), dtype="float32")
    disk.finalize(out)
    assert np.array_equal(mem.finalize(), np.asarray(out[:]))
