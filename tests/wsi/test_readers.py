"""Slide readers: real slides, tile-direct TIFF decode vs OpenSlide, read_at_mpp vs a naive oracle, bad input."""

from __future__ import annotations

import logging
import math
import pickle
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image
from skimage.transform import resize

from wsi.errors import SlideOpenError
from wsi.readers import ImageReader, OpenSlideReader, TiffSlideReader, open_slide

CMU = "slides/CMU-1-Small-Region.svs"
BREAST = "slides/CropBreastSlide.tiff"
MONUSEG = "monuseg-train/images/TCGA-B0-5710-01Z-00-DX1.tif"
GBM = "gbm40-emory/images/07.tif"


def write_pyramid(
    path: Path,
    img: np.ndarray,
    levels: int = 3,
    tile: int = 128,
    compression: str = "zlib",
    mpp=0.25,
    ome=False,
) -> None:
    """A tiled pyramidal TIFF (reduced-resolution pages, or OME SubIFDs) with resolution tags in cm."""
    kw = dict(
        tile=(tile, tile), compression=compression, photometric="rgb" if img.ndim == 3 else "minisblack"
    )
    res = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path, ome=ome) as tw:
        if ome:
            tw.write(
                img, subifds=levels - 1, metadata={"PhysicalSizeX": mpp, "PhysicalSizeY": mpp}, **res, **kw
            )
        else:
            tw.write(img, **res, **kw)
        for i in range(1, levels):
            tw.write(np.ascontiguousarray(img[:: 2**i, :: 2**i]), subfiletype=1, **kw)


@pytest.fixture
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (45, 65, 3), dtype=np.uint8)
    return np.kron(base, np.ones((20, 20, 1), dtype=np.uint8))  # 900x1300, smooth enough for JPEG too


def one_line_naming(err: pytest.ExceptionInfo, path: Path | str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(str(path)), msg


# -- real slides ----------------------------------------------------------------------------------------
def test_cmu_svs_opens_with_vendor_mpp(data_root: Path) -> None:
    with open_slide(data_root / CMU) as r:
        assert isinstance(r, OpenSlideReader)
        assert r.vendor == "aperio"
        assert r.dimensions == (2220, 2967)
        assert r.level_count == 1
        assert r.mpp == pytest.approx(0.499)
        assert r.mpp_source == "vendor"
        assert r.mpp_rejected == []


def test_crop_breast_opens_as_generic_tiff_with_six_levels(data_root: Path) -> None:
    with open_slide(data_root / BREAST, default_mpp=0.5) as r:
        assert isinstance(r, TiffSlideReader)
        assert r.vendor == "generic-tiff"
        assert r.level_count == 6
        assert r.level_dimensions == openslide.OpenSlide(str(data_root / BREAST)).level_dimensions
        assert r.level_dimensions[0] == (2033, 1525) and r.level_dimensions[-1] == (63, 47)
        assert r.level_downsamples[1] == pytest.approx(2.0011, abs=1e-3)


def test_crop_breast_bogus_mpp_rejected_with_warning(
    data_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="wsi.mpp"):
        r = open_slide(data_root / BREAST, default_mpp=0.5)
    assert r.mpp == 0.5 and r.mpp_source == "config"
    assert [(x.source, round(x.value, 2)) for x in r.mpp_rejected] == [("tiff_tags", 264.58)]
    assert any("264.6" in m and "rejected" in m for m in caplog.messages)
    # a manifest override wins over everything and is recorded as such
    assert open_slide(data_root / BREAST, mpp_override=0.46).mpp_source == "manifest"
    # no fallback at all: a clear error naming the file and what to do
    with pytest.raises(SlideOpenError, match="mpp override") as e:
        open_slide(data_root / BREAST)
    one_line_naming(e, data_root / BREAST)


def test_flat_tiles_use_image_reader(data_root: Path) -> None:
    r = open_slide(data_root / MONUSEG, mpp_override=0.2527)
    assert isinstance(r, ImageReader) and r.dimensions == (1000, 1000) and r.mpp_source == "manifest"
    ref = tifffile.imread(data_root / MONUSEG)
    np.testing.assert_array_equal(r.read_region(0, 0, 0, 1000, 1000), ref[..., :3])
    g = open_slide(data_root / GBM, default_mpp=0.25)  # 72-dpi tags rejected
    assert g.mpp_source == "config" and g.mpp_rejected[0].source == "tiff_tags"


def test_tile_direct_equals_openslide_read_region(data_root: Path) -> None:
    """The tifffile tile path decodes the same JPEG tiles OpenSlide does: pixel-equal at every level."""
    ours = open_slide(data_root / BREAST, default_mpp=0.5)
    ref = openslide.OpenSlide(str(data_root / BREAST))
    rng = np.random.default_rng(1)
    for _ in range(4):
        w, h = (int(v) for v in rng.integers(1, 300, 2))
        x0, y0 = int(rng.integers(0, 2033 - w)), int(rng.integers(0, 1525 - h))
        a = ours.read_region(x0, y0, 0, w, h)
        b = np.asarray(ref.read_region((x0, y0), 0, (w, h)))[..., :3]
        np.testing.assert_array_equal(a, b)
    # Coarser levels from the origin (elsewhere OpenSlide shifts by a sub-pixel amount because this
    # slide's downsamples are not integers, 2.0011 ..., while we read whole level pixels).
    for level in range(1, 6):
        W, H = ref.level_dimensions[level]
        np.testing.assert_array_equal(
            ours.read_region(0, 0, level, W, H), np.asarray(ref.read_region((0, 0), level, (W, H)))[..., :3]
        )
    # a whole level, and a region straddling the slide's corner (white outside, like OpenSlide's alpha=0)
    np.testing.assert_array_equal(
        ours.read_region(0, 0, 0, 2033, 1525), np.asarray(ref.read_region((0, 0), 0, (2033, 1525)))[..., :3]
    )
    edge = ours.read_region(1900, 1400, 0, 300, 200)
    np.testing.assert_array_equal(
        edge[:125, :133], np.asarray(ref.read_region((1900, 1400), 0, (133, 125)))[..., :3]
    )
    assert (edge[125:] == 255).all() and (edge[:, 133:] == 255).all()


@pytest.mark.parametrize("target", [0.8, 1.7])
def test_read_at_mpp_matches_naive_full_resolution_oracle(data_root: Path, target: float) -> None:
    """read_at_mpp vs reading level 0 in full and resizing it with skimage (anti-aliased)."""
    r = open_slide(data_root / BREAST, default_mpp=0.5)
    plan = r.plan_mpp(target)
    assert not plan.exact
    w, h, x0, y0 = 160, 120, 333, 211
    out = r.read_at_mpp(x0, y0, w, h, target)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    w0, h0 = r.footprint(w, h, target)
    assert (w0, h0) == pytest.approx((w * target / 0.5, h * target / 0.5))
    full = r.read_region(x0, y0, 0, round(w0), round(h0)).astype(np.float64)
    oracle = resize(full, (h, w), anti_aliasing=True, preserve_range=True)
    diff = np.abs(out - oracle)
    # 0.8 is resampled from level 0 (same pixels as the oracle); 1.7 from level 1, a separately
    # JPEG-compressed downsample, so it differs a little more.
    assert diff.mean() < (1.5 if plan.level == 0 else 4.0), (plan, diff.mean())
    assert np.percentile(diff, 99) < 25


def test_read_at_mpp_exact_level_and_integer_factor(data_root: Path) -> None:
    r = open_slide(data_root / BREAST, default_mpp=0.5)
    plan = r.plan_mpp(1.05)  # level 1 is 1.0006 µm/px: within the 10% tolerance, read as is
    assert plan.exact and plan.level == 1 and plan.resample_factor == 1.0
    np.testing.assert_array_equal(r.read_at_mpp(400, 300, 64, 48, 1.05), r.read_region(400, 300, 1, 64, 48))
    assert r.footprint(64, 48, 1.05) == pytest.approx(
        (64 * r.level_downsamples[1], 48 * r.level_downsamples[1])
    )
    # finer than level 0: upsampled from level 0
    up = r.plan_mpp(0.25)
    assert up.level == 0 and up.resample_factor == pytest.approx(0.5)
    assert r.read_at_mpp(0, 0, 40, 30, 0.25).shape == (30, 40, 3)
    # an integer factor on aligned coordinates is exactly the k x k block mean
    cmu = open_slide(data_root / CMU)
    full = cmu.read_region(0, 0, 0, 2220, 2967).astype(np.float64)
    for k in (2, 3):
        got = cmu.read_at_mpp(120, 80, 50, 40, 0.499 * k, tolerance=0.0)
        want = full[80 : 80 + 40 * k, 120 : 120 + 50 * k].reshape(40, k, 50, k, 3).mean(axis=(1, 3))
        assert np.abs(got - want).max() <= 0.5


def test_thumbnail_and_outside_reads(data_root: Path) -> None:
    r = open_slide(data_root / CMU)
    th = r.thumbnail(256)
    assert th.shape == (256, 192, 3)  # 2220 * 256 / 2967 = 191.5
    ref = np.asarray(openslide.OpenSlide(str(data_root / CMU)).get_thumbnail((256, 256)).convert("RGB"))
    assert abs(th.shape[1] - ref.shape[1]) <= 1
    assert abs(float(th.mean()) - float(ref.mean())) < 3
    assert (r.read_region(-500, -500, 0, 100, 100) == 255).all()
    part = r.read_region(-10, -20, 0, 30, 40)
    assert (part[:20] == 255).all() and (part[:, :10] == 255).all() and (part[20:, 10:] < 255).any()


def test_reader_pickles_by_path(data_root: Path) -> None:
    """dask ships readers to workers by pickling: the pickle must carry only how to re-open the file. The
    reconstruction is checked by calling the pickled recipe, not by unpickling anything."""
    r = open_slide(data_root / BREAST, default_mpp=0.5)
    assert len(pickle.dumps(r)) < 2048  # a path and two floats, no pixels or handles
    rebuild, args = r.__reduce__()[:2]
    r2 = rebuild(*args)
    assert type(r2) is type(r) and r2.mpp == 0.5
    np.testing.assert_array_equal(r2.read_region(10, 10, 2, 20, 20), r.read_region(10, 10, 2, 20, 20))


# -- synthetic TIFFs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ome", [False, True])
def test_pyramidal_tiff_reads_only_the_tiles_it_needs(tmp_path: Path, rgb: np.ndarray, ome: bool) -> None:
    p = tmp_path / ("p.ome.tif" if ome else "p.tif")
    write_pyramid(p, rgb, levels=3, tile=128, ome=ome, mpp=0.25)
    r = open_slide(p)
    assert isinstance(r, TiffSlideReader)
    assert r.vendor == ("ome-tiff" if ome else "generic-tiff")
    assert r.level_dimensions == ((1300, 900), (650, 450), (325, 225))
    assert r.mpp == pytest.approx(0.25) and r.mpp_source == ("vendor" if ome else "tiff_tags")
    # a region inside one tile decodes exactly one tile
    np.testing.assert_array_equal(r.read_region(130, 140, 0, 100, 100), rgb[140:240, 130:230])
    assert len(r._cache) == 1
    # a region across 2x2 tiles decodes four
    np.testing.assert_array_equal(r.read_region(300, 300, 0, 100, 100), rgb[300:400, 300:400])
    assert len(r._cache) == 5
    np.testing.assert_array_equal(r.read_region(0, 0, 2, 325, 225), rgb[::4, ::4])


def test_rgba_and_grey_tiffs_become_rgb(tmp_path: Path, rgb: np.ndarray) -> None:
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=2)
    p = tmp_path / "rgba.tif"
    tifffile.imwrite(p, rgba, tile=(256, 256), photometric="rgb", extrasamples=[2], compression="zlib")
    r = open_slide(p, default_mpp=0.5)
    np.testing.assert_array_equal(r.read_region(0, 0, 0, 300, 300), rgb[:300, :300])
    g = tmp_path / "grey.tif"
    tifffile.imwrite(g, rgb[..., 1], tile=(256, 256), photometric="minisblack")
    out = open_slide(g, default_mpp=0.5).read_region(5, 5, 0, 50, 50)
    np.testing.assert_array_equal(out, np.repeat(rgb[5:55, 5:55, 1:2], 3, axis=2))


def test_layout_tifffile_path_does_not_handle_falls_back_to_openslide(
    tmp_path: Path, rgb: np.ndarray
) -> None:
    planes = np.ascontiguousarray(np.moveaxis(rgb[:512, :512], -1, 0))
    p = tmp_path / "planar.tif"
    tifffile.imwrite(p, planes, tile=(256, 256), planarconfig="separate", photometric="rgb", compression="zlib",
                     resolution=(4e4, 4e4), resolutionunit="CENTIMETER")  # fmt: skip
    r = open_slide(p)
    assert isinstance(r, OpenSlideReader) and r.vendor == "generic-tiff" and r.mpp_source == "tiff_tags"
    np.testing.assert_array_equal(r.read_region(0, 0, 0, 512, 512), rgb[:512, :512])


def test_png_and_jpeg_tiles(tmp_path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(tmp_path / "t.png")
    Image.fromarray(rgb).save(tmp_path / "t.jpg", quality=95)
    png = open_slide(tmp_path / "t.png", mpp_override=0.5)
    assert isinstance(png, ImageReader) and png.vendor == "png"
    np.testing.assert_array_equal(png.read_region(0, 0, 0, 1300, 900), rgb)
    jpg = open_slide(tmp_path / "t.jpg", mpp_override=0.5)
    np.testing.assert_array_equal(
        jpg.read_region(0, 0, 0, 1300, 900), np.asarray(Image.open(tmp_path / "t.jpg"))
    )
    # by content, not by extension
    (tmp_path / "t.svs").write_bytes((tmp_path / "t.png").read_bytes())
    assert open_slide(tmp_path / "t.svs", mpp_override=0.5).vendor == "png"


def test_aperio_svs_with_jpeg2000_tiles(tmp_path: Path, rgb: np.ndarray) -> None:
    """An Aperio SVS whose tiles are JPEG 2000 (compression 33005) goes to OpenSlide, pixel-exact (lossless)."""
    import imagecodecs

    img = np.ascontiguousarray(rgb[:768, :1024])
    tiles = (
        imagecodecs.jpeg2k_encode(
            np.ascontiguousarray(img[y : y + 256, x : x + 256]), level=0, codecformat="j2k"
        )
        for y in range(0, 768, 256)
        for x in range(0, 1024, 256)
    )
    desc = "Aperio Image Library v12.0.15\r\n1024x768 [0,0 1024x768] (256x256) J2K/KDU Q=70|AppMag = 20|MPP = 0.4990"
    p = tmp_path / "j2k.svs"
    with tifffile.TiffWriter(p) as tw:
        tw.write(tiles, shape=img.shape, dtype=np.uint8, tile=(256, 256), compression=33005, photometric="rgb",
                 description=desc, metadata=None)  # fmt: skip
    r = open_slide(p)
    assert isinstance(r, OpenSlideReader) and r.vendor == "aperio"
    assert r.mpp == pytest.approx(0.499) and r.mpp_source == "vendor"
    np.testing.assert_array_equal(r.read_region(0, 0, 0, 1024, 768), img)
    np.testing.assert_array_equal(r.read_region(300, 200, 0, 100, 50), img[200:250, 300:400])


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [CMU, BREAST])
def test_truncated_real_slide(data_root: Path, tmp_path: Path, name: str) -> None:
    data = (data_root / name).read_bytes()
    p = tmp_path / Path(name).name
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideOpenError, match="truncated|corrupt") as e:
        open_slide(p, default_mpp=0.5)
    one_line_naming(e, p)


def test_truncated_tiff_with_leading_ifd_fails_at_open(tmp_path: Path, rgb: np.ndarray) -> None:
    p = tmp_path / "full.tif"
    write_pyramid(p, rgb, compression="jpeg")
    data = p.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: int(len(data) * 0.6)])  # the first IFD survives, its tiles do not
    with pytest.raises(SlideOpenError, match="truncated: .* ends at byte") as e:
        open_slide(cut)
    one_line_naming(e, cut)


def test_corrupt_tile_data_is_a_read_error(tmp_path: Path, rgb: np.ndarray) -> None:
    p = tmp_path / "bad.tif"
    write_pyramid(p, rgb, levels=1, compression="zlib")
    with tifffile.TiffFile(p) as tf:
        off, n = tf.pages[0].dataoffsets[0], tf.pages[0].databytecounts[0]
    data = bytearray(p.read_bytes())
    data[off : off + n] = b"\x00" * n  # the first tile's JPEG stream is gone
    p.write_bytes(bytes(data))
    r = open_slide(p)
    np.testing.assert_array_equal(
        r.read_region(500, 500, 0, 10, 10), rgb[500:510, 500:510]
    )  # other tiles fine
    with pytest.raises(SlideOpenError, match="cannot decode tile 0") as e:
        r.read_region(0, 0, 0, 10, 10)
    one_line_naming(e, p)


def test_missing_unsupported_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(SlideOpenError, match="no such file") as e:
        open_slide(tmp_path / "nope.svs")
    one_line_naming(e, tmp_path / "nope.svs")
    txt = tmp_path / "notes.tiff"
    txt.write_text("this is not an image\n")
    with pytest.raises(SlideOpenError, match="unsupported format") as e:
        open_slide(txt)
    one_line_naming(e, txt)
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(SlideOpenError, match="empty file"):
        open_slide(empty)
    bad_png = tmp_path / "bad.png"
    bad_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(SlideOpenError, match="cannot decode png") as e:
        open_slide(bad_png, mpp_override=0.5)
    one_line_naming(e, bad_png)


@pytest.mark.parametrize("level", [0, 1])
def test_read_tiles_into_equals_read_region_on_real_jpeg_tiff(data_root: Path, level: int) -> None:
    """The tiler's fast path (the slide's own JPEG tiles decoded straight into the caller's buffer) gives
    exactly the pixels of the region path, into aligned and misaligned buffers alike; reads that are not
    the file's own tiles are declined, having written nothing."""
    from wsi.store import aligned_empty

    r = open_slide(data_root / BREAST, default_mpp=0.5)
    assert isinstance(r, TiffSlideReader)
    ds = r.level_downsamples[level]
    n, t = 2, 256
    # level tiles (1, 1) and (2, 1), addressed in level-0 pixels as read_region takes them
    x0 = y0 = math.ceil(256 * ds)
    ref = r.read_region(x0, y0, level, n * t, t).reshape(t, n, t, 3).transpose(1, 0, 2, 3)
    aligned = aligned_empty((n, t, t, 3))
    raw = np.empty(n * t * t * 3 + 64, dtype=np.uint8)
    off = (16 - raw.ctypes.data) % 32  # 16 bytes off a 32-byte boundary
    misaligned = raw[off : off + n * t * t * 3].reshape(n, t, t, 3)
    for out in (aligned, misaligned):
        out[:] = 7
        assert r.read_tiles_into(x0, y0, level, n, t, out)
        np.testing.assert_array_equal(out, ref)
    untouched = np.zeros((n, t, t, 3), dtype=np.uint8)
    assert not r.read_tiles_into(x0 + 8, y0, level, n, t, untouched)  # not on the file's tile grid
    assert not r.read_tiles_into(x0, y0, level, n, 128, untouched[:, :128, :128])  # another tile size
    w = r.level_dimensions[level][0]
    assert not r.read_tiles_into(math.ceil((w // t) * t * ds), 0, level, 1, t, untouched[:1])  # past the edge
    assert not untouched.any()


def test_read_tiles_into_non_jpeg_tiles(tmp_path: Path, rgb: np.ndarray) -> None:
    """Deflate-compressed tiles take the same route through tifffile's decoder (one copy)."""
    p = tmp_path / "z.tiff"
    write_pyramid(p, rgb, levels=2, tile=128, compression="zlib")
    r = open_slide(p, default_mpp=0.25)
    out = np.empty((2, 128, 128, 3), dtype=np.uint8)
    assert r.read_tiles_into(128, 0, 0, 2, 128, out)
    np.testing.assert_array_equal(out, rgb[0:128, 128:384].reshape(128, 2, 128, 3).transpose(1, 0, 2, 3))


def test_openslide_reader_direct_tiles_equal_openslide(data_root: Path) -> None:
    """An Aperio SVS read through OpenSlide: level-0 reads on the file's own 240-px tile grid decode
    straight from the TIFF, pixel-equal to OpenSlide's read_region; other reads are declined."""
    path = data_root / "slides/CMU-1-Small-Region.svs"
    r = OpenSlideReader(path)
    ref = openslide.OpenSlide(str(path))
    out = np.zeros((3, 240, 240, 3), dtype=np.uint8)
    for cx, cy in ((0, 0), (2, 5), (6, 11)):
        assert r.read_tiles_into(cx * 240, cy * 240, 0, 3, 240, out)
        want = np.asarray(ref.read_region((cx * 240, cy * 240), 0, (720, 240)))[..., :3]
        np.testing.assert_array_equal(out, want.reshape(240, 3, 240, 3).transpose(1, 0, 2, 3))
    untouched = np.zeros((1, 256, 256, 3), dtype=np.uint8)
    assert not r.read_tiles_into(0, 0, 0, 1, 256, untouched)  # not the file's tile size
    assert not r.read_tiles_into(8, 0, 0, 1, 240, untouched[:, :240, :240].copy())  # off the grid
    assert not r.read_tiles_into(9 * 240, 0, 0, 1, 240, untouched[:, :240, :240].copy())  # past the edge
    assert not untouched.any()
    r.close()
