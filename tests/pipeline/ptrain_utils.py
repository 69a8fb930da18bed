"""Shared helpers of the pipeline training tests: real MoNuSeg tiles in a site store, via the real tiler."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ExperimentConfig
from wsi.config import TilingConfig
from wsi.tiling import run_tile_site

REPO = Path(__file__).resolve().parents[2]
SITE = "monuseg_breast_gi"


def tile_monuseg(data_root: Path, run_dir: Path, tile_size: int = 64, site: str = SITE) -> Path:
    """Tile one MoNuSeg site (its manifest's train/val/test split) into ``run_dir/sites/<site>/store.zarr``."""
    store = run_dir / "sites" / site / "store.zarr"
    res = run_tile_site(
        manifest=REPO / "data_manifests" / f"{site}.csv",
        data_root=data_root,
        store=store,
        tiling=TilingConfig(target_mpp=0.5, tile_size=tile_size, overlap=0),
        site=site,
        run_dir=None,
        workers=1,
    )
    assert not res["failed"], res["failed"]
    return store


def small_config(run_dir: Path, **train: object) -> ExperimentConfig:
    """A config small enough for CI: tiny UNet, one thread."""
    data = {
        "run_dir": str(run_dir),
        "sites": [{"name": SITE, "manifest": str(REPO / "data_manifests" / f"{SITE}.csv")}],
        "model": {"name": "unet", "channels": [8, 16, 32], "strides": [2, 2], "groups": 4},
        "train": {
            "batch_size": 16,
            "physical_batch_size": 8,
            "lr": 3e-3,
            "threads": 1,
            "checkpoint_every": 5,
            **train,
        },
    }
    return ExperimentConfig.model_validate(data)
