"""Real tiles for the attack evaluation: MoNuSeg crops from the data root, or a site's zarr store.

MoNuSeg images are 1000x1000 RGB TIFFs at 0.2527 µm/px; they are resampled to the federation's
tile MPP (``tiling.target_mpp``) and cut into non-overlapping ``tile_size`` crops, so the attacked
tiles look like what the sites train on. Masks come from ``masks/*.png`` (channel 0, 0/255).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import FedpathError

MONUSEG_MPP = 0.2527


@dataclass
class TileSet:
    """Tiles as float [0, 1] (N, 3, T, T), masks long (N, T, T), and the source image of each."""

    images: Tensor
    masks: Tensor
    sources: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, idx: list[int] | np.ndarray) -> TileSet:
        ii = [int(i) for i in idx]
        return TileSet(self.images[ii], self.masks[ii], [self.sources[i] for i in ii])


def monuseg_dir(data_root: Path | None) -> Path | None:
    if data_root is None:
        return None
    d = Path(data_root) / "monuseg-train"
    return d if (d / "images").is_dir() else None


def _read_pair(img_path: Path, mask_dir: Path, scale: float) -> tuple[np.ndarray, np.ndarray]:
    import tifffile
    from PIL import Image
    from skimage.transform import rescale

    mask_path = mask_dir / (img_path.stem + ".png")
    if not mask_path.is_file():
        raise FedpathError(f"{mask_path}: mask for {img_path.name} not found")
    try:
        img = tifffile.imread(img_path)
    except Exception as exc:  # tifffile raises several types for corrupt input
        raise FedpathError(f"{img_path}: not a readable TIFF ({exc})") from None
    if img.ndim != 3 or img.shape[2] < 3:
        raise FedpathError(f"{img_path}: expected an RGB image, got shape {img.shape}")
    img = img[..., :3]
    mask = np.asarray(Image.open(mask_path))
    mask = (mask[..., 0] if mask.ndim == 3 else mask) > 0
    if mask.shape != img.shape[:2]:
        raise FedpathError(f"{mask_path}: mask shape {mask.shape} differs from image {img.shape[:2]}")
    imgf = img.astype(np.float32) / 255.0
    if abs(scale - 1.0) > 1e-3:
        imgf = rescale(imgf, scale, channel_axis=-1, anti_aliasing=True, order=1).astype(np.float32)
        mask = rescale(mask.astype(np.float32), scale, order=0, anti_aliasing=False) > 0.5
    return np.clip(imgf, 0, 1), mask


@functools.lru_cache(maxsize=4)
def load_monuseg_images(
    data_root: Path, target_mpp: float, max_images: int | None = None
) -> tuple[tuple[str, np.ndarray, np.ndarray], ...]:
    """(name, float RGB image in [0, 1], bool mask) per MoNuSeg image, resampled to ``target_mpp``
    (cached: the sweep cuts tiles of several sizes from the same images)."""
    d = monuseg_dir(data_root)
    if d is None:
        raise FedpathError(f"{data_root}: no monuseg-train/images folder under the data root")
    paths = sorted((d / "images").glob("*.tif"))
    if not paths:
        raise FedpathError(f"{d / 'images'}: no .tif images")
    if max_images is not None:
        paths = paths[:max_images]
    scale = MONUSEG_MPP / target_mpp
    return tuple((p.stem, *_read_pair(p, d / "masks", scale)) for p in paths)


def load_monuseg_tiles(
    data_root: Path,
    tile_size: int,
    target_mpp: float = 0.5,
    per_image: int = 4,
    max_images: int | None = None,
    seed: int = 0,
) -> TileSet:
    """Non-overlapping random crops (``per_image`` from each image) resampled to ``target_mpp``."""
    rng = np.random.default_rng(seed)
    imgs, masks, sources = [], [], []
    for name, img, mask in load_monuseg_images(Path(data_root), float(target_mpp), max_images):
        ny, nx = img.shape[0] // tile_size, img.shape[1] // tile_size
        if ny * nx == 0:
            raise FedpathError(f"{name}: smaller than one {tile_size}px tile at {target_mpp} µm/px")
        cells = rng.permutation(ny * nx)[:per_image]
        for c in cells:
            y, x = (int(c) // nx) * tile_size, (int(c) % nx) * tile_size
            imgs.append(img[y : y + tile_size, x : x + tile_size])
            masks.append(mask[y : y + tile_size, x : x + tile_size])
            sources.append(name)
    return TileSet(
        torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(np.stack(masks).astype(np.int64)),
        sources,
    )


def load_store_tiles(
    store_path: Path, max_tiles: int, tile_size: int | None = None, seed: int = 0
) -> TileSet:
    """Up to ``max_tiles`` training tiles of a site's zarr store (``wsi.store.SiteStore``), center-cropped
    to ``tile_size`` when given. Slides without masks get all-background masks (unknown labels)."""
    from wsi.store import SiteStore

    store = SiteStore(store_path)
    if not store.exists():
        raise FedpathError(f"{store_path}: site store not found")
    index = list(store.iter_index({"train"})) or list(store.iter_index(None))
    if not index:
        raise FedpathError(f"{store_path}: store has no tiles")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.permutation(len(index))[:max_tiles].tolist())
    imgs, masks, sources = [], [], []
    for k in pick:
        slide, i = index[k]
        im = np.asarray(store.images(slide)[i])
        m_arr = store.masks(slide)
        m = np.asarray(m_arr[i]) if m_arr is not None else np.zeros(im.shape[:2], np.uint8)
        if tile_size is not None and tile_size < im.shape[0]:
            o = (im.shape[0] - tile_size) // 2
            im, m = im[o : o + tile_size, o : o + tile_size], m[o : o + tile_size, o : o + tile_size]
        imgs.append(im.astype(np.float32) / 255.0)
        masks.append(m > 0)
        sources.append(f"{slide}#{i}")
    return TileSet(
        torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(np.stack(masks).astype(np.int64)),
        sources,
    )
