"""Tissue detection: synthetic oracle, flat tiles (all tissue), a real slide, and low-res-only reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.draw import disk as draw_disk
from skimage.draw import ellipse

from wsi.config import TissueConfig
from wsi.readers import TiffSlideReader, open_slide
from wsi.tissue import detect_tissue, tissue_mask_from_rgb


def he_canvas(h: int, w: int, seed: int = 0) -> np.ndarray:
    """White glass with noise; callers paint pink/purple tissue on it."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(242, 4, (h, w, 3)), 0, 255).astype(np.uint8)


def paint_tissue(img: np.ndarray, rr: np.ndarray, cc: np.ndarray, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    pink = np.array([225, 150, 190], float)
    purple = np.array([120, 70, 150], float)
    mix = rng.random(rr.size)[:, None] < 0.3
    img[rr, cc] = np.clip(np.where(mix, purple, pink) + rng.normal(0, 8, (rr.size, 3)), 0, 255)


def test_mask_matches_painted_tissue() -> None:
    img = he_canvas(400, 600)
    rr, cc = ellipse(200, 250, 120, 180, shape=img.shape[:2])
    paint_tissue(img, rr, cc)
    rr2, cc2 = draw_disk((80, 520), 30, shape=img.shape[:2])
    paint_tissue(img, rr2, cc2)
    speck_r, speck_c = draw_disk((350, 550), 2, shape=img.shape[:2])
    paint_tissue(img, speck_r, speck_c)  # dust: removed as a small object
    truth = np.zeros(img.shape[:2], bool)
    truth[rr, cc] = True
    truth[rr2, cc2] = True
    cfg = TissueConfig(min_object_area_um2=50.0 * 64)  # 50 px at 8 µm/px
    mask, thr = tissue_mask_from_rgb(img, cfg, mask_mpp=8.0)
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.97, iou
    assert not mask[speck_r, speck_c].any()
    assert cfg.min_saturation <= thr < 0.3


def test_holes_filled_and_config_respected() -> None:
    img = he_canvas(300, 300)
    rr, cc = draw_disk((150, 150), 100, shape=img.shape[:2])
    paint_tissue(img, rr, cc)
    hr, hc = draw_disk((150, 150), 20, shape=img.shape[:2])
    img[hr, hc] = 242  # a lumen inside the tissue
    filled, _ = tissue_mask_from_rgb(img, TissueConfig(), mask_mpp=8.0)
    assert filled[hr, hc].all()
    holes, _ = tissue_mask_from_rgb(img, TissueConfig(fill_holes=False), mask_mpp=8.0)
    assert not holes[150, 150]


def test_pyramid_slide_is_detected_from_low_resolution_only(tmp_path: Path) -> None:
    """A 4096 x 4096 pyramidal slide: the mask comes from a coarse level; level 0 is never decoded."""
    small = he_canvas(256, 256, seed=3)
    rr, cc = ellipse(128, 100, 60, 70, shape=small.shape[:2])
    paint_tissue(small, rr, cc)
    big = np.kron(small, np.ones((16, 16, 1), np.uint8))  # 4096 x 4096 at 0.5 µm/px
    p = tmp_path / "slide.tif"
    kw = dict(tile=(256, 256), compression="jpeg", photometric="rgb")
    with tifffile.TiffWriter(p) as tw:
        tw.write(big, resolution=(2e4, 2e4), resolutionunit="CENTIMETER", **kw)
        for k in (4, 16):
            tw.write(np.ascontiguousarray(big[::k, ::k]), subfiletype=1, **kw)
    r = open_slide(p)
    assert isinstance(r, TiffSlideReader) and r.mpp == pytest.approx(0.5)
    tm = detect_tissue(r, TissueConfig(detect_mpp=8.0))
    assert {lvl for lvl, _ in r._cache} == {2}  # only the 16x level (8 µm/px) was decoded
    assert tm.mask.shape == (256, 256) and tm.downsample == pytest.approx(16.0)
    truth = np.zeros((256, 256), bool)
    truth[rr, cc] = True
    assert (tm.mask & truth).sum() / (tm.mask | truth).sum() > 0.95
    # box fractions in level-0 coordinates
    assert tm.fraction(100 * 16 - 256, 128 * 16 - 256, 512, 512) == 1.0  # inside the ellipse
    assert tm.fraction(3800, 3800, 256, 256) == 0.0  # glass
    assert tm.fraction(-1000, -1000, 500, 500) == 0.0  # outside the slide
    boxes = np.array([[x, 0, 256, 4096] for x in range(0, 4096, 256)], float)
    col = tm.fractions(boxes)
    np.testing.assert_allclose(col, [tm.mask[:, i * 16 : (i + 1) * 16].mean() for i in range(16)])


@pytest.mark.parametrize(
    ("rel", "mpp"),
    [("monuseg-train/images/TCGA-B0-5710-01Z-00-DX1.tif", 0.2527), ("gbm40-emory/images/07.tif", 0.25)],
)
def test_flat_tiles_are_all_tissue(data_root: Path, rel: str, mpp: float) -> None:
    """A tile cut from inside tissue has no glass: Otsu would split stroma from nuclei; the floor wins."""
    r = open_slide(data_root / rel, mpp_override=mpp)
    tm = detect_tissue(r, TissueConfig())
    assert tm.mask.shape[0] >= 64  # small images get a usable mask, not a 16x16 one
    assert tm.tissue_fraction_total > 0.95
    assert tm.threshold == TissueConfig().min_saturation
    W, H = r.dimensions
    assert tm.fraction(0, 0, W, H) > 0.95


def test_real_slide_has_tissue_and_glass(data_root: Path) -> None:
    r = open_slide(data_root / "slides/CMU-1-Small-Region.svs")
    tm = detect_tissue(r, TissueConfig())
    assert 0.15 < tm.tissue_fraction_total < 0.6
    assert tm.threshold > TissueConfig().min_saturation  # Otsu found the glass/tissue split
    # the mask agrees with colour: masked pixels are far more saturated than the rest
    from skimage.color import rgb2hsv

    th = r.read_downsampled(*tm.mask.shape[::-1])
    sat = rgb2hsv(th)[..., 1]
    assert sat[tm.mask].mean() > 3 * sat[~tm.mask].mean()
    # the left/right margins of this region are glass
    W, H = r.dimensions
    assert tm.fraction(0, 0, 150, H) < 0.05
