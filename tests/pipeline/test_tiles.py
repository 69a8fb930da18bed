"""pipeline.tiles.tile_sites: the one loop that tiles a config's sites before a stage trains on them."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.errors import FedpathError
from pipeline.tiles import tile_sites


def _config(tmp: Path, repo_root: Path, *, corrupt: bool) -> Path:
    rows = list(csv.DictReader((repo_root / "data_manifests" / "monuseg_breast_gi.csv").open()))[:2]
    if corrupt:
        rows[1]["sha256"] = "0" * 64  # the tiler must refuse this slide, and the stage must stop
    manifest = tmp / "m.csv"
    with manifest.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    data = {
        "name": "tiles",
        "run_dir": str(tmp / "run"),
        "sites": [{"name": "monuseg_breast_gi", "manifest": str(manifest)}],
        "tiling": {"target_mpp": 2.0, "tile_size": 64, "min_tissue_fraction": 0.0},
    }
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_tile_sites_tiles_resumes_and_stops_on_a_failed_slide(tmp_path: Path, data_root: Path, repo_root: Path) -> None:
    from wsi.store import SiteStore

    cfg = load_config(_config(tmp_path, repo_root, corrupt=False))
    assert tile_sites(cfg, data_root, "test") == ["monuseg_breast_gi"]
    store = cfg.store_path("monuseg_breast_gi")
    assert len(SiteStore(store).slides()) == 2
    # an existing store is left alone with missing_only; tiled again (resumably) without it
    assert tile_sites(cfg, data_root, "test", missing_only=True) == []
    assert tile_sites(cfg, data_root, "test") == ["monuseg_breast_gi"]

    bad = load_config(_config(_mk(tmp_path / "bad"), repo_root, corrupt=True))
    with pytest.raises(FedpathError, match=r"^test: tiling monuseg_breast_gi failed: .*TCGA-A7-A13F"):
        tile_sites(bad, data_root, "test")


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
