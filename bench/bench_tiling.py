"""Tiling throughput and memory: ``fedpath tile`` against the raw JPEG-decode limit and peers.

On a generated JPEG-compressed pyramidal slide (default 20k x 20k, mostly tissue), on one grid (256-px
tiles at the slide's own 0.5 µm/px, the tiles ``fedpath tile`` keeps), it measures in one run:

* ``fedpath tile`` (``wsi.tiling.run_tile_site``) with 1 and 2 workers: the tiling proper (read, mask,
  compress, write to zarr) in tiles/s; the plan (checksums, open, tissue detection) is reported apart;
* the raw limit: reading the same compressed JPEG tiles from the file and decoding them with imagecodecs,
  nothing else;
* peers doing the same grid: an OpenSlide ``read_region`` loop and MONAI's ``SlidingPatchWSIDataset``
  (a subset of tiles when they are slow);

and prints the ratios against the targets (>= 0.7x raw, >= 3x peer on one worker, >= 1.7x from one to two
workers), by wall clock and by CPU time per tile (the latter is robust to other processes competing for the
cores; the one-to-two-worker scaling can only be judged on otherwise idle cores). ``--memory`` also tiles a 20k and an 80k slide (the same amount of tissue, a sparse 80k) in
subprocesses and compares their peak RSS (target: within 20%). JSON goes to bench/out/bench_tiling.json.

    .venv/bin/python bench/bench_tiling.py [--size 20000] [--memory] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wsi.config import TilingConfig, TissueConfig  # noqa: E402
from wsi.manifest import make_row, write_manifest  # noqa: E402
from wsi.store import SiteStore  # noqa: E402
from wsi.synth import SlideScene, write_slide  # noqa: E402
from wsi.tiling import run_tile_site  # noqa: E402

OUT = REPO / "bench" / "out"
CACHE = OUT / "cache"


def make_slide(size: int, tissue_fraction: float, seed: int = 7, workers: int = 2) -> Path:
    """A generated slide (cached under bench/out/cache: generation is not what is measured)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"bench_{size}_{tissue_fraction}_{seed}.tiff"
    if not path.exists():
        t0 = time.perf_counter()
        scene = SlideScene("bench", 0, size, size, 0.5, seed, tissue_fraction=tissue_fraction)
        write_slide(scene, path, path.with_name(path.stem + "_mask.tiff"), quality=85, workers=workers)
        print(
            f"generated {path.name} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s"
        )
    return path


def manifest_for(slide: Path, work: Path) -> Path:
    row = make_row(slide.parent, "bench", slide, slide_id=slide.stem)
    return write_manifest([row], work / "bench.csv")


def tiling_cfg(**kw: Any) -> TilingConfig:
    return TilingConfig(
        target_mpp=0.5, tile_size=256, overlap=0, min_tissue_fraction=0.5, tissue=TissueConfig(), **kw
    )


def bench_fedpath(slide: Path, work: Path, workers: int) -> dict[str, Any]:
    mf = manifest_for(slide, work)
    store = work / f"store_w{workers}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    res = run_tile_site(mf, slide.parent, store, tiling_cfg(), "bench", None, None, workers)
    if res["failed"]:
        raise SystemExit(f"tiling failed: {res['failed']}")
    tiles = res["tiles_written"]
    return {
        "workers": workers,
        "tiles": tiles,
        "tiling_seconds": res["tiling_seconds"],
        "plan_seconds": res["plan_seconds"],
        "total_seconds": res["seconds"],
        "tiles_per_s": tiles / res["tiling_seconds"],
        "cpu_ms_per_tile": 1e3 * res["task_cpu_seconds"] / tiles,
        "tiles_per_s_incl_plan": tiles / res["seconds"],
        "store": str(store),
    }


def kept_coords(store: Path, slide_id: str) -> np.ndarray:
    return SiteStore(store).coords(slide_id)


def bench_raw(slide: Path, coords: np.ndarray, write_to: Path | None = None) -> dict[str, Any]:
    """Read each tile's compressed bytes (pread at its offset) and decode it with imagecodecs.

    With ``write_to``, each decoded tile is also appended to that file (what any tiler must at least do:
    decode every tile and persist its pixels, here with no format at all): the decode-plus-write floor on
    this machine's disk."""
    import imagecodecs
    import tifffile

    with tifffile.TiffFile(str(slide)) as tf:
        page = tf.pages.first
        offsets, counts = page.dataoffsets, page.databytecounts
        cols = -(-page.imagewidth // page.tilewidth)
        tw = page.tilewidth
        tables = page.jpegtables
    idx = [(int(y) // tw) * cols + int(x) // tw for x, y, _, _ in coords]
    fd = os.open(slide, os.O_RDONLY)
    out = open(write_to, "wb") if write_to is not None else None  # noqa: SIM115
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        for i in idx:
            data = os.pread(fd, counts[i], offsets[i])
            px = imagecodecs.jpeg8_decode(data, tables=tables, colorspace="YCBCR", outcolorspace="RGB")
            if out is not None:
                out.write(px.data)
        if out is not None:
            out.close()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        os.close(fd)
        if out is not None:
            out.close()
            os.unlink(out.name)
    return {
        "tiles": len(idx),
        "seconds": dt,
        "tiles_per_s": len(idx) / dt,
        "cpu_ms_per_tile": 1e3 * cpu / len(idx),
    }


def bench_openslide(slide: Path, coords: np.ndarray, limit: int) -> dict[str, Any]:
    import openslide

    sub = coords[:limit]
    with openslide.OpenSlide(str(slide)) as s:
        t0, c0 = time.perf_counter(), time.process_time()
        for x, y, w, h in sub:
            np.asarray(s.read_region((int(x), int(y)), 0, (int(w), int(h))).convert("RGB"))
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "tiles": len(sub),
        "seconds": dt,
        "tiles_per_s": len(sub) / dt,
        "cpu_ms_per_tile": 1e3 * cpu / len(sub),
    }


def bench_monai(slide: Path, coords: np.ndarray, limit: int) -> dict[str, Any]:
    """MONAI's SlidingPatchWSIDataset (OpenSlide backend) on the same grid: its sliding-window patches
    restricted to the tiles fedpath keeps, first ``limit`` of them."""
    from monai.data import SlidingPatchWSIDataset

    ds = SlidingPatchWSIDataset(
        data=[{"image": str(slide)}], patch_size=(256, 256), patch_level=0, reader="OpenSlide"
    )
    keep = {(int(y), int(x)) for x, y, _, _ in coords}
    ds.data = [d for d in ds.data if tuple(int(v) for v in d["location"]) in keep][:limit]
    n = len(ds.data)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        ds[i]
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tiles": n, "seconds": dt, "tiles_per_s": n / dt, "cpu_ms_per_tile": 1e3 * cpu / n}


def peak_rss_mb(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run ``cmd``; its peak RSS (MB) and wall time.

    The peak is the child's own VmHWM (its address space's high-water mark), polled every 10 ms until
    it exits. wait4's ru_maxrss is not used: Linux carries the forking parent's RSS into the child's
    maxrss across exec, so it can never read below this (large) benchmark process.
    """
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    status_file = Path(f"/proc/{p.pid}/status")
    peak_kb = 0
    while p.poll() is None:
        try:
            for line in status_file.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kb = max(peak_kb, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{cmd} failed: {p.stderr.read().decode() if p.stderr else ''}")
    return peak_kb / 1024.0, dt


def bench_memory(work: Path, small: int, big: int) -> dict[str, Any]:
    """Peak RSS of one-worker tiling for a small and a big slide with about the same tissue area."""
    frac_small = 0.85
    frac_big = min(0.85, frac_small * (small / big) ** 2)
    out: dict[str, Any] = {}
    for size, frac in ((small, frac_small), (big, frac_big)):
        slide = make_slide(size, frac)
        mf = manifest_for(slide, work)
        store = work / f"mem_{size}.zarr"
        shutil.rmtree(store, ignore_errors=True)
        code = (
            f"import sys, json; from pathlib import Path; sys.path.insert(0, {str(REPO)!r});"
            "from wsi.config import TilingConfig;"
            "from wsi.tiling import run_tile_site;"
            "cfg = TilingConfig(target_mpp=0.5, tile_size=256, min_tissue_fraction=0.5);"
            f"r = run_tile_site(Path({str(mf)!r}), Path({str(slide.parent)!r}), Path({str(store)!r}), cfg, 'bench', None, None, 1);"
            "sys.exit(1 if r['failed'] else 0)"
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        rss, dt = peak_rss_mb([sys.executable, "-c", code], env)
        n = SiteStore(store).n_tiles(slide.stem)
        out[str(size)] = {"peak_rss_mb": rss, "seconds": dt, "tiles": n, "tissue_fraction": frac}
        print(f"memory: {size}x{size} slide, {n} tiles: peak RSS {rss:.0f} MB in {dt:.0f} s")
    ratio = out[str(big)]["peak_rss_mb"] / out[str(small)]["peak_rss_mb"]
    out["ratio_big_over_small"] = ratio
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=20000, help="side of the throughput slide (px)")
    ap.add_argument("--memory", action="store_true", help="also compare peak RSS of 20k vs 80k slides")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--big", type=int, default=80000, help="side of the big slide of the memory run")
    ap.add_argument("--peer-tiles", type=int, default=1500, help="tiles the (slow) peers read")
    ap.add_argument("--quick", action="store_true", help="8k slide, for a smoke run")
    args = ap.parse_args()
    size = 8000 if args.quick else args.size
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"size": size, "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        work = Path(tmp)
        if not args.memory_only:
            slide = make_slide(size, 0.85)
            one = bench_fedpath(slide, work, 1)
            coords = kept_coords(Path(one["store"]), slide.stem)
            raw = bench_raw(slide, coords)
            floor = bench_raw(slide, coords, write_to=work / "decoded.raw")
            two = bench_fedpath(slide, work, 2)
            osl = bench_openslide(slide, coords, args.peer_tiles)
            mon = bench_monai(slide, coords, args.peer_tiles)
            results.update(
                fedpath_1=one, fedpath_2=two, raw_decode=raw, decode_write_floor=floor, openslide_loop=osl,
                monai=mon,
            )
            best_peer = max(osl["tiles_per_s"], mon["tiles_per_s"])
            results["ratios"] = {
                "fedpath1_over_raw": one["tiles_per_s"] / raw["tiles_per_s"],
                "fedpath1_over_decode_write_floor": one["tiles_per_s"] / floor["tiles_per_s"],
                "fedpath1_over_openslide": one["tiles_per_s"] / osl["tiles_per_s"],
                "fedpath1_over_monai": one["tiles_per_s"] / mon["tiles_per_s"],
                "fedpath1_over_best_peer": one["tiles_per_s"] / best_peer,
                "fedpath2_over_fedpath1": two["tiles_per_s"] / one["tiles_per_s"],
                # CPU time per tile: the same comparison, robust to other processes competing for cores
                "cpu_fedpath1_over_raw": raw["cpu_ms_per_tile"] / one["cpu_ms_per_tile"],
                "cpu_fedpath1_over_openslide": osl["cpu_ms_per_tile"] / one["cpu_ms_per_tile"],
            }
            r = results["ratios"]
            print(f"\nslide {size}x{size}, 256-px tiles at 0.5 µm/px, {one['tiles']} tissue tiles")
            print(f"  raw JPEG decode (pread + imagecodecs) {raw['tiles_per_s']:8.0f} tiles/s")
            print(f"  decode + append pixels to one file    {floor['tiles_per_s']:8.0f} tiles/s  (the floor of any tiler)")
            print(
                f"  fedpath tile, 1 worker               {one['tiles_per_s']:8.0f} tiles/s"
                f"  (plan/tissue detection {one['plan_seconds']:.1f} s apart; incl. it "
                f"{one['tiles_per_s_incl_plan']:.0f}/s)"
            )
            print(
                f"  fedpath tile, 2 workers              {two['tiles_per_s']:8.0f} tiles/s"
                f"  (incl. cluster start and plan {two['tiles_per_s_incl_plan']:.0f}/s)"
            )
            print(f"  OpenSlide read_region loop           {osl['tiles_per_s']:8.0f} tiles/s")
            print(f"  MONAI WSIReader (OpenSlide) loop     {mon['tiles_per_s']:8.0f} tiles/s")
            print(f"  fedpath(1) / raw decode   = {r['fedpath1_over_raw']:.2f}   (target >= 0.7)")
            print(f"  fedpath(1) / decode+write = {r['fedpath1_over_decode_write_floor']:.2f}")
            print(f"  fedpath(1) / OpenSlide    = {r['fedpath1_over_openslide']:.2f}   (target >= 3)")
            print(f"  fedpath(1) / MONAI        = {r['fedpath1_over_monai']:.2f}")
            print(f"  fedpath(2) / fedpath(1)   = {r['fedpath2_over_fedpath1']:.2f}   (target >= 1.7)")
            print(
                f"  CPU ms/tile: raw {raw['cpu_ms_per_tile']:.3f}, fedpath {one['cpu_ms_per_tile']:.3f}, "
                f"OpenSlide {osl['cpu_ms_per_tile']:.3f}, MONAI {mon['cpu_ms_per_tile']:.3f} -> by CPU time "
                f"fedpath/raw = {r['cpu_fedpath1_over_raw']:.2f}, fedpath/OpenSlide = "
                f"{r['cpu_fedpath1_over_openslide']:.2f} (load average {os.getloadavg()[0]:.1f} on "
                f"{os.cpu_count()} cores: wall-clock ratios include waiting for a core)"
            )
        if args.memory or args.memory_only:
            mem = bench_memory(work, 20000 if not args.quick else 8000, args.big if not args.quick else 24000)
            results["memory"] = mem
            print(f"  peak RSS big / small     = {mem['ratio_big_over_small']:.2f}   (target <= 1.2)")
    results["load_avg_end"] = os.getloadavg()
    results["self_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (OUT / "bench_tiling.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {OUT / 'bench_tiling.json'} (load average {results['load_avg_end'][0]:.1f} at the end)")


if __name__ == "__main__":
    main()
