"""``make demo``: the whole pipeline on fedpath's synthetic default, stage by stage.

synth -> tile every site -> federated DP training through the real aggregator process (one process per
site) -> inference and stitching on each site's held-out slide -> attack sweep -> report. Every stage
is the same code a deployment runs; the demo only chains them and prints the headline figures.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedcore.layout import RunLayout
from fedcore.summary import read_summary, update_summary
from pipeline.config import ExperimentConfig
from pipeline.errors import FedpathError
from pipeline.statement import statement_lines, write_statement
from pipeline.tiles import tile_sites

log = logging.getLogger(__name__)
console = Console()


def _stage(name: str) -> None:
    console.rule(f"[bold]{name}")


def _headline(run_dir: Path, timings: dict[str, float]) -> dict[str, Any]:
    summary = read_summary(run_dir)
    infer = summary.get("infer", {})
    dices = [
        s["metrics"]["dice"]
        for s in infer.get("slides", [])
        if isinstance(s, dict) and isinstance(s.get("metrics"), dict) and "dice" in s["metrics"]
    ]
    statement = write_statement(run_dir)
    eps = {site: st["against_aggregator"] for site, st in statement["sites"].items()}
    attack = summary.get("attack", {})
    return {
        "held_out_dice": sum(dices) / len(dices) if dices else None,
        "held_out_slides": len(dices),
        "epsilon": eps,
        "attack_ssim": attack.get("headline", attack.get("ssim_by_epsilon")),
        "attack_verdict": _attack_verdict(attack),
        "stage_seconds": timings,
    }


def _attack_verdict(attack: dict[str, Any]) -> str | None:
    """The headline's reading of the attack: the prior it must beat, and what the control's result means."""
    rows = attack.get("per_epsilon") or []
    primary = attack.get("primary_attack")
    control = next((r for r in rows if r.get("epsilon") is None), None)
    if not control or not primary or control["prior_ssim"].get(primary) is None:
        return None
    prior = float(control["prior_ssim"][primary])
    if control["status"].get(primary) == "beats prior":
        where = (attack.get("indistinguishable_from") or {}).get("epsilon")
        tail = f"; within the prior from ε = {where:g} down" if isinstance(where, (int, float)) else ""
        return f"prior {prior:.2f}: the undefended attack beats it{tail}"
    return f"prior {prior:.2f}: the undefended attack does not beat it, so this shows nothing either way"


def run_demo(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run every stage on the synthetic default and print where the report is and what it found."""
    from federation.attack.sweep import run_attack
    from fedpath.simulate import run_simulation
    from pipeline.infer import run_infer
    from pipeline.report import build_report
    from wsi.synth import run_synth

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    timings: dict[str, float] = {}
    data_root = cfg.resolved_data_root() or run_dir / "synthetic"

    t0 = time.perf_counter()
    _stage("1/6 synthesise slides")
    run_synth(cfg.synth, data_root, run_dir=run_dir)
    timings["synth"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _stage("2/6 tile every site into its own zarr store")
    tile_sites(cfg, data_root, "demo")
    timings["tile"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _stage("3/6 federated DP training (aggregator + one process per site)")
    run_simulation(cfg)
    timings["federation"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _stage("4/6 inference and stitching on the held-out slides")
    model = RunLayout(run_dir).server.latest_global()
    failed: list[Any] = []
    for site in cfg.sites:
        res = run_infer(cfg, model=model, slides=[], manifest=None, site=site.name, data_root=data_root, all_splits=False)
        failed += res.get("failed", [])
    if failed:
        raise FedpathError(f"inference failed: {failed}")
    timings["infer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _stage("5/6 privacy attacks")
    run_attack(cfg, data_root=data_root)
    timings["attack"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _stage("6/6 report")
    report = build_report(run_dir)
    timings["report"] = time.perf_counter() - t0

    head = _headline(run_dir, timings)
    update_summary(run_dir, "demo", head)
    table = Table(title="fedpath demo: headline figures")
    table.add_column("figure")
    table.add_column("value")
    dice = head["held_out_dice"]
    table.add_row("Dice on held-out slides", "n/a" if dice is None else f"{dice:.3f} ({head['held_out_slides']} slides)")
    for label, text in statement_lines(read_summary(run_dir)["privacy"]):
        table.add_row(label, text)
    ssim = head["attack_ssim"]
    if isinstance(ssim, dict):
        ssim_text = ", ".join(f"{k}: {v:.2f}" if isinstance(v, (int, float)) else f"{k}: {v}" for k, v in ssim.items())
    else:
        ssim_text = str(ssim)
    if head.get("attack_verdict"):
        ssim_text += f" ({head['attack_verdict']})"
    table.add_row("gradient-inversion SSIM by ε", ssim_text)
    table.add_row("wall time", f"{sum(timings.values()):.0f} s")
    console.print(table)
    console.print(f"report: [bold]{report}[/]")
    return head
