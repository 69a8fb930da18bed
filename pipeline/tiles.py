"""Tile every site of an experiment config into its store: the one loop that every stage (demo, simulate,
experiment, calibrate, the one-shot experiment) and the tests run before training.

``fedpath tile`` keeps its own loop: it tiles what it can and exits non-zero at the end, where these
stages stop at the first site with a slide that failed (they cannot train on a partial store).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ExperimentConfig
from pipeline.errors import FedpathError


def tile_sites(
    cfg: ExperimentConfig,
    data_root: Path | None,
    what: str,
    *,
    missing_only: bool = False,
) -> list[str]:
    """Tile each site of ``cfg`` (resumable: finished slides are skipped by the tiler) with the config's
    scheduler and workers. ``missing_only`` leaves a site whose store exists untouched. Returns the
    sites tiled; FedpathError ``"<what>: tiling <site> failed: …"`` at the first failed slide."""
    from wsi.tiling import run_tile_site

    done = []
    for s in cfg.sites:
        store = cfg.store_path(s.name)
        if missing_only and store.exists():
            continue
        res = run_tile_site(
            manifest=s.manifest,
            data_root=None if data_root is None else Path(data_root).resolve(),
            store=store,
            tiling=cfg.tiling,
            site=s.name,
            run_dir=cfg.run_dir,
            scheduler=cfg.tiling.scheduler,
            workers=cfg.tiling.workers,
        )
        if res.get("failed"):
            raise FedpathError(f"{what}: tiling {s.name} failed: {res['failed']}")
        done.append(s.name)
    return done


__all__ = ["tile_sites"]
