"""Tiling slides into a site's zarr store: grids, MPP fallbacks, masks, bad input, memory, resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import zarr
from PIL import Image
from skimage.transform import resize

from wsi.config import SynthConfig, TilingConfig, TissueConfig
from wsi.manifest import ManifestRow, make_row, read_manifest, write_manifest
from wsi.readers import open_slide
from wsi.store import SiteStore
from wsi.synth import SlideScene, run_synth
from wsi.tiling import grid_origins, run_tile_site
from wsi.tissue import detect_tissue

REPO = Path(__file__).resolve().parents[2]


def _tile(manifest: Path, root: Path, store: Path, site: str, **kw: object) -> dict:
    cfg = TilingConfig(**kw)  # type: ignore[arg-type]
    return run_tile_site(manifest, root, store, cfg, site, store.parent, None, 1)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(sites=["a"], slides_per_site=2, held_out_slides=0, width=1280, height=1024, seed=5)
    run_synth(cfg, out)
    return out


# ------------------------------------------------------------------------------------------------------
# Synthetic slides against their ground truth
# ------------------------------------------------------------------------------------------------------
def test_synthetic_tiles_match_the_scene(synth_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "a.zarr"
    res = _tile(synth_root / "manifests" / "a.csv", synth_root, store, "a", tile_size=128)
    assert res["failed"] == [] and sorted(res["slides_done"]) == ["a_000", "a_001"]
    st = SiteStore(store)
    for sid in st.slides():
        idx = int(sid[-1])
        scene = SlideScene("a", idx, 1280, 1024, 0.5, 5, tissue_fraction=0.5)
        rgb, truth = scene.render(1, 0, 0, 1280, 1024, want_mask=True)
        level0 = tifffile.imread(synth_root / "slides" / f"{sid}.tiff", key=0)
        coords, images, masks = st.coords(sid), st.images(sid)[:], st.masks(sid)
        assert masks is not None
        masks = masks[:]
        # grid: 128-px tiles at level 0 (the slide is 0.5 µm/px), whole slide covered by 10 x 8 candidates
        assert (coords[:, :2] % 128 == 0).all() and (coords[:, 2:] == 128).all()
        prov = st.slide_attrs(sid)["provenance"]
        assert prov["grid"] == [10, 8] and prov["level"] == 0 and prov["resample_factor"] == 1.0
        # tile count vs tissue: the scene's true tissue fraction decides, up to the low-res boundary
        alpha = (rgb.min(axis=2) < 225).astype(float)
        kept = {(int(x), int(y)) for x, y, _, _ in coords}
        for gy in range(8):
            for gx in range(10):
                frac = alpha[gy * 128 : (gy + 1) * 128, gx * 128 : (gx + 1) * 128].mean()
                if frac > 0.8:
                    assert (gx * 128, gy * 128) in kept, f"{sid}: tissue tile {gx},{gy} dropped"
                if frac < 0.2:
                    assert (gx * 128, gy * 128) not in kept, f"{sid}: glass tile {gx},{gy} kept"
        for i, (x, y, w, h) in enumerate(coords):
            np.testing.assert_array_equal(images[i], level0[y : y + h, x : x + w])
            np.testing.assert_array_equal(masks[i], truth[y : y + h, x : x + w])  # exact synth mask
        assert st.split(sid) == "train"


def test_synthetic_at_coarser_mpp_uses_the_pyramid(synth_root: Path, tmp_path: Path) -> None:
    mf = synth_root / "manifests" / "a.csv"
    st = SiteStore(tmp_path / "a1.zarr")
    _tile(mf, synth_root, st.path, "a", tile_size=128, target_mpp=1.0)
    mask0 = tifffile.imread(synth_root / "masks" / "a_000_mask.tiff") > 0
    prov = st.slide_attrs("a_000")["provenance"]
    assert prov["level"] == 1 and not prov["resampled"] and prov["effective_mpp"] == 1.0
    coords, masks = st.coords("a_000"), st.masks("a_000")
    assert masks is not None and len(coords) > 0
    assert (coords[:, :2] % 256 == 0).all() and (coords[:, 2:] == 256).all()
    for i, (x, y, w, h) in enumerate(coords):
        # masks are sampled at the output pixel centres: level-0 pixel (x + 2j + 1, y + 2i + 1)
        np.testing.assert_array_equal(masks[i], mask0[y + 1 : y + h : 2, x + 1 : x + w : 2])
    # 0.7 µm/px matches no level: level 0 resampled by 1.4
    st7 = SiteStore(tmp_path / "a7.zarr")
    _tile(mf, synth_root, st7.path, "a", tile_size=128, target_mpp=0.7)
    p7 = st7.slide_attrs("a_000")["provenance"]
    assert p7["resampled"] and p7["level"] == 0 and p7["resample_factor"] == pytest.approx(1.4)
    assert p7["grid"] == list(grid_origins(1280, 1024, 1.4, 128, 0))
    c7 = st7.coords("a_000")
    assert (c7[:, 2] == round(128 * 1.4)).all()


def test_store_opens_with_plain_zarr(synth_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "a.zarr"
    _tile(synth_root / "manifests" / "a.csv", synth_root, store, "a", tile_size=128, overlap=32)
    root = zarr.open_group(str(store), mode="r")
    want = {"site": "a", "tile_size": 128, "overlap": 32, "target_mpp": 0.5}
    assert {k: root.attrs[k] for k in want} == want
    g = root["slides"]["a_001"]
    n = g.attrs["n_tiles"]
    assert g["images"].shape == (n, 128, 128, 3) and g["masks"].shape == (n, 128, 128)
    assert g["coords"].shape == (n, 4) and g["tissue"].shape == (n,)
    prov = g.attrs["provenance"]
    for key in (
        "source_path",
        "sha256",
        "reader",
        "source_mpp",
        "mpp_source",
        "level",
        "resample_factor",
        "target_mpp",
        "tile_size",
        "overlap",
        "tissue_params",
        "fedpath_version",
    ):
        assert key in prov, key
    assert prov["source_path"] == "slides/a_001.tiff" and prov["overlap"] == 32
    c = g["coords"][:]
    steps = np.diff(np.unique(c[:, 0]))
    assert (steps % 96 == 0).all()  # stride = tile_size - overlap
    t = g["images"][n // 2]  # one tile on its own
    full = tifffile.imread(synth_root / "slides" / "a_001.tiff", key=0)
    x, y, w, h = c[n // 2]
    np.testing.assert_array_equal(t, full[y : y + h, x : x + w])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tile"]["a"]["tiles"] == sum(
        int(root["slides"][s].attrs["n_tiles"]) for s in ("a_000", "a_001")
    )


# ------------------------------------------------------------------------------------------------------
# Real data
# ------------------------------------------------------------------------------------------------------
def _expected(
    reader_path: Path, target: float, tile: int, tol: float, min_frac: float, **kw: object
) -> tuple:
    """The grid and kept tiles computed independently of wsi.tiling (oracle for counts and coords)."""
    r = open_slide(reader_path, **kw)  # type: ignore[arg-type]
    scale = r.footprint(1, 1, target, tol)[0]
    W, H = r.dimensions
    nx = 1 if W / scale <= tile else math.ceil((W / scale - tile) / tile) + 1
    ny = 1 if H / scale <= tile else math.ceil((H / scale - tile) / tile) + 1
    tm = detect_tissue(r, TissueConfig())
    boxes = [
        (gx * tile * scale, gy * tile * scale, tile * scale, tile * scale)
        for gy in range(ny)
        for gx in range(nx)
    ]
    frac = tm.fractions(np.array(boxes))
    kept = [b for b, f in zip(boxes, frac, strict=True) if f >= min_frac and f > 0]
    return r, scale, (nx, ny), kept


@pytest.mark.realdata
@pytest.mark.parametrize(("target", "level", "resampled"), [(0.5, 0, False), (1.0, 0, True)])
def test_cmu1_svs_two_mpps(
    data_root: Path, tmp_path: Path, target: float, level: int, resampled: bool
) -> None:
    slide = data_root / "slides" / "CMU-1-Small-Region.svs"
    row = make_row(data_root, "real", slide, split="test")
    mf = write_manifest([row], tmp_path / "m.csv")
    st = SiteStore(tmp_path / "s.zarr")
    res = _tile(mf, data_root, st.path, "real", tile_size=256, target_mpp=target, min_tissue_fraction=0.25)
    assert res["failed"] == []
    sid = "CMU-1-Small-Region"
    prov = st.slide_attrs(sid)["provenance"]
    assert prov["reader"] == "openslide" and prov["mpp_source"] == "vendor"
    assert prov["source_mpp"] == pytest.approx(0.499)
    assert prov["level"] == level and prov["resampled"] is resampled
    r, scale, grid, kept = _expected(slide, target, 256, 0.1, 0.25)
    assert prov["grid"] == list(grid)
    coords = st.coords(sid)
    assert len(coords) == len(kept) > 5
    np.testing.assert_array_equal(coords, np.rint(np.array(kept)).astype(np.int64))
    osr = openslide.OpenSlide(str(slide))
    x, y, w, h = (int(v) for v in coords[len(coords) // 2])
    tile = st.images(sid)[len(coords) // 2]
    ref = np.asarray(osr.read_region((x, y), 0, (w, h)).convert("RGB"))
    if not resampled:
        np.testing.assert_array_equal(tile, ref)
    else:  # 2.004x down: skimage's anti-aliased resize of the level-0 footprint is the oracle
        small = resize(ref, (256, 256, 3), anti_aliasing=True, preserve_range=True)
        err = np.abs(tile.astype(float) - small).mean()
        shifted = np.asarray(osr.read_region((x + 24, y + 24), 0, (w, h)).convert("RGB"))
        err_shifted = np.abs(tile.astype(float) - resize(shifted, (256, 256, 3), preserve_range=True)).mean()
        assert err < 7 and err_shifted > 2 * err  # sub-pixel resampling differences only


@pytest.mark.realdata
def test_crop_breast_bogus_mpp_falls_back(data_root: Path, tmp_path: Path) -> None:
    slide = data_root / "slides" / "CropBreastSlide.tiff"
    mf = write_manifest([make_row(data_root, "real", slide, split="test")], tmp_path / "m.csv")
    # no override and no default: the 96-dpi tag is rejected and nothing else is left
    res = _tile(mf, data_root, tmp_path / "none.zarr", "real", tile_size=128)
    assert len(res["failed"]) == 1 and "MPP" in res["failed"][0]["reason"]
    assert "CropBreastSlide.tiff" in res["failed"][0]["reason"]
    for target, level in ((0.5, 0), (2.0, 2)):
        st = SiteStore(tmp_path / f"t{target}.zarr")
        res = _tile(mf, data_root, st.path, "real", tile_size=128, target_mpp=target, default_mpp=0.5)
        assert res["failed"] == []
        prov = st.slide_attrs("CropBreastSlide")["provenance"]
        assert prov["mpp_source"] == "config" and prov["source_mpp"] == 0.5
        assert prov["mpp_rejected"][0]["source"] == "tiff_tags"
        assert prov["mpp_rejected"][0]["value"] == pytest.approx(264.58, abs=0.01)
        assert prov["level"] == level and not prov["resampled"]
        _, scale, grid, kept = _expected(slide, target, 128, 0.1, 0.25, default_mpp=0.5)
        assert prov["grid"] == list(grid) and len(st.coords("CropBreastSlide")) == len(kept) > 0
    # a manifest override wins over the config default
    over = ManifestRow(**{**read_manifest(mf)[0].__dict__, "mpp": 0.25})
    mf2 = write_manifest([over], tmp_path / "m2.csv")
    st = SiteStore(tmp_path / "over.zarr")
    _tile(mf2, data_root, st.path, "real", tile_size=128, target_mpp=0.5, default_mpp=0.5)
    prov = st.slide_attrs("CropBreastSlide")["provenance"]
    assert prov["mpp_source"] == "manifest" and prov["level"] == 1


@pytest.mark.realdata
def test_monuseg_xml_and_png_masks_agree(data_root: Path, repo_root: Path, tmp_path: Path) -> None:
    rows = read_manifest(repo_root / "data_manifests" / "monuseg_breast_gi.csv")
    xml_dir = data_root / "monuseg-train" / "annotations_xml"
    with_xml = [
        r
        for r in rows
        if (xml_dir / f"{r.slide_id}.xml.gz").exists() or (xml_dir / f"{r.slide_id}.xml").exists()
    ]
    row = (with_xml or rows)[0]
    png_mf = write_manifest([row], tmp_path / "png.csv")
    st_png = SiteStore(tmp_path / "png.zarr")
    res = _tile(png_mf, data_root, st_png.path, row.site, tile_size=128, min_tissue_fraction=0.0)
    assert res["failed"] == []
    prov = st_png.slide_attrs(row.slide_id)["provenance"]
    assert prov["mpp_source"] == "manifest" and prov["resampled"]  # 0.2527 -> 0.5
    coords, masks = st_png.coords(row.slide_id), st_png.masks(row.slide_id)
    assert masks is not None
    assert len(coords) == 16  # 1000 px at 0.2527 = 505 px at 0.5: a 4 x 4 grid of 128 (edges padded)
    png = np.asarray(Image.open(data_root / str(row.annotation_path)))
    png = (png[..., 0] if png.ndim == 3 else png) > 0
    scale = prov["scale_level0_per_px"]
    agree = []
    for i, (x, y, _w, _h) in enumerate(coords):
        gx, gy = round(x / (128 * scale)), round(y / (128 * scale))
        cols = np.floor(gx * 128 * scale + (np.arange(128) + 0.5) * scale).astype(int)
        rows_ = np.floor(gy * 128 * scale + (np.arange(128) + 0.5) * scale).astype(int)
        ref = np.zeros((128, 128), bool)
        vr, vc = rows_ < png.shape[0], cols < png.shape[1]
        ref[np.ix_(vr, vc)] = png[np.ix_(rows_[vr], cols[vc])]
        agree.append((masks[i] == ref).mean())
    assert min(agree) == 1.0  # nearest sampling of the PNG at the tile's pixel centres
    if with_xml:
        xml = next(
            p for p in (xml_dir / f"{row.slide_id}.xml.gz", xml_dir / f"{row.slide_id}.xml") if p.exists()
        )
        xrow = make_row(data_root, row.site, data_root / row.path, xml, slide_id=row.slide_id, mpp=row.mpp)
        st_xml = SiteStore(tmp_path / "xml.zarr")
        _tile(
            write_manifest([xrow], tmp_path / "xml.csv"),
            data_root,
            st_xml.path,
            row.site,
            tile_size=128,
            min_tissue_fraction=0.0,
        )
        mx, mp = st_xml.masks(row.slide_id)[:], masks[:]  # type: ignore[index]
        dice = 2 * (mx & mp).sum() / (mx.sum() + mp.sum())
        assert dice > 0.95, dice


@pytest.mark.realdata
def test_gbm40_contour_masks(data_root: Path, repo_root: Path, tmp_path: Path) -> None:
    rows = read_manifest(repo_root / "data_manifests" / "gbm40.csv")[:2]
    mf = write_manifest(rows, tmp_path / "g.csv")
    st = SiteStore(tmp_path / "g.zarr")
    res = _tile(mf, data_root, st.path, rows[0].site, tile_size=128, min_tissue_fraction=0.0)
    assert res["failed"] == [] and len(st.slides()) == 2
    for r in rows:
        prov = st.slide_attrs(r.slide_id)["provenance"]
        assert prov["mpp_source"] == "manifest" and prov["annotation_kind"] is not None
        masks = st.masks(r.slide_id)
        assert masks is not None and 0.02 < masks[:].mean() < 0.6
    # without the manifest's MPP, GBM40 (no MPP in the file) needs the config default
    bare = [ManifestRow(**{**r.__dict__, "mpp": None}) for r in rows[:1]]
    mf2 = write_manifest(bare, tmp_path / "bare.csv")
    res = _tile(mf2, data_root, tmp_path / "bare.zarr", rows[0].site, tile_size=128)
    assert "MPP" in res["failed"][0]["reason"]
    st3 = SiteStore(tmp_path / "dflt.zarr")
    _tile(mf2, data_root, st3.path, rows[0].site, tile_size=128, default_mpp=0.25, min_tissue_fraction=0.0)
    assert st3.slide_attrs(rows[0].slide_id)["provenance"]["mpp_source"] == "config"


# ------------------------------------------------------------------------------------------------------
# Bad input, re-runs, memory, kill and resume
# ------------------------------------------------------------------------------------------------------
def test_bad_inputs_fail_alone_with_one_line_reasons(synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    good = synth_root / "slides" / "a_000.tiff"
    data = good.read_bytes()
    (root / "good.tiff").write_bytes(data)
    (root / "truncated.tiff").write_bytes(data[: len(data) // 2])
    (root / "corrupt.tiff").write_bytes(data[:8] + bytes(range(256)) * 64)
    (root / "notes.txt").write_text("this is not a slide\n")
    (root / "changed.tiff").write_bytes(data)
    (root / "bad.xml").write_text("<Annotations><Annotation><Regions><Region>")
    rows = [
        make_row(root, "x", root / "good.tiff", slide_id="good"),
        make_row(root, "x", root / "truncated.tiff", slide_id="truncated"),
        make_row(root, "x", root / "corrupt.tiff", slide_id="corrupt"),
        make_row(root, "x", root / "notes.txt", slide_id="unsupported"),
        make_row(root, "x", root / "changed.tiff", slide_id="checksum"),
        make_row(root, "x", root / "good.tiff", root / "bad.xml", slide_id="badxml"),
        ManifestRow("x", "missing", "gone.tiff", None, None, "train", "0" * 64, None),
    ]
    (root / "changed.tiff").write_bytes(data[:-1] + b"\x00")  # after hashing: checksum mismatch
    mf = write_manifest(rows, tmp_path / "bad.csv")
    res = _tile(mf, root, tmp_path / "x.zarr", "x", tile_size=128)
    assert res["slides_done"] == ["good"]
    reasons = {f["slide_id"]: f["reason"] for f in res["failed"]}
    assert set(reasons) == {"truncated", "corrupt", "unsupported", "checksum", "badxml", "missing"}
    assert "truncated.tiff" in reasons["truncated"] and "truncated" in reasons["truncated"]
    assert "corrupt.tiff" in reasons["corrupt"]
    assert "notes.txt" in reasons["unsupported"] and "unsupported" in reasons["unsupported"]
    assert "changed.tiff" in reasons["checksum"] and "sha256" in reasons["checksum"]
    assert "bad.xml" in reasons["badxml"]
    assert "gone.tiff" in reasons["missing"] and "no such file" in reasons["missing"]
    assert all("\n" not in r for r in reasons.values())
    summary = json.loads((tmp_path / "summary.json").read_text())["tile"]["x"]
    assert {f["slide_id"] for f in summary["failed"]} == set(reasons)
    assert SiteStore(tmp_path / "x.zarr").slides() == ["good"]
    assert SiteStore(tmp_path / "x.zarr").pending() == []
    # the CLI exits non-zero and prints the reasons
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        f"run_dir: {tmp_path / 'cli'}\ndata_root: {root}\nsites: [{{name: x, manifest: {mf}}}]\n"
        "tiling: {tile_size: 128}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fedpath.cli", "tile", "--config", str(cfg), "--site", "x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "gone.tiff" in proc.stderr and "bad.xml" in proc.stderr


def test_rerun_skips_complete_and_retiles_changed(synth_root: Path, tmp_path: Path) -> None:
    mf = synth_root / "manifests" / "a.csv"
    store = tmp_path / "a.zarr"
    first = _tile(mf, synth_root, store, "a", tile_size=128)
    assert sorted(first["slides_done"]) == ["a_000", "a_001"]
    stamp = (store / "slides" / "a_000" / "zarr.json").stat().st_mtime_ns
    again = _tile(mf, synth_root, store, "a", tile_size=128)
    assert again["slides_done"] == [] and sorted(again["slides_skipped"]) == ["a_000", "a_001"]
    assert (store / "slides" / "a_000" / "zarr.json").stat().st_mtime_ns == stamp
    changed = _tile(mf, synth_root, store, "a", tile_size=128, min_tissue_fraction=0.9)
    assert sorted(changed["slides_done"]) == ["a_000", "a_001"]
    assert changed["tiles"] < first["tiles"]
    bigger = _tile(mf, synth_root, store, "a", tile_size=256)  # store-level change: retiled, not mixed
    assert sorted(bigger["slides_done"]) == ["a_000", "a_001"]
    assert SiteStore(store).images("a_000").shape[1:] == (256, 256, 3)


@pytest.mark.parametrize("mode", ["local-cluster", pytest.param("scheduler-address", marks=pytest.mark.slow)])
def test_dask_workers_match_in_process(synth_root: Path, tmp_path: Path, mode: str) -> None:
    """Two dask workers (the default in-process LocalCluster with two threads, or two worker processes of
    an existing cluster reached by address) write the same store as the in-process path."""
    mf = synth_root / "manifests" / "a.csv"
    one, two = SiteStore(tmp_path / "one.zarr"), SiteStore(tmp_path / "two.zarr")
    cfg = TilingConfig(tile_size=128, batch_tiles=8)
    _tile(mf, synth_root, one.path, "a", tile_size=128, batch_tiles=8)
    if mode == "local-cluster":
        res = run_tile_site(mf, synth_root, two.path, cfg, "a", None, None, 2)
        assert res["workers"] == 2
    else:
        from distributed import LocalCluster

        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
            res = run_tile_site(mf, synth_root, two.path, cfg, "a", None, cluster.scheduler_address, 1)
        assert res["scheduler"] == cluster.scheduler_address
    assert res["failed"] == []
    for sid in one.slides():
        np.testing.assert_array_equal(one.coords(sid), two.coords(sid))
        np.testing.assert_array_equal(one.images(sid)[:], two.images(sid)[:])
        np.testing.assert_array_equal(one.masks(sid)[:], two.masks(sid)[:])  # type: ignore[index]


_BIG_SCRIPT = r"""
import json, sys, time
from pathlib import Path

def peak_mb():
    # VmHWM belongs to this address space; ru_maxrss would carry the forking pytest's peak across exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

from wsi.config import TilingConfig
from wsi.manifest import make_row, write_manifest
from wsi.synth import SlideScene, write_slide
from wsi.tiling import run_tile_site
d = Path(sys.argv[1]); n = int(sys.argv[2])
t0 = time.perf_counter()
write_slide(SlideScene("a", 0, n, n, 0.5, 11, tissue_fraction=0.0004), d / "big.tiff", d / "big_mask.tiff")
t1 = time.perf_counter()
rss_synth = peak_mb()
mf = write_manifest([make_row(d, "big", d / "big.tiff", d / "big_mask.tiff", slide_id="big")], d / "m.csv")
r = run_tile_site(mf, d, d / "s.zarr", TilingConfig(tile_size=256), "big", None, None, 1)
print(json.dumps({"synth_s": t1 - t0, "tile_s": time.perf_counter() - t1, "failed": r["failed"],
                  "tiles": r["tiles"], "rss_synth_mb": rss_synth,
                  "rss_mb": peak_mb()}))
"""


@pytest.mark.parametrize("n", [pytest.param(30_000), pytest.param(60_000, marks=pytest.mark.slow)])
def test_slide_far_larger_than_memory(tmp_path: Path, n: int) -> None:
    """A 30k (2.7 GB of RGB at level 0; 60k, 10.8 GB, in the slow suite) slide, mostly glass, is
    synthesised and tiled tile by tile: peak RSS stays a small fraction of it whatever the size, and
    every stored tile and mask matches the files."""
    proc = subprocess.run(
        [sys.executable, "-c", _BIG_SCRIPT, str(tmp_path), str(n)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["failed"] == [] and out["tiles"] > 0
    assert out["rss_synth_mb"] < 400 and out["rss_mb"] < 700, out  # vs n * n * 3 bytes for level 0
    st = SiteStore(tmp_path / "s.zarr")
    with tifffile.TiffFile(tmp_path / "big.tiff") as tf:
        assert tf.pages[0].shape == (n, n, 3)
    r = open_slide(tmp_path / "big.tiff")
    mask = open_slide(tmp_path / "big_mask.tiff", default_mpp=0.5)
    images, masks = st.images("big")[:], st.masks("big")
    assert masks is not None
    for i, (x, y, w, h) in enumerate(st.coords("big")):
        np.testing.assert_array_equal(images[i], r.read_region(int(x), int(y), 0, int(w), int(h)))
        ref = mask.read_region(int(x), int(y), 0, int(w), int(h))[..., 0] > 0
        np.testing.assert_array_equal(masks[i], ref)


def _write_config(tmp_path: Path, root: Path, mf: Path) -> Path:
    cfg = tmp_path / "resume.yaml"
    cfg.write_text(
        f"run_dir: {tmp_path / 'run'}\ndata_root: {root}\nsites: [{{name: r, manifest: {mf}}}]\n"
        "tiling: {tile_size: 64, min_tissue_fraction: 0.2}\n"
    )
    return cfg


def test_kill_and_resume(tmp_path: Path) -> None:
    """SIGKILL `fedpath tile` mid-run, re-run: every slide ends complete, finished ones are not redone,
    and no half-written slide ever looks complete."""
    root = tmp_path / "data"
    cfg_s = SynthConfig(sites=["r"], slides_per_site=6, held_out_slides=0, width=1024, height=1024, seed=9)
    run_synth(cfg_s, root)
    mf = root / "manifests" / "r.csv"
    cfg = _write_config(tmp_path, root, mf)
    store = tmp_path / "run" / "sites" / "r" / "store.zarr"
    cmd = [sys.executable, "-m", "fedpath.cli", "tile", "--config", str(cfg), "--site", "r"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        done = [p for p in (store / "slides").glob("*/zarr.json")] if (store / "slides").exists() else []
        if len(done) >= 2:
            break
        time.sleep(0.02)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st = SiteStore(store)
    before = {sid: (store / "slides" / sid / "zarr.json").stat().st_mtime_ns for sid in st.slides()}
    for sid in st.slides():  # whatever was visible as complete really is complete
        assert st.slide_attrs(sid)["complete"] is True
        n = st.n_tiles(sid)
        imgs = st.images(sid)[:]
        assert imgs.shape[0] == n and (imgs.reshape(n, -1).min(axis=1) < 250).all()
    assert len(before) >= 2
    if killed:
        assert len(before) < 6
    proc2 = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc2.returncode == 0, proc2.stderr[-2000:]
    assert st.slides() == [f"r_{i:03d}" for i in range(6)] and st.pending() == []
    for sid, stamp in before.items():
        assert (store / "slides" / sid / "zarr.json").stat().st_mtime_ns == stamp, f"{sid} was redone"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["tile"]["r"]
    assert sorted(summary["slides_skipped"]) == sorted(before)
    assert len(summary["slides_done"]) == 6 - len(before)


@pytest.mark.parametrize("n_shards", [0, 1, 2, 5, 13, 81, 200])
@pytest.mark.parametrize("nthreads", [1, 2, 4])
def test_group_shards_covers_every_shard_once(n_shards: int, nthreads: int) -> None:
    from wsi.tiling import MAX_SHARDS_PER_TASK, group_shards

    groups = group_shards(n_shards, nthreads)
    flat = [i for g in groups for i in g]
    assert flat == list(range(n_shards))  # contiguous, in order, each shard once
    assert all(1 <= len(g) <= MAX_SHARDS_PER_TASK for g in groups)
    if n_shards >= nthreads:
        assert len(groups) >= nthreads  # every thread gets work
    if n_shards > nthreads and len(groups) < n_shards:
        assert len(groups) % nthreads == 0  # tasks come out even across threads
    if groups:
        sizes = [len(g) for g in groups]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("workers", [1, 2])
def test_failed_background_shard_write_fails_the_slide(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """A shard's last writes go on in the background while the next shard is decoded; a failure
    there (a full disk) still fails that slide, with its reason, and leaves nothing committed."""
    import errno

    from wsi import store as store_mod

    calls = {"n": 0}
    real_finish = store_mod.ShardStream.finish

    def finish(self, tail):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_finish(self, tail)

    monkeypatch.setattr(store_mod.ShardStream, "finish", finish)
    store = tmp_path / "a.zarr"
    cfg = TilingConfig(tile_size=64, batch_tiles=8)
    res = run_tile_site(synth_root / "manifests" / "a.csv", synth_root, store, cfg, "a", None, None, workers)
    assert len(res["failed"]) == 1 and "No space left on device" in res["failed"][0]["reason"]
    failed = res["failed"][0]["slide_id"]
    st = SiteStore(store)
    assert failed not in st.slides() and failed not in st.pending()
    assert len(st.slides()) == 1  # the other slide is tiled


def test_shard_buffers_are_reused_across_tasks() -> None:
    from wsi import tiling as T

    T._FREE_BUFFERS.clear()
    a = T._take_buffer(3_000_000)
    b = T._take_buffer(1_000_000)
    T._give_buffer(a)
    T._give_buffer(b)
    T._give_buffer(b)  # given twice: kept once
    assert len(T._FREE_BUFFERS) == 2
    assert T._take_buffer(900_000) is b  # the smallest that fits
    assert T._take_buffer(2_000_000) is a
    assert T._take_buffer(10) is not a and T._FREE_BUFFERS == []


@pytest.mark.realdata
def test_svs_on_its_own_tile_grid_uses_the_direct_path(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiling the real Aperio SVS at its scan resolution with its own 240-px tiles decodes the stored
    JPEG tiles straight into the shards (no OpenSlide read_region), and every tile equals OpenSlide's."""
    from wsi.readers import OpenSlideReader

    slide = data_root / "slides" / "CMU-1-Small-Region.svs"
    mf = write_manifest([make_row(data_root, "real", slide, split="test")], tmp_path / "m.csv")
    calls = {"region": 0}
    real = OpenSlideReader._read

    def counting(self, *a, **k):  # type: ignore[no-untyped-def]
        calls["region"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(OpenSlideReader, "_read", counting)
    st = SiteStore(tmp_path / "s.zarr")
    res = _tile(mf, data_root, st.path, "real", tile_size=240, target_mpp=0.499, min_tissue_fraction=0.25)
    assert res["failed"] == []
    sid = "CMU-1-Small-Region"
    coords, images = st.coords(sid), st.images(sid)[:]
    assert len(coords) > 20
    tile_reads = calls["region"]
    monkeypatch.undo()
    osr = openslide.OpenSlide(str(slide))
    ref = OpenSlideReader(slide)
    W, H = osr.dimensions
    inside = 0
    for (x, y, w, h), tile in zip(coords, images, strict=True):
        # the region path (OpenSlide, composited over white beyond the slide's edge) ...
        np.testing.assert_array_equal(tile, ref.read_region(int(x), int(y), 0, int(w), int(h)))
        if x + w <= W and y + h <= H:  # ... and OpenSlide itself where the tile is inside the slide
            inside += 1
            want = np.asarray(osr.read_region((int(x), int(y)), 0, (int(w), int(h))))[..., :3]
            np.testing.assert_array_equal(tile, want)
    assert inside > 20
    # tissue detection's downsampled reads and the edge tiles only, no per-tile region reads inside
    assert tile_reads <= 20 + (len(coords) - inside)
