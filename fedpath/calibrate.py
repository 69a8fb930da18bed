"""`fedpath calibrate`: pick the privacy budget from evidence measured on the real experiment.

For every ε of the grid (``null`` = no DP, the control) one run records

* **utility**: held-out Dice of the experiment's own federation (FedAvg with DP-SGD at every site at that
  ε, through the real aggregator: :func:`fedpath.simulate.run_simulation`), on every site's test tiles,
  with each site's ledger figures (ε, δ, unit) as the trainer wrote them;
* **inversion**: the attack sweep (:func:`federation.attack.sweep.run_attack`) on real tiles at that ε:
  the FedAvg-round inversion against the prior, with its CI verdict;
* **membership**: LiRA (:mod:`federation.attack.lira`): ``lira.n_models`` models trained by the same
  trainer at that ε, each the target once with the others as shadows; AUC and TPR at 0.1% / 1% FPR.

It recommends the smallest ε whose held-out Dice meets ``utility_floor``, and says which evidence supports
it. Results: ``<run_dir>/calibrate/calibrate.json`` (read by ``fedpath report``) and summary key
"calibrate". Resumable per ε and per part: finished parts are read back from ``calibrate.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from fedcore.layout import RunLayout
from fedcore.summary import update_summary
from pipeline.config import ConfigError, ExperimentConfig, apply_overrides, load_config, variant_config
from pipeline.errors import FedpathError
from pipeline.tiles import tile_sites

log = logging.getLogger(__name__)


class LiraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    n_models: int = Field(17, ge=3, description="models per ε; each is the target once, the others its shadows")
    steps: int = Field(150, ge=1, description="training steps of each model")
    tile_size: int = Field(32, ge=8)
    tiles_per_image: int = Field(16, ge=1)
    images: int = Field(8, ge=2, description="MoNuSeg images whose tiles form the member/non-member pool")
    held_out_images: int = Field(4, ge=0, description="further images scoring the models' Dice")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="dotted config keys for the LiRA models, e.g. model.channels"
    )
    views: int = Field(
        1, ge=1, le=8,
        description="dihedral views the attacker queries per tile (augmented queries; 1: none, the default: "
        "measured, 8 views lowered the power here, README)",
    )


class CalibrateConfig(BaseModel):
    """configs/calibrate.yaml: which experiment, which ε grid, the utility floor, what to measure."""

    model_config = ConfigDict(extra="forbid")

    experiment: Path = Field(description="the experiment YAML whose budget is calibrated")
    run_dir: Path | None = Field(None, description="default: the experiment's run_dir + '_calibrate'")
    epsilons: list[float | None] = Field(default_factory=lambda: [None, 64.0, 16.0, 8.0, 4.0, 1.0])
    utility_floor: float = Field(ge=0, le=1, description="held-out Dice the recommended ε must reach")
    utility: Literal["federated", "none"] = "federated"
    experiment_overrides: list[str] = Field(default_factory=list, description="section.key=value, as --set")
    attack: dict[str, Any] = Field(default_factory=dict, description="overrides of the experiment's attack")
    inversion: bool = True
    lira: LiraSettings = LiraSettings()
    seed: int = 0


def load_calibrate(path: Path, overrides: list[str] | None = None) -> tuple[CalibrateConfig, ExperimentConfig]:
    if not path.is_file():
        raise ConfigError(f"{path}: calibrate config not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    try:
        cal = CalibrateConfig.model_validate(data)
    except Exception as exc:  # pydantic's ValidationError: one line naming the file
        first = str(exc).splitlines()
        raise ConfigError(f"{path}: {' '.join(first[:3])}") from None
    exp = load_config(cal.experiment, cal.experiment_overrides)
    data = exp.model_dump(mode="python")
    data["run_dir"] = cal.run_dir or Path(f"{exp.run_dir}_calibrate")
    data["attack"] = {**data["attack"], **cal.attack, "epsilons": cal.epsilons}
    data = apply_overrides(data, overrides)  # --set, last: on the experiment as calibrate runs it
    cfg = ExperimentConfig.model_validate(data)
    return cal.model_copy(update={"epsilons": cfg.attack.epsilons}), cfg


def _eps_tag(eps: float | None) -> str:
    return "nodp" if eps is None else f"{eps:g}"


def _variant(cfg: ExperimentConfig, eps: float | None) -> ExperimentConfig:
    """The experiment's FedAvg at ε over the whole training (None: DP off), in its own run directory."""
    vdir = cfg.run_dir / "calibrate" / "variants" / f"eps_{_eps_tag(eps)}"
    privacy: dict[str, Any] = {"train__privacy__enabled": False}
    if eps is not None:
        privacy = {"train__privacy__enabled": True, "train__privacy__target_epsilon": float(eps),
                   "train__privacy__noise_multiplier": None, "train__privacy__budget_epsilon": None}  # fmt: skip
    v = variant_config(cfg, f"calibrate eps={_eps_tag(eps)}", vdir, federation__strategy="fedavg", **privacy)
    for s in cfg.sites:
        src, dst = cfg.store_path(s.name).resolve(), v.store_path(s.name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            os.symlink(src, dst, target_is_directory=True)
    return v


def federated_utility(cfg: ExperimentConfig, eps: float | None) -> dict[str, Any]:
    """Held-out Dice of the experiment's federation at ``eps`` and each site's ledger (ε, δ, unit)."""
    from fedpath.simulate import run_simulation
    from pipeline.checkpoint import read_model_file
    from pipeline.evaluate import evaluate_store
    from pipeline.models import build_model
    from pipeline.statement import write_statement

    v = _variant(cfg, eps)
    t0 = time.perf_counter()
    run_simulation(v)
    models = [p for _, p in RunLayout(v.run_dir).server.published_globals()]
    state, _ = read_model_file(models[-1])
    net = build_model(v.model)
    net.load_state_dict(state)
    per_site = {s.name: evaluate_store(net, cfg.store_path(s.name), {"test"}) for s in cfg.sites}
    dices = [m["dice"] for m in per_site.values() if m.get("dice") is not None]
    ledgers: dict[str, Any] = {}
    for site, st in write_statement(v.run_dir)["sites"].items():
        finest = next(iter(st["against_aggregator"].values()))
        ledgers[site] = {k: finest.get(k) for k in ("epsilon", "delta", "unit", "text")}
    return {
        "dice": float(np.mean(dices)) if dices else None,
        "dice_per_site": {k: m.get("dice") for k, m in per_site.items()},
        "what": f"FedAvg + DP-SGD, {v.federation.rounds} rounds x {v.train.max_steps} steps, {len(cfg.sites)} sites",
        "ledger": ledgers,
        "model": str(models[-1]),
        "seconds": time.perf_counter() - t0,
    }


def _lira_pools(cfg: ExperimentConfig, data_root: Path, lira: LiraSettings, seed: int) -> tuple[Any, Any]:
    from federation.attack.tiles import load_monuseg_tiles

    n_img = lira.images + lira.held_out_images
    tiles = load_monuseg_tiles(
        data_root, lira.tile_size, cfg.tiling.target_mpp, per_image=lira.tiles_per_image, max_images=None, seed=seed
    )
    srcs = sorted(set(tiles.sources))
    if len(srcs) < n_img:
        raise FedpathError(f"{data_root}: {len(srcs)} MoNuSeg images, lira needs {n_img}")
    order = [srcs[i] for i in np.random.default_rng(seed + 11).permutation(len(srcs))]
    pool_imgs, held_imgs = set(order[: lira.images]), set(order[lira.images : n_img])
    pool = tiles.subset([i for i, s in enumerate(tiles.sources) if s in pool_imgs])
    held = tiles.subset([i for i, s in enumerate(tiles.sources) if s in held_imgs]) if held_imgs else None
    return pool, held


def recommend(rows: list[dict[str, Any]], floor: float) -> dict[str, Any]:
    """The smallest finite ε whose held-out Dice meets the floor, with the evidence at that ε."""
    ok = [r for r in rows if r["epsilon"] is not None and r.get("dice") is not None and r["dice"] >= floor]
    if not ok:
        return {
            "epsilon": None,
            "text": f"no ε of the grid reaches the utility floor (held-out Dice {floor:g}); none is recommended",
        }
    best = min(ok, key=lambda r: r["epsilon"])
    inv = (best.get("inversion") or {}).get("status", "not measured")
    lira = best.get("lira") or {}
    ctrl = next((r for r in rows if r["epsilon"] is None), None)
    ctrl_inv = ((ctrl or {}).get("inversion") or {}).get("status", "not measured")
    evidence = [
        f"held-out Dice {best['dice']:.3f} ≥ floor {floor:g}",
        f"inversion at this ε: {inv} (undefended control: {ctrl_inv})",
    ]
    if lira:
        evidence.append(
            f"LiRA AUC {lira['auc']:.3f}, TPR {lira['tpr_at_0_1pct_fpr']:.4f} at 0.1% FPR and "
            f"{lira['tpr_at_1pct_fpr']:.4f} at 1% FPR"
        )
    delta = best.get("delta")
    return {
        "epsilon": best["epsilon"],
        "delta": delta,
        "unit": best.get("unit"),
        "evidence": evidence,
        "text": f"ε = {best['epsilon']:g} (δ = {delta:.2g}, per {best.get('unit') or 'tile'}): "
        + "; ".join(evidence)
        + ("" if ctrl_inv == "beats prior" else ". The inversion evidence is void: the undefended attack did "
           "not beat the prior, so it shows nothing either way"),
    }  # fmt: skip


def run_calibrate(cal: CalibrateConfig, cfg: ExperimentConfig, data_root: Path | None) -> dict[str, Any]:
    """The whole grid; writes and returns calibrate.json's content."""
    from federation.attack.lira import run_lira
    from federation.attack.sweep import run_attack

    t_start = time.perf_counter()
    out = cfg.run_dir / "calibrate"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "calibrate.json"
    if data_root is None:
        raise FedpathError("calibrate: no data root (give --data-root or set FEDPATH_DATA_ROOT)")
    key = cal.model_dump_json() + cfg.model_dump_json()
    prev: dict[str, Any] = {}
    if path.is_file():
        try:
            prev = json.loads(path.read_text())
        except json.JSONDecodeError:
            prev = {}
        if prev.get("config_key") != key:
            prev = {}
    rows: dict[str, dict[str, Any]] = {r["tag"]: r for r in prev.get("rows", [])}

    def save(done: bool) -> dict[str, Any]:
        ordered = [rows[_eps_tag(e)] for e in cal.epsilons if _eps_tag(e) in rows]
        result = {
            "config_key": key,
            "experiment": str(cal.experiment),
            "utility_floor": cal.utility_floor,
            "utility_source": cal.utility,
            "lira_what": (
                f"online LiRA, {cal.lira.n_models} models per ε trained by fedpath's trainer on random halves of "
                f"{cal.lira.tiles_per_image} x {cal.lira.images} MoNuSeg tiles ({cal.lira.tile_size} px, members and "
                f"non-members from the same images), each model the target once with the other "
                f"{cal.lira.n_models - 1} as shadows, {cal.lira.steps} steps each, {cal.lira.views} dihedral "
                "view(s) queried per tile"
            ),
            "rows": ordered,
            "recommendation": recommend(ordered, cal.utility_floor),
            "complete": done,
            "seconds_this_invocation": time.perf_counter() - t_start,
        }
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2, default=float))
        os.replace(tmp, path)
        return result

    if cal.utility == "federated":
        tile_sites(cfg, data_root, "calibrate")

    attack: dict[str, Any] = {}
    if cal.inversion:
        done_inv = all("inversion" in rows.get(_eps_tag(e), {}) for e in cal.epsilons)
        if not done_inv:
            attack = run_attack(cfg, data_root)
            for e in attack["results"]:
                key_ = attack["primary_attack"]
                a = e["attacks"].get(key_)
                row = rows.setdefault(_eps_tag(e["epsilon"]), {"tag": _eps_tag(e["epsilon"]), "epsilon": e["epsilon"]})
                row["noise_multiplier"] = e["noise_multiplier"]
                row.setdefault("delta", e["delta"])
                row.setdefault("unit", e["unit"])
                row["inversion"] = (
                    {"attack": key_, "status": a["status"], **{k: a["summary"][k] for k in ("ssim", "prior_ssim", "difference")}}
                    if a else None
                )  # fmt: skip
            save(False)

    pool = held = None
    if cal.lira.enabled:
        pool, held = _lira_pools(cfg, data_root, cal.lira, cal.seed)
    for eps in cal.epsilons:
        tag = _eps_tag(eps)
        row = rows.setdefault(tag, {"tag": tag, "epsilon": eps})
        if cal.utility == "federated" and "dice" not in row:
            u = federated_utility(cfg, eps)
            row.update(dice=u["dice"], utility=u)
            if eps is not None and u["ledger"]:
                worst = max(u["ledger"].values(), key=lambda r: r.get("epsilon") or 0.0)
                row.update(ledger_epsilon=worst.get("epsilon"), delta=worst.get("delta"), unit=worst.get("unit"))
            save(False)
        if cal.lira.enabled and "lira" not in row:
            assert pool is not None
            lr = run_lira(
                # one seed for every ε: the same member/non-member splits, so the ε are compared paired
                cfg, pool, held, eps, cal.lira.n_models, cal.lira.steps, cal.lira.overrides, seed=cal.seed,
                views=cal.lira.views,
            )
            row["lira"] = lr.as_dict()
            if cal.utility == "none":
                row.setdefault("dice", lr.dice)
                row.setdefault("utility", {"what": "mean held-out Dice of the LiRA models (disjoint images)"})
            if eps is not None:
                row.setdefault("delta", lr.delta)
                row.setdefault("unit", "tile")
            save(False)
        if eps is not None and row.get("delta") is None:
            row["delta"] = (attack.get("dp_accounting") or {}).get("delta")
            row["unit"] = "tile"
    result = save(True)
    if (cfg.run_dir / "attack" / "attack.json").is_file() and cal.utility == "federated":
        from pipeline.report import build_report

        result["report"] = str(build_report(cfg.run_dir))
    update_summary(
        cfg.run_dir,
        "calibrate",
        {"calibrate_json": "calibrate/calibrate.json", "recommendation": result["recommendation"],
         "rows": [{k: r.get(k) for k in ("epsilon", "delta", "unit", "dice")} | {
             "inversion": (r.get("inversion") or {}).get("status"),
             "lira_tpr_at_0_1pct_fpr": (r.get("lira") or {}).get("tpr_at_0_1pct_fpr")} for r in result["rows"]]},
    )  # fmt: skip
    return result
