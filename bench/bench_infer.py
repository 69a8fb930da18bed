"""Slide inference benchmark: MONAI's SlidingWindowInferer next to fedpath's on a real slide, bf16 Dice on
real data, peak memory at two slide sizes.

What it does (each measurement in its own subprocess, so peaks and thread pools do not mix):

1. Real data (``FEDPATH_DATA_ROOT``): trains the default UNet for ``--train-steps`` Adam steps on the
   MoNuSeg training images at 0.5 µm/px (all but four, whose masks are held out). Then:
   a. Throughput on a real slide region with realistic tissue: ``CMU-1-Small-Region.svs`` (2220 x 2967 at
      0.499 µm/px, about 40% tissue), 128-px windows, overlap 0.25, batch 16. fedpath's ``stitch_slide``
      (tissue windows only, batched, ``inference_mode``, channels-last, next block read in a thread,
      Gaussian blending into the disk-backed accumulator) in float32 and in bfloat16 autocast, next to
      MONAI's ``SlidingWindowInferer`` over the canvas read into memory, with the same network as MONAI
      users run it (float32, contiguous), timed with its read and without. Ratio = MONAI s / ours s.
   b. Dice: ``infer_slide`` over the four held-out MoNuSeg images against their masks, float32 and
      bfloat16; bf16 may be the default only if Dice moves by at most 0.002.
2. Memory: the whole ``infer`` path for one generated slide (pyramidal JPEG TIFF, 0.25 µm/px, 512-px
   tiles, tissue in two ellipses written from a few pre-encoded ``wsi.synth`` tiles; windows at 2 µm/px),
   peak RSS sampled every 20 ms, at 20k x 20k and 80k x 80k. The level-0 mask (6.4 gigapixels at 80k) is
   written too.
3. Throughput on a generated fully-tissue region (24k x 24k: a 3072 x 3072 canvas at 2 µm/px, 256-px
   windows): the same comparison with no tissue to skip.

``--smoke`` runs everything tiny (CI checks that the bench works; no timing means anything there).
Writes bench/out/bench_infer.json. ``python bench/bench_infer.py [--sizes 20000 80000] [--region 24576]
[--train-steps 300] [--skip-memory] [--smoke]``.
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


def _model(path: Path, fit_steps: int = 40) -> Path:
    import torch

    from pipeline.checkpoint import ModelMeta, save_model
    from pipeline.config import ModelConfig
    from pipeline.models import build_model

    cfg = ModelConfig()  # the UNet every site trains by default (configs: model section)
    torch.manual_seed(0)
    net = build_model(cfg)
    _fit_dark_regions(net, fit_steps)
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

        from pipeline.models import build_model

        plain = build_model(loaded.meta.model).eval()  # as MONAI users run it: float32, contiguous
        plain.load_state_dict(loaded.state)

        def predictor(x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(plain(x), dim=1)[:, 1:2]

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
# Real data: a UNet trained on MoNuSeg, CMU-1 throughput, held-out Dice in float32 and bfloat16
# ------------------------------------------------------------------------------------------------------
MONUSEG_MPP = 0.2527
REAL_MPP = 0.5
REAL_WINDOW = 128
HELD_OUT = 4


def _monuseg(data_root: Path) -> list[tuple[Path, Path]]:
    imgs = sorted((data_root / "monuseg-train" / "images").glob("*.tif"))
    pairs = [(p, data_root / "monuseg-train" / "masks" / f"{p.stem}.png") for p in imgs]
    return [(i, m) for i, m in pairs if m.is_file()]


def real_model(path: Path, data_root: Path, steps: int) -> Path:
    """The default UNet after ``steps`` Adam steps (batch 8, random 128-px crops with flips) on the
    MoNuSeg images not held out, at 0.5 µm/px."""
    import torch
    from monai.losses import DiceCELoss

    from pipeline.checkpoint import ModelMeta, save_model
    from pipeline.config import ModelConfig
    from pipeline.models import build_model
    from wsi.annotations import load_annotation
    from wsi.readers import open_slide

    torch.set_num_threads(2)
    xs, ys = [], []
    for img, mask in _monuseg(data_root)[:-HELD_OUT]:
        with open_slide(img, MONUSEG_MPP) as r:
            W0, H0 = r.dimensions
            w, h = r.size_at_mpp(REAL_MPP, 0.1)
            xs.append(r.read_at_mpp(0, 0, w, h, REAL_MPP, 0.1))
        ys.append(load_annotation(mask, slide_dimensions=(W0, H0)).rasterize(0, 0, W0, H0, w, h) > 0)
    cfg = ModelConfig()
    torch.manual_seed(0)
    net = build_model(cfg)
    rng = np.random.default_rng(0)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    net.train()
    for _ in range(steps):
        bx, by = [], []
        for _ in range(8):
            k = int(rng.integers(len(xs)))
            y0 = int(rng.integers(xs[k].shape[0] - REAL_WINDOW + 1))
            x0 = int(rng.integers(xs[k].shape[1] - REAL_WINDOW + 1))
            cx = xs[k][y0 : y0 + REAL_WINDOW, x0 : x0 + REAL_WINDOW]
            cy = ys[k][y0 : y0 + REAL_WINDOW, x0 : x0 + REAL_WINDOW]
            if rng.random() < 0.5:
                cx, cy = cx[:, ::-1], cy[:, ::-1]
            bx.append(cx)
            by.append(cy)
        x = torch.from_numpy(np.ascontiguousarray(np.stack(bx))).permute(0, 3, 1, 2).float().div(255.0)
        y = torch.from_numpy(np.ascontiguousarray(np.stack(by))).long()[:, None]
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
    return save_model(path, net.state_dict(), ModelMeta(model=cfg, tile_size=REAL_WINDOW, target_mpp=REAL_MPP))


def _time_ours(reader: Any, loaded: Any, icfg: Any, canvas: Any, tissue: Any, out: Path, reps: int) -> tuple[float, Any]:
    import zarr

    from pipeline.infer import stitch_slide

    H, W = canvas.shape
    best, stats = math.inf, None
    for rep in range(reps):
        tag = f"{icfg.precision}{rep}"
        out.mkdir(parents=True, exist_ok=True)
        outz = zarr.create_array(str(out / f"ours_{tag}.zarr"), shape=(1, H, W), chunks=(1, 512, 512),
                                 dtype="float32", fill_value=0.0)  # fmt: skip
        t0 = time.perf_counter()
        stats = stitch_slide(reader, loaded, icfg, canvas, outz, out / f"acc_{tag}", tissue)
        best = min(best, time.perf_counter() - t0)
    return best, stats


def _time_monai(reader: Any, net: Any, canvas: Any, window: int, batch: int, overlap: float, sigma: float,
                reps: int) -> tuple[float, float]:  # fmt: skip
    import torch
    from monai.inferers import SlidingWindowInferer

    from pipeline.infer import read_canvas

    H, W = canvas.shape
    inferer = SlidingWindowInferer(
        roi_size=(window, window), sw_batch_size=batch, overlap=overlap, mode="gaussian", sigma_scale=sigma,
        progress=False,
    )  # fmt: skip
    with_read, model_only = math.inf, math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        img = read_canvas(reader, canvas, 0, 0, H, W)
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div_(255.0)
        t1 = time.perf_counter()
        with torch.inference_mode():
            inferer(x, lambda t: torch.softmax(net(t), dim=1)[:, 1:2])
        t2 = time.perf_counter()
        with_read, model_only = min(with_read, t2 - t0), min(model_only, t2 - t1)
    return with_read, model_only


def child_real(data_root: Path, model: Path, out: Path, smoke: bool) -> dict[str, Any]:
    import torch

    from pipeline.config import ExperimentConfig
    from pipeline.infer import (
        SlideJob,
        _tissue_config,
        infer_slide,
        load_inference_model,
        plan_canvas,
    )
    from pipeline.models import bf16_native, build_model
    from wsi.readers import open_slide
    from wsi.tissue import detect_tissue

    torch.set_num_threads(2)
    loaded = load_inference_model(model)
    precisions = ["float32", "bfloat16"] if bf16_native() else ["float32"]
    res: dict[str, Any] = {"bf16_native": bf16_native(), "threads": torch.get_num_threads()}
    cfg = ExperimentConfig.model_validate({"run_dir": str(out), "inference": {"batch_size": 16}})
    reps = 1 if smoke else 3
    slide = data_root / "slides" / "CMU-1-Small-Region.svs"
    mpp = 4 * REAL_MPP if smoke else REAL_MPP
    with open_slide(slide) as reader:
        canvas = plan_canvas(reader, mpp, 0.1)
        tissue = detect_tissue(reader, _tissue_config(reader, cfg))
        H, W = canvas.shape
        res["slide"] = str(slide)
        res["canvas"] = [H, W]
        res["megapixels"] = H * W / 1e6
        with torch.inference_mode():  # warm-up (thread pools, allocator, oneDNN kernels)
            loaded.net(torch.rand(16, 3, REAL_WINDOW, REAL_WINDOW))
        net = build_model(loaded.meta.model).eval()  # as MONAI users run it: float32, contiguous
        net.load_state_dict(loaded.state)
        icfg = cfg.inference
        res["monai_s"] = res["monai_model_only_s"] = math.inf
        for rep in range(reps):  # alternate the paths, so that a busy machine slows them alike
            for prec in precisions:
                pcfg = cfg.inference.model_copy(update={"precision": prec})
                t, stats = _time_ours(reader, loaded, pcfg, canvas, tissue, out / f"r{rep}", 1)
                res[f"ours_{prec}_s"] = min(res.get(f"ours_{prec}_s", math.inf), t)
                res["windows_tissue"], res["windows_total"] = stats["windows"], stats["windows_total"]
            m, mo = _time_monai(reader, net, canvas, REAL_WINDOW, icfg.batch_size, icfg.overlap, icfg.sigma_scale, 1)
            res["monai_s"], res["monai_model_only_s"] = min(res["monai_s"], m), min(res["monai_model_only_s"], mo)
    for prec in precisions:
        res[f"ratio_{prec}_vs_monai"] = res["monai_s"] / res[f"ours_{prec}_s"]
        res[f"ratio_{prec}_vs_monai_model_only"] = res["monai_model_only_s"] / res[f"ours_{prec}_s"]

    # Dice on the held-out MoNuSeg images, float32 and bfloat16
    dice: dict[str, list[float]] = {}
    held = _monuseg(data_root)[-HELD_OUT:]
    if smoke:
        held = held[:1]
    for prec in precisions:
        pcfg = ExperimentConfig.model_validate(
            {"run_dir": str(out / f"dice_{prec}"), "inference": {"batch_size": 16, "precision": prec,
                                                                  "tissue_only": False}}
        )  # fmt: skip
        dice[prec] = []
        for img, mask in held:
            job = SlideJob(img.stem, img, mpp=MONUSEG_MPP, annotation=mask)
            summary = infer_slide(job, loaded, pcfg, out / f"dice_{prec}" / "predictions")
            dice[prec].append(summary["metrics"]["dice"])
    res["dice"] = {k: {"per_image": v, "mean": float(np.mean(v))} for k, v in dice.items()}
    res["held_out"] = [p.stem for p, _ in held]
    if "bfloat16" in dice:
        res["dice_bf16_minus_fp32"] = res["dice"]["bfloat16"]["mean"] - res["dice"]["float32"]["mean"]
        res["dice_bf16_max_abs_change"] = max(
            abs(a - b) for a, b in zip(dice["bfloat16"], dice["float32"], strict=True)
        )
    return res


# ------------------------------------------------------------------------------------------------------
def _run_child(kind: str, slide: Path, model: Path, out: Path) -> dict[str, Any]:
    res_file = out / f"{kind}.json"
    env = dict(os.environ)
    cmd = [sys.executable, __file__, "--child", kind, str(slide), str(model), str(out), str(res_file)]
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return json.loads(res_file.read_text())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20000, 80000])
    ap.add_argument("--region", type=int, default=24576, help="side of the synthetic throughput region (level-0 px)")
    ap.add_argument("--train-steps", type=int, default=300, help="Adam steps of the MoNuSeg model")
    ap.add_argument("--skip-memory", action="store_true", help="only the real-data part and the synthetic region")
    ap.add_argument("--smoke", action="store_true", help="tiny: checks the bench works, no timing meaning")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default bench/out/bench_infer.json)")
    args = ap.parse_args(argv)
    if args.child:
        kind, slide, model, out, res = args.child
        if kind.startswith("real"):
            result = child_real(Path(slide), Path(model), Path(out), smoke=kind == "real-smoke")
        else:
            fn = child_memory if kind.startswith("memory") else child_throughput
            result = fn(Path(slide), Path(model), Path(out))
        Path(res).write_text(json.dumps(result))
        return result
    if args.smoke:
        args.sizes, args.region, args.train_steps = [1024], 2048, 1

    from wsi.manifest import resolve_data_root

    data_root = resolve_data_root(None)
    report: dict[str, Any] = {
        "slide_mpp": SLIDE_MPP,
        "model_mpp": MODEL_MPP,
        "window": WINDOW,
        "cpus": os.cpu_count(),
        "smoke": args.smoke,
        "load_before": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        rmodel = real_model(work / "monuseg.safetensors", data_root, args.train_steps)
        report["real_model_train_s"] = time.perf_counter() - t0
        out = work / "real"
        out.mkdir()
        real = _run_child("real-smoke" if args.smoke else "real", data_root, rmodel, out)
        report["real"] = real
        print(
            f"real region {Path(real['slide']).name}, canvas {real['canvas'][1]}x{real['canvas'][0]} "
            f"({real['windows_tissue']} of {real['windows_total']} windows touch tissue): "
            f"MONAI {real['monai_s']:.2f} s ({real['monai_model_only_s']:.2f} s without its read), "
            + ", ".join(
                f"ours {p} {real[f'ours_{p}_s']:.2f} s: ratio {real[f'ratio_{p}_vs_monai']:.2f}x "
                f"({real[f'ratio_{p}_vs_monai_model_only']:.2f}x vs model-only)"
                for p in ("float32", "bfloat16") if f"ours_{p}_s" in real
            ),
            flush=True,
        )  # fmt: skip
        print(
            "held-out MoNuSeg Dice: "
            + ", ".join(f"{p} {d['mean']:.4f}" for p, d in real["dice"].items())
            + (f"; bf16 - fp32 = {real['dice_bf16_minus_fp32']:+.4f}" if "dice_bf16_minus_fp32" in real else ""),
            flush=True,
        )
        model = _model(work / "model.safetensors", 1 if args.smoke else 40)
        if not args.skip_memory:
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
            f"synthetic full-tissue region {tp['canvas'][1]}x{tp['canvas'][0]} ({tp['megapixels']:.1f} Mpx at {MODEL_MPP} µm/px): "
            f"ours {tp['ours_mpx_s']:.2f} Mpx/s, MONAI SlidingWindowInferer {tp['monai_mpx_s']:.2f} Mpx/s with its read "
            f"({tp['monai_model_only_mpx_s']:.2f} without): ratio {tp['ratio_vs_monai']:.2f}x "
            f"({tp['ratio_vs_monai_model_only']:.2f}x vs model-only); max |ours - MONAI| = {tp['max_abs_diff']:.2e}"
        )
    report["load_after"] = os.getloadavg()
    dest = args.out or REPO / "bench" / "out" / ("bench_infer_smoke.json" if args.smoke else "bench_infer.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(report, indent=2))
    print(f"wrote {dest}")
    return report


if __name__ == "__main__":
    main()
    raise SystemExit(0)
