"""`fedpath report --run DIR`: the attack-evaluation report a privacy officer reads.

Writes ``<run_dir>/report/index.html`` (one self-contained file: images and plots base64-embedded) and
``<run_dir>/report/report.json`` (the same content as data).

Inputs and what is required:

* **required** ``sites/*/privacy.json``: at least one site's DP ledger (``pipeline.privacy``); without a
  ledger there is no ε to report, so the report refuses with the missing path.
* **required** ``attack/attack.json``: the attack sweep's results (``fedpath attack``); without it the
  report cannot say what an aggregator could reconstruct.
* optional ``sites/*/update_privacy.json`` (update-level DP ledgers), ``server/updates/`` (stored updates:
  when absent the report says that the real-update attack had nothing to attack), ``summary.json`` and
  ``config.json``/``config.yaml`` (the run's configuration), the grid PNGs named in attack.json.
"""

from __future__ import annotations

import base64
import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedcore.summary import read_summary
from pipeline.errors import FedpathError

THREAT_MODEL = (
    "The attacker is the aggregator itself (or anyone who can read what it stores): honest-but-curious, "
    "it runs the protocol faithfully but keeps every model update a site uploads and the global model "
    "each update started from. It knows the network architecture, the loss (Dice + cross-entropy), the "
    "local training schedule (number of local steps, batch size, learning rate, optimiser) and the DP "
    "parameters, but not a single pixel of any site. From one update it tries to reconstruct the "
    "training tiles (gradient inversion: Inverting Gradients, DLG, and a multi-step inversion of what "
    "FedAvg actually sends), and from the final model it tries to tell whether a given tile was used "
    "in training (membership inference by loss threshold). The worst case evaluated is one tile per "
    "step and one step per update with the nucleus masks known to the attacker; real updates from "
    "many tiles and several steps are harder to invert. The networks use GroupNorm, so the "
    "BatchNorm-statistics prior of the strongest published medical attacks does not exist here."
)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FedpathError(f"{path}: not readable JSON ({exc})") from None


def _first(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return None


def _entries(ledger: dict[str, Any]) -> list[dict[str, Any]]:
    for key in ("entries", "rounds", "history", "records", "jobs"):
        v = ledger.get(key)
        if isinstance(v, list):
            return [e for e in v if isinstance(e, dict)]
    return []


def ledger_row(site: str, ledger: dict[str, Any], source: Path) -> dict[str, Any]:
    """One site's ledger in a fixed shape, whatever optional fields the writer used."""
    entries = _entries(ledger)
    last = entries[-1] if entries else {}
    eps = _first(ledger, "epsilon", "epsilon_tile", "epsilon_per_tile")
    if eps is None:
        eps = _first(last, "epsilon", "epsilon_tile", "epsilon_so_far")
    eps_slide = _first(ledger, "epsilon_slide", "slide_epsilon", "epsilon_per_slide")
    if eps_slide is None:
        eps_slide = _first(last, "epsilon_slide", "slide_epsilon")
    return {
        "site": site,
        "file": str(source),
        "unit": _first(ledger, "unit") or _first(last, "unit") or "tile",
        "epsilon_per_tile": eps,
        "epsilon_per_slide": eps_slide,
        "delta": _first(ledger, "delta") or _first(last, "delta"),
        "delta_per_slide": _first(ledger, "delta_slide") or _first(last, "delta_slide"),
        "budget": _first(ledger, "budget_epsilon", "budget"),
        "noise_multiplier": _first(last, "noise_multiplier", "sigma") or _first(ledger, "noise_multiplier"),
        "clip": _first(last, "max_grad_norm", "clip", "clip_norm") or _first(ledger, "max_grad_norm", "clip"),
        "sample_rate": _first(last, "sample_rate", "sampling_rate") or _first(ledger, "sample_rate"),
        "steps": sum(int(e.get("steps", 0) or 0) for e in entries) or _first(ledger, "steps"),
        "accountant": _first(ledger, "accountant") or _first(last, "accountant"),
        "max_tiles_per_slide": _first(ledger, "max_tiles_per_slide", "group_size")
        or _first(last, "max_tiles_per_slide", "group_size"),
        "rounds": len(entries),
        "entries": entries,
    }


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isinf(v):
            return "∞"
        if math.isnan(v):
            return "n/a"
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def _b64_png(path: Path) -> str | None:
    return base64.b64encode(path.read_bytes()).decode() if path.is_file() else None


def _eps_x(eps: float | None, finite: list[float]) -> float:
    """Plot position: ε itself, and 'no DP' one decade right of the largest finite ε."""
    if eps is not None:
        return float(eps)
    return (max(finite) if finite else 1.0) * 10


def _prior_ssim(entry: dict[str, Any]) -> float | None:
    """The prior baseline of one ε row: SSIM of the dataset-mean image to the attacked tiles."""
    for a in entry["attacks"].values():
        v = a.get("summary", {}).get("mean_prior_ssim_true")
        if v is not None:
            return float(v)
    return None


def _plots(results: list[dict[str, Any]]) -> dict[str, str]:
    """ε-vs-SSIM/leakage and ε-vs-Dice/membership curves, as base64 PNGs (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [e["epsilon"] for e in results if e["epsilon"] is not None]
    xs = [_eps_x(e["epsilon"], finite) for e in results]
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    xs_sorted = [xs[i] for i in order]
    labels = ["no DP" if results[i]["epsilon"] is None else f"{results[i]['epsilon']:g}" for i in order]
    attacks = sorted({k for e in results for k in e["attacks"]})

    def encode(fig: Any) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return base64.b64encode(buf.getvalue()).decode()

    out: dict[str, str] = {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in attacks:
        ys = [results[i]["attacks"].get(name, {}).get("summary", {}).get("mean_ssim") for i in order]
        ls = [results[i]["attacks"].get(name, {}).get("summary", {}).get("mean_leakage") for i in order]
        axes[0].plot(xs_sorted, [y if y is not None else float("nan") for y in ys], "o-", label=name)
        axes[1].plot(xs_sorted, [v if v is not None else float("nan") for v in ls], "o-", label=name)
    prior = [_prior_ssim(results[i]) for i in order]
    axes[0].plot(
        xs_sorted, [p if p is not None else float("nan") for p in prior], "k--", label="prior (mean image)"
    )
    axes[0].axhline(0.5, color="grey", lw=0.8, ls=":")
    axes[1].axhline(1.0, color="k", ls="--", lw=1, label="= prior")
    for ax, title in zip(
        axes, ("SSIM of reconstruction to true tile", "leakage (SSIM / prior SSIM)"), strict=True
    ):
        ax.set_xscale("log")
        ax.set_xticks(xs_sorted, labels)
        ax.minorticks_off()
        ax.set_xlabel("ε (per tile)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    out["leakage"] = encode(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    dice = [results[i].get("utility", {}).get("dice") for i in order]
    auc = [results[i].get("utility", {}).get("membership", {}).get("auc") for i in order]
    tpr = [results[i].get("utility", {}).get("membership", {}).get("tpr_at_1pct_fpr") for i in order]
    axes[0].plot(xs_sorted, [d if d is not None else float("nan") for d in dice], "o-", color="C2")
    axes[0].set_title("utility: validation Dice", fontsize=10)
    axes[1].plot(xs_sorted, [a if a is not None else float("nan") for a in auc], "o-", label="ROC AUC")
    axes[1].plot(xs_sorted, [t if t is not None else float("nan") for t in tpr], "s-", label="TPR @ 1% FPR")
    axes[1].axhline(0.5, color="grey", lw=0.8, ls=":")
    axes[1].set_title("membership inference (loss threshold)", fontsize=10)
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(xs_sorted, labels)
        ax.minorticks_off()
        ax.set_xlabel("ε (per tile)")
    out["utility"] = encode(fig)
    return out


def _verdict(attack: dict[str, Any]) -> dict[str, Any]:
    """Plain statements: did the undefended attack work, and does DP at ε ≤ 8 hold it at the prior?"""
    results = attack.get("results", [])
    und = attack.get("undefended_mean_ssim")
    lines = []
    settings = attack.get("settings") or {}
    how = (
        f"{settings.get('matching', 'cosine')} gradient matching, {settings.get('iterations')} iterations x "
        f"{settings.get('restarts')} restarts"
        if settings
        else "the configured settings"
    )
    n_und = next(
        (
            int(ig["summary"].get("n", 0))
            for e in results
            if e.get("epsilon") is None
            for k, ig in e.get("attacks", {}).items()
            if k == "inverting_gradients"
        ),
        0,
    )
    if und is None:
        lines.append(
            "No undefended Inverting-Gradients run in this sweep: the attack's strength is unmeasured."
        )
    elif und >= 0.5:
        lines.append(
            f"Undefended worst case (one tile, one step, masks known): mean SSIM {und:.3f} over {n_und} tiles "
            f"at {attack.get('tile_size')}px ({how}), so the 0.5 target IS met: the attack is strong "
            "enough for the DP rows below to mean something."
        )
    else:
        lines.append(
            f"The attack did NOT reach the 0.5 SSIM target undefended (mean SSIM {und:.3f} over {n_und} tiles "
            f"at {attack.get('tile_size')}px, {how}). The DP rows below are therefore a weaker statement than "
            "they look: a stronger attack might recover more at the same ε."
        )
    dp_ok = []
    for e in results:
        eps = e.get("epsilon")
        if eps is None or eps > 8:
            continue
        for name, a in e["attacks"].items():
            s = a.get("summary", {})
            if "mean_ssim" not in s:
                continue
            margin = s["mean_ssim"] - s["mean_prior_ssim_true"]
            dp_ok.append(margin <= 0.05)
            lines.append(
                f"ε = {eps:g}, {name}: SSIM {s['mean_ssim']:.3f} vs prior {s['mean_prior_ssim_true']:.3f} "
                f"({'within' if margin <= 0.05 else 'MORE than'} prior + 0.05)."
            )
    return {
        "lines": lines,
        "undefended_target_met": bool(und is not None and und >= 0.5),
        "dp_within_prior": all(dp_ok) if dp_ok else None,
    }


def _config(run_dir: Path, summary: dict[str, Any]) -> Any:
    for name in ("config.json", "config.yaml", "config.yml"):
        p = run_dir / name
        if p.is_file():
            if name.endswith(".json"):
                return _load_json(p)
            import yaml

            return yaml.safe_load(p.read_text())
    if isinstance(summary.get("config"), dict):
        return summary["config"]
    attack = summary.get("attack")
    return {"attack (from summary.json)": attack} if attack else None


def collect(run_dir: Path) -> dict[str, Any]:
    """Everything the report shows, as plain data (report.json); raises FedpathError on missing inputs."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FedpathError(f"{run_dir}: run directory not found")
    ledgers = sorted((run_dir / "sites").glob("*/privacy.json"))
    if not ledgers:
        raise FedpathError(
            f"{run_dir / 'sites'}: no site privacy ledger (sites/<site>/privacy.json); train the sites first"
        )
    attack_path = run_dir / "attack" / "attack.json"
    if not attack_path.is_file():
        raise FedpathError(f"{attack_path}: attack results missing; run `fedpath attack` on this run first")
    attack = _load_json(attack_path)
    if not isinstance(attack, dict) or not isinstance(attack.get("results"), list):
        raise FedpathError(f"{attack_path}: no 'results' list (not written by fedpath attack)")
    rows = []
    for p in ledgers:
        data = _load_json(p)
        if not isinstance(data, dict):
            raise FedpathError(f"{p}: ledger is not a JSON object")
        rows.append(ledger_row(p.parent.name, data, p.relative_to(run_dir)))
    update_rows = [
        ledger_row(p.parent.name, _load_json(p), p.relative_to(run_dir))
        for p in sorted((run_dir / "sites").glob("*/update_privacy.json"))
    ]
    updates_dir = run_dir / "server" / "updates"
    n_updates = len(list(updates_dir.glob("*/*.safetensors"))) if updates_dir.is_dir() else 0
    summary = read_summary(run_dir)
    from pipeline.statement import write_statement

    return {
        "run_dir": str(run_dir),
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "threat_model": THREAT_MODEL,
        "verdict": _verdict(attack),
        "privacy_statement": write_statement(run_dir),
        "ledger": rows,
        "update_ledger": update_rows,
        "stored_updates": n_updates,
        "attack": attack,
        "config": _config(run_dir, summary),
        "summary": summary,
    }


def build_report(run_dir: Path | str) -> Path:
    """Write report/index.html (self-contained) and report/report.json; return the HTML path."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    run_dir = Path(run_dir)
    data = collect(run_dir)
    attack = data["attack"]
    grids = []
    for e in attack["results"]:
        g = e.get("grid")
        grids.append(
            {
                "epsilon": "no DP" if e["epsilon"] is None else f"ε = {e['epsilon']:g}",
                "sigma": e.get("noise_multiplier"),
                "png": _b64_png(run_dir / g) if g else None,
            }
        )
    real = [
        dict(r, png=_b64_png(run_dir / r["grid"]) if r.get("grid") else None)
        for r in attack.get("real_updates", [])
    ]
    templates = Path(__file__).resolve().parent / "templates"
    env = Environment(loader=FileSystemLoader(templates), autoescape=select_autoescape(["html"]))
    env.filters["fmt"] = _fmt
    html = env.get_template("report.html").render(
        d=data,
        attack=attack,
        grids=grids,
        real=real,
        plots=_plots(attack["results"]),
        config_json=json.dumps(data["config"], indent=2, default=str),
    )
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.html").write_text(html)
    slim = {k: v for k, v in data.items() if k != "summary"}
    (out / "report.json").write_text(json.dumps(slim, indent=2, default=str))
    return out / "index.html"
