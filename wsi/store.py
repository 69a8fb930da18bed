"""A site's tile store: one zarr v3 hierarchy per institution (layout in docs/CONTRACTS.md).

Each tile is its own chunk, so a dataset can fetch one random tile without touching any other, and
parallel writers (dask tasks) never share a chunk. A slide is written under ``_incomplete/<id>`` and
renamed into ``slides/<id>`` only when every tile is in, so an interrupted job never leaves a slide that
looks complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from wsi.errors import WSIError

STORE_VERSION = 1
_SLIDES = "slides"
_PENDING = "_incomplete"


def _compressor(level: int) -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=level, shuffle=BloscShuffle.bitshuffle)


class SlideWriter:
    """Arrays of one slide being written; tiles may be written by index from any process."""

    def __init__(self, group_path: Path) -> None:
        self.path = group_path

    def _group(self) -> zarr.Group:
        return zarr.open_group(str(self.path), mode="r+")

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
        cls, path: Path | str, *, site: str, target_mpp: float, tile_size: int, overlap: int
    ) -> SiteStore:
        """Open the store for writing, creating it if needed; refuse one tiled with other parameters."""
        path = Path(path)
        attrs = {
            "fedpath_store_version": STORE_VERSION,
            "site": site,
            "target_mpp": float(target_mpp),
            "tile_size": int(tile_size),
            "overlap": int(overlap),
        }
        if (path / "zarr.json").exists():
            root = zarr.open_group(str(path), mode="r+")
            old = dict(root.attrs)
            for key in ("site", "target_mpp", "tile_size", "overlap"):
                if key in old and old[key] != attrs[key]:
                    raise WSIError(
                        f"{path}: store was tiled with {key}={old[key]!r}, not {attrs[key]!r}; "
                        "use a new run directory or delete the store"
                    )
            root.attrs.update(attrs)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            root = zarr.open_group(str(path), mode="a", zarr_format=3)
            root.attrs.update(attrs)
        root.require_group(_SLIDES)
        root.require_group(_PENDING)
        return cls(path)

    def begin_slide(
        self, slide_id: str, n_tiles: int, tile_size: int, with_masks: bool, compressor_level: int = 3
    ) -> SlideWriter:
        """Create (or recreate) the pending arrays of one slide."""
        pending = self.path / _PENDING / slide_id
        if pending.exists():
            shutil.rmtree(pending)
        g = zarr.open_group(str(self.path), mode="r+")[_PENDING].create_group(slide_id)
        n = max(int(n_tiles), 0)
        t = int(tile_size)
        comp = _compressor(compressor_level)
        g.create_array("images", shape=(n, t, t, 3), chunks=(1, t, t, 3), dtype="uint8", compressors=comp)
        g.create_array("coords", shape=(n, 4), chunks=(max(n, 1), 4), dtype="int64")
        g.create_array("tissue", shape=(n,), chunks=(max(n, 1),), dtype="float32")
        if with_masks:
            g.create_array("masks", shape=(n, t, t), chunks=(1, t, t), dtype="uint8", compressors=comp)
        return SlideWriter(pending)

    def commit_slide(self, slide_id: str, attrs: dict[str, Any]) -> None:
        """Mark a pending slide complete and move it into ``slides/`` in one rename."""
        pending = self.path / _PENDING / slide_id
        g = zarr.open_group(str(pending), mode="r+")
        g.attrs.update({**attrs, "n_tiles": int(g["images"].shape[0]), "complete": True})
        final = self.path / _SLIDES / slide_id
        if final.exists():
            shutil.rmtree(final)
        os.replace(pending, final)

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

    def _slide(self, slide_id: str) -> zarr.Group:
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
