"""``fedpath pretrain``: the server's self-supervised θ_pre (issue 16), from slides only the server holds.

The server tiles its own unlabelled slides (``federation.server_manifest``: public slides in the data root, or
fedpath's synthetic slides) through the normal tiling path, pretrains the configured network by masked
image modelling (:func:`pipeline.transfer.mim_pretrain`), puts a fresh head for the task's classes on it
(:func:`pipeline.transfer.with_fresh_head`) and writes ``<run>/server/pretrained.safetensors``.

No site data is read, so no site's privacy budget is spent. Resumable: a finished model for the same
settings is kept.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.layout import RunLayout
from fedcore.summary import update_summary
from pipeline.checkpoint import ModelMeta, read_model_file, save_model
from pipeline.config import ExperimentConfig, SiteConfig, variant_config
from pipeline.errors import FedpathError

log = logging.getLogger(__name__)


def pretrained_path(cfg: ExperimentConfig) -> Path:
    return RunLayout(cfg.run_dir).server.pretrained


def run_pretrain(cfg: ExperimentConfig, data_root: Path | None, objective: str | None = None) -> dict[str, Any]:
    """θ_pre by ``objective`` (default ``pretrain.objective``); returns what was done, ``path`` included."""
    from pipeline.transfer import UnlabelledTiles, mim_pretrain, with_fresh_head

    pc = cfg.pretrain
    if (objective or pc.objective) == "synthetic":
        lay = RunLayout(cfg.run_dir).server
        return _synthetic_pretrain(cfg, lay.synthetic_pretrained, lay.synthetic_run)
    manifest = cfg.federation.server_manifest
    if manifest is None:
        raise FedpathError(
            "federation.server_manifest: not set (the server's unlabelled slides, e.g. data_manifests/slides.csv)"
        )
    if data_root is None:
        raise FedpathError("pretrain: no data root (give --data-root or set FEDPATH_DATA_ROOT)")
    out = pretrained_path(cfg)
    settings = {"pretrain": pc.model_dump(mode="json", exclude={"objective", "synthetic"}), "manifest": str(manifest), "model": cfg.model.model_dump(), "tiling": cfg.tiling.model_dump(mode="json")}
    store = _tile_server_slides(cfg, manifest, data_root, RunLayout(cfg.run_dir).server.data_store, "slides")
    tile_server_val(cfg, data_root)
    if (kept := _kept(out, settings)) is not None:
        return kept
    tiles = UnlabelledTiles(store, seed=pc.seed)
    t0 = time.perf_counter()
    pre = mim_pretrain(
        cfg.model, tiles, steps=pc.steps, batch_size=pc.batch_size, lr=pc.lr,
        mask_ratio=pc.mask_ratio, patch=pc.patch, seed=pc.seed,
    )
    state = with_fresh_head(pre.state, cfg.model, seed=pc.seed)
    tail = max(1, pc.steps // 5)
    first, last = float(np.mean(pre.losses[:tail])), float(np.mean(pre.losses[-tail:]))
    result: dict[str, Any] = {
        "tiles": len(tiles),
        "steps": pc.steps,
        "seconds": round(time.perf_counter() - t0, 1),
        "masked_l1_first": first,
        "masked_l1_last": last,
        "mean_fill_l1": pre.mean_fill_l1,
        "path": str(out),
    }
    if not last < pre.mean_fill_l1:
        log.warning(
            "pretrain: the network restores hidden tissue no better than each tile's mean colour "
            "(L1 %.4f vs %.4f): θ_pre has learnt little; raise pretrain.steps", last, pre.mean_fill_l1,
        )
    meta = ModelMeta(
        model=cfg.model, tile_size=cfg.tiling.tile_size, target_mpp=cfg.tiling.target_mpp, source="pretrained",
        extra={"settings": settings, "result": result},
    )
    save_model(out, state, meta)
    update_summary(cfg.run_dir, "pretrain", result)
    log.info("pretrain: θ_pre written to %s (%s)", out, result)
    return result


def _kept(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded result of ``out`` when it was trained with ``settings`` (compared as JSON), else None."""
    if not out.is_file():
        return None
    _, meta = read_model_file(out)
    if meta.extra.get("settings") != json.loads(json.dumps(settings)):
        return None
    log.info("pretrain: %s already holds θ_pre for these settings", out)
    return dict(meta.extra.get("result", {})) | {"path": str(out)}


def run_teacher_pretrain(cfg: ExperimentConfig, width: float) -> dict[str, Any]:
    """FedMIC's teacher θ_pre: the synthetic pretraining (:func:`run_pretrain`, ``objective: synthetic``) of
    the teacher's architecture (``width`` times the model's channels), on the same synthetic slides; returns
    what was done, ``path`` included. The server's public data, so no DP and no site's budget."""
    from federation.fedmic_site import teacher_config

    lay = RunLayout(cfg.run_dir).server
    tcfg = cfg.model_copy(update={"model": teacher_config(cfg.model, width)})
    return _synthetic_pretrain(tcfg, lay.synthetic_teacher_pretrained, lay.synthetic_teacher_run, "pretrain_teacher")


def _synthetic_pretrain(cfg: ExperimentConfig, out: Path, run: Path, summary_key: str = "pretrain") -> dict[str, Any]:
    """θ_pre of ``cfg.model`` into ``out`` by supervised segmentation on slides the server synthesises
    (``pretrain.synthetic``), through the normal synth, tiling and training paths: public data, so no DP and
    no site's budget. The training is the pooled (centralised) job of a run of its own (``run``, e.g.
    ``<run>/server/synthetic_run``): resumable after a kill, and a finished model for the same settings is
    kept."""
    from pipeline.train import train_local
    from wsi.synth import run_synth
    from wsi.tiling import run_tile_site

    pc = cfg.pretrain
    sp = pc.synthetic
    lay = RunLayout(cfg.run_dir).server
    settings = {
        "objective": "synthetic", "synth": sp.synth.model_dump(mode="json"), "steps": sp.steps,
        "model": cfg.model.model_dump(), "tiling": cfg.tiling.model_dump(mode="json"),
        "pretrain_seed": pc.seed, "train": cfg.train.model_dump(mode="json", exclude={"threads", "privacy", "seed"}),
    }  # fmt: skip
    if (kept := _kept(out, settings)) is not None:
        return kept
    t0 = time.perf_counter()
    synth = run_synth(sp.synth, lay.synthetic, cfg.run_dir)
    sites = [SiteConfig(name=s, manifest=Path(m)) for s, m in synth["manifests"].items()]
    sub = variant_config(cfg, "pretrain", run, sites=[s.model_dump() for s in sites],
                         train__privacy__enabled=False, train__max_steps=sp.steps, train__seed=pc.seed)  # fmt: skip
    for s in sites:
        res = run_tile_site(
            manifest=s.manifest, data_root=lay.synthetic, store=sub.store_path(s.name), tiling=cfg.tiling,
            site=s.name, run_dir=sub.run_dir, workers=cfg.tiling.workers,
        )  # fmt: skip
        if res.get("failed"):
            raise FedpathError(f"pretrain: tiling the server's synthetic site {s.name!r} failed: {res['failed']}")
    trained = train_local(sub, [s.name for s in sites], sub.run_dir, max_steps=sp.steps, job_id="pretrain", progress=False)
    result: dict[str, Any] = {
        "objective": "synthetic",
        "sites": [s.name for s in sites],
        "steps": trained.steps,
        "seconds": round(time.perf_counter() - t0, 1),
        "val_dice": trained.metrics.get("val_dice"),
        "path": str(out),
    }
    meta = ModelMeta(
        model=cfg.model, tile_size=cfg.tiling.tile_size, target_mpp=cfg.tiling.target_mpp, source="pretrained",
        extra={"settings": settings, "result": result},
    )  # fmt: skip
    save_model(out, trained.state, meta)
    update_summary(cfg.run_dir, summary_key, result)
    log.info("pretrain: θ_pre written to %s (%s)", out, result)
    return result


def tile_server_val(cfg: ExperimentConfig, data_root: Path, manifest: Path | None = None) -> Path | None:
    """Tile the server's labelled validation slides (``federation.server_val_manifest``, or ``manifest``)
    into ``<run>/server/val/store.zarr`` through the normal tiling path; None when none is configured."""
    manifest = manifest or cfg.federation.server_val_manifest
    if manifest is None:
        return None
    return _tile_server_slides(cfg, manifest, data_root, RunLayout(cfg.run_dir).server.val_store, "validation slides")


def _tile_server_slides(cfg: ExperimentConfig, manifest: Path, data_root: Path, store: Path, what: str) -> Path:
    """One of the server's own manifests through the normal tiling path into ``store``."""
    from wsi.tiling import run_tile_site

    res = run_tile_site(
        manifest=manifest, data_root=data_root.resolve(), store=store, tiling=cfg.tiling,
        site=_site_of(manifest), run_dir=cfg.run_dir, workers=cfg.tiling.workers,
    )
    if res.get("failed"):
        raise FedpathError(f"pretrain: tiling the server's {what} failed: {res['failed']}")
    return store


def _site_of(manifest: Path) -> str:
    from wsi.manifest import read_manifest

    rows = read_manifest(manifest)
    if not rows:
        raise FedpathError(f"{manifest}: no slides")
    return rows[0].site
