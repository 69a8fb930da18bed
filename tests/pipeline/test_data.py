"""Tile datasets over a real MoNuSeg store: lazy reads, H&E augmentation, splits by slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ptrain_utils import tile_monuseg

from pipeline.config import AugmentConfig
from pipeline.data import TileDataset, augment_tile, split_by_slide
from wsi.store import SiteStore


@pytest.fixture(scope="module")
def store(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tile_monuseg(data_root, tmp_path_factory.mktemp("data_run"), tile_size=64)


def test_split_respects_manifest_and_never_straddles(store: Path) -> None:
    st = SiteStore(store)
    split = split_by_slide(st, val_fraction=0.2, seed=0)
    assert split.source == "manifest"
    assert set(split.val) == {s for s in st.slides() if st.split(s) == "val"}
    assert set(split.test) == {s for s in st.slides() if st.split(s) == "test"}
    train_ds, val_ds = TileDataset(store, split.train), TileDataset(store, split.val)
    train_slides = {train_ds.slide_of(i) for i in range(len(train_ds))}
    val_slides = {val_ds.slide_of(i) for i in range(len(val_ds))}
    assert train_slides and val_slides and not train_slides & val_slides
    assert len(train_ds) == sum(st.n_tiles(s) for s in split.train)


def test_seeded_split_without_manifest_split(store: Path) -> None:
    import zarr

    st = SiteStore(store)
    old = {}
    for sid in st.slides():  # forget the manifest split
        g = zarr.open_group(str(store / "slides" / sid), mode="r+")
        old[sid] = g.attrs["split"]
        del g.attrs["split"]
    try:
        a = split_by_slide(st, val_fraction=0.3, seed=7)
        b = split_by_slide(st, val_fraction=0.3, seed=7)
        c = split_by_slide(st, val_fraction=0.3, seed=8)
        assert a == b and a.source == "seeded" and not a.test
        assert (
            len(a.val) == 3
            and not set(a.val) & set(a.train)
            and set(a.val) | set(a.train) == set(st.slides())
        )
        assert a.val != c.val  # the seed decides which slides are held out
    finally:
        for sid, split in old.items():
            st.set_slide_attrs(sid, {"split": split})


def test_items_are_read_lazily_and_well_formed(store: Path) -> None:
    st = SiteStore(store)
    ds = TileDataset(store, st.slides()[:2])
    assert ds._arrays == {}  # nothing read at construction
    x, y = ds[3]
    assert x.dtype == torch.float32 and x.shape == (3, 64, 64) and 0 <= float(x.min()) <= float(x.max()) <= 1
    assert y.dtype == torch.int64 and y.shape == (1, 64, 64) and set(torch.unique(y).tolist()) <= {0, 1}
    img, msk = ds.read(3)
    np.testing.assert_array_equal(x.numpy().transpose(1, 2, 0), img.astype(np.float32) / 255)
    np.testing.assert_array_equal(y[0].numpy(), (msk > 0).astype(np.int64))
    assert len(ds._arrays) == 1  # only the slide that was touched is open


def test_views_are_independent_augmentations_of_one_tile(store: Path) -> None:
    """Augmentation multiplicity: an item with ``views`` = 4 is four augmentations of the same tile, each
    with its own draw and its mask moved with it."""
    st = SiteStore(store)
    ds = TileDataset(store, st.slides()[:1], AugmentConfig(flips=True, rot90=True, hed_jitter=0.0, brightness=0.0))
    ds.views = 4
    x, y = ds[5]
    assert x.shape == (4, 3, 64, 64) and y.shape == (4, 1, 64, 64)
    img, msk = ds.read(5)
    base, mask = torch.from_numpy(img.astype(np.float32) / 255).permute(2, 0, 1), torch.from_numpy((msk > 0).astype(np.int64))
    # flips and quarter turns only: each view is one of the 8 symmetries of the tile, its mask the same one
    seen = set()
    for v in range(4):
        match = [
            (k, f) for k in range(4) for f in (False, True)
            if torch.equal(x[v], torch.rot90(base.flip(-1) if f else base, k, (1, 2)))
            and torch.equal(y[v, 0], torch.rot90(mask.flip(-1) if f else mask, k, (0, 1)))
        ]  # fmt: skip
        assert match, v
        seen.add(match[0])
    x2, _ = ds[5]
    assert len(seen) > 1 or not torch.equal(x, x2)  # independent draws, not one augmentation repeated


def test_augmentation_moves_mask_with_image() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((32, 32, 3)).astype(np.float32)
    mask = (img[..., 0] > 0.5).astype(np.int64)
    cfg = AugmentConfig(flips=True, rot90=True, hed_jitter=0.0, brightness=0.0)
    for seed in range(8):
        a, m = augment_tile(img, mask, cfg, np.random.default_rng(seed))
        np.testing.assert_array_equal(m, (a[..., 0] > 0.5).astype(np.int64))  # geometry identical
    jit, m2 = augment_tile(
        img,
        mask,
        AugmentConfig(flips=False, rot90=False, hed_jitter=0.05, brightness=0.1),
        np.random.default_rng(1),
    )
    np.testing.assert_array_equal(m2, mask)
    assert jit.dtype == np.float32 and 0 <= jit.min() and jit.max() <= 1 and not np.allclose(jit, img)


def test_slide_sampler_caps_tiles_per_slide() -> None:
    from pipeline.data import SlidePoissonSampler

    groups = [list(range(i * 50, i * 50 + 50)) for i in range(6)]
    sampler = SlidePoissonSampler(groups, sample_rate=0.3, tiles_per_slide=4, steps=400, seed=0)
    sizes = []
    for batch in sampler:
        per_slide: dict[int, int] = {}
        for item in batch:
            per_slide[item // 50] = per_slide.get(item // 50, 0) + 1
        assert all(n == 4 for n in per_slide.values())
        sizes.append(len(per_slide))
    # Poisson over slides: the number of slides per batch is Binomial(6, 0.3)
    assert abs(np.mean(sizes) - 6 * 0.3) < 0.2 and min(sizes) == 0


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_stain_normalisation_from_site_tiles(store: Path, method: str) -> None:
    from pipeline.config import StainConfig
    from pipeline.stain import build_stain

    st = SiteStore(store)
    ds = TileDataset(store, st.slides()[:3])
    tiles = [ds.read(i)[0] for i in range(0, len(ds), 12)]
    fn, ref = build_stain(StainConfig(method=method, reference_tiles=16), tiles)
    assert fn is not None and ref is not None and ref["method"] == method
    out = fn(tiles[0])
    assert out.dtype == np.uint8 and out.shape == tiles[0].shape
    if method == "reinhard":
        from skimage.color import rgb2lab

        lab = rgb2lab(out).reshape(-1, 3)
        np.testing.assert_allclose(lab.mean(0), ref["mean"], atol=3.0)  # moved onto the site's reference


def test_hed_jitter_matches_skimage_colour_deconvolution():
    """The fused float32 HED jitter gives skimage's rgb2hed -> s*(1+a)+b -> hed2rgb -> clip, with the same
    draws, on real-looking colours including saturated white and near-black pixels."""
    from skimage.color import hed2rgb, rgb2hed

    from pipeline.data import hed_jitter

    rng = np.random.default_rng(7)
    img = rng.random((40, 24, 3)).astype(np.float32)
    img[0, :4] = 1.0
    img[1, :4] = 0.0
    rotated = np.rot90(img, 1, axes=(0, 1))  # a non-contiguous view, as augment_tile passes it
    for sigma in (0.05, 0.3):
        got = hed_jitter(rotated, sigma, np.random.default_rng(3))
        draws = np.random.default_rng(3)
        alpha, beta = draws.normal(0.0, sigma, size=3), draws.normal(0.0, sigma, size=3)
        want = np.clip(hed2rgb(rgb2hed(rotated) * (1.0 + alpha) + beta), 0.0, 1.0)
        assert got.dtype == np.float32 and got.shape == rotated.shape
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_batch_zoom_moves_image_and_mask_together():
    """Zoomed tiles keep their shape, labels stay labels, and the mask follows the image: a blocky image
    whose mask is its own thresholded red channel still agrees after zooming in and out (off the block
    borders, where bilinear and nearest resampling differ); 0 leaves the batch as it is."""
    import torch

    from pipeline.data import batch_zoom

    torch.manual_seed(0)
    blocks = torch.rand(8, 3, 16, 16)
    x = blocks.repeat_interleave(8, 2).repeat_interleave(8, 3)  # 128 px of 8 px blocks
    y = (x[:, :1] > 0.5).long() + (x[:, 1:2] > 0.8).long()
    same = batch_zoom(x, y, 0.0)
    assert same[0] is x and same[1] is y
    seen = set()
    for _ in range(4):
        xz, yz = batch_zoom(x, y, 0.4)
        assert xz.shape == x.shape and yz.shape == y.shape and yz.dtype == y.dtype
        assert set(yz.unique().tolist()) <= {0, 1, 2}
        want = (xz[:, :1] > 0.5).long() + (xz[:, 1:2] > 0.8).long()
        assert (want == yz).float().mean() > 0.94  # a one-pixel shift of the mask alone gives 0.93
        seen.add(round(float((xz - x).abs().mean()), 3))
    assert len(seen) > 1 and min(seen) > 0  # a fresh zoom per call, and not the identity
