"""Training-tile augmentation: fedpath's per-tile path against skimage's colour deconvolution.

A training step's data loading is mostly its augmentation (flips, 90-degree rotations, HED stain jitter,
brightness; `pipeline.data.augment_tile`), and most of that was the HED jitter. This bench times, on the
same 128 px H&E tiles (cut from the real MoNuSeg images of the data root at 0.5 µm/px; a synthetic pattern
when it is absent) and the same random draws:

* peer: skimage's ``rgb2hed`` -> per-stain ``s*(1+a)+b`` -> ``hed2rgb`` -> clip (float64 inside), then
  brightness, as fedpath did before;
* ours: ``augment_tile`` with the experiment's settings (HED σ 0.05, brightness 0.1, flips, rotations);

checks that both give the same pixels (to 1e-5), and prints ms per tile and the ratio; a training batch
of 16 tiles pays 16 times that per step. Writes bench/out/bench_augment.json (``--out``). ``--smoke``: 64
tiles, one repeat (CI runs it; no timing means anything there).

    .venv/bin/python bench/bench_augment.py [--tiles 512] [--repeat 5] [--smoke] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import data  # noqa: E402
from pipeline.config import AugmentConfig  # noqa: E402
from pipeline.data import augment_tile  # noqa: E402

OUT = REPO / "bench" / "out"
T = 128


def tiles(n: int) -> tuple[np.ndarray, str]:
    """``n`` float32 RGB tiles in [0, 1] and where they came from."""
    root = Path(os.environ.get("FEDPATH_DATA_ROOT", REPO.parent / "shared" / "data"))
    images = sorted((root / "monuseg-train" / "images").glob("*.tif*"))
    out: list[np.ndarray] = []
    if images:
        import tifffile

        for path in images:
            img = tifffile.imread(path)[..., :3]
            half = img[: img.shape[0] // 2 * 2, : img.shape[1] // 2 * 2].reshape(img.shape[0] // 2, 2, img.shape[1] // 2, 2, 3)
            half = half.mean(axis=(1, 3)).astype(np.float32) / 255.0  # 0.25 -> 0.5 µm/px
            for y in range(0, half.shape[0] - T + 1, T // 2):  # the tiler's stride (half a tile)
                for x in range(0, half.shape[1] - T + 1, T // 2):
                    out.append(np.ascontiguousarray(half[y : y + T, x : x + T]))
            if len(out) >= n:
                break
    if len(out) >= n:
        return np.stack(out[:n]), f"MoNuSeg ({root})"
    yy, xx = np.mgrid[0:T, 0:T]
    rng = np.random.default_rng(0)
    synth = [
        np.clip(np.stack([0.8 + 0.15 * np.sin(xx / (5 + i % 7)), 0.5 + 0.3 * np.cos(yy / 9), 0.75 + 0.1 * rng.random((T, T))], -1), 0, 1)
        for i in range(n)
    ]
    return np.stack(synth).astype(np.float32), "synthetic pattern (no data root)"


def skimage_hed_jitter(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """The HED jitter as fedpath had it: skimage's colour deconvolution (float64 inside), the same draws."""
    from skimage.color import hed2rgb, rgb2hed

    alpha = rng.normal(0.0, sigma, size=3)
    beta = rng.normal(0.0, sigma, size=3)
    return np.clip(hed2rgb(rgb2hed(image) * (1.0 + alpha) + beta), 0.0, 1.0)


def skimage_augment(image: np.ndarray, mask: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``augment_tile`` with skimage's HED jitter in place of fedpath's (geometry and brightness shared)."""
    saved = data.hed_jitter
    data.hed_jitter = skimage_hed_jitter
    try:
        return augment_tile(image, mask, cfg, rng)
    finally:
        data.hed_jitter = saved


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5, help="timed passes over the tiles (median reported)")
    ap.add_argument("--smoke", action="store_true", help="64 tiles, 1 repeat: checks the bench works")
    ap.add_argument("--out", type=Path, default=OUT / "bench_augment.json", help="JSON report")
    a = ap.parse_args(argv)
    if a.smoke:
        a.tiles, a.repeat = 64, 1
    cfg = AugmentConfig(flips=True, rot90=True, hed_jitter=0.05, brightness=0.1)
    imgs, source = tiles(a.tiles)
    masks = (imgs[..., 2] < 0.6).astype(np.uint8)
    paths = {"skimage": skimage_augment, "fedpath": augment_tile}
    for i in range(min(16, len(imgs))):  # the same pixels from the same draws
        want = paths["skimage"](imgs[i], masks[i], cfg, np.random.default_rng(i))
        got = paths["fedpath"](imgs[i], masks[i], cfg, np.random.default_rng(i))
        if not (np.allclose(got[0], want[0], atol=1e-5) and np.array_equal(got[1], want[1])):
            raise SystemExit(f"bench_augment: tile {i}: fedpath's augmentation differs from skimage's")
    runs: dict[str, list[float]] = {k: [] for k in paths}  # interleaved passes, the median of each
    for _ in range(a.repeat):
        for name, fn in paths.items():
            t = time.perf_counter()
            for i in range(len(imgs)):
                fn(imgs[i], masks[i], cfg, np.random.default_rng(i))
            runs[name].append((time.perf_counter() - t) / len(imgs) * 1e3)
    ms = {k: float(np.median(v)) for k, v in runs.items()}
    report = {
        "tiles": len(imgs), "tile_px": T, "repeat": a.repeat, "source": source,
        "ms_per_tile": {k: round(v, 4) for k, v in ms.items()},
        "ms_per_batch16": {k: round(16 * v, 3) for k, v in ms.items()},
        "ratio_skimage_vs_fedpath": round(ms["skimage"] / ms["fedpath"], 3),
    }  # fmt: skip
    print(f"{len(imgs)} tiles of {T} px from {source}, median of {a.repeat}")
    for k, v in ms.items():
        print(f"  {k:10s} {v:7.3f} ms per tile, {16 * v:6.2f} ms per batch of 16")
    print(f"  {'speed-up':10s} {report['ratio_skimage_vs_fedpath']:.2f}x (skimage path / fedpath's)")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
