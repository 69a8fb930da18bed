"""Issue 16's rows: one-shot data vectors, FedAvg from θ_pre and the universal model, leave one site out.

For each left-out site L (``--folds``; default every site) and each privacy level (no DP; ε = 8 per tile
over each site's whole training), the other sites federate through the real aggregator, and every
model is scored on L's images (all of them: no variant trained on any) and on each in-fold site's own
test split:

* ``local:<s>``: each in-fold site alone, from scratch, ``rounds × steps`` steps;
* ``centralised``: the in-fold sites' tiles pooled (no federation), the same total steps;
* ``fedavg``: FedAvg from scratch, ``rounds`` rounds of ``steps``; ``fedavg θ_pre``: from the server's
  MIM-pretrained θ_pre (``fedpath pretrain``);
* ``data vectors (sum|mean)``: every site fine-tunes θ_pre once for ``rounds × steps`` steps and
  uploads τ once (one round on the wire: a quarter of 4-round FedAvg's uploads); the server's version is
  θ_pre + λ·Σ τ (``sum``: the real run through the aggregator; ``mean``: the same vectors merged with
  λ = 1/n); ``+ restore``: distilled from the local models onto the server's tiles; ``random control``:
  random vectors with the real vectors' per-tensor norms (must do clearly worse); ``tuned λ``: the λ whose
  merge scores best on the server's own labelled validation tiles (``federation.server_val_manifest``, or
  else fedpath's synthetic slides with their masks: never a site's data); ``(sum) + DP fine-tune``: a
  second federation in which the first in-fold site also fine-tunes the merge (``restore: finetune``, on
  its ledger: its σ covers both jobs, so it too ends at ε = 8);
* ``universal``: per stage, the sites fine-tune the current version and the server distils their
  ensemble onto its own tiles (no site data), stage-wise from θ_pre.

Bytes per site are counted on the wire (update bodies posted, model bodies received), summed over the run
and averaged over the sites. Every row records the largest per-tile ε of its sites (their ledgers). The
table goes to ``<run>/oneshot.md``, the curves to ``oneshot.png`` (left-out Dice per method, per fold and
level; Dice against upload; the λ curve), both into ``oneshot.html``, and ``summary.json`` key
``oneshot``. Resumable per row (``oneshot.json``).

``fedpath experiment-oneshot --config configs/experiment_real.yaml [--folds gbm40_emory] [--no-dp-only]``
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

from fedcore.io import atomic_write_json
from fedcore.layout import RunLayout
from fedcore.summary import update_summary
from pipeline.config import ExperimentConfig, variant_config
from pipeline.errors import FedpathError
from pipeline.tiles import tile_sites

log = logging.getLogger(__name__)

EPSILON = 8.0


def _variant(cfg: ExperimentConfig, name: str, run_dir: Path, sites: list[str], **changes: Any) -> ExperimentConfig:
    kept = [s.model_dump(mode="python") for s in cfg.sites if s.name in sites]
    vcfg = variant_config(cfg, name, run_dir, sites=kept, **changes)
    for s in vcfg.sites:  # the stores are tiled once, in the base run
        dst = vcfg.store_path(s.name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            os.symlink(cfg.store_path(s.name).resolve(), dst, target_is_directory=True)
    return vcfg


def _privacy(eps: float | None) -> dict[str, Any]:
    if eps is None:
        return {"train__privacy__enabled": False}
    return {
        "train__privacy__enabled": True, "train__privacy__target_epsilon": eps,
        "train__privacy__noise_multiplier": None, "train__privacy__budget_epsilon": None,
    }


def _net(cfg: ExperimentConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from pipeline.models import build_model

    net = build_model(cfg.model)
    net.load_state_dict(state)
    return net


def _score(cfg: ExperimentConfig, state: dict[str, torch.Tensor], left_out: str, in_fold: list[str]) -> dict[str, Any]:
    """Dice on the left-out site's images (every split) and on each in-fold site's test split."""
    from pipeline.evaluate import evaluate_store

    net = _net(cfg, state)
    out = {"left_out": evaluate_store(net, cfg.store_path(left_out), {"train", "val", "test"}).get("dice")}
    out["sites"] = {s: evaluate_store(net, cfg.store_path(s), {"test"}).get("dice") for s in in_fold}
    return out


def _last_global(run_dir: Path) -> tuple[dict[str, torch.Tensor], int]:
    from pipeline.checkpoint import read_model_file

    gdir = RunLayout(run_dir).server.global_model(0).parent
    models = sorted(gdir.glob("round_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    if len(models) < 2:
        raise FedpathError(f"{gdir}: the federation published no model")
    state, _ = read_model_file(models[-1])
    return state, len(models) - 1


def _bytes(run_dir: Path, sites: list[str], rounds: int) -> dict[str, float]:
    """Total bytes per site over the run, as sent on the wire (update bodies posted, model bodies
    received; summed over the rounds a site took part in, mean over sites)."""
    lay = RunLayout(run_dir)
    up, down = [], []
    for s in sites:
        u = d = 0
        for r in range(rounds):
            body = lay.site(s).update(r)
            if body.is_file():
                u += body.stat().st_size
            tj = lay.site(s).train_json(r)
            if tj.is_file():
                got = json.loads(tj.read_text()).get("bytes_down")
                d += got if got is not None else lay.server.global_model(r).stat().st_size
        up.append(u)
        down.append(d)
    return {"up": sum(up) / len(up) if up else float("nan"), "down": sum(down) / len(down) if down else float("nan")}


def _max_eps(run_dir: Path) -> dict[str, Any] | None:
    """The largest per-tile ε of the run's sites, with its δ (their ledgers); None without DP."""
    from fedpath.experiment import _ledger_eps

    try:
        per_site = _ledger_eps(run_dir)
    except FedpathError:
        return None
    found = [v for v in per_site.values() if v.get("epsilon") is not None]
    if not found:
        return None
    top = max(found, key=lambda v: float(v["epsilon"]))
    return {"epsilon": top["epsilon"], "delta": top["delta"], "unit": top["unit"]}


def _vectors(run_dir: Path, sites: list[str]) -> list[dict[str, torch.Tensor]]:
    """The data vectors the sites uploaded (their own copies of the bodies they posted)."""
    from federation.wire import iter_tensors

    out = []
    for s in sites:
        lay = RunLayout(run_dir).site(s)
        body = next((lay.update(r) for r in range(8) if lay.update(r).is_file()), None)
        if body is None:
            raise FedpathError(f"{run_dir}: site {s} uploaded no data vector")
        out.append(dict(iter_tensors(body)))
    return out


RESTORED = "data vectors (sum) + fine-tune at a site"
TUNED = "data vectors (tuned λ)"


def server_validation(cfg: ExperimentConfig, data_root: Path) -> Path:
    """The server's labelled validation tiles: ``federation.server_val_manifest`` when configured, else
    fedpath's own synthetic slides with their exact masks (generated once; never a site's data)."""
    from fedpath.pretrain import tile_server_val
    from wsi.config import SynthConfig
    from wsi.synth import run_synth

    if cfg.federation.server_val_manifest is not None:
        store = tile_server_val(cfg, data_root)
        assert store is not None
        return store
    out = cfg.run_dir / "server_val_synth"
    sc = SynthConfig(sites=["server_val"], slides_per_site=2, held_out_slides=0, width=1536, height=1536,
                     mpp=cfg.tiling.target_mpp, seed=0)
    run_synth(sc, out, run_dir=cfg.run_dir)
    store = tile_server_val(cfg, out, manifest=out / "manifests" / "server_val.csv")
    assert store is not None
    return store


#: rows derived from the uploaded vectors without new training or uploads: (method, λ, control, restore)
DERIVED: list[tuple[str, str, bool, bool]] = [
    ("data vectors (mean)", "mean", False, False),
    ("data vectors (sum) + restore", "sum", False, True),
    ("data vectors (mean) + restore", "mean", False, True),
    ("data vectors random control (sum)", "sum", True, False),
    ("data vectors random control (mean)", "mean", True, False),
]


def _merged(
    cfg: ExperimentConfig, pre: dict[str, torch.Tensor], taus: list[dict[str, torch.Tensor]], lam: str,
    control: bool, restore: bool, server_tiles: Any, steps: int,
) -> dict[str, torch.Tensor]:
    """θ_pre + λ·Σ τ (or the random control), optionally restored by distillation from the local models."""
    from pipeline.merging import merge, random_vectors_like
    from pipeline.transfer import distil_ensemble

    vectors = random_vectors_like(taus, seed=0) if control else taus
    merged = merge(pre, vectors, lam)
    if not restore:
        return merged
    teachers = [_net(cfg, merge(pre, [t], "sum")) for t in vectors]
    student = _net(cfg, merged)
    distil_ensemble(teachers, student, server_tiles, steps=2 * steps, batch_size=cfg.train.batch_size, lr=5e-4, seed=0)
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def run_oneshot(
    cfg: ExperimentConfig, data_root: Path | None, folds: list[str] | None = None, dp_levels: tuple[float | None, ...] = (None, EPSILON)
) -> dict[str, Any]:
    from fedpath.pretrain import run_pretrain
    from fedpath.simulate import run_simulation
    from pipeline.train import train_local
    from pipeline.transfer import UnlabelledTiles

    if data_root is None:
        raise FedpathError("experiment-oneshot: no data root (give --data-root or set FEDPATH_DATA_ROOT)")
    steps, rounds = cfg.train.max_steps, cfg.federation.rounds
    if steps is None:
        raise FedpathError("experiment-oneshot: set train.max_steps (local steps per round)")
    names = [s.name for s in cfg.sites]
    if len(names) < 3:
        raise FedpathError("experiment-oneshot: needs at least 3 sites (two in each fold)")
    folds = folds or names
    unknown = sorted(set(folds) - set(names))
    if unknown:
        raise FedpathError(f"experiment-oneshot: --folds names unknown sites {unknown}")
    base = cfg.run_dir
    tile_sites(cfg, data_root, "experiment-oneshot")
    pre_info = run_pretrain(cfg, data_root)
    pre_path = Path(pre_info["path"])
    from pipeline.checkpoint import read_model_file

    pre_state, _ = read_model_file(pre_path)
    server_tiles = UnlabelledTiles(RunLayout(base).server.data_store, seed=cfg.pretrain.seed)
    val_store = server_validation(cfg, data_root)

    state_file = base / "oneshot.json"
    from fedcore.hashing import sha256_bytes

    # settings left at their defaults are not in the key, so a release that adds a setting keeps the rows
    config_key = sha256_bytes(cfg.model_dump_json(exclude={"run_dir", "name"}, exclude_defaults=True).encode())[:16]
    previous = json.loads(state_file.read_text()) if state_file.is_file() else {}
    # rows of another configuration are never mixed into this table
    rows: dict[str, dict[str, Any]] = previous.get("rows", {}) if previous.get("config_key") == config_key else {}

    def record(key: str, row: dict[str, Any]) -> None:
        rows[key] = row
        atomic_write_json(state_file, {"config_key": config_key, "rows": rows})
        log.info("oneshot: %s: left-out Dice %s", key, row["score"]["left_out"])

    for eps, left_out in [(e, f) for e in dp_levels for f in folds]:  # every fold without DP first
        in_fold = [n for n in names if n != left_out]
        lvl = "no DP" if eps is None else f"ε={eps:g}"
        tag = f"{left_out}|{lvl}"
        vroot = base / "oneshot" / left_out / ("nodp" if eps is None else f"eps{eps:g}")
        priv = _privacy(eps)

        for s in in_fold:
            key = f"{tag}|local:{s}"
            if key not in rows:
                vdir = vroot / f"local_{s}"
                v = _variant(cfg, f"local_{s}", vdir, [s], **priv)
                t0 = time.perf_counter()
                res = train_local(v, [s], vdir, max_steps=rounds * steps, job_id="oneshot", progress=False)
                record(key, {"method": f"local:{s}", "rounds": 0, "bytes": {"up": 0.0, "down": 0.0},
                             "seconds": time.perf_counter() - t0, "score": _score(cfg, res.state, left_out, in_fold),
                             "epsilon": _max_eps(vdir)})
        key = f"{tag}|centralised"
        if key not in rows:
            vdir = vroot / "centralised"
            v = _variant(cfg, "centralised", vdir, in_fold, **priv)
            t0 = time.perf_counter()
            res = train_local(v, in_fold, vdir, max_steps=rounds * steps * len(in_fold), job_id="oneshot", progress=False)
            record(key, {"method": "centralised", "rounds": 0, "bytes": {"up": 0.0, "down": 0.0},
                         "seconds": time.perf_counter() - t0, "score": _score(cfg, res.state, left_out, in_fold)})

        fed_runs: list[tuple[str, str, dict[str, Any]]] = [
            ("fedavg", "fedavg", {"federation__strategy": "fedavg"}),
            ("fedavg θ_pre", "fedavg_pre", {"federation__strategy": "fedavg", "federation__initial_model": pre_path}),
            ("universal", "universal", {"federation__strategy": {"name": "universal", "distil_steps": 2 * steps},
                                        "federation__initial_model": pre_path, "federation__server_manifest": cfg.federation.server_manifest}),
            ("data vectors (sum)", "dv", {"federation__strategy": {"name": "data_vectors", "lam": "sum"},
                                          "federation__initial_model": pre_path, "federation__rounds": 1,
                                          "federation__min_sites": len(in_fold), "train__max_steps": rounds * steps}),
            # the same, and the first in-fold site fine-tunes the merge on its ledger (round 2)
            (RESTORED, "dv_restore", {"federation__strategy": {
                "name": "data_vectors", "lam": "sum", "restore": "finetune", "restore_site": in_fold[0],
                "restore_steps": steps}, "federation__initial_model": pre_path, "federation__rounds": 2,
                "federation__min_sites": len(in_fold), "train__max_steps": rounds * steps}),
        ]
        for method, dirname, changes in fed_runs:
            key = f"{tag}|{method}"
            if key in rows:
                continue
            vdir = vroot / dirname
            # every in-fold site takes part (the config's min_sites may count the left-out one)
            v = _variant(cfg, dirname, vdir, in_fold, **priv, **({"federation__min_sites": len(in_fold)} | changes))
            if dirname == "universal":  # the server's own tiles, where its strategies look for them
                dst = RunLayout(vdir).server.data_store
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists():
                    os.symlink(RunLayout(base).server.data_store.resolve(), dst, target_is_directory=True)
            t0 = time.perf_counter()
            run_simulation(v)
            state, n_versions = _last_global(vdir)
            row = {"method": method, "rounds": v.federation.rounds, "bytes": _bytes(vdir, in_fold, v.federation.rounds),
                   "seconds": time.perf_counter() - t0, "score": _score(cfg, state, left_out, in_fold),
                   "epsilon": _max_eps(vdir)}
            if dirname == "dv_restore":
                row["restore_site"] = in_fold[0]
            record(key, row)

        # the same uploaded vectors, merged otherwise (no new training, no new uploads)
        dv_dir = vroot / "dv"
        taus = _vectors(dv_dir, in_fold)
        dv_row = rows[f"{tag}|data vectors (sum)"]
        n = len(taus)
        for method, lam, control, restore in DERIVED:
            key = f"{tag}|{method}"
            if key in rows:
                continue
            t0 = time.perf_counter()
            state = _merged(cfg, pre_state, taus, lam, control, restore, server_tiles, steps)
            record(key, {"method": method, "rounds": 1, "bytes": dv_row["bytes"], "n_vectors": n,
                         "seconds": time.perf_counter() - t0, "score": _score(cfg, state, left_out, in_fold),
                         "epsilon": dv_row.get("epsilon")})
        key = f"{tag}|{TUNED}"
        if key not in rows:
            from pipeline.merging import merge, tune_lambda, validation_dice
            from pipeline.models import build_model

            t0 = time.perf_counter()
            best, scores = tune_lambda(
                pre_state, taus, lambda st: validation_dice(lambda: build_model(cfg.model), st, val_store)
            )
            state = merge(pre_state, taus, best)
            record(key, {"method": TUNED, "rounds": 1, "bytes": dv_row["bytes"], "n_vectors": n, "lam": best,
                         "lam_curve": {f"{k:.4g}": v for k, v in sorted(scores.items())},
                         "seconds": time.perf_counter() - t0, "score": _score(cfg, state, left_out, in_fold),
                         "epsilon": dv_row.get("epsilon")})

    table = tabulate(rows)
    (base / "oneshot.md").write_text(table)
    plot = plot_oneshot(rows, base / "oneshot.png")
    from fedpath.experiment import write_html

    write_html(base / "oneshot.html", table, plot, "Data vectors, FedAvg from θ_pre and the universal model: leave one site out")
    summary = {"rows": rows, "table_markdown": table, "goals": goals(rows)}
    update_summary(base, "oneshot", summary)
    print(table)
    return summary


def _f(x: Any, nd: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _eps_text(e: dict[str, Any] | None) -> str:
    if not e or e.get("epsilon") is None:
        return "-"
    return f"{float(e['epsilon']):.2f} per {e.get('unit') or 'tile'} (δ={float(e['delta']):.1g})"


def _method_label(r: dict[str, Any]) -> str:
    m = str(r["method"])
    if r.get("restore_site"):
        m = m.replace("a site", str(r["restore_site"]))
    if r.get("lam") is not None:
        m += f" (λ={float(r['lam']):.3g})"
    return m


def tabulate(rows: dict[str, dict[str, Any]]) -> str:
    head = ["left-out site", "privacy", "method", "Dice left-out", "Dice in-fold sites (test)", "rounds",
            "KiB up / site", "KiB down / site", "ε (max over sites)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, r in rows.items():
        left_out, lvl, _ = key.split("|", 2)
        sites = ", ".join(f"{s}: {_f(d)}" for s, d in r["score"]["sites"].items())
        lines.append("| " + " | ".join([left_out, lvl, _method_label(r), _f(r["score"]["left_out"]), sites,
                                          str(r["rounds"]), _f(r["bytes"]["up"] / 1024, 0),
                                          _f(r["bytes"]["down"] / 1024, 0), _eps_text(r.get("epsilon"))]) + " |")
    return "\n".join(lines) + "\n"


def plot_oneshot(rows: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """The curves that make the comparison obvious: left-out Dice per method (one point per left-out
    site, the bar their mean) at each privacy level; left-out Dice against KiB uploaded per site; and
    each fold's λ curve on the server's validation tiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({k.split("|")[1] for k in rows}, key=lambda s: (s != "no DP", s))
    methods: list[str] = []
    for k in rows:
        m = k.split("|", 2)[2]
        if not m.startswith("local:") and m not in methods:
            methods.append(m)
    methods = ["local (best)", *methods]
    if not levels:
        return None
    fig, axes = plt.subplots(1, len(levels) + 2, figsize=(6 * len(levels) + 9, 4.6))
    folds = sorted({k.split("|")[0] for k in rows})
    for ax, lvl in zip(axes, levels, strict=False):
        for i, m in enumerate(methods):
            ys = []
            for f in folds:
                g = {k.split("|", 2)[2]: r for k, r in rows.items() if k.startswith(f"{f}|{lvl}|")}
                if m == "local (best)":
                    vals = [r["score"]["left_out"] for mm, r in g.items() if mm.startswith("local:")]
                    v = max((x for x in vals if x is not None), default=None)
                else:
                    v = g.get(m, {}).get("score", {}).get("left_out")
                if v is not None:
                    ys.append(float(v))
            if ys:
                ax.bar(i, sum(ys) / len(ys), color="C0" if "control" not in m else "C3", alpha=0.45)
                ax.plot([i] * len(ys), ys, "k.", ms=5)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=40, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("Dice on the left-out site")
        ax.set_title(f"{lvl}: bar = mean over {len(folds)} left-out sites, dots = each")
        ax.grid(axis="y", alpha=0.3)
    ax = axes[len(levels)]
    for j, lvl in enumerate(levels):
        for m in methods[1:]:
            pts = [(r["bytes"]["up"] / 1024, r["score"]["left_out"]) for k, r in rows.items()
                   if k.split("|")[1] == lvl and k.split("|", 2)[2] == m and r["score"]["left_out"] is not None]
            if pts:
                mx = sum(p[0] for p in pts) / len(pts)
                my = sum(p[1] for p in pts) / len(pts)
                ax.scatter([mx], [my], marker="o" if j == 0 else "^", s=30)
                ax.annotate(f"{m} ({lvl})", (mx, my), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("KiB uploaded per site (whole run, log)")
    ax.set_ylabel("mean left-out Dice")
    ax.set_title("quality against upload")
    ax.grid(alpha=0.3)
    ax = axes[len(levels) + 1]
    for k, r in rows.items():
        if r.get("lam_curve"):
            lams = [float(x) for x in r["lam_curve"]]
            ax.plot(lams, list(r["lam_curve"].values()), ".-", label=f"{k.split('|')[0]} {k.split('|')[1]}")
    ax.set_xlabel("λ (merge θ_pre + λ·Σ τ)")
    ax.set_ylabel("Dice on the server's validation tiles")
    ax.set_title("λ tuned on server-held labelled tiles")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def goals(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals per fold and privacy level: measured, met or not."""
    out: dict[str, Any] = {}
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for key, r in rows.items():
        tag, method = key.rsplit("|", 1)
        groups.setdefault(tag, {})[method] = r
    for tag, g in groups.items():
        def lo(m: str, g: dict[str, dict[str, Any]] = g) -> float:
            v = g.get(m, {}).get("score", {}).get("left_out")
            return float("nan") if v is None else float(v)

        dv = max(lo("data vectors (sum)"), lo("data vectors (mean)"), lo(TUNED))
        fa = lo("fedavg")
        ctrl = max(lo("data vectors random control (sum)"), lo("data vectors random control (mean)"))
        locals_ = [lo(m) for m in g if m.startswith("local:")]
        methods = [m for m in g if not m.startswith("local:") and "control" not in m]
        out[tag] = {
            "data_vectors_within_0.02_of_fedavg": dv >= fa - 0.02,
            "data_vectors_minus_fedavg": dv - fa,
            "control_clearly_worse": ctrl < dv - 0.05,
            "data_vectors_restored_minus_fedavg": max(
                lo("data vectors (sum) + restore"), lo("data vectors (mean) + restore"), lo(RESTORED)) - fa,
            "universal_at_or_above_fedavg_left_out": lo("universal") >= fa,
            "every_method_above_every_local_on_left_out": all(lo(m) > max(locals_) for m in methods) if locals_ else None,
        }
    return out
