"""Slide inference benchmark: peak memory at two slide sizes, throughput next to MONAI's in-memory inferer.

What it does (each measurement in its own subprocess, so peaks do not mix):

1. Generates pyramidal JPEG TIFF slides (0.25 µm/px, 512-px tiles, 2x levels) tile by tile: tissue tiles
   are a few tiles rendered once by ``wsi.synth.SlideScene`` and repeated inside two ellipses (~40% of the
   slide), the rest is white glass. Writing repeated pre-encoded tiles keeps an 80k x 80k slide cheap.
2. Memory: the whole ``infer`` path for one slide (tissue detection, windows at 2 µm/px, Gaussian blending
   into the zarr accumulator, OME-Zarr pyramid, level-0 OME-TIFF mask, GeoJSON, thumbnail) with the
   default UNet (fitted for a few steps to the dark, nucleus-rich regions of synthetic tissue so that its
   masks look like real ones), peak RSS sampled every 20 ms, at 20k x 20k and 80k x 80k. The coarse model
   MPP (8x the slide's) keeps the 80k run affordable on 2 cores; the level-0 mask (6.4 gigapixels at 80k) is still written.
3. Throughput: the same model over the same fully-tissue region (a 24k x 24k slide: a 3072 x 3072 canvas
   at 2 µm/px), our block-wise disk-backed path (reads included) next to MONAI's ``SlidingWindowInferer``
   on the canvas read into memory (reported with and without its read), and the maximum difference of
   the two probability maps.

Writes bench/out/bench_infer.json. ``python bench/bench_infer.py [--sizes 20000 80000] [--region 24576]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TILE = 512
SLIDE_MPP = 0.25
MODEL_MPP = 2.0
WINDOW = 256


# ------------------------------------------------------------------------------------------------------
# Slide generator
# ------------------------------------------------------------------------------------------------------
def _tissue_tiles(n: int = 6) -> list[bytes]:
    import imagecodecs

    from wsi.synth import SlideScene

    scene = SlideScene("a", 0, 8192, 8192, SLIDE_MPP, seed=0, tissue_fraction=0.9)
    out: list[bytes] = []
    y = x = 2048
    while len(out) < n and y < 8192 - TILE:
        rgb, _ = scene.render(1, x, y, TILE, TILE)
        if rgb.mean() < 225:  # mostly tissue
            out.append(
                bytes(imagecodecs.jpeg8_encode(rgb, level=85, colorspace="RGB", outcolorspace="YCBCR"))
            )
        x += TILE
        if x >= 8192 - TILE:
            x, y = 2048, y + TILE
    return out


def write_slide(path: Path, size: int, full_tissue: bool = False) -> Path:
    """A ``size`` x ``size`` pyramidal JPEG TIFF, written tile by tile from pre-encoded tiles."""
    import imagecodecs
    import tifffile

    tissue = _tissue_tiles()
    white = bytes(
        imagecodecs.jpeg8_encode(np.full((TILE, TILE, 3), 246, np.uint8), level=85, colorspace="RGB",
                                 outcolorspace="YCBCR")
    )  # fmt: skip

    def is_tissue(u: float, v: float) -> bool:
        if full_tissue:
            return True
        e1 = ((u - 0.35) / 0.28) ** 2 + ((v - 0.45) / 0.38) ** 2 < 1
        e2 = ((u - 0.72) / 0.2) ** 2 + ((v - 0.6) / 0.3) ** 2 < 1
        return e1 or e2

    levels = [1]
    while math.ceil(size / levels[-1]) > TILE:
        levels.append(levels[-1] * 2)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, ds in enumerate(levels):
            lw = lh = math.ceil(size / ds)
            rows, cols = math.ceil(lh / TILE), math.ceil(lw / TILE)

            def tiles(rows: int = rows, cols: int = cols, lw: int = lw) -> Any:
                for r in range(rows):
                    for c in range(cols):
                        t = is_tissue((c + 0.5) * TILE / lw, (r + 0.5) * TILE / lw)
                        yield tissue[(r * 7 + c * 3) % len(tissue)] if t else white

            mpp = SLIDE_MPP * ds
            tw.write(
                tiles(), shape=(lh, lw, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                compression="jpeg", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
                subfiletype=1 if k else 0, metadata=None,
            )  # fmt: skip
    return path


# ------------------------------------------------------------------------------------------------------
# Measurements (run in child processes)
# ------------------------------------------------------------------------------------------------------
class PeakRSS:
    """Samples this process' RSS every ``interval`` seconds in a thread; ``.peak`` in bytes."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self.interval = interval

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _model(path: Path) -> Path:
    import torch

    from pipeline.checkpoint import ModelMeta, save_model
    from pipeline.config import ModelConfig
    from pipeline.models import build_model

    cfg = ModelConfig()  # the UNet every site trains by default (configs: model section)
    torch.manual_seed(0)
    net = build_model(cfg)
    _fit_dark_regions(net)
    return save_model(path, net.state_dict(), ModelMeta(model=cfg, tile_size=WINDOW, target_mpp=MODEL_MPP))


def _fit_dark_regions(net: Any, steps: int = 40) -> None:
    """A few Adam steps teaching the UNet to segment the dark (nucleus-rich) regions of synthetic
    tissue at the model MPP, so the benchmark stitches and exports realistic blobs. An untrained network
    outputs salt-and-pepper noise around 0.5, whose hundreds of thousands of one-pixel holes no real
    segmentation has."""
    import torch
    from monai.losses import DiceCELoss
    from skimage.filters import threshold_otsu

    from wsi.synth import SlideScene

    ds = round(MODEL_MPP / SLIDE_MPP)
    scene = SlideScene("a", 0, 8192, 8192, SLIDE_MPP, seed=1, tissue_fraction=0.9)
    rgb = np.stack([scene.render(ds, x, y, WINDOW, WINDOW)[0] for y in (0, 512) for x in (0, 256, 512, 768)])
    grey = rgb.mean(-1)
    tissue = grey < threshold_otsu(grey)
    target = (grey < np.percentile(grey[tissue], 25)).astype(np.int64)  # the darkest quarter of the tissue
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float().div(255.0)
    y = torch.from_numpy(target)[:, None]
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
    net.eval()


def child_memory(slide: Path, model: Path, out: Path) -> dict[str, Any]:
    import psutil
    import torch

    from pipeline.config import ExperimentConfig
    from pipeline.infer import SlideJob, infer_slide, load_inference_model

    torch.set_num_threads(2)
    loaded = load_inference_model(model)
    cfg = ExperimentConfig.model_validate({"run_dir": str(out), "inference": {"batch_size": 8}})
    base = psutil.Process().memory_info().rss
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        summary = infer_slide(SlideJob(slide.stem, slide), loaded, cfg, out / "predictions")
        wall = time.perf_counter() - t0
    mask = out / "predictions" / slide.stem / "mask.ome.tif"
    return {
        "peak_rss_mb": rss.peak / 2**20,
        "baseline_rss_mb": base / 2**20,
        "wall_s": wall,
        "canvas": summary["canvas"],
        "windows": summary["windows"],
        "seconds_predict": summary["seconds_predict"],
        "seconds_stitch": summary["seconds_stitch"],
        "seconds_export": summary["seconds_export"],
        "mask_tiff_mb": mask.stat().st_size / 2**20,
        "foreground_fraction": summary["foreground_fraction"],
        "polygons": summary["polygons"],
    }


def child_throughput(slide: Path, model: Path, out: Path) -> dict[str, Any]:
    import torch
    import zarr
    from monai.inferers import SlidingWindowInferer

    from pipeline.config import InferenceConfig
    from pipeline.infer import load_inference_model, plan_canvas, read_canvas, stitch_slide
    from wsi.readers import open_slide

    torch.set_num_threads(2)
    loaded = load_inference_model(model)
    net = loaded.net
    icfg = InferenceConfig(batch_size=8, tissue_only=False)
    with open_slide(slide) as reader:
        canvas = plan_canvas(reader, MODEL_MPP, 0.1)
        H, W = canvas.shape
        mpx = H * W / 1e6
        # warm-up (thread pools, allocator)
        with torch.inference_mode():
            net(torch.rand(8, 3, WINDOW, WINDOW))

        results: dict[str, Any] = {"canvas": [H, W], "megapixels": mpx}
        ours_t = []
        for rep in range(2):
            outz = zarr.create_array(str(out / f"ours{rep}.zarr"), shape=(1, H, W), chunks=(1, 512, 512),
                                     dtype="float32", fill_value=0.0)  # fmt: skip
            t0 = time.perf_counter()
            stitch_slide(reader, loaded, icfg, canvas, outz, out / f"acc{rep}", None)
            ours_t.append(time.perf_counter() - t0)
        ours = np.asarray(outz[0])

        inferer = SlidingWindowInferer(
            roi_size=(WINDOW, WINDOW), sw_batch_size=8, overlap=icfg.overlap, mode="gaussian",
            sigma_scale=icfg.sigma_scale, progress=False,
        )  # fmt: skip

        def predictor(x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(net(x), dim=1)[:, 1:2]

        monai_t, monai_model_t = [], []
        for _ in range(2):
            t0 = time.perf_counter()
            img = read_canvas(reader, canvas, 0, 0, H, W)
            x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div_(255.0)
            t1 = time.perf_counter()
            with torch.inference_mode():
                ref = inferer(x, predictor)
            t2 = time.perf_counter()
            monai_t.append(t2 - t0)
            monai_model_t.append(t2 - t1)
        ref_np = ref[0, 0].numpy()
    best_ours, best_monai, best_monai_model = min(ours_t), min(monai_t), min(monai_model_t)
    results.update(
        ours_s=best_ours,
        monai_s=best_monai,
        monai_model_only_s=best_monai_model,
        ours_mpx_s=mpx / best_ours,
        monai_mpx_s=mpx / best_monai,
        monai_model_only_mpx_s=mpx / best_monai_model,
        ratio_vs_monai=best_monai / best_ours,
        ratio_vs_monai_model_only=best_monai_model / best_ours,
        max_abs_diff=float(np.abs(ours - ref_np).max()),
    )
    return results


# ------------------------------------------------------------------------------------------------------
def _run_child(kind: str, slide: Path, model: Path, out: Path) -> dict[str, Any]:
    res_file = out / f"{kind}.json"
    env = dict(os.environ)
    cmd = [sys.executable, __file__, "--child", kind, str(slide), str(model), str(out), str(res_file)]
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return json.loads(res_file.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 80000])
    ap.add_argument("--region", type=int, default=24576, help="side of the throughput region (level-0 px)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    if args.child:
        kind, slide, model, out, res = args.child
        fn = child_memory if kind.startswith("memory") else child_throughput
        result = fn(Path(slide), Path(model), Path(out))
        Path(res).write_text(json.dumps(result))
        return 0

    report: dict[str, Any] = {
        "slide_mpp": SLIDE_MPP,
        "model_mpp": MODEL_MPP,
        "window": WINDOW,
        "cpus": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        model = _model(work / "model.safetensors")
        report["memory"] = {}
        for size in args.sizes:
            t0 = time.perf_counter()
            slide = write_slide(work / f"slide{size}.tiff", size)
            gen = time.perf_counter() - t0
            out = work / f"run{size}"
            out.mkdir()
            r = _run_child(f"memory{size}", slide, model, out)
            r["generate_s"] = gen
            r["slide_gb"] = slide.stat().st_size / 2**30
            report["memory"][str(size)] = r
            print(
                f"{size} x {size}: peak RSS {r['peak_rss_mb']:.0f} MB (baseline {r['baseline_rss_mb']:.0f} MB), "
                f"canvas {r['canvas'][1]}x{r['canvas'][0]}, {r['windows']} windows, "
                f"predict {r['seconds_predict']:.1f} s, export {r['seconds_export']:.1f} s, wall {r['wall_s']:.1f} s",
                flush=True,
            )
            slide.unlink()
            import shutil

            shutil.rmtree(out)
        peaks = [report["memory"][str(s)]["peak_rss_mb"] for s in args.sizes]
        report["memory_ratio_max_over_min"] = max(peaks) / min(peaks)
        print(f"peak RSS largest/smallest: {max(peaks) / min(peaks):.3f} (target <= 1.2, and < 1536 MB)")

        slide = write_slide(work / "region.tiff", args.region, full_tissue=True)
        out = work / "tp"
        out.mkdir()
        tp = _run_child("throughput", slide, model, out)
        report["throughput"] = tp
        print(
            f"throughput over a {tp['canvas'][1]}x{tp['canvas'][0]} canvas ({tp['megapixels']:.1f} Mpx at {MODEL_MPP} µm/px): "
            f"ours {tp['ours_mpx_s']:.2f} Mpx/s, MONAI SlidingWindowInferer {tp['monai_mpx_s']:.2f} Mpx/s with its read "
            f"({tp['monai_model_only_mpx_s']:.2f} without): ratio {tp['ratio_vs_monai']:.2f}x "
            f"({tp['ratio_vs_monai_model_only']:.2f}x vs model-only); max |ours - MONAI| = {tp['max_abs_diff']:.2e}"
        )
    dest = REPO / "bench" / "out"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "bench_infer.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {dest / 'bench_infer.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
