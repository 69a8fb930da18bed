"""Synthetic H&E slides: readable pyramids with MPP, exact masks, determinism, site heterogeneity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from scipy import ndimage

from pipeline.config import load_config
from wsi.config import SynthConfig
from wsi.manifest import read_manifest, sha256_file
from wsi.readers import open_slide
from wsi.synth import SlideScene, run_synth

SMALL = SynthConfig(sites=["a", "b"], slides_per_site=1, held_out_slides=1, width=1024, height=768, seed=3)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    run_synth(SMALL, out, run_dir=out)
    return out


def test_outputs_are_pyramidal_tiffs_with_mpp_and_manifests(small_run: Path) -> None:
    rows = read_manifest(small_run / "manifests" / "a.csv")
    assert [(r.slide_id, r.split) for r in rows] == [("a_000", "train"), ("a_001", "test")]
    for r in rows:
        slide, mask = small_run / r.path, small_run / str(r.annotation_path)
        assert sha256_file(slide) == r.sha256 and sha256_file(mask) == r.annotation_sha256
        with tifffile.TiffFile(slide) as tf:
            p0 = tf.pages[0]
            assert p0.is_tiled and p0.tilewidth == 256 and p0.compression == tifffile.COMPRESSION.JPEG
            assert [p.shape[:2] for p in tf.pages] == [(768, 1024), (384, 512), (192, 256)]
        osr = openslide.OpenSlide(str(slide))
        assert osr.properties["openslide.vendor"] == "generic-tiff"
        assert osr.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        reader = open_slide(slide)
        assert reader.mpp == pytest.approx(0.5) and reader.mpp_source == "tiff_tags"
        # OpenSlide and fedpath's tile-direct reader see the same pixels
        a = np.asarray(osr.read_region((256, 128), 0, (300, 200)).convert("RGB"))
        np.testing.assert_array_equal(a, reader.read_region(256, 128, 0, 300, 200))
        m = tifffile.imread(mask)
        assert m.shape == (768, 1024) and set(np.unique(m)) <= {0, 255}


def test_mask_is_exact_and_nuclei_are_dark_purple(small_run: Path) -> None:
    scene = SlideScene("a", 0, 1024, 768, 0.5, 3, tissue_fraction=SMALL.tissue_fraction)
    rgb, truth = scene.render(1, 0, 0, 1024, 768, want_mask=True)
    assert truth is not None
    stored = tifffile.imread(small_run / "masks" / "a_000_mask.tiff") > 0
    np.testing.assert_array_equal(stored, truth)  # the shipped mask is exactly what was drawn
    jpeg = tifffile.imread(small_run / "slides" / "a_000.tiff", key=0).astype(np.float32)
    assert np.abs(jpeg - rgb).mean() < 3.0  # JPEG of the rendered pixels
    tissue = rgb.min(axis=2) < 215
    nuc = truth
    stroma = tissue & ~ndimage.binary_dilation(truth, iterations=2)
    assert nuc.mean() > 0.04 and stroma.mean() > 0.1
    mean = {k: rgb[v].astype(float).mean(axis=0) for k, v in (("nuc", nuc), ("stroma", stroma))}
    assert mean["nuc"].sum() < mean["stroma"].sum() - 150  # nuclei clearly darker
    assert mean["nuc"][2] > mean["nuc"][0] + 20  # haematoxylin: blue/purple
    assert mean["stroma"][0] > mean["stroma"][1] + 30  # eosin: pink


def test_deterministic_bit_identical(tmp_path: Path, small_run: Path) -> None:
    out = tmp_path / "again"
    cfg = SMALL.model_copy(update={"sites": ["b"], "workers": 2})  # other site subset, two processes
    run_synth(cfg, out)
    assert (out / "manifests" / "b.csv").read_text() == (small_run / "manifests" / "b.csv").read_text()
    other = run_synth(cfg.model_copy(update={"seed": 4}), tmp_path / "seed4")
    assert other["slides_written"] == 2
    assert read_manifest(tmp_path / "seed4" / "manifests" / "b.csv")[0].sha256 != (
        read_manifest(out / "manifests" / "b.csv")[0].sha256
    )


def test_rerun_keeps_matching_slides(tmp_path: Path) -> None:
    cfg = SynthConfig(sites=["c"], slides_per_site=1, held_out_slides=0, width=512, height=512)
    first = run_synth(cfg, tmp_path)
    again = run_synth(cfg, tmp_path)
    assert first["slides_written"] == 1 and again["slides_written"] == 0 and again["slides_kept"] == 1
    (tmp_path / "slides" / "c_000.tiff").write_bytes(b"tampered")
    assert run_synth(cfg, tmp_path)["slides_written"] == 1


def _nuclei_stats(site: str) -> tuple[float, float, np.ndarray]:
    scene = SlideScene(site, 0, 1536, 1536, 0.5, 0, tissue_fraction=0.7)
    rgb, mask = scene.render(1, 256, 256, 1024, 1024, want_mask=True)
    assert mask is not None
    labels, n = ndimage.label(mask)
    areas = np.bincount(labels.ravel())[1:]
    tissue = rgb.min(axis=2) < 215
    stroma = tissue & ~ndimage.binary_dilation(mask, iterations=2)
    return float(np.median(areas)), n / max(tissue.sum(), 1) * 1e6, rgb[stroma].mean(axis=0)


def test_sites_differ_in_morphology_and_stain() -> None:
    a, b, c = (_nuclei_stats(s) for s in "abc")
    assert b[0] < a[0] < c[0]  # nucleus size: b small (lymphocyte-like), c large
    assert b[1] > a[1] > c[1]  # density per tissue pixel
    assert np.abs(a[2] - b[2]).max() > 15 and np.abs(a[2] - c[2]).max() > 15  # stroma colour


def test_shipped_manifests_match_demo_settings(tmp_path: Path, repo_root: Path) -> None:
    """data_manifests/synthetic/<site>.csv is exactly what `fedpath synth` makes with configs/demo.yaml
    (checked for site a here; every site in the slow test below)."""
    cfg = load_config(repo_root / "configs" / "demo.yaml").synth
    run_synth(cfg.model_copy(update={"sites": ["a"]}), tmp_path)
    shipped = repo_root / "data_manifests" / "synthetic" / "a.csv"
    assert (tmp_path / "manifests" / "a.csv").read_text() == shipped.read_text()


@pytest.mark.slow
def test_all_shipped_manifests_match(tmp_path: Path, repo_root: Path) -> None:
    cfg = load_config(repo_root / "configs" / "demo.yaml").synth
    run_synth(cfg, tmp_path)
    for site in cfg.sites:
        shipped = repo_root / "data_manifests" / "synthetic" / f"{site}.csv"
        assert (tmp_path / "manifests" / f"{site}.csv").read_text() == shipped.read_text()
