"""Slide-level inference: a model over the tissue of whole slides, stitched seam-free on disk.

For each slide: open it (manifest MPP override first), plan the read at the model's MPP the way the tiler
does (a pyramid level within tolerance as is, else Gaussian anti-aliasing and bilinear resampling), lay
overlapping windows over the slide at that resolution, keep those touching tissue, and group them into
blocks (``inference.block_size`` model pixels). A block's pixels are read once, its windows run through
the model in batches (``inference_mode``, channels-last, optionally bf16 autocast: ``inference.precision``),
and the softmax foreground probability is blended with MONAI's Gaussian importance map into an in-memory
block merger whose sums are added to a disk-backed :class:`wsi.stitch.ZarrMerger` by a writer thread.
Blocks run locally (the next block's read prefetched in a thread, the previous one's blending in another,
while the model runs) or as tasks on a dask cluster (``inference.scheduler``: :class:`DaskBlockRunner`, a
few slides in flight at once) that return block sums, in block order, to the one writer. The finalised
map is the OME-Zarr's level 0, from which the OME-TIFF mask, the GeoJSON polygons and the thumbnail are
streamed (:mod:`wsi.export`).

Outputs go to ``<run_dir>/predictions/<slide_id>/`` with ``run.json`` holding a fingerprint (model
sha256, inference settings, slide sha256); a folder holding a different run is refused, a completed
identical run is skipped.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedcore.layout import RunLayout
from fedcore.summary import read_summary, update_summary
from pipeline.checkpoint import ModelMeta, load_model, read_model_file
from pipeline.config import ExperimentConfig, InferenceConfig
from pipeline.errors import FedpathError
from pipeline.metrics import dice_from_counts
from pipeline.models import autocast, foreground_from_logits, resolve_precision, tta_logits
from wsi.errors import WSIError
from wsi.readers import SlideReader, open_slide
from wsi.stitch import ArrayMerger, ZarrMerger, window_positions

log = logging.getLogger(__name__)

INFER_VERSION = 1


# ------------------------------------------------------------------------------------------------------
# Geometry: the model-resolution canvas over a slide
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Canvas:
    """The slide at the model's resolution: ``shape`` (H, W) model pixels, ``scale`` (sx, sy) level-0
    pixels per model pixel, ``mpp`` the canvas' true µm/px, ``level`` the pyramid level read."""

    shape: tuple[int, int]
    scale: tuple[float, float]
    mpp: float
    level: int
    exact: bool
    request_mpp: float
    tolerance: float

    def to_level0(self, y: int, x: int) -> tuple[float, float]:
        """Level-0 (x0, y0) of canvas pixel (y, x). For a level read as is, the smallest integer that
        the reader maps back to level pixel (x, y) (``floor(x0 / ds)``), also for non-integer downsamples."""
        if self.exact:
            return math.ceil(x * self.scale[0] - 1e-6), math.ceil(y * self.scale[1] - 1e-6)
        return x * self.scale[0], y * self.scale[1]


def plan_canvas(reader: SlideReader, model_mpp: float, tolerance: float, max_upsample: float = 1.0) -> Canvas:
    """The model-resolution canvas of a slide, or FedpathError when the model's MPP cannot be reached
    (the slide's finest level is coarser than the model by more than ``max_upsample`` and tolerance)."""
    base = reader.mpp
    if model_mpp * (1 + tolerance) * max_upsample < base:
        raise FedpathError(
            f"{reader.path}: model MPP {model_mpp:g} µm/px cannot be reached: the slide's finest level is "
            f"{base:g} µm/px ({reader.mpp_source}); that needs {base / model_mpp:.2f}x upsampling "
            f"(inference.max_upsample={max_upsample:g}; set the slide's mpp in the manifest if it is wrong)"
        )
    plan = reader.plan_mpp(model_mpp, tolerance)
    W0, H0 = reader.dimensions
    if plan.exact:
        ds = reader.level_downsamples[plan.level]
        sx = sy = ds
        mpp = plan.level_mpp
    else:
        sx = sy = model_mpp / base
        mpp = model_mpp
    shape = (max(1, int(np.ceil(H0 / sy - 1e-9))), max(1, int(np.ceil(W0 / sx - 1e-9))))
    return Canvas(shape, (sx, sy), mpp, plan.level, plan.exact, model_mpp, tolerance)


def read_canvas(reader: SlideReader, canvas: Canvas, y: int, x: int, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 of the canvas box at model pixel (y, x): one ``read_at_mpp`` (white outside)."""
    x0, y0 = canvas.to_level0(y, x)
    return reader.read_at_mpp(x0, y0, w, h, canvas.request_mpp, canvas.tolerance)


@dataclass
class Block:
    """The windows (model-pixel origins) whose origin falls in one block, and the box they cover."""

    origins: np.ndarray  # (n, 2) int64 (y, x)
    box: tuple[int, int, int, int]  # y0, x0, y1, x1 (may pass the canvas edge for small canvases)


def plan_windows(
    canvas: Canvas, window: int, overlap: float, block: int, tissue: Any | None
) -> tuple[list[Block], int]:
    """Windows covering the canvas (``overlap`` of a window shared with each neighbour, last one flush
    with the edge), the ones touching tissue when ``tissue`` (a TissueMask) is given, grouped by block.
    Returns (blocks, total windows before the tissue filter)."""
    stride = max(1, int(round(window * (1 - overlap))))
    H, W = canvas.shape
    ys = np.array(window_positions(H, window, stride), dtype=np.int64)
    xs = np.array(window_positions(W, window, stride), dtype=np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    origins = np.column_stack([gy.ravel(), gx.ravel()])
    total = len(origins)
    if tissue is not None and total:
        sx, sy = canvas.scale
        boxes = np.column_stack(
            [origins[:, 1] * sx, origins[:, 0] * sy, np.full(total, window * sx), np.full(total, window * sy)]
        )
        origins = origins[tissue.fractions(boxes) > 0]
    blocks: list[Block] = []
    if len(origins):
        key = (origins[:, 0] // block) * (W // block + 1) + origins[:, 1] // block
        order = np.argsort(key, kind="stable")
        origins, key = origins[order], key[order]
        cuts = np.flatnonzero(np.diff(key)) + 1
        for grp in np.split(origins, cuts):
            y0, x0 = int(grp[:, 0].min()), int(grp[:, 1].min())
            y1, x1 = int(grp[:, 0].max()) + window, int(grp[:, 1].max()) + window
            blocks.append(Block(grp, (y0, x0, y1, x1)))
    return blocks, total


# ------------------------------------------------------------------------------------------------------
# The model over one block
# ------------------------------------------------------------------------------------------------------
def importance_map(window: int, sigma_scale: float) -> np.ndarray:
    """MONAI's Gaussian importance map for a square window (strictly positive, peak 1)."""
    from monai.data.utils import compute_importance_map

    imp = compute_importance_map((window, window), mode="gaussian", sigma_scale=sigma_scale, device="cpu")
    return imp.numpy().astype(np.float32)


def prepare_for_inference(net: nn.Module) -> nn.Module:
    """Eval mode, channels-last weights (oneDNN's fast layout for CPU convolutions)."""
    return net.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def foreground_probability(
    net: nn.Module, batch: np.ndarray, precision: str = "float32", tta: str = "none"
) -> np.ndarray:
    """(n, h, w) float32 foreground probability (:func:`pipeline.models.foreground_from_logits`: every
    class but background) for (n, h, w, 3) uint8 RGB windows (scaled to [0, 1] as in training and
    evaluation). The input keeps the windows' (n, h, w, c) layout: a channels-last tensor, no copy. ``precision="bfloat16"`` runs the network under CPU autocast (softmax in float32); ``tta`` averages
    the logits over turned and flipped views (:func:`pipeline.models.tta_logits`)."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)
    with torch.inference_mode():
        with autocast(precision):
            logits = tta_logits(net, x, tta)
        prob = foreground_from_logits(logits)
    return prob.contiguous().numpy().astype(np.float32, copy=False)


def predict_block(
    net: nn.Module,
    pixels: np.ndarray,
    block: Block,
    window: int,
    importance: np.ndarray,
    batch_size: int,
    precision: str = "float32",
    tta: str = "none",
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted sums (1, h, w) and weights (h, w) of a block's windows over its box (``pixels``)."""
    y0, x0, y1, x1 = block.box
    merger = ArrayMerger((1, y1 - y0, x1 - x0), importance)
    rel = block.origins - np.array([y0, x0])
    for start in range(0, len(rel), batch_size):
        part = rel[start : start + batch_size]
        batch = np.stack([pixels[y : y + window, x : x + window] for y, x in part])
        prob = foreground_probability(net, batch, precision, tta)
        for (y, x), p in zip(part, prob, strict=True):
            merger.aggregate(p[None], (int(y), int(x)))
    return merger.sums, merger.weights


# -- dask workers: the model arrives as safetensors bytes and is rebuilt once per worker ---------------
_WORKER_MODELS: dict[str, nn.Module] = {}
_WORKER_READERS: dict[tuple[str, float | None, float | None], SlideReader] = {}
_WORKER_LOCK = threading.Lock()
_WORKER_READERS_MAX = 8  # a few slides in flight per worker; older readers are dropped (not closed
# here: another thread may still hold one; the last reference closes it)


def _worker_model(key: str, blob: bytes, model_cfg: dict[str, Any]) -> nn.Module:
    net = _WORKER_MODELS.get(key)
    if net is None:
        from safetensors.torch import load as st_load

        from pipeline.config import ModelConfig
        from pipeline.models import build_model

        net = build_model(ModelConfig.model_validate(model_cfg))
        net.load_state_dict(st_load(blob), strict=True)
        net = prepare_for_inference(net)
        _WORKER_MODELS.clear()
        _WORKER_MODELS[key] = net
    return net


def _dask_block(
    reader_args: tuple[str, float | None, float | None],
    canvas: Canvas,
    block: Block,
    model_key: str,
    model_blob: bytes,
    model_cfg: dict[str, Any],
    window: int,
    importance: np.ndarray,
    batch_size: int,
    threads: int = 0,
    precision: str = "float32",
    tta: str = "none",
) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)  # as the local run: CPU kernels may split reductions by threads
    with _WORKER_LOCK:
        reader = _WORKER_READERS.pop(reader_args, None)
        if reader is None:
            reader = open_slide(*reader_args)
            while len(_WORKER_READERS) >= _WORKER_READERS_MAX:
                _WORKER_READERS.pop(next(iter(_WORKER_READERS)))
        _WORKER_READERS[reader_args] = reader  # most recently used last
    net = _worker_model(model_key, model_blob, model_cfg)
    y0, x0, y1, x1 = block.box
    pixels = read_canvas(reader, canvas, y0, x0, y1 - y0, x1 - x0)
    sums, weights = predict_block(net, pixels, block, window, importance, batch_size, precision, tta)
    return (y0, x0), sums, weights


@dataclass
class LoadedModel:
    """A model ready for inference, with what identifies it."""

    path: Path
    net: nn.Module
    meta: ModelMeta
    sha256: str
    state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)


def load_inference_model(path: Path) -> LoadedModel:
    """Load a model file and check it can run on RGB slides (FedpathError naming the file if not)."""
    path = Path(path)
    net, meta = load_model(path)
    if meta.model.in_channels != 3:
        raise FedpathError(
            f"{path}: model takes {meta.model.in_channels} input channel(s); slides are RGB (3 channels)"
        )
    if meta.model.out_channels < 1:
        raise FedpathError(f"{path}: model has no output channel")
    if not (meta.target_mpp and meta.target_mpp > 0):
        raise FedpathError(f"{path}: model metadata has no valid target_mpp ({meta.target_mpp!r})")
    state, _ = read_model_file(path)
    net = prepare_for_inference(net)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return LoadedModel(path, net, meta, h.hexdigest(), state)


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``).

    Windows at the slide's edges and blocks of different sizes make tensors and arrays of many sizes;
    glibc keeps the freed memory of each in its arenas, so without trimming the resident size creeps up
    with the number of blocks (that is, with slide area) though nothing is live."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def stitch_slide(
    reader: SlideReader,
    model: LoadedModel,
    cfg: InferenceConfig,
    canvas: Canvas,
    output: Any,
    workdir: Path,
    tissue: Any | None,
    runner: DaskBlockRunner | None = None,
) -> dict[str, Any]:
    """Run the model over the slide's windows (locally, or on ``runner``'s dask cluster) and finalise the
    blended foreground map into ``output`` (a zarr array (1, H, W)). Returns counts and timings."""
    window = cfg.tile_size or model.meta.tile_size
    block_size = max(cfg.block_size, window)
    precision = resolve_precision(cfg.precision)
    blocks, total = plan_windows(canvas, window, cfg.overlap, block_size, tissue)
    if not blocks:
        log.warning("%s: no window touches detected tissue; the mask is empty", reader.path)
    importance = importance_map(window, cfg.sigma_scale)
    merger = _canvas_merger(canvas.shape, workdir, cfg)
    t0 = time.perf_counter()
    n_windows = int(sum(len(b.origins) for b in blocks))
    if runner is not None:
        results = runner.run(reader, canvas, blocks, window, importance, cfg.batch_size, precision, cfg.tta)
    else:
        results = _run_blocks(reader, model, cfg, canvas, blocks, window, importance)

    def add(sums: np.ndarray, weights: np.ndarray, loc: tuple[int, int]) -> None:
        merger.add_weighted(sums, weights, loc)
        trim_heap()

    # Blend each block into the accumulator in a writer thread while the next block computes (zarr
    # read-add-write and blosc release the GIL). One writer, one block at a time: blocks are added in
    # the same order as they come, so the sums are the same bit for bit.
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: Future[None] | None = None
        for loc, sums, weights in results:
            if pending is not None:
                pending.result()
            pending = writer.submit(add, sums, weights, loc)
            del sums, weights
        if pending is not None:
            pending.result()
    t_model = time.perf_counter() - t0
    if isinstance(merger, ArrayMerger):
        output[...] = merger.finalize()  # zarr writes it chunk by chunk
    else:
        merger.finalize(output)
    return {
        "windows": n_windows,
        "windows_total": total,
        "blocks": len(blocks),
        "window": window,
        "seconds_predict": round(t_model, 3),
        "seconds_stitch": round(time.perf_counter() - t0, 3),
    }


def _canvas_merger(shape: tuple[int, int], workdir: Path, cfg: InferenceConfig) -> ArrayMerger | ZarrMerger:
    """The slide's accumulator: in memory when its sums and weights fit ``inference.memory_accumulator_mb``
    (no compressed read-add-write per block, no chunked finalisation), else on disk so that memory stays
    flat whatever the slide's size. Both add the same blocks in the same order: the same map bit for bit."""
    h, w = shape
    if 2 * 4 * h * w <= cfg.memory_accumulator_mb * 2**20:
        return ArrayMerger((1, h, w))
    return ZarrMerger((1, h, w), workdir, importance=None, chunk=cfg.chunk_size)


def _run_blocks(
    reader: SlideReader,
    model: LoadedModel,
    cfg: InferenceConfig,
    canvas: Canvas,
    blocks: list[Block],
    window: int,
    importance: np.ndarray,
) -> Iterator[tuple[tuple[int, int], np.ndarray, np.ndarray]]:
    if not blocks:
        return

    def read(b: Block) -> np.ndarray:
        y0, x0, y1, x1 = b.box
        return read_canvas(reader, canvas, y0, x0, y1 - y0, x1 - x0)

    # Prefetch the next block's pixels (I/O and resampling release the GIL) while the model runs.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future[np.ndarray] = pool.submit(read, blocks[0])
        for i, b in enumerate(blocks):
            pixels = pending.result()
            if i + 1 < len(blocks):
                pending = pool.submit(read, blocks[i + 1])
            sums, weights = predict_block(
                model.net, pixels, b, window, importance, cfg.batch_size, resolve_precision(cfg.precision), cfg.tta
            )
            yield (b.box[0], b.box[1]), sums, weights


class DaskBlockRunner:
    """Runs inference blocks as tasks on a dask cluster, for every slide of a stage: one client, the model
    scattered to every worker once (as safetensors bytes, rebuilt once per worker process).

    Results come back in block order, whatever order the workers finish in, so the one writer adds the
    same sums in the same order as a local run and the maps are the same bit for bit (with the same
    ``train.threads``: torch's CPU kernels may split reductions by thread count). At most ``in_flight``
    blocks per slide are submitted ahead of the one being merged, which bounds the writer's memory."""

    def __init__(self, address: str, model: LoadedModel, threads: int = 0) -> None:
        from distributed import Client
        from safetensors.torch import save as st_save

        try:
            self.client = Client(address, timeout="20s", set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise FedpathError(f"dask scheduler {address}: cannot connect ({exc})") from None
        try:
            self.blob = self.client.scatter(st_save(model.state), broadcast=True)
            self.in_flight = max(2, 2 * sum(self.client.nthreads().values()))
        except BaseException:
            self.client.close()
            raise
        self.model_key = model.sha256
        self.model_cfg = model.meta.model.model_dump()
        self.threads = threads

    def run(
        self,
        reader: SlideReader,
        canvas: Canvas,
        blocks: list[Block],
        window: int,
        importance: np.ndarray,
        batch_size: int,
        precision: str = "float32",
        tta: str = "none",
    ) -> Iterator[tuple[tuple[int, int], np.ndarray, np.ndarray]]:
        args = (str(reader.path), reader._mpp_override, reader._default_mpp)
        futures: dict[int, Any] = {}
        submitted = 0
        try:
            for i in range(len(blocks)):
                while submitted < len(blocks) and submitted < i + self.in_flight:
                    futures[submitted] = self.client.submit(
                        _dask_block, args, canvas, blocks[submitted], self.model_key, self.blob,
                        self.model_cfg, window, importance, batch_size, self.threads, precision, tta, pure=False,
                    )  # fmt: skip
                    submitted += 1
                fut = futures.pop(i)
                loc, sums, weights = fut.result()
                fut.release()
                yield loc, sums, weights
        finally:
            for fut in futures.values():  # a failed or abandoned slide: cancel what is still queued
                fut.cancel()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> DaskBlockRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------------
# Metrics against ground truth
# ------------------------------------------------------------------------------------------------------
def slide_metrics(
    prob: Any, canvas: Canvas, annotation: Any, threshold: float, aji_max_pixels: int, block: int = 2048
) -> dict[str, Any]:
    """Dice, Jaccard and pixel accuracy over the slide and AJI (connected components as instances),
    at the model's resolution, the ground truth rasterised block by block. AJI is computed over the whole
    slide up to ``aji_max_pixels`` model pixels, else pooled over blocks (objects cut at block borders)."""
    from skimage.measure import label

    from pipeline.metrics import aji_sums

    H, W = canvas.shape
    sx, sy = canvas.scale
    tp = fp = fn = tn = 0
    whole = H * W <= aji_max_pixels
    gt_full = np.zeros((H, W), dtype=bool) if whole else None
    pr_full = np.zeros((H, W), dtype=bool) if whole else None
    inter = union = 0.0
    for y0 in range(0, H, block):
        for x0 in range(0, W, block):
            y1, x1 = min(y0 + block, H), min(x0 + block, W)
            pred = np.asarray(prob[0, y0:y1, x0:x1]) > threshold
            gt = annotation.rasterize(x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy, x1 - x0, y1 - y0) > 0
            tp += int(np.count_nonzero(pred & gt))
            fp += int(np.count_nonzero(pred & ~gt))
            fn += int(np.count_nonzero(~pred & gt))
            tn += int(np.count_nonzero(~pred & ~gt))
            if gt_full is not None and pr_full is not None:
                gt_full[y0:y1, x0:x1] = gt
                pr_full[y0:y1, x0:x1] = pred
            else:
                i, u = aji_sums(label(gt, connectivity=2), label(pred, connectivity=2))
                inter, union = inter + i, union + u
    if gt_full is not None and pr_full is not None:
        inter, union = aji_sums(label(gt_full, connectivity=2), label(pr_full, connectivity=2))
    return {
        "dice": dice_from_counts(tp, fp, fn),
        "jaccard": 1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn),
        "pixel_accuracy": (tp + tn) / max(1, tp + fp + fn + tn),
        "aji": 1.0 if union == 0 else inter / union,
        "aji_scope": "slide" if whole else f"blocks of {block} px",
        "resolution_mpp": canvas.mpp,
        "pixels": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }


# ------------------------------------------------------------------------------------------------------
# One slide end to end
# ------------------------------------------------------------------------------------------------------
@dataclass
class SlideJob:
    """A slide to run: its id, file, optional MPP override and annotation, and expected checksums."""

    slide_id: str
    path: Path
    mpp: float | None = None
    annotation: Path | None = None
    split: str | None = None
    sha256: str | None = None
    row: Any | None = None  # wsi.manifest.ManifestRow, verified before use


def _fingerprint(model: LoadedModel, cfg: ExperimentConfig, job: SlideJob, slide_sha: str) -> dict[str, Any]:
    # Settings that change the maps; where and how fast they run (scheduler, batch, cache) do not.
    inf = cfg.inference.model_dump(exclude={"scheduler", "parallel_slides", "batch_size", "tile_cache"})
    inf["precision"] = resolve_precision(cfg.inference.precision)  # what ran, not "auto"
    return {
        "infer_version": INFER_VERSION,
        "model_sha256": model.sha256,
        "slide_sha256": slide_sha,
        "mpp_override": job.mpp,
        "default_mpp": cfg.tiling.default_mpp,
        "mpp_tolerance": cfg.tiling.mpp_tolerance,
        "tissue": cfg.tiling.tissue.model_dump(),
        "inference": inf,
    }


def _check_output_dir(out: Path, fingerprint: dict[str, Any]) -> bool:
    """True when ``out`` already holds this exact run, complete (skip it); FedpathError when it holds a
    different complete run or files without a run record; False when it is free (an incomplete earlier
    attempt is cleared)."""
    if not out.exists() or not any(out.iterdir()):
        return False
    run_json = out / "run.json"
    if not run_json.is_file():
        raise FedpathError(
            f"{out}: output folder is not empty and has no run.json; remove it or use another run_dir"
        )
    try:
        prev = json.loads(run_json.read_text())
    except (OSError, json.JSONDecodeError):
        raise FedpathError(
            f"{run_json}: unreadable run record; remove the folder or use another run_dir"
        ) from None
    if not prev.get("complete"):
        # A failed or interrupted attempt (whatever its settings) holds nothing worth keeping: redo it.
        log.info("%s: clearing an incomplete earlier attempt", out)
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        return False
    if prev.get("fingerprint") != fingerprint:
        old = prev.get("fingerprint") or {}
        diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        raise FedpathError(
            f"{out}: holds a different run (differs in {', '.join(diff) or 'fingerprint'}); "
            "remove it or use another run_dir"
        )
    return True


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _open_for_inference(job: SlideJob, cfg: ExperimentConfig) -> SlideReader:
    """The slide's reader; a tifffile reader gets a small decoded-tile cache (each block is read whole,
    once, so a large cache only costs memory)."""
    from wsi.readers import TiffSlideReader

    reader = open_slide(job.path, job.mpp, cfg.tiling.default_mpp)
    if isinstance(reader, TiffSlideReader):
        reader.close()
        reader = TiffSlideReader(
            job.path, job.mpp, cfg.tiling.default_mpp, tile_cache=cfg.inference.tile_cache
        )
    return reader


def _tissue_config(reader: SlideReader, cfg: ExperimentConfig) -> Any:
    """The tiling's tissue settings, at a resolution coarse enough that the mask has at most
    ``inference.tissue_max_side`` pixels on the slide's longer side (its memory stays bounded)."""
    tcfg = cfg.tiling.tissue
    floor = reader.mpp * max(reader.dimensions) / cfg.inference.tissue_max_side
    return tcfg.model_copy(update={"detect_mpp": max(tcfg.detect_mpp, floor)})


def infer_slide(
    job: SlideJob,
    model: LoadedModel,
    cfg: ExperimentConfig,
    out_root: Path,
    data_root: Path | None = None,
    runner: DaskBlockRunner | None = None,
) -> dict[str, Any]:
    """Run one slide and write its outputs; returns its summary entry (raises on failure). With a
    ``runner`` its blocks run on a dask cluster; reading, stitching and export stay here."""
    from wsi.export import (
        create_prob_zarr,
        finish_prob_zarr,
        mask_coverage,
        write_geojson,
        write_mask_ome_tiff,
        write_thumbnail,
    )
    from wsi.manifest import sha256_file, verify_row
    from wsi.tissue import detect_tissue

    t0 = time.perf_counter()
    inf = cfg.inference
    if job.row is not None and data_root is not None:
        verify_row(job.row, data_root)  # existence and sha256 of slide and annotation
    if not job.path.is_file():
        raise FedpathError(f"{job.path}: no such slide file")
    slide_sha = job.sha256 or sha256_file(job.path)
    out = out_root / job.slide_id
    fp = _fingerprint(model, cfg, job, slide_sha)
    if _check_output_dir(out, fp):
        prev = json.loads((out / "run.json").read_text())
        log.info("%s: already done with this model and settings, skipped", out)
        return {**prev.get("summary", {}), "status": "skipped"}
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "fingerprint": fp,
        "complete": False,
        "slide": str(job.path),
        "model": str(model.path),
    }
    _write_json(out / "run.json", record)

    with _open_for_inference(job, cfg) as reader:
        canvas = plan_canvas(reader, model.meta.target_mpp, cfg.tiling.mpp_tolerance, inf.max_upsample)
        tissue = detect_tissue(reader, _tissue_config(reader, cfg)) if inf.tissue_only else None
        prob = create_prob_zarr(out / "prob.ome.zarr", (1, *canvas.shape), inf.chunk_size)
        stats = stitch_slide(reader, model, inf, canvas, prob, out / ".accumulator", tissue, runner)
        t1 = time.perf_counter()
        trim_heap()
        finish_prob_zarr(out / "prob.ome.zarr", canvas.mpp, inf.pyramid_levels, ["foreground"], job.slide_id)
        trim_heap()
        levels = write_mask_ome_tiff(
            out / "mask.ome.tif", prob, channel=0, threshold=inf.threshold, slide_size=reader.dimensions,
            scale=canvas.scale, mpp=reader.mpp, name=f"{job.slide_id} mask",
        )  # fmt: skip
        n_polys = write_geojson(
            out / "mask.geojson", prob, channel=0, threshold=inf.threshold, scale=canvas.scale,
            mpp=reader.mpp, object_type=inf.geojson_object_type, class_name=inf.geojson_class,
            simplify=inf.geojson_simplify,
        )  # fmt: skip
        from pipeline.instances import slide_instances

        nuclei = slide_instances(
            model.net, functools.partial(read_canvas, reader, canvas), canvas.shape, canvas.scale, reader.mpp,
            out, window=inf.tile_size or model.meta.tile_size, fg_prob=prob, threshold=inf.threshold, tta=inf.tta,
            precision=resolve_precision(inf.precision),
        )  # one detection per nucleus (nuclei.geojson) and the instance label image (instances.zarr)
        thumb = reader.thumbnail(inf.thumbnail_size)
        cover = mask_coverage(prob, 0, inf.threshold, thumb.shape[:2])
        write_thumbnail(out / "thumbnail.png", thumb, cover)
        t2 = time.perf_counter()
        metrics = None
        if job.annotation is not None:
            from wsi.annotations import load_annotation

            ann = load_annotation(job.annotation, slide_dimensions=reader.dimensions)
            metrics = slide_metrics(prob, canvas, ann, inf.threshold, inf.aji_max_pixels)
            from pipeline.instances import instance_metrics

            # AJI/PQ of the predicted nuclei against the annotated ones at full resolution (not of blobs)
            metrics.update(instance_metrics(out / "instances.zarr", ann, reader.dimensions, inf.aji_max_pixels))
            metrics["annotation"] = str(job.annotation)
            _write_json(out / "metrics.json", metrics)
        slide_info = reader.describe()

    fg = mask_coverage(prob, 0, inf.threshold, (1, 1))[0, 0]
    summary: dict[str, Any] = {
        "slide_id": job.slide_id,
        "status": "ok",
        "slide": str(job.path),
        "split": job.split,
        "output": str(out),
        "dimensions": list(slide_info["dimensions"]),
        "slide_mpp": slide_info["mpp"],
        "mpp_source": slide_info["mpp_source"],
        "model_mpp": canvas.mpp,
        "canvas": list(canvas.shape),
        "level": canvas.level,
        "resampled": not canvas.exact,
        "foreground_fraction": float(fg),
        "polygons": n_polys,
        "nuclei": nuclei,
        "mask_levels": [list(lv) for lv in levels],
        "metrics": metrics,
        **stats,
        "seconds_export": round(t2 - t1, 3),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    record.update(complete=True, summary=summary, reader=slide_info)
    _write_json(out / "run.json", record)
    return summary


# ------------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------------
def _slide_id(path: Path, taken: set[str]) -> str:
    name = path.name
    for suf in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
            break
    else:
        name = path.stem
    base = "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "slide"
    sid, i = base, 1
    while sid in taken:
        i += 1
        sid = f"{base}-{i}"
    taken.add(sid)
    return sid


def collect_jobs(
    cfg: ExperimentConfig,
    slides: list[Path],
    manifest: Path | None,
    site: str | None,
    data_root: Path | None,
    all_splits: bool,
) -> tuple[list[SlideJob], Path | None]:
    """Slides given on the command line, else the test split (or all) of a manifest or of the config's
    sites' manifests. Returns the jobs and the resolved data root."""
    from wsi.manifest import read_manifest, resolve_data_root

    taken: set[str] = set()
    jobs = [SlideJob(_slide_id(Path(p), taken), Path(p)) for p in slides]
    sources: list[tuple[Path, str | None]] = []
    if manifest is not None:
        sources.append((Path(manifest), site))
    elif site is not None:
        sources.append((cfg.site(site).manifest, site))
    elif not slides:
        sources = [(s.manifest, s.name) for s in cfg.sites]
        if not sources:
            raise FedpathError("infer: no --slide, --manifest or --site given and the config lists no sites")
    root = resolve_data_root(data_root) if sources else data_root
    for mpath, site_name in sources:
        for row in read_manifest(mpath, site=site_name):
            if not all_splits and row.split != "test":
                continue
            sid = row.slide_id if row.slide_id not in taken else f"{row.site}-{row.slide_id}"
            taken.add(sid)
            assert root is not None
            jobs.append(
                SlideJob(
                    sid, row.slide_path(root), row.mpp, row.annotation_file(root), row.split, row.sha256, row
                )
            )
    return jobs, root


def run_infer(
    cfg: ExperimentConfig,
    model: Path | None,
    slides: list[Path],
    manifest: Path | None,
    site: str | None,
    data_root: Path | None,
    all_splits: bool = False,
) -> dict[str, Any]:
    """The ``infer`` stage: every slide's outputs under ``<run_dir>/predictions/``; failures are listed
    (one line each) and the others go on. Writes the summary's ``infer`` key and returns it."""
    model_path = Path(model) if model is not None else RunLayout(cfg.run_dir).server.latest_global("; pass --model")
    loaded = load_inference_model(model_path)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        jobs, root = collect_jobs(cfg, slides, manifest, site, data_root, all_splits)
    except WSIError as exc:  # an unreadable manifest or data root concerns every slide: stop here
        raise FedpathError(str(exc)) from None
    out_root = cfg.run_dir / "predictions"

    def one(
        job: SlideJob, runner: DaskBlockRunner | None
    ) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
        try:
            entry = infer_slide(job, loaded, cfg, out_root, root, runner)
            m = entry.get("metrics") or {}
            log.info(
                "%s: %s, %d windows, %.1f s%s", job.slide_id, entry["status"], entry.get("windows", 0),
                entry.get("seconds", 0.0), "".join(
                    f", {k} {m[k]:.3f}" for k in ("dice", "aji") if isinstance(m.get(k), (int, float))
                ),
            )  # fmt: skip
            return entry, None
        except WSIError as exc:
            log.error("%s", exc)
            return None, {"slide_id": job.slide_id, "path": str(job.path), "error": str(exc)}
        except Exception as exc:  # one slide's unexpected failure must not stop the others
            log.exception("%s: inference failed", job.path)
            return None, {"slide_id": job.slide_id, "path": str(job.path), "error": f"{job.path}: {exc}"}

    if cfg.inference.scheduler and jobs:
        # Slides and blocks on the cluster: up to ``parallel_slides`` slides at once, each streaming its
        # blocks to the workers, so one slide's tail and export overlap the next one's blocks.
        with DaskBlockRunner(cfg.inference.scheduler, loaded, cfg.train.threads or 0) as runner:
            with ThreadPoolExecutor(max_workers=min(len(jobs), cfg.inference.parallel_slides)) as pool:
                outcomes = list(pool.map(lambda j: one(j, runner), jobs))
    else:
        outcomes = [one(job, None) for job in jobs]
    results = [e for e, _ in outcomes if e is not None]
    failed = [f for _, f in outcomes if f is not None]
    summary: dict[str, Any] = {
        "model": str(model_path),
        "model_sha256": loaded.sha256,
        "model_mpp": loaded.meta.target_mpp,
        "predictions": str(out_root),
        "slides": results,
        "failed": failed,
        "n_ok": len(results),
        "n_failed": len(failed),
    }
    # Per-site jobs (``fedpath infer --site a``, then ``--site b``) accumulate in one summary entry as long
    # as they used the same model (a new model starts afresh); the return value is this call's slides only.
    merged: dict[str, Any] = dict(summary)
    prev = read_summary(cfg.run_dir).get("infer", {})
    if isinstance(prev, dict) and prev.get("model_sha256") == loaded.sha256:
        done = {r["slide_id"] for r in results} | {f["slide_id"] for f in failed}
        merged["slides"] = [r for r in prev.get("slides", []) if r.get("slide_id") not in done] + results
        merged["failed"] = [f for f in prev.get("failed", []) if f.get("slide_id") not in done] + failed
        merged["n_ok"], merged["n_failed"] = len(merged["slides"]), len(merged["failed"])
    update_summary(cfg.run_dir, "infer", merged)
    return summary
