"""The real-data experiment: one table comparing how sites can train together.

Variants (same model, same budget of local optimiser steps):

* ``local:<site>``: each site alone, ``rounds * steps_per_round`` steps on its own tiles;
* ``centralised``: all training tiles pooled, ``rounds * steps_per_round * n_sites`` steps (the same
  total compute as a federation);
* ``fedavg`` / ``fedprox``: the federation through the real aggregator (one process per site), no DP;
* ``feddp_eps_<ε>``: FedAvg with sample-level DP-SGD at every site (FedDP), ε over the whole training;
  ``inf`` clips per-sample gradients but adds no noise.

Every model is evaluated on every site's held-out (``test`` split) tiles. The table (markdown and JSON) is
written to ``<run_dir>/experiment.md`` / ``experiment.json`` and to ``summary.json`` key "experiment".
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from fedcore.summary import update_summary
from pipeline.config import ExperimentConfig
from pipeline.errors import FedpathError
from pipeline.evaluate import evaluate_store
from pipeline.models import build_model

log = logging.getLogger(__name__)

FED_VARIANTS = ("fedavg", "fedprox")


def _variant_cfg(cfg: ExperimentConfig, name: str, run_dir: Path, **changes: Any) -> ExperimentConfig:
    data = cfg.model_dump(mode="python")
    data["run_dir"] = run_dir
    data["name"] = f"{cfg.name}:{name}"
    for dotted, value in changes.items():
        node = data
        parts = dotted.split("__")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    return ExperimentConfig.model_validate(data)


def _link_stores(base: ExperimentConfig, variant: ExperimentConfig) -> None:
    for s in base.sites:
        src = base.store_path(s.name).resolve()
        dst = variant.store_path(s.name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            os.symlink(src, dst, target_is_directory=True)


def _evaluate(cfg: ExperimentConfig, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    net = build_model(cfg.model)
    net.load_state_dict(state)
    return {s.name: evaluate_store(net, cfg.store_path(s.name), {"test"}) for s in cfg.sites}


def _final_global(run_dir: Path) -> dict[str, torch.Tensor]:
    from pipeline.checkpoint import read_model_file

    models = sorted(
        (run_dir / "server" / "global").glob("round_*.safetensors"), key=lambda p: int(p.stem.split("_")[1])
    )
    if not models:
        raise FedpathError(f"{run_dir}/server/global: the federation published no model")
    state, _ = read_model_file(models[-1])
    return state


def _ledger_eps(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per site: the tile-level guarantee against the aggregator (ε, δ) and the slide-level one, when
    group privacy gives a meaningful one, from the variant's privacy statement."""
    from pipeline.statement import write_statement

    out: dict[str, dict[str, Any]] = {}
    for site, st in write_statement(run_dir)["sites"].items():
        finest = next(iter(st["against_aggregator"].values()))
        sample: dict[str, Any] = next((m for m in st["mechanisms"] if m["level"] == "sample"), {})
        slide = sample.get("slide") or {}
        out[site] = {
            "epsilon": finest.get("epsilon"),
            "delta": finest.get("delta"),
            "unit": finest.get("unit"),
            "epsilon_slide": slide.get("epsilon"),
            "delta_slide": slide.get("delta"),
            "text": finest.get("text"),
        }
    return out


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.3f}"
    return str(x)


def _eps_cell(eps_delta: tuple[float, float | None]) -> str:
    eps, delta = eps_delta
    return _fmt(eps) if delta is None else f"{_fmt(eps)} (δ={delta:.1g})"


DEFAULT_EPSILONS: tuple[float, ...] = (math.inf, 8.0, 4.0, 1.0)


def _config_key(cfg: ExperimentConfig) -> str:
    """Rows computed under another config are stale; the ε list only adds or drops FedDP rows."""
    import hashlib

    # how `simulate` runs its site jobs (warm workers or fresh processes) changes no result
    exclude: Any = {"run_dir": True, "name": True, "federation": {"simulate_workers"}}
    return hashlib.sha256(cfg.model_dump_json(exclude=exclude).encode()).hexdigest()[:16]


def run_experiment(
    cfg: ExperimentConfig, data_root: Path | None, epsilons: list[float] | None = None
) -> dict[str, Any]:
    """Tile every site once, train every variant, evaluate on every site's held-out tiles, tabulate.

    Resumable: a variant already evaluated under the same config (``experiment.json``) is not rerun, and
    training jobs themselves resume from their checkpoints.
    """
    from fedpath.simulate import run_simulation
    from pipeline.train import train_local
    from wsi.tiling import run_tile_site

    base_dir = cfg.run_dir
    base_dir.mkdir(parents=True, exist_ok=True)
    if data_root is None:
        raise FedpathError("experiment: no data root (give --data-root or set FEDPATH_DATA_ROOT)")
    data_root = data_root.resolve()
    for s in cfg.sites:
        res = run_tile_site(
            manifest=s.manifest, data_root=data_root, store=cfg.store_path(s.name), tiling=cfg.tiling,
            site=s.name, run_dir=base_dir, scheduler=cfg.tiling.scheduler, workers=cfg.tiling.workers,
        )
        if res.get("failed"):
            raise FedpathError(f"experiment: tiling {s.name} failed: {res['failed']}")

    rounds = cfg.federation.rounds
    steps = cfg.train.max_steps
    if steps is None:
        raise FedpathError("experiment: set train.max_steps (local steps per round) so every variant has the same budget")
    names = [s.name for s in cfg.sites]
    eps_list: list[float] = list(epsilons) if epsilons else list(DEFAULT_EPSILONS)
    key = _config_key(cfg)
    state_file = base_dir / "experiment.json"
    rows: dict[str, dict[str, Any]] = {}
    if state_file.exists():
        try:
            previous = json.loads(state_file.read_text())
        except json.JSONDecodeError:
            previous = {}
        if previous.get("config_key") == key:
            rows = previous.get("rows", {})
            log.info("experiment: resuming, %d variants already done: %s", len(rows), ", ".join(rows))

    def record(name: str, kind: str, state: dict[str, torch.Tensor], seconds: float, run_dir: Path, extra: dict[str, Any]) -> None:
        ev = _evaluate(cfg, state)
        rows[name] = {"kind": kind, "seconds": seconds, "eval": ev, "ledger": _ledger_eps(run_dir), **extra}
        log.info("experiment: %s done in %.0f s: %s", name, seconds, {k: round(v.get("dice", float("nan")), 3) for k, v in ev.items()})
        tmp = state_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"config_key": key, "rows": rows}, indent=2, default=str))
        os.replace(tmp, state_file)

    no_dp = {"train__privacy__enabled": False}
    for site in names:
        if f"local:{site}" in rows:
            continue
        vdir = base_dir / "variants" / f"local_{site}"
        vcfg = _variant_cfg(cfg, f"local_{site}", vdir, **no_dp)
        _link_stores(cfg, vcfg)
        t0 = time.perf_counter()
        local = train_local(vcfg, [site], vdir, max_steps=rounds * steps, job_id="experiment")
        record(f"local:{site}", "local", local.state, time.perf_counter() - t0, vdir, {"site": site})

    if "centralised" not in rows:
        vdir = base_dir / "variants" / "centralised"
        vcfg = _variant_cfg(cfg, "centralised", vdir, **no_dp)
        _link_stores(cfg, vcfg)
        t0 = time.perf_counter()
        pooled = train_local(vcfg, names, vdir, max_steps=rounds * steps * len(names), job_id="experiment")
        record("centralised", "centralised", pooled.state, time.perf_counter() - t0, vdir, {})

    for strat in FED_VARIANTS:
        if strat in rows:
            continue
        vdir = base_dir / "variants" / strat
        vcfg = _variant_cfg(cfg, strat, vdir, federation__strategy=strat, **no_dp)
        _link_stores(cfg, vcfg)
        t0 = time.perf_counter()
        run_simulation(vcfg)
        record(strat, "federated", _final_global(vdir), time.perf_counter() - t0, vdir, {})

    for eps in eps_list:
        tag = "inf" if math.isinf(eps) else f"{eps:g}"
        if f"feddp eps={tag}" in rows:
            continue
        vdir = base_dir / "variants" / f"feddp_eps_{tag}"
        privacy = {
            "train__privacy__enabled": True,
            "train__privacy__target_epsilon": None if math.isinf(eps) else eps,
            "train__privacy__noise_multiplier": 0.0 if math.isinf(eps) else None,
            # ε = inf clips without noise: no guarantee, so no budget, and the statement says so
            "train__privacy__budget_epsilon": "unlimited" if math.isinf(eps) else None,
        }
        vcfg = _variant_cfg(cfg, f"feddp_eps_{tag}", vdir, federation__strategy="fedavg", **privacy)
        _link_stores(cfg, vcfg)
        t0 = time.perf_counter()
        run_simulation(vcfg)
        record(f"feddp eps={tag}", "federated", _final_global(vdir), time.perf_counter() - t0, vdir, {"target_epsilon": eps})

    from fedpath.experiment_fedmic import fedmic_table, run_fedmic_variants  # issue 15: the FedMIC rows

    run_fedmic_variants(cfg, base_dir, rows, record, _variant_cfg, _link_stores, _final_global)
    table = tabulate(rows, names) + fedmic_table(rows, names)
    (base_dir / "experiment.md").write_text(table)
    summary = {"rows": rows, "table_markdown": table, "epsilons": [str(e) for e in eps_list]}
    update_summary(base_dir, "experiment", summary)
    print(table)
    return summary


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def tabulate(rows: dict[str, dict[str, Any]], sites: list[str]) -> str:
    """Markdown table: Dice per site's held-out slides, mean Dice/Jaccard/accuracy, ε, wall time."""
    head = ["variant"] + [f"Dice {s}" for s in sites] + [
        "mean Dice", "mean Jaccard", "mean pixel acc.", "Dice on other sites", "ε per tile (max; δ)", "ε per slide (max; δ)", "wall s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        ev = row["eval"]
        dice = [ev[s].get("dice") for s in sites]
        others = [ev[s].get("dice") for s in sites if s != row.get("site")] if row.get("site") else None
        eps = [(v["epsilon"], v.get("delta")) for v in row["ledger"].values() if isinstance(v.get("epsilon"), (int, float))]
        eps_slide = [(v["epsilon_slide"], v.get("delta_slide")) for v in row["ledger"].values() if isinstance(v.get("epsilon_slide"), (int, float))]
        dp_row = any(v.get("unit") for v in row["ledger"].values())
        cells = [name] + [_fmt(d) for d in dice] + [
            _fmt(_mean(dice)),
            _fmt(_mean([ev[s].get("jaccard") for s in sites])),
            _fmt(_mean([ev[s].get("pixel_accuracy") for s in sites])),
            _fmt(_mean(others)) if others is not None else _fmt(_mean(dice)),
            _eps_cell(max(eps)) if eps else "-",
            _eps_cell(max(eps_slide)) if eps_slide else ("no guarantee" if dp_row else "-"),
            f"{row['seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
