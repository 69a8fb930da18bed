"""Tiling a site's slides into its zarr store (``sites/<site>/store.zarr``), in parallel with dask.

Per manifest row: verify the sha256s, open the slide (MPP by the declared fallback order), detect tissue
at low resolution, lay a grid of ``tile_size`` tiles (stride ``tile_size - overlap``) at the target MPP
over the whole slide (edge tiles padded white), keep tiles whose tissue fraction reaches
``min_tissue_fraction``, then read each kept tile at the target MPP (a pyramid level within
``mpp_tolerance`` as is, else resampled) with its mask rasterised from the annotation at the same
resolution, and write them through :class:`wsi.store.SiteStore`.

Work is split into small tasks so memory never grows with slide size and nothing big crosses the
scheduler: one *plan* task per slide (checksums, open, tissue mask, grid; returns the kept tiles'
coordinates), then *batch* tasks of up to ``batch_tiles`` tiles of one slide, each opening the slide
itself (a per-process cache of open readers), reading runs of horizontally adjacent tiles in one region
read (a TIFF tile is decoded once even when tiles are smaller than it), writing its chunks straight into
the pending slide and returning only counts. The driver creates the pending arrays, writes the
coordinates, and commits a slide (one rename) when all of its batches are in.

Resumable: a complete slide whose provenance matches (slide and annotation sha256 plus every tiling
parameter) is skipped; a pending (half-written) slide is redone; a slide tiled with other parameters is
retiled. A slide that fails (missing, corrupt, truncated, checksum mismatch, unsupported, unparsable
annotation) is logged in one line and listed in the summary; the others are still tiled.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from wsi.annotations import Annotation, load_annotation
from wsi.config import TilingConfig
from wsi.errors import WSIError
from wsi.manifest import ManifestRow, read_manifest, verify_row
from wsi.readers import SlideReader, open_slide
from wsi.store import SiteStore, SlideWriter, aligned_empty, tiles_per_shard
from wsi.tissue import detect_tissue

log = logging.getLogger(__name__)

#: Bump when tiling output changes for the same inputs and parameters (forces a retile).
TILING_VERSION = 1
#: Level pixels one region read may cover (bounds a batch's memory whatever the resampling factor).
RUN_PIXEL_BUDGET = 24_000_000
#: Cluster tasks per thread per slide, and the most shards one task may hold (see group_shards).
TASKS_PER_THREAD = 3
MAX_SHARDS_PER_TASK = 16
MAX_RUN = 16


def fedpath_version() -> str:
    try:
        from importlib.metadata import version

        return version("fedpath")
    except Exception:
        return "0+unknown"


# ------------------------------------------------------------------------------------------------------
# Jobs and plans (small, picklable)
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlideJob:
    """What a task needs to know about one slide."""

    site: str
    slide_id: str
    path: str  # absolute
    annotation: str | None
    mpp_override: float | None
    default_mpp: float | None
    split: str
    sha256: str
    annotation_sha256: str | None
    target_mpp: float
    mpp_tolerance: float
    tile_size: int
    overlap: int
    min_tissue_fraction: float
    tissue: dict[str, Any]
    row: ManifestRow
    data_root: str
    mask_classes: int = 2


@dataclass
class TilePlan:
    """The kept tiles of a slide and how they are read (returned by :func:`plan_slide`)."""

    slide_id: str
    coords: np.ndarray  # (N, 4) int64 level-0 x0, y0, w0, h0
    tissue: np.ndarray  # (N,) float32
    grid: np.ndarray  # (N, 2) int64 grid column, row
    scale: float  # level-0 pixels per output pixel
    provenance: dict[str, Any]
    n_candidates: int
    seconds: float
    batches: list[list[tuple[int, int]]] = field(default_factory=list)  # runs (start, stop) per batch


def params_fingerprint(tiling: TilingConfig) -> dict[str, Any]:
    """Tiling parameters a complete slide must match to be skipped on a re-run."""
    return {
        "tiling_version": TILING_VERSION,
        "target_mpp": tiling.target_mpp,
        "mpp_tolerance": tiling.mpp_tolerance,
        "default_mpp": tiling.default_mpp,
        "tile_size": tiling.tile_size,
        "overlap": tiling.overlap,
        "min_tissue_fraction": tiling.min_tissue_fraction,
        "tissue": tiling.tissue.model_dump(),
        # only a 3-class store records it, so 2-class stores tiled before it stay current
        **({"mask_classes": tiling.mask_classes} if tiling.mask_classes != 2 else {}),
    }


# ------------------------------------------------------------------------------------------------------
# Per-process caches (worker processes keep a few readers/annotations open between tasks)
# ------------------------------------------------------------------------------------------------------
_READERS: OrderedDict[tuple[Any, ...], SlideReader] = OrderedDict()
_ANNOTATIONS: OrderedDict[tuple[Any, ...], Annotation] = OrderedDict()
_WRITERS: OrderedDict[tuple[Any, ...], SlideWriter] = OrderedDict()
_CACHE_SIZE = 3
#: The caches are shared by the threads of an in-process (threaded) dask worker.
_CACHE_LOCK = threading.RLock()


def _reader(job: SlideJob) -> SlideReader:
    key = (job.path, job.mpp_override, job.default_mpp, os.stat(job.path).st_mtime_ns)
    with _CACHE_LOCK:
        r = _READERS.get(key)
        if r is None:
            r = open_slide(job.path, job.mpp_override, job.default_mpp)
            _READERS[key] = r
            while len(_READERS) > _CACHE_SIZE:
                _READERS.popitem(last=False)[1].close()
        else:
            _READERS.move_to_end(key)
        return r


def _annotation(job: SlideJob, dims: tuple[int, int]) -> Annotation | None:
    if not job.annotation:
        return None
    key = (job.annotation, dims, os.stat(job.annotation).st_mtime_ns)
    with _CACHE_LOCK:
        a = _ANNOTATIONS.get(key)
        if a is None:
            a = load_annotation(job.annotation, slide_dimensions=dims)
            _ANNOTATIONS[key] = a
            while len(_ANNOTATIONS) > _CACHE_SIZE:
                _ANNOTATIONS.popitem(last=False)
        else:
            _ANNOTATIONS.move_to_end(key)
        return a


class ShardPipeline:
    """A thread's two page-aligned shard buffers, used in turn, and the background writes still
    reading them: while the last writes of one shard (and its index) go to disk, the next shard is
    decoded into the other buffer. :meth:`drain` waits for everything; a task calls it before it
    returns, so a finished task still means written shards.

    Buffers are reused from shard to shard and, through a process-wide free list, from task to task and
    thread to thread (a new cluster brings new threads): fresh memory costs first-touch page faults,
    slow on a VM, and 2 MB-aligned (huge-page) buffers decode faster and go to disk with O_DIRECT at a
    fraction of the kernel's cost for 4 KB pages."""

    #: Where the tiles start in a buffer: 16 bytes off a 32-byte boundary, where libjpeg-turbo decodes
    #: with ordinary stores (see readers._decode_scratch); the shard file skips these bytes.
    LEAD = 16

    def __init__(self) -> None:
        self._bufs: list[np.ndarray | None] = [None, None]
        self._pending: list[Any] = [None, None]
        self._turn = 0

    def buffer(self, n: int, tile: int) -> tuple[np.ndarray, np.ndarray]:
        """The next buffer, for ``n`` RGB tiles, once no write still reads it: (tiles, the whole
        page-aligned buffer they lie in, at byte :attr:`LEAD`)."""
        self._turn ^= 1
        self._wait(self._turn)
        need = self.LEAD + n * tile * tile * 3
        buf = self._bufs[self._turn]
        if buf is None or buf.nbytes < need:
            if buf is not None:
                _give_buffer(buf)
            buf = self._bufs[self._turn] = _take_buffer(need)
        return buf[self.LEAD : need].reshape(n, tile, tile, 3), buf

    def defer(self, future: Any) -> None:
        """``future`` (a background write of the current buffer) must end before the buffer is reused."""
        self._pending[self._turn] = future

    def _wait(self, i: int) -> None:
        fut, self._pending[i] = self._pending[i], None
        if fut is not None:
            fut.result()

    def drain(self) -> None:
        """Wait for every background write; raise the first error (after waiting for all)."""
        errors: list[BaseException] = []
        for i in (0, 1):
            try:
                self._wait(i)
            except BaseException as e:  # re-raised below, once both are done
                errors.append(e)
            buf, self._bufs[i] = self._bufs[i], None
            if buf is not None:
                _give_buffer(buf)  # for the next task, on whichever thread
        if errors:
            raise errors[0]


_PIPELINES = threading.local()
_FREE_BUFFERS: list[np.ndarray] = []
_FREE_MAX = 8


def _take_buffer(nbytes: int) -> np.ndarray:
    """A free page-aligned buffer of at least ``nbytes`` (the smallest that fits), or a new one."""
    with _CACHE_LOCK:
        fits = [i for i, b in enumerate(_FREE_BUFFERS) if b.nbytes >= nbytes]
        if fits:  # by position: list.remove would compare arrays elementwise
            return _FREE_BUFFERS.pop(min(fits, key=lambda i: _FREE_BUFFERS[i].nbytes))
    return aligned_empty((nbytes,))


def _give_buffer(buf: np.ndarray) -> None:
    with _CACHE_LOCK:
        if len(_FREE_BUFFERS) < _FREE_MAX and all(b is not buf for b in _FREE_BUFFERS):
            _FREE_BUFFERS.append(buf)


def _pipeline() -> ShardPipeline:
    p = getattr(_PIPELINES, "p", None)
    if p is None:
        p = _PIPELINES.p = ShardPipeline()
    return p


def _writer(pending: str) -> SlideWriter:
    """The writer of a pending slide, opened once per process: opening the zarr group and reading its
    arrays' metadata costs ~2 ms (zarr's event loop round trips), as much as decoding ten tiles. Keyed on
    the images array's metadata file too, so a slide begun again is opened afresh."""
    meta = os.stat(Path(pending) / "images" / "zarr.json")
    key = (pending, meta.st_ino, meta.st_mtime_ns)
    with _CACHE_LOCK:
        w = _WRITERS.get(key)
        if w is None:
            w = _WRITERS[key] = SlideWriter(Path(pending))
            while len(_WRITERS) > _CACHE_SIZE:
                _WRITERS.popitem(last=False)
        else:
            _WRITERS.move_to_end(key)
        return w


def clear_caches() -> None:
    """Close the readers this process keeps open (and forget its writers and annotations)."""
    with _CACHE_LOCK:
        while _READERS:
            _READERS.popitem()[1].close()
        _ANNOTATIONS.clear()
        _WRITERS.clear()


# ------------------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------------------
def grid_origins(width0: int, height0: int, scale: float, tile: int, overlap: int) -> tuple[int, int]:
    """Columns and rows of the tile grid covering a level-0 ``width0 x height0`` slide at ``scale``
    level-0 pixels per output pixel (the last row/column may stick out and is padded)."""
    stride = tile - overlap

    def n(extent0: int) -> int:
        ext = extent0 / scale
        return 1 if ext <= tile else math.ceil((ext - tile) / stride - 1e-9) + 1

    return n(width0), n(height0)


def plan_slide(job: SlideJob, batch_tiles: int = 64) -> TilePlan:
    """Verify checksums, open the slide, detect tissue and choose the tiles (runs in a worker)."""
    t0 = time.perf_counter()
    from wsi.config import TissueConfig

    verify_row(job.row, job.data_root)
    r = _reader(job)
    ann = _annotation(job, r.dimensions)  # parse now: an unparsable annotation fails the slide early
    mplan = r.plan_mpp(job.target_mpp, job.mpp_tolerance)
    scale = r.footprint(1, 1, job.target_mpp, job.mpp_tolerance)[0]
    W0, H0 = r.dimensions
    T, ov = job.tile_size, job.overlap
    stride = T - ov
    nx, ny = grid_origins(W0, H0, scale, T, ov)
    gy, gx = np.mgrid[0:ny, 0:nx]
    gx, gy = gx.ravel().astype(np.int64), gy.ravel().astype(np.int64)
    fx = gx * stride * scale
    fy = gy * stride * scale
    boxes = np.stack([fx, fy, np.full_like(fx, T * scale), np.full_like(fy, T * scale)], axis=1)
    tcfg = TissueConfig(**job.tissue)
    tmask = detect_tissue(r, tcfg)
    frac = tmask.fractions(boxes)
    keep = frac >= job.min_tissue_fraction
    if job.min_tissue_fraction > 0:
        keep &= frac > 0
    coords = np.stack(
        [np.rint(fx), np.rint(fy), np.full_like(fx, round(T * scale)), np.full_like(fy, round(T * scale))],
        axis=1,
    ).astype(np.int64)[keep]
    grid = np.stack([gx, gy], axis=1)[keep]
    level_pixels_per_tile = (T * mplan.resample_factor) ** 2
    max_run = int(max(1, min(MAX_RUN, RUN_PIXEL_BUDGET // max(level_pixels_per_tile, 1))))
    batches = _batches(grid, max_run, tiles_per_shard(T, batch_tiles))
    prov = {
        "source_path": job.row.path,
        "source_abspath": job.path,
        "sha256": job.sha256,
        "annotation_path": job.row.annotation_path,
        "annotation_sha256": job.annotation_sha256,
        "annotation_kind": ann.kind if ann is not None else None,
        "reader": r.reader_name,
        "vendor": r.vendor,
        "dimensions": list(r.dimensions),
        "level_count": r.level_count,
        "source_mpp": r.mpp,
        "mpp_source": r.mpp_source,
        "mpp_rejected": [rj._asdict() for rj in r.mpp_rejected],
        "level": mplan.level,
        "level_mpp": mplan.level_mpp,
        "level_downsample": r.level_downsamples[mplan.level],
        "resample_factor": mplan.resample_factor,
        "resampled": not mplan.exact,
        "effective_mpp": mplan.effective_mpp,
        "scale_level0_per_px": scale,
        "target_mpp": job.target_mpp,
        "mpp_tolerance": job.mpp_tolerance,
        "tile_size": T,
        "overlap": ov,
        "min_tissue_fraction": job.min_tissue_fraction,
        "tissue_params": job.tissue,
        "tissue_threshold": tmask.threshold,
        "tissue_mask_mpp": tmask.mask_mpp,
        "tissue_fraction_slide": tmask.tissue_fraction_total,
        "grid": [nx, ny],
        "fedpath_version": fedpath_version(),
        "tiling_version": TILING_VERSION,
    }
    return TilePlan(
        slide_id=job.slide_id,
        coords=coords,
        tissue=frac[keep].astype(np.float32),
        grid=grid,
        scale=scale,
        provenance=prov,
        n_candidates=int(len(frac)),
        seconds=time.perf_counter() - t0,
        batches=batches,
    )


def _batches(grid: np.ndarray, max_run: int, shard: int) -> list[list[tuple[int, int]]]:
    """Split kept tiles (row-major) into batches of ``shard`` consecutive tiles (one store shard each),
    and each batch into runs of horizontally adjacent tiles (one region read each)."""
    batches: list[list[tuple[int, int]]] = []
    n = len(grid)
    for b0 in range(0, n, shard):
        b1 = min(b0 + shard, n)
        runs: list[tuple[int, int]] = []
        i = b0
        while i < b1:
            j = i + 1
            while (
                j < b1 and j - i < max_run and grid[j, 1] == grid[i, 1] and grid[j, 0] == grid[j - 1, 0] + 1
            ):
                j += 1
            runs.append((i, j))
            i = j
        batches.append(runs)
    return batches


def tile_batch(
    job: SlideJob,
    pending: str,
    runs: list[tuple[int, int]],
    grid: np.ndarray,
    scale: float,
    pipeline: ShardPipeline | None = None,
) -> dict[str, Any]:
    """Read the tiles of ``runs`` (consecutive index ranges making up one store shard) and write them as
    that shard; returns counts only. ``grid`` holds the (column, row) of the first tile of each run.
    With a ``pipeline`` the shard's last writes may still be in flight on return (``pipeline.drain()``
    waits for them); without, the shard is on disk when this returns."""
    t0, c0 = time.perf_counter(), time.process_time()
    r = _reader(job)
    ann = _annotation(job, r.dimensions)
    writer = _writer(pending)
    mplan = r.plan_mpp(job.target_mpp, job.mpp_tolerance)
    T, stride = job.tile_size, job.tile_size - job.overlap
    first, last = runs[0][0], runs[-1][1]
    pipe = pipeline if pipeline is not None else _pipeline()
    images, data = pipe.buffer(last - first, T)
    masks = np.empty((last - first, T, T), dtype=np.uint8) if ann is not None else None
    fg = 0
    stream = writer.image_stream(slice(first, last), images, data)
    try:
        for (start, stop), (gx, gy) in zip(runs, grid, strict=True):
            k = stop - start
            wout = (k - 1) * stride + T
            x0, y0 = gx * stride * scale, gy * stride * scale
            dst = images[start - first : stop - first]
            if (
                job.overlap == 0
                and mplan.exact
                and r.read_tiles_into(round(x0), round(y0), mplan.level, k, T, dst)
            ):
                pass  # the slide's own tiles, decoded straight into the shard buffer
            elif job.overlap == 0:
                region = r.read_at_mpp(x0, y0, wout, T, job.target_mpp, job.mpp_tolerance)
                dst[:] = region.reshape(T, k, T, 3).transpose(1, 0, 2, 3)
            else:
                region = r.read_at_mpp(x0, y0, wout, T, job.target_mpp, job.mpp_tolerance)
                for i in range(k):
                    dst[i] = region[:, i * stride : i * stride + T]
            if stream is not None:
                stream.ready(stop - first)  # the disk write of these tiles overlaps decoding the next
            if masks is not None and ann is not None:
                m = ann.rasterize(x0, y0, wout * scale, T * scale, wout, T, classes=job.mask_classes)
                for i in range(k):
                    masks[start - first + i] = m[:, i * stride : i * stride + T]
                fg += int(np.count_nonzero(m))
        pipe.defer(writer.write_tiles(slice(first, last), images, masks, stream=stream, wait=False))
    except BaseException:
        if stream is not None:
            stream.abandon()  # the buffer is reused by the next task: no write may still be reading it
        if pipeline is None:
            pipe.drain()
        raise
    if pipeline is None:
        pipe.drain()  # on its own, a batch returns with its shard on disk
    return {
        "tiles": last - first,
        "mask_pixels": fg,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
    }


def tile_shards(
    job: SlideJob,
    pending: str,
    shards: list[tuple[list[tuple[int, int]], np.ndarray]],
    scale: float,
) -> dict[str, Any]:
    """Several shards in one task, one after the other (``shards``: the ``runs`` and ``grid`` arguments
    of :func:`tile_batch` for each): a cluster's per-task cost (scheduling, messages, the driver's
    bookkeeping) is then paid once per several shards."""
    t0, c0 = time.perf_counter(), time.process_time()
    tiles = fg = 0
    pipe = _pipeline()
    try:
        for runs, firsts in shards:
            out = tile_batch(job, pending, runs, firsts, scale, pipe)
            tiles += out["tiles"]
            fg += out["mask_pixels"]
    finally:
        pipe.drain()  # the task ends with all of its shards on disk
    return {
        "tiles": tiles,
        "mask_pixels": fg,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
    }


def group_shards(n_shards: int, nthreads: int, per_thread: int = TASKS_PER_THREAD) -> list[range]:
    """Split a slide's ``n_shards`` shards into contiguous groups, one task each: about ``per_thread``
    tasks per cluster thread (so the last tasks still balance), at most :data:`MAX_SHARDS_PER_TASK` shards
    each, and a multiple of ``nthreads`` tasks where there are more shards than threads."""
    if n_shards <= 0:
        return []
    per_task = max(1, min(MAX_SHARDS_PER_TASK, n_shards // max(1, nthreads * per_thread)))
    n_tasks = -(-n_shards // per_task)
    if n_tasks > nthreads:
        n_tasks = min(n_shards, -(-n_tasks // nthreads) * nthreads)
    bounds = np.linspace(0, n_shards, n_tasks + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


# ------------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------------
def _warm_worker() -> bool:
    import wsi.tiling  # noqa: F401  (readers, tissue, annotations, store, zarr, openslide, tifffile)

    return True


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} tiles/s" if speed else "- tiles/s", style="progress.data.speed")


def _job(row: ManifestRow, data_root: Path, tiling: TilingConfig) -> SlideJob:
    slide = row.slide_path(data_root)
    ann = row.annotation_file(data_root)
    return SlideJob(
        site=row.site,
        slide_id=row.slide_id,
        path=str(slide.resolve()) if slide.exists() else str(slide),
        annotation=str(ann.resolve()) if ann is not None and ann.exists() else (str(ann) if ann else None),
        mpp_override=row.mpp,
        default_mpp=tiling.default_mpp,
        split=row.split,
        sha256=row.sha256,
        annotation_sha256=row.annotation_sha256,
        target_mpp=tiling.target_mpp,
        mpp_tolerance=tiling.mpp_tolerance,
        tile_size=tiling.tile_size,
        overlap=tiling.overlap,
        min_tissue_fraction=tiling.min_tissue_fraction,
        tissue=tiling.tissue.model_dump(),
        row=row,
        data_root=str(data_root),
        mask_classes=tiling.mask_classes,
    )


def _is_current(store: SiteStore, job: SlideJob, params: dict[str, Any]) -> bool:
    if job.slide_id not in store.slides():
        return False
    attrs = store.slide_attrs(job.slide_id)
    prov = attrs.get("provenance", {})
    return bool(
        attrs.get("complete")
        and prov.get("sha256") == job.sha256
        and prov.get("annotation_sha256") == job.annotation_sha256
        and prov.get("mpp_override") == job.mpp_override
        and attrs.get("params") == params
    )


def _one_line(exc: BaseException, job: SlideJob) -> str:
    if isinstance(exc, WSIError):
        return " ".join(str(exc).split())
    return f"{job.path}: {type(exc).__name__}: {' '.join(str(exc).split())}"[:400]


def run_tile_site(
    manifest: Path,
    data_root: Path | None,
    store: Path,
    tiling: TilingConfig,
    site: str,
    run_dir: Path | None,
    scheduler: str | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Tile every slide of ``site``'s manifest into ``store``; returns (and records in the run's
    summary.json under ``tile.<site>``) what was done, skipped and failed, with reasons."""
    from wsi.manifest import resolve_data_root

    t_start = time.perf_counter()
    root = resolve_data_root(data_root)
    rows = read_manifest(manifest)
    mine = [r for r in rows if r.site == site]
    if rows and not mine:
        sites = sorted({r.site for r in rows})
        raise WSIError(f"{manifest}: no rows for site {site!r} (sites in it: {', '.join(sites)})")
    st = SiteStore.create(
        store,
        site=site,
        target_mpp=tiling.target_mpp,
        tile_size=tiling.tile_size,
        overlap=tiling.overlap,
        on_mismatch="reset",
    )
    params = params_fingerprint(tiling)
    jobs = [_job(r, root, tiling) for r in mine]
    results: dict[str, dict[str, Any]] = {}
    todo: list[SlideJob] = []
    for job in jobs:
        if _is_current(st, job, params):
            if st.split(job.slide_id) != job.split:
                st.set_slide_attrs(job.slide_id, {"split": job.split})
            results[job.slide_id] = {"status": "skipped", "tiles": st.n_tiles(job.slide_id)}
            log.info("%s: %s already tiled with these parameters, skipped", site, job.slide_id)
        else:
            todo.append(job)
    for sid in st.pending():
        if sid not in {j.slide_id for j in todo}:
            st.remove_slide_pending(sid)
    compressor = {"cname": tiling.compressor, "clevel": tiling.compressor_level}
    runner = _Runner(st, params, tiling.batch_tiles, results, compressor)
    if todo:
        if scheduler or workers > 1:
            runner.run_distributed(todo, scheduler, workers)
        else:
            runner.run_local(todo)
    done = [s for s, v in results.items() if v["status"] == "done"]
    skipped = [s for s, v in results.items() if v["status"] == "skipped"]
    failed = [{"slide_id": s, "reason": v["reason"]} for s, v in results.items() if v["status"] == "failed"]
    tiles_new = sum(v.get("tiles", 0) for v in results.values() if v["status"] == "done")
    seconds = time.perf_counter() - t_start
    summary = {
        "site": site,
        "manifest": str(manifest),
        "store": str(store),
        "slides_done": done,
        "slides_skipped": skipped,
        "slides_failed": failed,
        "failed": failed,
        "tiles": sum(v.get("tiles", 0) for v in results.values() if v["status"] != "failed"),
        "tiles_written": tiles_new,
        "seconds": round(seconds, 2),
        "tiling_seconds": round(runner.tiling_seconds, 2),
        "plan_seconds": round(runner.plan_seconds, 2),
        "task_seconds": round(runner.task_seconds, 2),
        "task_cpu_seconds": round(runner.task_cpu_seconds, 2),
        "tiles_per_second": round(tiles_new / runner.tiling_seconds, 1)
        if runner.tiling_seconds > 0
        else None,
        "workers": 0 if scheduler else workers,
        "scheduler": scheduler,
        "slides": results,
    }
    log.info(
        "tile %s: %d done, %d skipped, %d failed, %d tiles in %.1f s",
        site,
        len(done),
        len(skipped),
        len(failed),
        summary["tiles"],
        seconds,
    )
    if run_dir is not None:
        from fedcore.summary import update_summary

        update_summary(Path(run_dir), "tile", summary, key=site)
    return summary


class _Runner:
    """Drives plan and batch tasks for the slides to tile, in process or on a dask cluster."""

    def __init__(
        self,
        store: SiteStore,
        params: dict[str, Any],
        batch_tiles: int,
        results: dict[str, Any],
        compressor: dict[str, Any],
    ):
        self.store = store
        self.compressor = compressor
        self.params = params
        self.batch_tiles = batch_tiles
        self.results = results
        self.tiling_seconds = 0.0
        self.plan_seconds = 0.0
        self.task_seconds = 0.0  # wall time inside batch tasks, summed over tasks
        self.task_cpu_seconds = 0.0  # CPU time of batch tasks: contention shows as task_seconds >> this
        self._progress = Progress(
            TextColumn("[bold]tiling {task.fields[site]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tiles"),
            _RateColumn(),
            TextColumn("{task.fields[slides]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )

    # -- bookkeeping shared by both paths -------------------------------------------------------------
    def _account(self, out: dict[str, Any]) -> None:
        self.task_seconds += out["seconds"]
        self.task_cpu_seconds += out["cpu_seconds"]

    def _fail(self, job: SlideJob, exc: BaseException) -> None:
        reason = _one_line(exc, job)
        if self.results.get(job.slide_id, {}).get("status") != "failed":
            log.error("%s", reason)
        self.results[job.slide_id] = {"status": "failed", "reason": reason}
        try:
            self.store.remove_slide_pending(job.slide_id)
        except OSError:
            pass

    def _begin(self, job: SlideJob, plan: TilePlan) -> str:
        writer = self.store.begin_slide(
            job.slide_id,
            len(plan.coords),
            job.tile_size,
            with_masks=job.annotation is not None,
            compressor=self.compressor,
            shard_tiles=tiles_per_shard(job.tile_size, self.batch_tiles),
        )
        writer.write_index(plan.coords, plan.tissue)
        return str(writer.path)

    def _commit(self, job: SlideJob, plan: TilePlan, tiles: int, seconds: float) -> None:
        prov = {**plan.provenance, "mpp_override": job.mpp_override}
        self.store.commit_slide(
            job.slide_id,
            {"provenance": prov, "params": self.params, "split": job.split, "site": job.site},
        )
        self.results[job.slide_id] = {
            "status": "done",
            "tiles": tiles,
            "candidates": plan.n_candidates,
            "mpp_source": prov["mpp_source"],
            "level": prov["level"],
            "resample_factor": prov["resample_factor"],
            "plan_seconds": round(plan.seconds, 3),
            "tile_seconds": round(seconds, 3),
        }

    # -- in process -------------------------------------------------------------------------------------
    def run_local(self, jobs: list[SlideJob]) -> None:
        with self._progress as progress:
            task = progress.add_task("tile", total=0, site=jobs[0].site, slides=f"0/{len(jobs)} slides")
            finished = 0
            try:
                for job in jobs:
                    try:
                        t0 = time.perf_counter()
                        plan = plan_slide(job, self.batch_tiles)
                        self.plan_seconds += time.perf_counter() - t0
                        progress.update(task, total=(progress.tasks[0].total or 0) + len(plan.coords))
                        t1 = time.perf_counter()
                        pending = self._begin(job, plan)
                        n = 0
                        pipe = _pipeline()
                        try:
                            for runs in plan.batches:
                                firsts = plan.grid[[s for s, _ in runs]]
                                out = tile_batch(job, pending, runs, firsts, plan.scale, pipe)
                                n += out["tiles"]
                                self._account(out)
                                progress.advance(task, sum(b - a for a, b in runs))
                        finally:
                            pipe.drain()  # every shard on disk before the slide is committed
                        dt = time.perf_counter() - t1
                        self.tiling_seconds += dt
                        self._commit(job, plan, n, dt)
                    except Exception as exc:  # one bad slide must not stop the site
                        self._fail(job, exc)
                    finished += 1
                    progress.update(task, slides=f"{finished}/{len(jobs)} slides")
            finally:
                clear_caches()

    # -- dask -------------------------------------------------------------------------------------------
    def run_distributed(self, jobs: list[SlideJob], scheduler: str | None, workers: int) -> None:
        from distributed import Client, LocalCluster, as_completed

        cluster = None
        for name in ("distributed", "bokeh", "tornado"):  # cluster chatter is not the stage's log
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
        if scheduler:
            client = Client(scheduler)
        else:
            import dask

            # The workers' statistical profiler samples every thread every 10 ms: pure overhead here.
            # One in-process worker with a thread per core: JPEG decoding, pixel copies and shard writes
            # release the GIL, and tasks then cost no pickling, no inter-process round trips and no
            # scheduler process competing for the same cores (readers are thread-safe: pread + locks).
            with dask.config.set({"distributed.worker.profile.enabled": False}):
                cluster = LocalCluster(
                    n_workers=1,
                    threads_per_worker=workers,
                    processes=False,
                    dashboard_address=None,
                    silence_logs=logging.WARNING,
                )
            client = Client(cluster)
        try:
            # Import the tiling stack on every worker up front (seconds per process), not inside the
            # first tasks, so per-slide timings measure tiling.
            client.run(_warm_worker)
            self._drive(client, as_completed, jobs)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()

    def _drive(self, client: Any, as_completed: Any, jobs: list[SlideJob]) -> None:
        by_id = {j.slide_id: j for j in jobs}
        plans: dict[str, TilePlan] = {}
        remaining: dict[str, int] = {}
        tiles_done: dict[str, int] = {}
        started: dict[str, float] = {}
        t_first: float | None = None
        futures: dict[str, tuple[str, str, int]] = {}
        nthreads = max(1, sum(client.nthreads().values()))
        ac = as_completed(with_results=False)
        for job in jobs:
            fut = client.submit(plan_slide, job, self.batch_tiles, pure=False)
            futures[fut.key] = ("plan", job.slide_id, 0)
            ac.add(fut)
        finished = 0
        with self._progress as progress:
            task = progress.add_task("tile", total=0, site=jobs[0].site, slides=f"0/{len(jobs)} slides")
            for fut in ac:
                kind, sid, ntiles = futures.pop(fut.key)
                job = by_id[sid]
                if self.results.get(sid, {}).get("status") == "failed":
                    fut.release()
                    continue
                try:
                    out = fut.result()
                except Exception as exc:
                    self._fail(job, exc)
                    finished += 1
                    progress.update(task, slides=f"{finished}/{len(jobs)} slides")
                    fut.release()
                    continue
                fut.release()
                if kind == "plan":
                    plan: TilePlan = out
                    self.plan_seconds += plan.seconds
                    try:
                        pending = self._begin(job, plan)
                    except Exception as exc:
                        self._fail(job, exc)
                        finished += 1
                        continue
                    plans[sid] = plan
                    remaining[sid] = len(plan.batches)
                    tiles_done[sid] = 0
                    started[sid] = time.perf_counter()
                    t_first = t_first if t_first is not None else started[sid]
                    progress.update(task, total=(progress.tasks[0].total or 0) + len(plan.coords))
                    if not plan.batches:
                        self._commit(job, plan, 0, 0.0)
                        finished += 1
                        continue
                    groups = group_shards(len(plan.batches), nthreads)
                    remaining[sid] = len(groups)
                    for group in groups:
                        shards = [(plan.batches[i], plan.grid[[s for s, _ in plan.batches[i]]]) for i in group]
                        bf = client.submit(tile_shards, job, pending, shards, plan.scale, pure=False)
                        futures[bf.key] = ("batch", sid, sum(b - a for i in group for a, b in plan.batches[i]))
                        ac.add(bf)
                else:
                    self._account(out)
                    tiles_done[sid] += out["tiles"]
                    remaining[sid] -= 1
                    progress.advance(task, ntiles)
                    if remaining[sid] == 0:
                        try:
                            self._commit(job, plans[sid], tiles_done[sid], time.perf_counter() - started[sid])
                        except Exception as exc:
                            self._fail(job, exc)
                        finished += 1
                progress.update(task, slides=f"{finished}/{len(jobs)} slides")
        for sid, res in self.results.items():
            if res.get("status") == "failed" and sid in by_id:
                self.store.remove_slide_pending(sid)  # batches still in flight may have written chunks
        if t_first is not None:
            self.tiling_seconds = time.perf_counter() - t_first
