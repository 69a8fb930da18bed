"""A site's tile store: one zarr v3 hierarchy per institution (layout in docs/CONTRACTS.md).

Each tile is its own (inner) chunk, so a dataset can fetch one random tile without touching any other;
tiles are grouped in shard files of ``S`` tiles (one file per tiling task), and parallel writers (dask
tasks) always write whole, distinct shards. A slide is written under ``_incomplete/<id>`` and
renamed into ``slides/<id>`` only when every tile is in, so an interrupted job never leaves a slide that
looks complete.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from wsi.errors import WSIError

log = logging.getLogger(__name__)

STORE_VERSION = 1
_SLIDES = "slides"
_PENDING = "_incomplete"


def _compressor(cname: str = "lz4", clevel: int = 1) -> BloscCodec | None:
    """Blosc codec for tile arrays (``none``: raw chunks). uint8 pixels gain nothing from byte shuffling.
    Lossless codecs shrink JPEG-decoded H&E pixels by only ~4% (lz4) to ~14% (zstd) at a CPU cost close to
    (lz4) or several times (zstd) the JPEG decode itself, so image tiles default to raw chunks."""
    if cname == "none":
        return None
    return BloscCodec(cname=cname, clevel=clevel, shuffle=BloscShuffle.noshuffle)  # type: ignore[arg-type]


_MAX_U64 = 2**64 - 1
#: Upper bound on one shard's raw size: a shard is what one task holds in memory before writing it.
SHARD_BYTES = 16 * 2**20


_PAGE = mmap.PAGESIZE
_O_DIRECT = getattr(os, "O_DIRECT", 0)
#: Filesystems (by st_dev) found to refuse O_DIRECT (older tmpfs, some network filesystems): written buffered.
_NO_DIRECT_DEVICES: set[int] = set()
_NO_DIRECT_LOCK = threading.Lock()
#: Bytes of a shard handed to the I/O thread at a time (whole pages).
STREAM_CHUNK = 1 << 20


def direct_io_enabled() -> bool:
    """Whether raw shards are written with O_DIRECT (Linux; ``FEDPATH_DIRECT_IO=0`` turns it off)."""
    return bool(_O_DIRECT) and os.environ.get("FEDPATH_DIRECT_IO", "1") not in ("0", "false", "no")


_HUGE = 2 << 20


def aligned_empty(shape: tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
    """An uninitialised C-contiguous array whose data start on a page boundary, as O_DIRECT writes
    need; from 2 MB on, on a 2 MB boundary inside a numpy allocation (which numpy advises as transparent
    huge pages): fewer page faults and TLB misses for the decoder, and far fewer pages for the kernel to
    pin per O_DIRECT write."""
    count = int(np.prod(shape))
    nbytes = max(count * np.dtype(dtype).itemsize, 1)
    align = _HUGE if nbytes >= _HUGE else _PAGE
    base = np.empty(nbytes + align, dtype=np.uint8)
    skip = (-base.ctypes.data) % align
    return base[skip : skip + count * np.dtype(dtype).itemsize].view(dtype).reshape(shape)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data.nbytes:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


_IO_POOL: ThreadPoolExecutor | None = None


def _forget_io_pool() -> None:
    """In a forked child the parent's I/O threads do not exist: start a fresh pool there."""
    global _IO_POOL, _NO_DIRECT_LOCK
    _IO_POOL = None
    _NO_DIRECT_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_io_pool)


def _io_pool() -> ThreadPoolExecutor:
    global _IO_POOL
    with _NO_DIRECT_LOCK:
        if _IO_POOL is None:
            _IO_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fedpath-shard-io")
        return _IO_POOL


class ShardStream:
    """One raw shard file written while its tiles are still being decoded.

    The caller fills ``tiles`` (C-contiguous, in a page-aligned buffer: its bytes are the shard's data
    section as they are) in order and calls :meth:`ready` as tiles become final; every
    :data:`STREAM_CHUNK` bytes are handed to an I/O thread that writes them with O_DIRECT, so the disk
    write overlaps decoding the next tiles and the pixels are never copied into (and allocated in) the
    page cache, which on a VM costs more CPU than decoding the JPEG tiles. :meth:`finish` writes the rest,
    the index and its checksum and waits: the shard is complete when it returns. Where the filesystem
    refuses O_DIRECT (older tmpfs, some network filesystems) or ``FEDPATH_DIRECT_IO=0``, :meth:`finish` writes
    the file buffered instead. The buffer must not be reused before :meth:`finish` or :meth:`abandon`.

    ``data``: a page-aligned flat uint8 buffer whose bytes ``[lead, lead + tiles.nbytes)`` are ``tiles``
    (``lead`` < one page). The shard's data section then starts with ``lead`` zero bytes, which the
    shard index skips (the sharding spec lets inner chunks sit anywhere in the shard): this lets tiles
    sit 16 bytes off a 32-byte boundary in memory, where the JPEG decoder writes them fastest, and still
    go to disk with O_DIRECT.
    """

    def __init__(self, path: Path, tiles: np.ndarray, data: np.ndarray | None = None) -> None:
        self.path = path
        self.lead = 0
        aligned_at = tiles.ctypes.data if tiles.size else 0
        if data is not None and tiles.size and data.dtype == np.uint8 and data.ndim == 1:
            lead = tiles.ctypes.data - data.ctypes.data
            if 0 <= lead < _PAGE and data.size >= lead + tiles.nbytes and tiles.flags.c_contiguous:
                self.lead = lead
                data[:lead] = 0
                aligned_at = data.ctypes.data
                self._payload = data[: lead + tiles.nbytes].data
        if not self.lead:
            self._payload = tiles.reshape(-1).data.cast("B") if tiles.size else memoryview(b"")
        self._tile_nbytes = int(tiles[0].nbytes) if len(tiles) else 0
        self._flushed = 0
        self._futures: list[Future[None]] = []
        self._fd = -1
        self._dev = os.stat(path.parent).st_dev
        if (
            direct_io_enabled()
            and tiles.flags.c_contiguous
            and aligned_at % _PAGE == 0
            and self._dev not in _NO_DIRECT_DEVICES
        ):
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_DIRECT, 0o644)
            except OSError:
                self._refuse()

    def _refuse(self) -> None:
        with _NO_DIRECT_LOCK:
            _NO_DIRECT_DEVICES.add(self._dev)
        log.debug("%s: filesystem refuses O_DIRECT, shards are written buffered", self.path.parent)

    def ready(self, n_tiles: int) -> None:
        """Tiles ``[0, n_tiles)`` are final: start writing the page-aligned part not yet written."""
        if self._fd < 0:
            return
        end = ((self.lead + n_tiles * self._tile_nbytes) // _PAGE) * _PAGE
        if end - self._flushed >= STREAM_CHUNK:
            self._futures.append(
                _io_pool().submit(_pwrite_all, self._fd, self._payload[self._flushed : end], self._flushed)
            )
            self._flushed = end

    def _wait(self) -> BaseException | None:
        err: BaseException | None = None
        for f in self._futures:
            e = f.exception()
            err = err or e
        self._futures.clear()
        return err

    def finish(self, tail: list[bytes]) -> None:
        """Write the rest of the data, then ``tail`` (index and checksum); return once all is written."""
        err = self._wait()
        if self._fd >= 0 and err is None:
            left = self._payload[self._flushed :]
            rest = left.nbytes + sum(len(t) for t in tail)
            bounce = aligned_empty((-(-rest // _PAGE) * _PAGE,))  # whole pages; truncated after
            pos = left.nbytes
            bounce[:pos] = np.frombuffer(left, dtype=np.uint8)
            for t in tail:
                bounce[pos : pos + len(t)] = np.frombuffer(t, dtype=np.uint8)
                pos += len(t)
            try:
                _pwrite_all(self._fd, bounce.data, self._flushed)
                os.ftruncate(self._fd, self._flushed + rest)
            except OSError as e:
                err = e
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if err is None:
                return
            if not (isinstance(err, OSError) and err.errno == errno.EINVAL):
                raise err
            self._refuse()  # O_DIRECT accepted at open but not for these writes: write it buffered
        with open(self.path, "wb") as f:
            f.write(self._payload)
            f.writelines(tail)

    def finish_async(self, tail: list[bytes]) -> Future[None]:
        """:meth:`finish` on an I/O thread: the caller goes on decoding the next shard (into another
        buffer) and must wait for the returned future before it reuses this buffer or reports the shard
        written. (The chunk writes queued before it run first, so it never waits on a queued task.)"""
        return _io_pool().submit(self.finish, tail)

    def abandon(self) -> None:
        """Wait for the writes in flight (the buffer is then free) and close; the file is left partial."""
        self._wait()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def tiles_per_shard(tile_size: int, wanted: int = 64) -> int:
    """Tiles per shard (and per tiling task): ``wanted``, fewer for large tiles (<= SHARD_BYTES raw)."""
    return int(max(1, min(wanted, SHARD_BYTES // (tile_size * tile_size * 3))))


class _DirectShards:
    """Writes whole shards of a local zarr v3 array straight to their files.

    Tile arrays are sharded: a shard of ``S`` tiles is one file holding ``S`` one-tile inner chunks and
    an index, so a slide is hundreds of files rather than a file per tile, and one tile still reads on
    its own (index + one byte range). Through zarr's async codec pipeline a shard costs ~2 ms per tile
    here, more than decoding the source JPEG tile; for the layout :meth:`SiteStore.begin_slide` creates
    (local store; sharding codec with one-tile inner chunks, ``bytes`` and optional ``blosc`` inner codecs,
    the default ``bytes`` + ``crc32c`` index at the end) the shard is assembled here exactly as zarr's
    ShardingCodec does: inner chunks encoded by numcodecs' Blosc (what zarr's BloscCodec calls), then the
    (offset, nbytes) uint64 index with its crc32c (google_crc32c, as zarr's Crc32cCodec). The tests read
    the result back with plain zarr; any other layout falls back to zarr's ``__setitem__``.
    """

    def __init__(self, arr: zarr.Array) -> None:
        from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

        self.ok = False
        self._blosc: Any = None
        md = arr.metadata
        store = arr.store
        root = getattr(store, "root", None)
        codecs = list(getattr(md, "codecs", ()))
        if root is None or type(store).__name__ != "LocalStore" or len(codecs) != 1:
            return
        sh = codecs[0]
        if not isinstance(sh, ShardingCodec) or sh.index_location.value != "end":
            return
        if tuple(sh.chunk_shape) != (1, *arr.shape[1:]):
            return
        if [type(c) for c in sh.index_codecs] != [BytesCodec, Crc32cCodec]:
            return
        inner = list(sh.codecs)
        if not inner or not isinstance(inner[0], BytesCodec):
            return
        if (
            len(inner) == 2
            and isinstance(inner[1], BloscCodec)
            and inner[1].shuffle == BloscShuffle.noshuffle
        ):
            import numcodecs

            b = inner[1]
            self._blosc = numcodecs.Blosc(
                cname=b.cname.value, clevel=int(b.clevel), shuffle=numcodecs.Blosc.NOSHUFFLE, blocksize=0
            )
        elif len(inner) != 1:
            return
        self.shard_len = int(md.chunk_grid.chunk_shape[0])  # type: ignore[attr-defined]
        self._dir = Path(root) / arr.path
        self._md = md
        self._zeros = (0,) * (len(arr.shape) - 1)
        self.ok = True

    def _path(self, shard: int) -> Path:
        path = self._dir / self._md.encode_chunk_key((shard, *self._zeros))
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _tail(self, lengths: list[int], start: int = 0) -> list[bytes]:
        """The shard index (offset, nbytes per inner chunk, the first at byte ``start``; empty ones all
        ones) and its crc32c."""
        import google_crc32c

        index = np.full((self.shard_len, 2), _MAX_U64, dtype="<u8")
        if lengths:
            n = np.asarray(lengths, dtype="<u8")
            index[: len(n), 0] = np.cumsum(n) - n + np.uint64(start)
            index[: len(n), 1] = n
        ib = index.tobytes()
        return [ib, np.uint32(google_crc32c.value(ib)).tobytes()]

    def open_stream(self, shard: int, tiles: np.ndarray, data: np.ndarray | None = None) -> ShardStream | None:
        """A :class:`ShardStream` for raw (uncompressed) shards; None when tiles are compressed."""
        if self._blosc is not None:
            return None
        return ShardStream(self._path(shard), tiles, data)

    def finish_stream(self, stream: ShardStream, tiles: np.ndarray, wait: bool = True) -> Future[None] | None:
        tail = self._tail([int(tiles[0].nbytes)] * len(tiles) if len(tiles) else [], stream.lead)
        if wait:
            stream.finish(tail)
            return None
        return stream.finish_async(tail)

    def write(self, shard: int, tiles: np.ndarray) -> None:
        """Write shard ``shard`` holding ``tiles`` (its first ``len(tiles)`` tiles; the rest stay empty)."""
        stream = self.open_stream(shard, tiles)
        if stream is not None:
            stream.ready(len(tiles))
            self.finish_stream(stream, tiles)
            return
        parts: list[Any] = [self._blosc.encode(np.ascontiguousarray(t)) for t in tiles]
        tail = self._tail([len(p) for p in parts])
        with open(self._path(shard), "wb") as f:
            f.writelines([*parts, *tail])


class SlideWriter:
    """Arrays of one slide being written; tiles may be written by index from any process."""

    def __init__(self, group_path: Path) -> None:
        self.path = Path(group_path)
        self._g: Any = None
        self._direct: dict[str, _DirectShards] = {}
        self._arrays: dict[str, Any] = {}

    def _direct_shard(self, name: str, index: slice, n_values: int) -> tuple[Any, _DirectShards, int | None]:
        """(array, its direct shard writer, the shard that ``index`` is exactly, or None)."""
        # The array handle is looked up once: each lookup reads its metadata through zarr's event loop.
        arr: Any = self._arrays.get(name)
        if arr is None:
            arr = self._arrays[name] = self._group()[name]
        d = self._direct.get(name)
        if d is None:
            d = self._direct[name] = _DirectShards(arr)
        start, stop, step = index.indices(arr.shape[0])
        whole = d.ok and step == 1 and start % d.shard_len == 0 and stop - start == n_values
        if whole and (stop - start == d.shard_len or stop == arr.shape[0]):
            return arr, d, start // d.shard_len
        return arr, d, None

    def _put(self, name: str, index: slice, values: np.ndarray) -> None:
        arr, d, shard = self._direct_shard(name, index, len(values))
        if shard is not None:
            d.write(shard, values)
        else:
            arr[index] = values

    def image_stream(
        self, index: slice, images: np.ndarray, data: np.ndarray | None = None
    ) -> ShardStream | None:
        """Start writing tiles ``index`` (exactly one shard) from ``images`` while the caller is still
        filling it: call ``stream.ready(k)`` as tiles become final, then :meth:`write_tiles` with
        ``stream=``. None where the layout has no streaming path (compressed tiles, not one shard)."""
        _, d, shard = self._direct_shard("images", index, len(images))
        return d.open_stream(shard, images, data) if shard is not None else None

    @property
    def shard_len(self) -> int:
        """Tiles per shard: writes of whole shards (``write_tiles`` at multiples of it) are the fast path."""
        return int(self._group()["images"].shards[0])

    def _group(self) -> Any:
        if self._g is None:
            self._g = zarr.open_group(str(self.path), mode="r+")
        return self._g

    def write_index(self, coords: np.ndarray, tissue: np.ndarray) -> None:
        """Write every tile's coordinates and tissue fraction at once (done by the driver, so the
        single-chunk index arrays never see concurrent writers)."""
        g = self._group()
        if len(coords):
            g["coords"][:] = np.asarray(coords, dtype=np.int64)
            g["tissue"][:] = np.asarray(tissue, dtype=np.float32)

    def write_tiles(
        self,
        index: slice,
        images: np.ndarray,
        masks: np.ndarray | None = None,
        stream: ShardStream | None = None,
        wait: bool = True,
    ) -> Future[None] | None:
        """Write the pixels (and masks) of tiles ``index`` (``stream``: the :meth:`image_stream` the
        pixels were streamed through; with ``wait=False`` its last writes go on in the background and the
        future to wait for is returned). Parallel writers must write whole shards (see
        :attr:`shard_len`): two writers of one shard would overwrite each other's tiles."""
        pending = None
        if stream is not None:
            pending = self._direct["images"].finish_stream(stream, images, wait=wait)
        else:
            self._put("images", index, images)
        if masks is not None:
            if "masks" not in self._arrays and "masks" not in self._group():
                raise WSIError(f"{self.path}: slide was created without masks")
            self._put("masks", index, masks)
        return pending

    def write(
        self,
        index: int | slice,
        images: np.ndarray,
        coords: np.ndarray,
        tissue: np.ndarray,
        masks: np.ndarray | None = None,
    ) -> None:
        """Write tile ``index`` (or a contiguous slice of tiles) of this slide."""
        g = self._group()
        if isinstance(index, int):
            index = slice(index, index + 1)
            images, coords, tissue = images[None], np.asarray(coords)[None], np.atleast_1d(tissue)
            masks = None if masks is None else masks[None]
        g["images"][index] = images
        g["coords"][index] = coords
        g["tissue"][index] = tissue
        if masks is not None:
            if "masks" not in g:
                raise WSIError(f"{self.path}: slide was created without masks")
            g["masks"][index] = masks


class SiteStore:
    """Read and write access to ``sites/<site>/store.zarr``."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    # ---------------------------------------------------------------- creation
    @classmethod
    def create(
        cls,
        path: Path | str,
        *,
        site: str,
        target_mpp: float,
        tile_size: int,
        overlap: int,
        on_mismatch: str = "raise",
    ) -> SiteStore:
        """Open the store for writing, creating it if needed.

        A store tiled with another site, target MPP, tile size or overlap is refused
        (``on_mismatch="raise"``) or, with ``"reset"``, emptied of its slides (they are all stale and
        would be retiled anyway; mixing tile sizes in one store would break its readers)."""
        path = Path(path)
        attrs = {
            "fedpath_store_version": STORE_VERSION,
            "site": site,
            "target_mpp": float(target_mpp),
            "tile_size": int(tile_size),
            "overlap": int(overlap),
        }
        if (path / "zarr.json").exists():
            root: Any = zarr.open_group(str(path), mode="r+")
            old = dict(root.attrs)
            for key in ("site", "target_mpp", "tile_size", "overlap"):
                if key in old and old[key] != attrs[key]:
                    if on_mismatch != "reset" or key == "site":
                        raise WSIError(
                            f"{path}: store was tiled with {key}={old[key]!r}, not {attrs[key]!r}; "
                            "use a new run directory or delete the store"
                        )
                    log.warning(
                        "%s: store was tiled with %s=%r, now %r: removing its slides to retile them",
                        path,
                        key,
                        old[key],
                        attrs[key],
                    )
                    for base in (_SLIDES, _PENDING):
                        if (path / base).exists():
                            shutil.rmtree(path / base)
                    break
            root.attrs.update(attrs)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            root = zarr.open_group(str(path), mode="a", zarr_format=3)
            root.attrs.update(attrs)
        root.require_group(_SLIDES)
        root.require_group(_PENDING)
        return cls(path)

    def begin_slide(
        self,
        slide_id: str,
        n_tiles: int,
        tile_size: int,
        with_masks: bool,
        compressor_level: int = 1,
        compressor: dict[str, Any] | None = None,
        shard_tiles: int | None = None,
    ) -> SlideWriter:
        """Create (or recreate) the pending arrays of one slide (``compressor``: blosc ``cname``/``clevel``;
        ``shard_tiles``: tiles per shard file, default :func:`tiles_per_shard`)."""
        pending = self.path / _PENDING / slide_id
        if pending.exists():
            shutil.rmtree(pending)
        g: Any = zarr.open_group(str(self.path), mode="r+")[_PENDING].create_group(slide_id)  # type: ignore[union-attr]
        n = max(int(n_tiles), 0)
        t = int(tile_size)
        spec = {"cname": "none", "clevel": compressor_level, **(compressor or {})}
        comp = _compressor(str(spec["cname"]), int(spec["clevel"]))
        flat: Any = {"name": "default", "separator": "."}  # shard files side by side: no directory per shard
        S = int(shard_tiles or tiles_per_shard(t))
        g.create_array(
            "images",
            shape=(n, t, t, 3),
            shards=(S, t, t, 3),
            chunks=(1, t, t, 3),
            dtype="uint8",
            compressors=comp,
            fill_value=255,
            chunk_key_encoding=flat,
        )
        g.create_array("coords", shape=(n, 4), chunks=(max(n, 1), 4), dtype="int64")
        g.create_array("tissue", shape=(n,), chunks=(max(n, 1),), dtype="float32")
        if with_masks:
            g.create_array(
                "masks",
                shape=(n, t, t),
                shards=(S, t, t),
                chunks=(1, t, t),
                dtype="uint8",
                compressors=_compressor("lz4", 1),  # 0/1 masks shrink ~30x for almost no CPU
                chunk_key_encoding=flat,
            )
        return SlideWriter(pending)

    def commit_slide(self, slide_id: str, attrs: dict[str, Any]) -> None:
        """Mark a pending slide complete and move it into ``slides/`` in one rename."""
        pending = self.path / _PENDING / slide_id
        g: Any = zarr.open_group(str(pending), mode="r+")
        g.attrs.update({**attrs, "n_tiles": int(g["images"].shape[0]), "complete": True})
        final = self.path / _SLIDES / slide_id
        if final.exists():
            shutil.rmtree(final)
        os.replace(pending, final)

    def set_slide_attrs(self, slide_id: str, attrs: dict[str, Any]) -> None:
        """Update attributes of a complete slide (e.g. its split) without retiling it."""
        p = self.path / _SLIDES / slide_id
        zarr.open_group(str(p), mode="r+").attrs.update(attrs)

    def remove_slide_pending(self, slide_id: str) -> None:
        """Drop the half-written copy of a slide, if any (a complete one stays)."""
        p = self.path / _PENDING / slide_id
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)

    def remove_slide(self, slide_id: str) -> None:
        for base in (_SLIDES, _PENDING):
            p = self.path / base / slide_id
            if p.exists():
                shutil.rmtree(p)

    # ---------------------------------------------------------------- reading
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(zarr.open_group(str(self.path), mode="r").attrs)

    def exists(self) -> bool:
        return (self.path / "zarr.json").exists()

    def slides(self) -> list[str]:
        """Ids of complete slides, sorted."""
        base = self.path / _SLIDES
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / "zarr.json").exists())

    def pending(self) -> list[str]:
        base = self.path / _PENDING
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def _slide(self, slide_id: str) -> Any:
        p = self.path / _SLIDES / slide_id
        if not (p / "zarr.json").exists():
            raise WSIError(f"{self.path}: no complete slide {slide_id!r}")
        return zarr.open_group(str(p), mode="r")

    def slide_attrs(self, slide_id: str) -> dict[str, Any]:
        return dict(self._slide(slide_id).attrs)

    def images(self, slide_id: str) -> zarr.Array:
        return self._slide(slide_id)["images"]  # type: ignore[return-value]

    def masks(self, slide_id: str) -> zarr.Array | None:
        g = self._slide(slide_id)
        return g["masks"] if "masks" in g else None  # type: ignore[return-value]

    def coords(self, slide_id: str) -> np.ndarray:
        return np.asarray(self._slide(slide_id)["coords"][:])

    def tissue(self, slide_id: str) -> np.ndarray:
        return np.asarray(self._slide(slide_id)["tissue"][:])

    def split(self, slide_id: str) -> str:
        return str(self.slide_attrs(slide_id).get("split", "train"))

    def n_tiles(self, slide_id: str) -> int:
        return int(self.slide_attrs(slide_id).get("n_tiles", 0))

    def iter_index(self, splits: set[str] | None = None) -> Iterator[tuple[str, int]]:
        """(slide_id, tile_index) for every tile of complete slides, optionally of some splits only."""
        for sid in self.slides():
            if splits is not None and self.split(sid) not in splits:
                continue
            for i in range(self.n_tiles(sid)):
                yield sid, i
