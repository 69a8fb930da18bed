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

from fedcore.layout import RunLayout
from fedcore.summary import read_summary
from pipeline.errors import FedpathError

THREAT_MODEL = (
    "The attacker is the aggregator itself (or anyone who can read what it stores): honest-but-curious, "
    "it runs the protocol faithfully but keeps every model update a site uploads and the global model "
    "each update started from. It knows the network architecture, the loss (Dice + cross-entropy), the "
    "local training schedule (number of local steps, batch size, learning rate, optimiser) and the DP "
    "parameters, but not a single pixel of any site. From one site round (the update after several local "
    "steps of fedpath's own DP-SGD trainer) it reconstructs the training tiles: for an SGD round by simulating "
    "the local steps on dummy tiles and matching the whole update (Geiping et al.'s FedAvg reconstructor); "
    "for an Adam round, whose steps are sign-like, by matching the update's direction with the dummy tiles' "
    "gradient at the global model (attack.json names the one used). One "
    "DP-SGD step of one tile, which no site ever sends, is attacked too as the worst-case upper bound. "
    "Every reconstruction is scored against the prior: the best an attacker knowing only the data "
    "distribution does (the mean image of a public tile set, or the public tile nearest to the truth). "
    "Membership inference (LiRA, Carlini et al. 2022) asks of a tile whether it was trained on, from the "
    "final model and shadow models trained by the same trainer. The networks use GroupNorm, so the "
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


def _eps_label(e: dict[str, Any]) -> str:
    """"no DP", or ε with its δ and unit (the sweep's accounting), e.g. "ε = 8 (δ = 3.1e-04, per tile)"."""
    if e.get("epsilon") is None:
        return "no DP"
    delta = e.get("delta")
    unit = e.get("unit") or "tile"
    return f"ε = {e['epsilon']:g} (δ = {_fmt(delta)}, per {unit})"


def _stat(a: dict[str, Any] | None, part: str, key: str) -> float:
    if not a:
        return float("nan")
    v = a.get("summary", {}).get(part, {}).get(key)
    return float(v) if v is not None else float("nan")


def _plots(attack: dict[str, Any], calib: dict[str, Any] | None) -> dict[str, str]:
    """ε-vs-SSIM (with the prior and the CIs) and, when calibrate ran, ε-vs-Dice and the LiRA ROC curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def encode(fig: Any) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return base64.b64encode(buf.getvalue()).decode()

    out: dict[str, str] = {}
    results = attack.get("results", [])
    if results:
        finite = [e["epsilon"] for e in results if e["epsilon"] is not None]
        xs = [_eps_x(e["epsilon"], finite) for e in results]
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        xs_sorted = [xs[i] for i in order]
        labels = ["no DP" if results[i]["epsilon"] is None else f"{results[i]['epsilon']:g}" for i in order]
        attacks = sorted({k for e in results for k in e["attacks"]})
        fig, ax = plt.subplots(figsize=(7, 4))
        for j, name in enumerate(attacks):
            rows = [results[i]["attacks"].get(name) for i in order]
            mean = [_stat(r, "ssim", "mean") for r in rows]
            prior = [_stat(r, "prior_ssim", "mean") for r in rows]
            lo = [p + _stat(r, "difference", "ci_low") for p, r in zip(prior, rows, strict=True)]
            hi = [p + _stat(r, "difference", "ci_high") for p, r in zip(prior, rows, strict=True)]
            ax.plot(xs_sorted, mean, "o-", color=f"C{j}", label=name)
            ax.fill_between(xs_sorted, lo, hi, color=f"C{j}", alpha=0.15)
            ax.plot(xs_sorted, prior, "--", color=f"C{j}", lw=1, label=f"prior ({name} tiles)")
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xticks(xs_sorted, labels)
        ax.minorticks_off()
        ax.set_xlabel("ε (per tile)")
        ax.set_title("SSIM of reconstruction to true tile (band: 95% CI of prior + difference)", fontsize=9)
        ax.legend(fontsize=7)
        out["leakage"] = encode(fig)
    if calib and calib.get("rows"):
        rows = calib["rows"]
        finite = [r["epsilon"] for r in rows if r["epsilon"] is not None]
        xs = [_eps_x(r["epsilon"], finite) for r in rows]
        labels = ["no DP" if r["epsilon"] is None else f"{r['epsilon']:g}" for r in rows]
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.plot(xs, [r.get("dice") if r.get("dice") is not None else float("nan") for r in rows], "o-", color="C2")
        floor = calib.get("utility_floor")
        if floor is not None:
            ax.axhline(floor, color="k", ls="--", lw=1, label=f"utility floor {floor:g}")
            ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.set_xticks(xs, labels)
        ax.minorticks_off()
        ax.set_xlabel("ε (per tile)")
        ax.set_title("held-out Dice of the run's own training at each ε", fontsize=9)
        out["utility"] = encode(fig)
        lira = [(r, r.get("lira")) for r in rows if r.get("lira")]
        if lira:
            fig, ax = plt.subplots(figsize=(5, 4.2))
            for j, (r, m) in enumerate(lira):
                fpr = [max(f, 1e-5) for f in m["roc"]["fpr"]]
                ax.plot(fpr, [max(t, 1e-5) for t in m["roc"]["tpr"]], color=f"C{j}",
                        label=f"{'no DP' if r['epsilon'] is None else r['epsilon']} (AUC {m['auc']:.2f})")  # fmt: skip
            ax.plot([1e-5, 1], [1e-5, 1], "k:", lw=0.8, label="chance")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(1e-3, 1)
            ax.set_ylim(1e-3, 1)
            ax.set_xlabel("false-positive rate")
            ax.set_ylabel("true-positive rate")
            ax.set_title("LiRA membership inference, log-scale ROC", fontsize=9)
            ax.legend(fontsize=7, title="ε")
            out["roc"] = encode(fig)
    return out


def _verdict(attack: dict[str, Any]) -> dict[str, Any]:
    """What the evidence supports. Only when the undefended control beats the prior (the CI of SSIM −
    prior lies above 0) can a DP row say anything; otherwise the attack shows nothing either way."""
    results = attack.get("results", [])
    key = attack.get("primary_attack")
    lines: list[str] = []
    control = next((e for e in results if e.get("epsilon") is None), None)
    ca = control["attacks"].get(key) if control and key else None
    if ca is None:
        lines.append(
            "No undefended control in this sweep: the attack's strength is unmeasured, so the rows below "
            "show nothing either way about what DP protects."
        )
        return {"lines": lines, "control_beats_prior": False, "dp_within_prior": None, "informative": False}
    s = ca["summary"]
    d = s["difference"]
    n = int(d.get("n", 0))
    desc = (
        f"{key}: SSIM mean {s['ssim']['mean']:.3f} (median {s['ssim']['median']:.3f}, IQR "
        f"{s['ssim']['q1']:.3f}–{s['ssim']['q3']:.3f}) against the prior's {s['prior_ssim']['mean']:.3f}; "
        f"difference {d['mean']:+.3f}, 95% bootstrap CI [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] over {n} tiles"
    )
    if ca["status"] != "beats prior":
        lines.append(
            f"The undefended attack does NOT beat the prior ({desc}). This attack therefore shows nothing "
            "either way: it cannot show that DP works, nor that it fails, because nothing leaked even "
            "without DP. A stronger attack might recover more at every ε."
        )
        return {"lines": lines, "control_beats_prior": False, "dp_within_prior": None, "informative": False}
    goal = "meets" if s["ssim"]["mean"] >= 0.5 else "does NOT meet"
    lines.append(
        f"Undefended control (no DP) beats the prior ({desc}); it {goal} the 0.5 SSIM goal. The DP rows "
        "below are therefore informative."
    )
    dp_ok: list[bool] = []
    for e in results:
        if e.get("epsilon") is None or key not in e["attacks"]:
            continue
        a = e["attacks"][key]
        sd = a["summary"]["difference"]
        lines.append(
            f"{_eps_label(e)}: SSIM {a['summary']['ssim']['mean']:.3f} vs prior "
            f"{a['summary']['prior_ssim']['mean']:.3f}, difference CI [{sd['ci_low']:+.3f}, {sd['ci_high']:+.3f}]: "
            f"{a['status']}."
        )
        if e["epsilon"] <= 8:
            dp_ok.append(a["status"] != "beats prior")
    ind = attack.get("indistinguishable_from") or {}
    eps_star = ind.get("epsilon")
    if eps_star is not None:
        row = next(e for e in results if e.get("epsilon") == eps_star)
        lines.append(f"Leakage is indistinguishable from the prior from {_eps_label(row)} down.")
    else:
        lines.append("At every ε of this sweep the attack still beats the prior.")
    return {
        "lines": lines,
        "control_beats_prior": True,
        "dp_within_prior": all(dp_ok) if dp_ok else None,
        "informative": True,
        "indistinguishable_from": eps_star,
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
    if not ledgers and (run_dir / "calibrate" / "calibrate.json").is_file():
        # a calibrate run: the ledgers of its federation at each ε
        ledgers = sorted((run_dir / "calibrate" / "variants").glob("*/sites/*/privacy.json"))
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
        name = p.parent.name if p.parent.parent.parent == run_dir else f"{p.parents[2].name}/{p.parent.name}"
        rows.append(ledger_row(name, data, p.relative_to(run_dir)))
    update_rows = [
        ledger_row(p.parent.name, _load_json(p), p.relative_to(run_dir))
        for p in sorted((run_dir / "sites").glob("*/update_privacy.json"))
    ]
    updates_dir = RunLayout(run_dir).server.updates_root
    n_updates = len(list(updates_dir.glob("*/*.safetensors"))) if updates_dir.is_dir() else 0
    summary = read_summary(run_dir)
    calib_path = run_dir / "calibrate" / "calibrate.json"
    calib = _load_json(calib_path) if calib_path.is_file() else None
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
        "calibrate": calib,
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
                "epsilon": _eps_label(e),
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
        plots=_plots(attack, data["calibrate"]),
        eps_label=_eps_label,
        config_json=json.dumps(data["config"], indent=2, default=str),
    )
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.html").write_text(html)
    slim = {k: v for k, v in data.items() if k != "summary"}
    (out / "report.json").write_text(json.dumps(slim, indent=2, default=str))
    return out / "index.html"
