"""The per-site zarr store: sharded tile arrays, atomic slide commit, plain-zarr readability."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from wsi.errors import WSIError
from wsi.store import SiteStore, tiles_per_shard


def _tiles(n: int, t: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, t, t, 3), dtype=np.uint8)
    masks = (rng.random((n, t, t)) > 0.7).astype(np.uint8)
    coords = np.stack([np.arange(n) * t, np.zeros(n), np.full(n, t), np.full(n, t)], 1).astype(np.int64)
    tissue = rng.random(n).astype(np.float32)
    return images, masks, coords, tissue


def test_direct_shards_are_what_zarr_writes(tmp_path: Path) -> None:
    """The fast whole-shard writer produces byte-identical shard files to zarr's own ShardingCodec."""
    images, masks, coords, tissue = _tiles(10, 32)
    st = SiteStore.create(tmp_path / "a.zarr", site="a", target_mpp=0.5, tile_size=32, overlap=0)
    fast = st.begin_slide("fast", 10, 32, with_masks=True, shard_tiles=4)
    slow = st.begin_slide("slow", 10, 32, with_masks=True, shard_tiles=4)
    for s0 in range(0, 10, 4):  # whole shards (the last one short): the direct path
        fast.write_tiles(slice(s0, min(s0 + 4, 10)), images[s0 : s0 + 4], masks[s0 : s0 + 4])
    g = zarr.open_group(str(slow.path), mode="r+")
    g["images"][:] = images  # zarr's own codec pipeline
    g["masks"][:] = masks
    for name in ("images", "masks"):
        a_dir, b_dir = fast.path / name, slow.path / name
        files = sorted(p.name for p in a_dir.iterdir() if p.name.startswith("c"))
        assert files == sorted(p.name for p in b_dir.iterdir() if p.name.startswith("c"))
        assert len(files) == 3  # 10 tiles in shards of 4
        for f in files:
            assert (a_dir / f).read_bytes() == (b_dir / f).read_bytes(), f"{name}/{f} differs"


def test_slide_roundtrip_with_plain_zarr(tmp_path: Path) -> None:
    images, masks, coords, tissue = _tiles(7, 16, seed=1)
    path = tmp_path / "site.zarr"
    st = SiteStore.create(path, site="b", target_mpp=0.5, tile_size=16, overlap=0)
    w = st.begin_slide("s1", 7, 16, with_masks=True, shard_tiles=3, compressor={"cname": "lz4", "clevel": 1})
    w.write_index(coords, tissue)
    w.write_tiles(slice(0, 3), images[:3], masks[:3])
    w.write_tiles(slice(3, 5), images[3:5], masks[3:5])  # part of a shard: zarr's path
    w.write_tiles(slice(5, 7), images[5:7], masks[5:7])
    assert st.slides() == [] and st.pending() == ["s1"]  # not visible until committed
    st.commit_slide("s1", {"provenance": {"sha256": "x"}, "split": "val"})
    assert st.slides() == ["s1"] and st.pending() == []
    root = zarr.open_group(str(path), mode="r")
    assert root.attrs["site"] == "b" and root.attrs["tile_size"] == 16
    g = root["slides/s1"]
    assert g.attrs["complete"] is True and g.attrs["n_tiles"] == 7 and g.attrs["split"] == "val"
    np.testing.assert_array_equal(g["images"][:], images)
    np.testing.assert_array_equal(g["masks"][:], masks)
    np.testing.assert_array_equal(g["coords"][:], coords)
    np.testing.assert_allclose(g["tissue"][:], tissue)
    np.testing.assert_array_equal(g["images"][4], images[4])  # one random tile on its own
    assert st.split("s1") == "val" and st.n_tiles("s1") == 7
    assert list(st.iter_index({"val"})) == [("s1", i) for i in range(7)]
    assert list(st.iter_index({"train"})) == []
    st.set_slide_attrs("s1", {"split": "train"})
    assert st.split("s1") == "train"


def test_store_parameters_are_guarded(tmp_path: Path) -> None:
    path = tmp_path / "site.zarr"
    st = SiteStore.create(path, site="a", target_mpp=0.5, tile_size=16, overlap=0)
    w = st.begin_slide("s", 1, 16, with_masks=False)
    w.write_tiles(slice(0, 1), np.zeros((1, 16, 16, 3), np.uint8))
    st.commit_slide("s", {})
    with pytest.raises(WSIError, match="tile_size=16"):
        SiteStore.create(path, site="a", target_mpp=0.5, tile_size=32, overlap=0)
    with pytest.raises(WSIError, match="site"):
        SiteStore.create(path, site="b", target_mpp=0.5, tile_size=16, overlap=0, on_mismatch="reset")
    st2 = SiteStore.create(path, site="a", target_mpp=0.5, tile_size=32, overlap=0, on_mismatch="reset")
    assert st2.slides() == [] and st2.attrs["tile_size"] == 32


def test_tiles_per_shard_bounds_memory() -> None:
    assert tiles_per_shard(256) == 64
    assert tiles_per_shard(1024) == 5  # 16 MiB of raw pixels per shard at most
    assert tiles_per_shard(4096) == 1


def _zarr_reference(st: SiteStore, sid: str, n: int, t: int, shard: int, images: np.ndarray) -> Path:
    ref = st.begin_slide(sid, n, t, with_masks=False, shard_tiles=shard)
    zarr.open_group(str(ref.path), mode="r+")["images"][:] = images  # zarr's own codec pipeline
    return ref.path


def _same_shards(a: Path, b: Path) -> int:
    files = sorted(p.name for p in a.iterdir() if p.name.startswith("c"))
    assert files == sorted(p.name for p in b.iterdir() if p.name.startswith("c"))
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f"{f} differs"
    return len(files)


@pytest.mark.parametrize("t", [32, 64])  # 3072-byte tiles (not whole pages) and 12288-byte ones
@pytest.mark.parametrize("direct", ["1", "0"])
def test_streamed_shards_are_what_zarr_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, t: int, direct: str
) -> None:
    """Shards streamed from a page-aligned buffer while it fills (O_DIRECT in chunks, the unaligned
    rest, index and checksum at the end; or buffered with FEDPATH_DIRECT_IO=0) are byte-identical to
    zarr's, and read back with plain zarr."""
    import os

    from wsi import store as store_mod
    from wsi.store import aligned_empty

    monkeypatch.setenv("FEDPATH_DIRECT_IO", direct)
    monkeypatch.setattr(store_mod, "STREAM_CHUNK", 4096)  # several chunks per shard
    n, shard = 10, 4
    images, _, _, _ = _tiles(n, t, seed=3)
    st = SiteStore.create(tmp_path / "a.zarr", site="a", target_mpp=0.5, tile_size=t, overlap=0)
    w = st.begin_slide("fast", n, t, with_masks=False, shard_tiles=shard)
    took_direct = []
    for s0 in range(0, n, shard):
        k = min(shard, n - s0)
        buf = aligned_empty((k, t, t, 3))
        stream = w.image_stream(slice(s0, s0 + k), buf)
        assert stream is not None
        took_direct.append(stream._fd >= 0)
        for i in range(k):  # filled tile by tile, handed over as it goes
            buf[i] = images[s0 + i]
            stream.ready(i + 1)
        w.write_tiles(slice(s0, s0 + k), buf, stream=stream)
    ref = _zarr_reference(st, "ref", n, t, shard, images)
    assert _same_shards(w.path / "images", ref / "images") == 3
    np.testing.assert_array_equal(zarr.open_group(str(w.path), mode="r")["images"][:], images)
    refused = os.stat(w.path / "images").st_dev in store_mod._NO_DIRECT_DEVICES
    assert all(took_direct) == (direct == "1" and not refused)


@pytest.mark.parametrize("where", ["open", "write"])
def test_filesystem_refusing_o_direct_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A filesystem that refuses O_DIRECT (EINVAL at open, as some network filesystems do, or only at
    the first write): the shard is written buffered, identically, and the filesystem is remembered."""
    import errno
    import os

    from wsi import store as store_mod
    from wsi.store import aligned_empty

    monkeypatch.setenv("FEDPATH_DIRECT_IO", "1")
    monkeypatch.setattr(store_mod, "_NO_DIRECT_DEVICES", set())
    real_open = os.open

    def refusing_open(path, flags, *a):  # type: ignore[no-untyped-def]
        if flags & store_mod._O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    def refusing_write(fd, data, offset):  # type: ignore[no-untyped-def]
        raise OSError(errno.EINVAL, "Invalid argument")

    if where == "open":
        monkeypatch.setattr(store_mod.os, "open", refusing_open)
    else:
        monkeypatch.setattr(store_mod, "_pwrite_all", refusing_write)
    images, _, _, _ = _tiles(4, 64, seed=4)
    st = SiteStore.create(tmp_path / "a.zarr", site="a", target_mpp=0.5, tile_size=64, overlap=0)
    w = st.begin_slide("s", 4, 64, with_masks=False, shard_tiles=4)
    buf = aligned_empty((4, 64, 64, 3))
    buf[:] = images
    w.write_tiles(slice(0, 4), buf)
    assert os.stat(w.path / "images").st_dev in store_mod._NO_DIRECT_DEVICES
    monkeypatch.undo()
    ref = _zarr_reference(st, "ref", 4, 64, 4, images)
    assert _same_shards(w.path / "images", ref / "images") == 1


def test_aligned_empty_alignment() -> None:
    import mmap

    from wsi.store import aligned_empty

    small = aligned_empty((3, 5))
    big = aligned_empty((64, 256, 256, 3))
    assert small.shape == (3, 5) and small.flags.c_contiguous and small.flags.writeable
    assert small.ctypes.data % mmap.PAGESIZE == 0
    assert big.ctypes.data % (2 << 20) == 0 and big.nbytes == 64 * 256 * 256 * 3
