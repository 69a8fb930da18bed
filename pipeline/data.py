"""Torch datasets over a site's zarr tile store, H&E augmentation and slide-level splits.

A slide is opened lazily, at its first tile, in whichever process reads it (a DataLoader worker re-opens
its own after a fork). A small slide (at most ``WHOLE_SLIDE_BYTES`` of tiles and masks, within the dataset's
``DATASET_CACHE_BYTES``) is then read whole, in one zarr read: one read per tile costs about 2 ms through
zarr's event loop, most of a training step on small tiles. Larger slides, and every slide past the budget,
are read one tile (one zarr chunk) at a time, so a large store is never held in memory. Splits are by slide, never by tile: tiles of one slide are correlated, so a tile-level split would
leak near-duplicates of training tiles into validation.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pipeline.config import AugmentConfig
from pipeline.errors import FedpathError
from wsi.errors import WSIError
from wsi.store import SiteStore

StainFn = Callable[[np.ndarray], np.ndarray]

#: a slide whose tiles and masks take at most this many bytes is read whole at its first use
WHOLE_SLIDE_BYTES = 64 << 20
#: the most bytes of whole slides one dataset holds in memory (later slides are read tile by tile)
DATASET_CACHE_BYTES = 512 << 20


# -- augmentation -----------------------------------------------------------------------------------------
@functools.cache
def _hed_matrices() -> tuple[np.ndarray, np.ndarray]:
    """skimage's H&E-DAB stain matrices with its log adjustment folded in, float32: ``log(rgb) @ into`` are
    the stains of :func:`skimage.color.rgb2hed`, ``exp(stains @ out)`` the RGB of :func:`skimage.color.hed2rgb`."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    log_adjust = np.log(1e-6)
    return (hed_from_rgb / log_adjust).astype(np.float32), (rgb_from_hed * log_adjust).astype(np.float32)


def hed_jitter(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Stain perturbation in HED space (Tellez et al. 2018): per stain channel ``s*(1+a) + b`` with
    ``a, b ~ N(0, sigma)``; float RGB in [0, 1] in, float32 out. skimage's colour deconvolution
    (``rgb2hed``, jitter, ``hed2rgb``, clip) in one float32 pass with the jitter folded into the
    reconstruction matrix: the same values to 1e-6, at half the time of skimage's float64 path, which was
    most of a training step's data loading."""
    into, out = _hed_matrices()
    alpha = rng.normal(0.0, sigma, size=3)
    beta = rng.normal(0.0, sigma, size=3)
    shape = image.shape
    od = np.maximum(np.asarray(image).reshape(-1, 3), 1e-6, dtype=np.float32)  # a fresh contiguous array
    np.log(od, out=od)
    stains = od @ into
    np.maximum(stains, 0.0, out=stains)
    rgb = stains @ ((1.0 + alpha)[:, None] * out).astype(np.float32)
    rgb += (beta @ out).astype(np.float32)
    np.exp(rgb, out=rgb)
    np.clip(rgb, 0.0, 1.0, out=rgb)
    return rgb.reshape(shape)


def augment_tile(
    image: np.ndarray, mask: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Flips, 90-degree rotations (image and mask together), HED stain jitter and brightness.

    ``image``: float32 HWC in [0, 1]; ``mask``: HW. Geometry is exact for H&E (no preferred orientation).
    """
    if cfg.flips:
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if rng.random() < 0.5:
            image, mask = image[::-1], mask[::-1]
    if cfg.rot90:
        k = int(rng.integers(0, 4))
        if k:
            image, mask = np.rot90(image, k, axes=(0, 1)), np.rot90(mask, k, axes=(0, 1))
    if cfg.hed_jitter > 0:
        image = hed_jitter(image, cfg.hed_jitter, rng)
    if cfg.brightness > 0:
        image = np.clip(image * np.float32(1.0 + rng.uniform(-cfg.brightness, cfg.brightness)), 0.0, 1.0)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(mask)


def batch_zoom(x: torch.Tensor, y: torch.Tensor, max_log_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each tile of a training batch zoomed about its centre by its own ``exp(U(-m, m))`` (torch's global
    RNG, seeded per job like the rest of the augmentation): resized (image bilinear, label map
    nearest-exact), then cropped to the tile's size about the centre, or mirrored out to it. Per sample, so
    DP-SGD's per-sample clipping is unaffected (no tile's transform depends on another tile)."""
    import torch.nn.functional as F

    n, _, h, w = x.shape
    if max_log_scale <= 0 or n == 0:
        return x, y
    zooms = torch.exp((torch.rand(n) * 2.0 - 1.0) * max_log_scale).tolist()
    xs, ys = [], []
    for i, z in enumerate(zooms):
        hh, ww = max(2, round(h * z)), max(2, round(w * z))
        if (hh, ww) == (h, w):
            xs.append(x[i : i + 1])
            ys.append(y[i : i + 1])
            continue
        xi = F.interpolate(x[i : i + 1], size=(hh, ww), mode="bilinear", align_corners=False)
        yi = F.interpolate(y[i : i + 1].to(torch.uint8), size=(hh, ww), mode="nearest-exact")
        if hh >= h:
            t, left = (hh - h) // 2, (ww - w) // 2
            xi, yi = xi[..., t : t + h, left : left + w], yi[..., t : t + h, left : left + w]
        else:
            pad = ((w - ww) // 2, w - ww - (w - ww) // 2, (h - hh) // 2, h - hh - (h - hh) // 2)
            xi = F.pad(xi, pad, mode="reflect")
            yi = F.pad(yi.float(), pad, mode="reflect").to(torch.uint8)
        xs.append(xi)
        ys.append(yi)
    return torch.cat(xs).contiguous(), torch.cat(ys).to(y.dtype)


# -- datasets ---------------------------------------------------------------------------------------------
class TileDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Tiles and masks of some slides of one store: ``(image float32 (3,H,W) in [0,1], label long (1,H,W))``.

    Only the index (slide id, tile number) is built up front; pixels are read per item.
    """

    def __init__(
        self,
        store_path: Path | str,
        slide_ids: Sequence[str],
        augment: AugmentConfig | None = None,
        stain: StainFn | None = None,
        seed: int = 0,
        classes: int = 2,
    ) -> None:
        self.store_path = Path(store_path)
        self.classes = classes  # 3: a 3-class store's 0/1/2 labels kept (inside/boundary); 2: foreground 0/1
        store = SiteStore(self.store_path)
        if not store.exists():
            raise FedpathError(f"{self.store_path}: no tile store (run `fedpath tile` for this site first)")
        self.slide_ids = list(slide_ids)
        self.augment = augment
        self.stain = stain
        self.seed = seed
        index: list[tuple[int, int]] = []
        self.tiles_per_slide: dict[str, int] = {}
        for si, sid in enumerate(self.slide_ids):
            if store.masks(sid) is None:
                raise FedpathError(
                    f"{self.store_path}: slide {sid!r} has no masks; it cannot be used for training"
                )
            n = store.n_tiles(sid)
            self.tiles_per_slide[sid] = n
            index.extend((si, i) for i in range(n))
        self.index = np.asarray(index, dtype=np.int64).reshape(-1, 2)
        self._arrays: dict[int, tuple[object, object]] = {}
        self._cached_bytes = 0
        self._pid: int | None = None
        self._epoch_draw = 0
        self.views = 1  # augmentations per item (DP-SGD's augmentation multiplicity; training sets only)

    def __len__(self) -> int:
        return len(self.index)

    def slide_of(self, item: int) -> str:
        return self.slide_ids[int(self.index[item, 0])]

    def _open(self, si: int) -> tuple[object, object]:
        if self._pid != os.getpid():  # after a fork: drop handles opened by the parent
            self._arrays, self._pid, self._cached_bytes = {}, os.getpid(), 0
        if si not in self._arrays:
            store = SiteStore(self.store_path)
            sid = self.slide_ids[si]
            images: Any = store.images(sid)
            masks: Any = store.masks(sid)
            size = int(getattr(images, "nbytes", 1 << 62)) + int(getattr(masks, "nbytes", 1 << 62))
            if size <= WHOLE_SLIDE_BYTES and self._cached_bytes + size <= DATASET_CACHE_BYTES:
                try:
                    images, masks = np.asarray(images[:]), np.asarray(masks[:])
                except Exception as exc:  # noqa: BLE001 - any zarr/codec failure is a bad store
                    raise WSIError(f"{self.store_path}: slide {sid!r}: unreadable ({exc})") from None
                self._cached_bytes += size
            self._arrays[si] = (images, masks)
        return self._arrays[si]

    def read(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw tile (uint8 HWC) and mask (uint8 HW) of one item."""
        si, ti = (int(v) for v in self.index[item])
        images, masks = self._open(si)
        try:
            img = np.array(images[ti])  # type: ignore[index]  # a copy: never a view of a whole slide
            msk = np.array(masks[ti])  # type: ignore[index]
        except Exception as exc:  # noqa: BLE001 - any zarr/codec failure is a bad store
            raise WSIError(
                f"{self.store_path}: slide {self.slide_ids[si]!r} tile {ti}: unreadable ({exc})"
            ) from None
        return img, msk

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One item: ``(3,H,W)`` image and ``(1,H,W)`` label; with ``views`` > 1 (augmentation multiplicity
        under DP-SGD) that many independent augmentations of the tile, stacked: ``(views,3,H,W)``, ``(views,1,H,W)``."""
        img, msk = self.read(item)
        if self.stain is not None:
            img = self.stain(img)
        image = img.astype(np.float32) / 255.0
        mask = (msk > 0).astype(np.int64) if self.classes == 2 else _three_class(msk)
        if self.augment is None or self.views == 1:
            return self._augmented(item, image, mask)
        pairs = [self._augmented(item, image, mask) for _ in range(self.views)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def _augmented(self, item: int, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self.augment is not None:
            # a fresh stream per draw (torch's per-worker seed differs by worker and epoch)
            rng = np.random.default_rng([self.seed, item, int(torch.randint(0, 2**31 - 1, ()).item())])
            image, mask = augment_tile(image, mask, self.augment, rng)
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        y = torch.from_numpy(np.ascontiguousarray(mask))[None]
        return x, y


def _three_class(msk: np.ndarray) -> np.ndarray:
    """0/1/2 labels of a 3-class tile mask; a 0/1 (or 0/255) mask gives 0/1 (inside only, no boundary)."""
    m = np.asarray(msk)
    return np.where(m == 2, 2, m > 0).astype(np.int64)


def store_tile_size(store_path: Path | str) -> int:
    return int(SiteStore(store_path).attrs.get("tile_size", 0))


# -- splits -----------------------------------------------------------------------------------------------
@dataclass
class SlideSplit:
    """Slide ids per role; ``source`` says whether the store's manifest split or a seeded split decided."""

    train: list[str]
    val: list[str]
    test: list[str]
    source: str


def _order_key(seed: int, slide_id: str) -> str:
    return hashlib.sha256(f"{seed}:{slide_id}".encode()).hexdigest()


def split_by_slide(store: SiteStore | Path | str, val_fraction: float, seed: int = 0) -> SlideSplit:
    """Train/val/test slide ids of a store; a slide's tiles never straddle two roles.

    The manifest's ``split`` (stored per slide) wins when the store has one: ``train``, ``val`` and
    ``test`` slides keep their roles, and if no slide is marked ``val`` a seeded ``val_fraction`` of the
    train slides is held out. Without split attributes every slide is a candidate and the seeded,
    by-slide split is deterministic (a hash of seed and slide id orders the slides).
    """
    st = store if isinstance(store, SiteStore) else SiteStore(store)
    if not st.exists():
        raise FedpathError(f"{st.path}: no tile store")
    slides = [s for s in st.slides() if st.masks(s) is not None and st.n_tiles(s) > 0]
    if not slides:
        raise FedpathError(f"{st.path}: no complete slide with tiles and masks")
    explicit = {s: st.slide_attrs(s).get("split") for s in slides}
    has_split = any(v is not None for v in explicit.values())
    roles = {s: str(v or "train") for s, v in explicit.items()}
    train = [s for s in slides if roles[s] == "train"]
    val = [s for s in slides if roles[s] == "val"]
    test = [s for s in slides if roles[s] == "test"]
    if not val and val_fraction > 0 and len(train) >= 2:
        ordered = sorted(train, key=lambda s: _order_key(seed, s))
        n_val = min(len(train) - 1, max(1, math.ceil(val_fraction * len(train))))
        val = sorted(ordered[:n_val])
        train = sorted(ordered[n_val:])
        source = "manifest+seeded" if has_split else "seeded"
    else:
        source = "manifest" if has_split else "seeded"
    if not train:
        raise FedpathError(f"{st.path}: no training slides (splits: {sorted(set(roles.values()))})")
    return SlideSplit(train=train, val=val, test=test, source=source)


# -- slide-level sampling ---------------------------------------------------------------------------------
class SlidePoissonSampler(Sampler[list[int]]):
    """Batches for slide-level DP: each slide joins a batch independently with probability ``sample_rate``
    (Poisson sampling over slides), contributing ``tiles_per_slide`` of its tiles drawn afresh.

    With per-tile clipping to C, a slide moves the summed gradient by at most ``tiles_per_slide * C``, so
    the accounting unit is the slide (sampling rate over slides, noise relative to that sensitivity).
    Batches may be empty; ``steps`` batches are drawn per iteration.
    """

    def __init__(
        self,
        slide_items: Sequence[Sequence[int]],
        sample_rate: float,
        tiles_per_slide: int,
        steps: int,
        seed: int,
    ) -> None:
        self.slide_items = [np.asarray(v, dtype=np.int64) for v in slide_items]
        self.sample_rate = sample_rate
        self.tiles_per_slide = tiles_per_slide
        self.steps = steps
        self.generator = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            chosen = self.generator.random(len(self.slide_items)) < self.sample_rate
            batch: list[int] = []
            for items in (self.slide_items[i] for i in np.flatnonzero(chosen)):
                k = min(self.tiles_per_slide, len(items))
                batch.extend(int(v) for v in self.generator.choice(items, size=k, replace=False))
            yield batch
