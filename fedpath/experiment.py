"""The real-data experiment: one table comparing how sites can train together.

Variants (same model, same budget of local optimiser steps):

* ``local:<site>``: each site alone, ``rounds * steps_per_round`` steps on its own tiles;
* ``centralised``: all training tiles pooled, ``rounds * steps_per_round * n_sites`` steps (the same
  total compute as a federation);
* ``fedavg`` / ``fedprox``: the federation through the real aggregator (one process per site), no DP;
* ``feddp_eps_<ε>``: FedAvg with sample-level DP-SGD at every site (FedDP), ε over the whole training;
  ``inf`` clips per-sample gradients but adds no noise.

Every model is evaluated on every site's held-out (``test`` split) images, which no variant trains on:
their tiles, or (``experiment.full_resolution``) the whole images at their own resolution with instance
metrics (AJI, PQ) against the annotations' own nuclei. Each variant runs once per seed
(``experiment.seeds``; the seed drives initialisation, augmentation and shuffling, never DP noise); the
table gives mean ± sd over seeds, with paired differences (same seed, same test images) between
centralised, FedAvg and FedDP, and per site, the site's local model against the federation. Written to
``<run_dir>/experiment.md`` / ``experiment.json`` / ``experiment.png`` (bar plot with error bars) /
``experiment.html`` and to ``summary.json`` key "experiment".
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

from fedcore.hashing import sha256_bytes
from fedcore.io import atomic_write_bytes
from fedcore.layout import RunLayout
from fedcore.summary import update_summary
from fedpath.seedstats import mean_sd, pm, spread
from pipeline.config import ExperimentConfig, variant_config
from pipeline.errors import FedpathError
from pipeline.evaluate import evaluate_store
from pipeline.models import build_model, resolve_precision
from pipeline.tiles import tile_sites

log = logging.getLogger(__name__)

FED_VARIANTS = ("fedavg", "fedprox")


def _strategy(cfg: ExperimentConfig, name: str) -> str | dict[str, Any]:
    """The strategy of a federated row: ``federation.strategy`` with its options where it names the same
    strategy (``{name: fedavg, server_momentum: 0.5}``), else the name with its default options."""
    chosen = cfg.federation.strategy
    return dict(chosen) if isinstance(chosen, dict) and chosen.get("name") == name else name


def dp_changes(cfg: ExperimentConfig, eps: float | None) -> dict[str, Any]:
    """The config changes of a row at privacy level ``eps`` (None: no DP): DP-SGD at ε per tile, with the
    DP rows' own batch, local steps and lr (``experiment.dp_*``). FedDP's rows and every other method's DP
    rows (FedMIC) use this, so they run the same budget as the baseline they are set beside."""
    if eps is None:
        return {"train__privacy__enabled": False}
    ex = cfg.experiment
    changes: dict[str, Any] = {
        "train__privacy__enabled": True,
        "train__privacy__target_epsilon": None if math.isinf(eps) else eps,
        "train__privacy__noise_multiplier": 0.0 if math.isinf(eps) else None,
        # ε = inf clips without noise: no guarantee, so no budget, and the statement says so
        "train__privacy__budget_epsilon": "unlimited" if math.isinf(eps) else None,
    }
    own = {"train__batch_size": ex.dp_batch_size, "train__max_steps": ex.dp_max_steps, "train__lr": ex.dp_lr}
    changes.update({k: v for k, v in own.items() if v})
    return changes


def _link_stores(base: ExperimentConfig, variant: ExperimentConfig) -> None:
    for s in base.sites:
        src = base.store_path(s.name).resolve()
        dst = variant.store_path(s.name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            os.symlink(src, dst, target_is_directory=True)


def _evaluate(
    cfg: ExperimentConfig, state: dict[str, torch.Tensor], data_root: Path, sites: list[str] | None = None
) -> dict[str, Any]:
    """Every site's (or ``sites``') test images: whole images at full resolution with instances, or the
    stored tiles. The network is ``cfg.model`` (a site's personal model passes its own)."""
    net = build_model(cfg.model)
    net.load_state_dict(state)
    chosen = [s for s in cfg.sites if sites is None or s.name in sites]
    if not cfg.experiment.full_resolution:
        return {s.name: evaluate_store(net, cfg.store_path(s.name), {"test"}) for s in chosen}
    from pipeline.evaluate import evaluate_images
    from wsi.manifest import read_manifest

    out: dict[str, Any] = {}
    for s in chosen:
        rows = [r for r in read_manifest(s.manifest, site=s.name) if r.split == "test"]
        out[s.name] = evaluate_images(
            net, rows, data_root, target_mpp=cfg.tiling.target_mpp,
            window=cfg.inference.tile_size or cfg.tiling.tile_size, overlap=cfg.inference.overlap,
            default_mpp=cfg.tiling.default_mpp, mpp_tolerance=cfg.tiling.mpp_tolerance,
            tta=cfg.inference.tta, precision=resolve_precision(cfg.inference.precision),
        )  # fmt: skip
    return out


def _global_models(run_dir: Path) -> list[Path]:
    return [p for _, p in RunLayout(run_dir).server.published_globals()]

def _final_global(run_dir: Path) -> dict[str, torch.Tensor]:
    from pipeline.checkpoint import read_model_file

    state, _ = read_model_file(_global_models(run_dir)[-1])
    return state


def _best_global(cfg: ExperimentConfig, run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global model of the round with the best validation Dice (mean over sites' ``val`` tiles): the
    federation's early stopping. Validation images are no site's training data and no test image."""
    from pipeline.checkpoint import read_model_file

    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    history: list[tuple[int, float]] = []
    for path in _global_models(run_dir)[1:]:  # round_0 is the untrained initial model
        state, _ = read_model_file(path)
        net = build_model(cfg.model)
        net.load_state_dict(state)
        vals = [evaluate_store(net, cfg.store_path(s.name), {"val"}).get("dice") for s in cfg.sites]
        d = float(sum(v for v in vals if v is not None) / max(1, sum(v is not None for v in vals)))
        r = int(path.stem.split("_")[1])
        history.append((r, round(d, 4)))
        if best is None or d > best[0]:
            best = (d, r, state)
    if best is None:
        return _final_global(run_dir), {}
    return best[2], {"selected_round": best[1], "val_dice": best[0], "val_history": history}


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


#: settings that only choose which rows an invocation runs, or how its trainings share the cores (thread counts
#: change the order of float sums, nothing else): no row's key holds them
_SCHEDULING: dict[str, set[str] | None] = {
    "run_dir": None, "name": None, "train": {"threads"}, "federation": {"simulate_workers", "parallel_sites"},
    "experiment": {"seeds", "variants", "fedmic", "epsilons", "federated", "parallel_local"},
}  # fmt: skip
#: what a row without DP never reads (dp_changes applies them to the DP rows only)
_DP_ONLY: dict[str, set[str] | None] = {"experiment": {"dp_max_steps", "dp_lr", "dp_batch_size"}, "train": {"privacy"}}
#: of ``federation``, what the local and centralised models read: their step budget (rounds) and start
_BASELINE_FEDERATION = ("rounds", "initial_model")


def _drop(data: dict[str, Any], spec: dict[str, set[str] | None]) -> None:
    for section, keys in spec.items():
        if keys is None:
            data.pop(section, None)
        else:
            for k in keys:
                data.get(section, {}).pop(k, None)


def row_key(cfg: ExperimentConfig, row: str) -> str:
    """The settings a table row (``local:<site>``, ``centralised``, ``fedavg``, ``feddp eps=8``, ``fedmic``, …)
    was trained and scored with, hashed: a recorded row whose key differs is stale and trains again, every
    other row stays. A setting of the DP rows only (``experiment.dp_lr``, ``train.privacy``) reruns those
    rows; a federation setting leaves the local and centralised models; FedMIC's own settings
    (``experiment.fedmic``) are checked by its rows (:mod:`fedpath.experiment_fedmic`)."""
    data = cfg.model_dump(mode="json")
    _drop(data, _SCHEDULING)
    if "eps=" not in row:
        _drop(data, _DP_ONLY)
    if row == "centralised" or row.startswith("local:"):
        _drop(data, {"experiment": {"select_round"}})
        data["federation"] = {k: data["federation"][k] for k in _BASELINE_FEDERATION}
    return sha256_bytes(json.dumps(data, sort_keys=True).encode())[:16]


def _legacy_config_key(cfg: ExperimentConfig) -> str:
    """The one key for every row that ``experiment.json`` held before :func:`row_key` (its records carry no key
    of their own): a run directory of that version resumes instead of training every row again."""
    exclude: Any = {
        "run_dir": True, "name": True, "federation": {"simulate_workers"}, "experiment": {"seeds", "variants", "fedmic"},
        "train": {"threads"},
    }  # fmt: skip
    return sha256_bytes(cfg.model_dump_json(exclude=exclude).encode())[:16]


def current_runs(cfg: ExperimentConfig, state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The records of ``experiment.json`` (``state``) that still hold under ``cfg``: each row's own key matches
    (:func:`row_key`); a record of the one-key version counts when that key matches, and gets its row key."""
    legacy = state.get("config_key") is not None and state.get("config_key") == _legacy_config_key(cfg)
    out: dict[str, dict[str, Any]] = {}
    for k, run in state.get("runs", {}).items():
        key = row_key(cfg, str(run.get("name")))
        if run.get("key") == key or (legacy and "key" not in run):
            out[k] = {**run, "key": key}
    return out


def claim_row_dir(vdir: Path, key: str) -> None:
    """Make ``vdir`` the training directory of a row with ``key``: a directory left by a row of other settings
    (or of a version before row keys) is moved aside, never trained on nor deleted; the same row's directory
    stays, so an interrupted training resumes."""
    mark = vdir / "row_key"
    if vdir.exists() and not (mark.is_file() and mark.read_text().strip() == key):
        old = mark.read_text().strip() if mark.is_file() else "unkeyed"
        aside = vdir.with_name(f"{vdir.name}.stale-{old}-{int(time.time())}")
        log.warning("experiment: %s was trained with other settings; moved to %s", vdir, aside.name)
        vdir.rename(aside)
    vdir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(mark, (key + "\n").encode())


def merge_runs(runs: dict[str, Any], mine: set[str], disk: dict[str, Any]) -> None:
    """Merge ``experiment.json``'s runs as on disk into ``runs``, this invocation's: the records it made
    itself (``mine``) stay, every other one is taken from disk, where another invocation (another seed) may
    have recorded it again since this one read the file at its start."""
    for k, v in disk.items():
        if k not in mine:
            runs[k] = v


def run_experiment(
    cfg: ExperimentConfig, data_root: Path | None, epsilons: list[float] | None = None
) -> dict[str, Any]:
    """Tile every site once, train every variant once per seed, evaluate on every site's held-out images,
    tabulate mean ± sd over seeds.

    Resumable: a (variant, seed) already evaluated under the same config (``experiment.json``) is not
    rerun, and training jobs themselves resume from their checkpoints.
    """
    import resource

    from federation.server import initial_model_state
    from fedpath.simulate import run_simulation

    t_start = time.perf_counter()
    cpu0 = _cpu_seconds(resource)
    base_dir = cfg.run_dir
    base_dir.mkdir(parents=True, exist_ok=True)
    if data_root is None:
        raise FedpathError("experiment: no data root (give --data-root or set FEDPATH_DATA_ROOT)")
    data_root = data_root.resolve()
    if "fedmic" in cfg.experiment.variants:
        from fedpath.experiment_fedmic import fedmic_strategy

        fedmic_strategy(cfg)  # a bad experiment.fedmic fails now, not after the other rows have trained
    tile_sites(cfg, data_root, "experiment")
    t_tiled = time.perf_counter()

    ex = cfg.experiment
    rounds = cfg.federation.rounds
    steps = cfg.train.max_steps
    if steps is None:
        raise FedpathError("experiment: set train.max_steps (local steps per round) so every variant has the same budget")
    names = [s.name for s in cfg.sites]
    eps_list: list[float] = list(epsilons or ex.epsilons or DEFAULT_EPSILONS)
    state_file = base_dir / "experiment.json"
    key_cfg = cfg  # rows are keyed by the settings as given (θ_pre's path, set below, follows from them)
    runs: dict[str, dict[str, Any]] = {}
    if state_file.exists():
        try:
            previous = json.loads(state_file.read_text())
        except json.JSONDecodeError:
            previous = {}
        runs = current_runs(key_cfg, previous)  # each row's own settings: a changed DP setting reruns the DP rows only
        if runs:
            log.info("experiment: resuming, %d runs already done: %s", len(runs), ", ".join(runs))

    mine: set[str] = set()  # the runs this invocation recorded: every other one is read back from disk

    def save() -> None:
        # under a lock, merged with what other invocations (other seeds) wrote meanwhile: their records
        # win over this invocation's copies from its start, which they may have re-recorded since
        import fcntl

        with open(base_dir / ".experiment.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if state_file.exists():
                try:
                    disk = json.loads(state_file.read_text())
                except json.JSONDecodeError:
                    disk = {}
                merge_runs(runs, mine, current_runs(key_cfg, disk))
            tmp = state_file.with_suffix(f".json.{os.getpid()}.tmp")
            all_seeds = sorted({int(r["seed"]) for r in runs.values()} | set(ex.seeds))
            rows = aggregate(runs, names, all_seeds)
            tmp.write_text(json.dumps({"runs": runs, "rows": rows}, indent=2, default=str))
            os.replace(tmp, state_file)

    def record(
        name: str, seed: int, kind: str, state: dict[str, torch.Tensor], seconds: float, run_dir: Path, extra: dict[str, Any]
    ) -> None:
        from pipeline.checkpoint import ModelMeta, save_model

        # the scored model, ready for `fedpath infer --model` (per-nucleus GeoJSON on a slide)
        meta = ModelMeta(
            model=cfg.model, tile_size=cfg.tiling.tile_size, target_mpp=cfg.tiling.target_mpp,
            source="global" if kind == "federated" else "local", extra={"variant": name, "seed": seed},
        )  # fmt: skip
        save_model(run_dir / "model.safetensors", state, meta)
        t0 = time.perf_counter()
        ev = _evaluate(cfg, state, data_root)
        mine.add(f"{name}@{seed}")
        runs[f"{name}@{seed}"] = {
            "name": name, "seed": seed, "kind": kind, "key": row_key(key_cfg, name), "seconds": seconds, "eval": ev, "ledger": _ledger_eps(run_dir),
            "seconds_eval": round(time.perf_counter() - t0, 1), "cpu_seconds_so_far": round(_cpu_seconds(resource) - cpu0, 1),
            **extra,
        }  # fmt: skip
        log.info("experiment: %s seed %d done in %.0f s: %s", name, seed, seconds, {k: _r3(v.get("dice")) for k, v in ev.items()})
        save()

    no_dp = {"train__privacy__enabled": False}
    pretrain: dict[str, Any] | None = None
    if ex.start == "synthetic":  # the server's θ_pre from its own synthetic slides, once for every seed
        from fedpath.pretrain import run_pretrain

        pretrain = run_pretrain(cfg, data_root, "synthetic")
        cfg = variant_config(cfg, "", base_dir, federation__initial_model=Path(pretrain["path"]))
    # every row starts from one model: federation.initial_model (e.g. the server's θ_pre, `fedpath pretrain`)
    # when set, so the local and centralised baselines compare with the federations from the same start
    start = initial_model_state(cfg) if cfg.federation.initial_model is not None else None
    pool: ProcessPoolExecutor | None = None  # experiment.parallel_local's worker processes, started once
    try:
        for seed in ex.seeds:
            seeded = {"train__seed": seed, "federation__seed": seed}
            root = base_dir / "variants" / f"seed_{seed}"
            # the local models and the centralised one: (row, sites, steps); the longest first, so that with
            # experiment.parallel_local workers it trains beside the others instead of after them
            todo: list[tuple[str, list[str], int]] = []
            if "centralised" in ex.variants and f"centralised@{seed}" not in runs:
                todo.append(("centralised", names, rounds * steps * len(names)))
            todo += [(f"local:{s}", [s], rounds * steps) for s in (names if "local" in ex.variants else []) if f"local:{s}@{seed}" not in runs]
            jobs: dict[str, tuple[ExperimentConfig, Path]] = {}
            for row, _, _ in todo:
                vdir = root / row.replace(":", "_")
                claim_row_dir(vdir, row_key(key_cfg, row))
                jobs[row] = (variant_config(cfg, row.replace(":", "_"), vdir, **no_dp, **seeded), vdir)
                _link_stores(cfg, jobs[row][0])
            if ex.parallel_local > 1 and len(todo) > 1:
                if pool is None:
                    pool = _local_pool(ex.parallel_local)
                futures = {
                    pool.submit(_train_local_job, _threads_for(jobs[row][0], ex.parallel_local), sites_, jobs[row][1], start, n): row
                    for row, sites_, n in todo
                }
                done: Iterable[tuple[str, Any]] = ((futures[f], f.result()) for f in as_completed(futures))
            else:
                done = ((row, _train_local_job(jobs[row][0], sites_, jobs[row][1], start, n)) for row, sites_, n in todo)
            for row, trained in done:
                extra = {"steps": trained.steps, "early_stopping": trained.metrics.get("early_stopping")}
                if row == "centralised":
                    record("centralised", seed, "centralised", trained.state, trained.seconds, jobs[row][1], extra)
                else:
                    record(row, seed, "local", trained.state, trained.seconds, jobs[row][1], {"site": row.split(":", 1)[1], **extra})

            def federated(name: str, vdir: Path, vcfg: ExperimentConfig, extra: dict[str, Any], seed: int = seed) -> None:
                claim_row_dir(vdir, row_key(key_cfg, name))
                _link_stores(cfg, vcfg)
                t0 = time.perf_counter()
                run_simulation(vcfg)
                if ex.select_round:
                    state, sel = _best_global(vcfg, vdir)
                else:
                    state, sel = _final_global(vdir), {}
                record(name, seed, "federated", state, time.perf_counter() - t0, vdir, {**extra, **sel})

            for strat in ex.federated if "federated" in ex.variants else []:
                if f"{strat}@{seed}" in runs:
                    continue
                vdir = root / strat
                federated(strat, vdir, variant_config(cfg, strat, vdir, federation__strategy=_strategy(cfg, strat), **no_dp, **seeded), {})

            for eps in eps_list if "feddp" in ex.variants else []:
                tag = "inf" if math.isinf(eps) else f"{eps:g}"
                if f"feddp eps={tag}@{seed}" in runs:
                    continue
                vdir = root / f"feddp_eps_{tag}"
                privacy = dp_changes(cfg, eps)
                vcfg = variant_config(cfg, f"feddp_eps_{tag}", vdir, federation__strategy=_strategy(cfg, "fedavg"), **privacy, **seeded)
                federated(f"feddp eps={tag}", vdir, vcfg, {"target_epsilon": eps})

            if "fedmic" in ex.variants:  # issue 15: FedMIC beside FedAvg of the same privacy level, every seed
                from fedpath.experiment_fedmic import run_fedmic_variants

                view = {r["name"]: r for r in runs.values() if int(r["seed"]) == seed}

                def rec(name: str, kind: str, state: dict[str, torch.Tensor], seconds: float, vdir: Path,
                        extra: dict[str, Any], seed: int = seed, view: dict[str, dict[str, Any]] = view) -> None:
                    record(name, seed, kind, state, seconds, vdir, extra)
                    view[name] = runs[f"{name}@{seed}"]

                def seeded_cfg(base: ExperimentConfig, name: str, vdir: Path, seeded: dict[str, Any] = seeded, **changes: Any) -> ExperimentConfig:
                    return variant_config(base, name, vdir, **changes, **seeded)

                def evaluate_own(vcfg: ExperimentConfig, state: dict[str, torch.Tensor], site: str) -> dict[str, Any]:
                    return _evaluate(vcfg, state, data_root, [site])[site]  # scored as every other row is

                run_fedmic_variants(cfg, root, view, rec, seeded_cfg, _link_stores, _final_global, evaluate_own)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


    save()  # picks up the other invocations' seeds
    seeds = sorted({int(r["seed"]) for r in runs.values()})
    rows = aggregate(runs, names, seeds)
    table = tabulate(rows, names)
    if any(r.get("fedmic") for r in runs.values()):
        from fedpath.experiment_fedmic import fedmic_table

        table += fedmic_table(runs, names)
    extra_md = compare(runs, names, seeds)
    wall = time.perf_counter() - t_start
    cpu = _cpu_seconds(resource) - cpu0
    md = table + "\n" + extra_md
    (base_dir / "experiment.md").write_text(md)
    plot = _bar_plot(rows, base_dir / "experiment.png")
    write_html(base_dir / "experiment.html", md, plot)
    summary = {
        "rows": rows, "table_markdown": table, "comparisons_markdown": extra_md, "epsilons": [str(e) for e in eps_list],
        "seeds": seeds, "seconds_total": round(wall, 1), "cpu_seconds": round(cpu, 1), "seconds_tiling": round(t_tiled - t_start, 1),
        "plot": str(plot) if plot else None, "pretrain": pretrain,
    }  # fmt: skip
    update_summary(base_dir, "experiment", summary)
    print(md)
    return summary


def _threads_for(cfg: ExperimentConfig, jobs: int) -> ExperimentConfig:
    """``cfg`` for one of ``jobs`` trainings that share the cores: ``train.threads`` (default: every core)
    split between them, at least one each."""
    threads = max(1, (cfg.train.threads or os.cpu_count() or 1) // jobs)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"threads": threads})})


def _local_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes for the local models (spawned: the parent's OpenMP pool must not be forked)."""
    import multiprocessing

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _train_local_job(
    cfg: ExperimentConfig, sites: list[str], run_dir: Path, start: dict[str, torch.Tensor] | None, max_steps: int
) -> Any:
    """A model trained without DP on ``sites``' pooled training tiles (one site: its local model; every site: the
    centralised one), the experiment's baselines; in the experiment's process or a worker."""
    from pipeline.train import train_local

    return train_local(cfg, sites, run_dir, init_state=start, max_steps=max_steps, job_id="experiment")


def _cpu_seconds(resource: Any) -> float:
    """CPU seconds of this process and its finished children (site jobs, aggregator): the machine time a
    run costs, whatever else shares the cores."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return float(me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime)


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def _r3(x: Any) -> Any:
    return round(x, 3) if isinstance(x, float) else x


METRICS = ("dice", "jaccard", "pixel_accuracy", "aji", "pq", "dq", "sq")


def _site_mean(ev: dict[str, Any], sites: list[str], k: str) -> float | None:
    return _mean([ev[s].get(k) for s in sites if s in ev])


def aggregate(runs: dict[str, dict[str, Any]], sites: list[str], seeds: list[int]) -> dict[str, dict[str, Any]]:
    """One row per variant: per site and over sites (mean of the site means), mean and sd over seeds."""
    names: list[str] = []
    for r in runs.values():
        if r["name"] not in names:
            names.append(r["name"])
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        per_seed = [runs[f"{name}@{sd}"] for sd in seeds if f"{name}@{sd}" in runs]
        first = per_seed[0]
        ev: dict[str, Any] = {}
        for s in sites:
            ev[s] = {}
            for k in METRICS:
                m, sd = mean_sd([r["eval"].get(s, {}).get(k) for r in per_seed])
                ev[s][k], ev[s][f"{k}_sd"] = m, sd
        overall: dict[str, Any] = {}
        for k in METRICS:
            m, sd = mean_sd([_site_mean(r["eval"], sites, k) for r in per_seed])
            overall[k], overall[f"{k}_sd"] = m, sd
        rows[name] = {
            "kind": first["kind"], "site": first.get("site"), "n_seeds": len(per_seed), "seeds": [r["seed"] for r in per_seed],
            "seconds": sum(r["seconds"] for r in per_seed) / len(per_seed), "eval": ev, "overall": overall,
            "ledger": first["ledger"],
        }  # fmt: skip
    return rows


def tabulate(rows: dict[str, dict[str, Any]], sites: list[str]) -> str:
    """Markdown table, mean ± sd over seeds: Dice per site's held-out images; over sites (mean of the site
    means) Dice, AJI, PQ, Jaccard; Dice on the other sites' images (local models); ε; wall time."""
    head = ["variant", "seeds"] + [f"Dice {s}" for s in sites] + [
        "mean Dice", "mean AJI", "mean PQ", "mean Jaccard", "Dice on other sites", "ε per tile (max; δ)", "ε per slide (max; δ)", "wall s",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        ev, ov = row["eval"], row["overall"]
        others = [ev[s].get("dice") for s in sites if s != row.get("site")] if row.get("site") else None
        eps = [(v["epsilon"], v.get("delta")) for v in row["ledger"].values() if isinstance(v.get("epsilon"), (int, float))]
        eps_slide = [(v["epsilon_slide"], v.get("delta_slide")) for v in row["ledger"].values() if isinstance(v.get("epsilon_slide"), (int, float))]
        dp_row = any(v.get("unit") for v in row["ledger"].values())
        cells = [name, str(row["n_seeds"])] + [pm(ev[s].get("dice"), ev[s].get("dice_sd")) for s in sites] + [
            pm(ov.get("dice"), ov.get("dice_sd")),
            pm(ov.get("aji"), ov.get("aji_sd")),
            pm(ov.get("pq"), ov.get("pq_sd")),
            pm(ov.get("jaccard"), ov.get("jaccard_sd")),
            _fmt(_mean(others)) if others is not None else _fmt(ov.get("dice")),
            _eps_cell(max(eps)) if eps else "-",
            _eps_cell(max(eps_slide)) if eps_slide else ("no guarantee" if dp_row else "-"),
            f"{row['seconds']:.0f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(runs: dict[str, dict[str, Any]], sites: list[str], seeds: list[int]) -> str:
    """Paired comparisons (same seed, same test images): differences of mean Dice / AJI between variants
    (mean ± sd over seeds, and over (seed, image) pairs); per site, the federation against its local model."""
    names = sorted({r["name"] for r in runs.values()})
    dp = [n for n in names if n.startswith("feddp") and n != "feddp eps=inf"]
    pairs = [(a, b) for a, b in [("centralised", "fedavg"), ("fedavg", "feddp eps=8"), ("centralised", "feddp eps=8")] if a in names and b in names]
    pairs += [("fedavg", n) for n in dp if n != "feddp eps=8"]
    out = ["Paired differences (A − B; same seeds, same test images; mean ± sd over seeds, and over seed × image pairs):", "",
           "| A | B | Δ mean Dice (seeds) | Δ Dice (images) | Δ mean AJI (seeds) | n seeds |", "|---|---|---|---|---|---|"]  # fmt: skip
    for a, b in pairs:
        common = [sd for sd in seeds if f"{a}@{sd}" in runs and f"{b}@{sd}" in runs]
        if not common:
            continue
        dd, da, di = [], [], []
        for sd in common:
            ea, eb = runs[f"{a}@{sd}"]["eval"], runs[f"{b}@{sd}"]["eval"]
            x, y = _site_mean(ea, sites, "dice"), _site_mean(eb, sites, "dice")
            if x is not None and y is not None:
                dd.append(x - y)
            x, y = _site_mean(ea, sites, "aji"), _site_mean(eb, sites, "aji")
            if x is not None and y is not None:
                da.append(x - y)
            for s in sites:
                sa, sb = ea.get(s, {}).get("slides", {}), eb.get(s, {}).get("slides", {})
                di += [sa[i]["dice"] - sb[i]["dice"] for i in sa if i in sb and sa[i].get("dice") is not None and sb[i].get("dice") is not None]
        out.append(f"| {a} | {b} | {spread(dd)} | {spread(di)} | {spread(da)} | {len(common)} |")
    fed = [n for n in ("fedavg", "feddp eps=8") if n in names]
    if fed and any(f"local:{s}" in names for s in sites):
        out += ["", "Per site, on that site's own test images (Dice, mean ± sd over seeds; Δ paired by seed):", ""]
        head = ["site", "local"] + fed + [f"Δ {n} − local" for n in fed] + ["AJI local"] + [f"AJI {n}" for n in fed]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in sites:
            loc = f"local:{s}"
            if loc not in names:
                continue

            def site_vals(n: str, k: str = "dice", s: str = s) -> list[float | None]:
                return [runs[f"{n}@{sd}"]["eval"].get(s, {}).get(k) if f"{n}@{sd}" in runs else None for sd in seeds]

            cells = [s, spread(site_vals(loc))] + [spread(site_vals(n)) for n in fed]
            for n in fed:
                d = [x - y for x, y in zip(site_vals(n), site_vals(loc), strict=True) if x is not None and y is not None]
                cells.append(spread(d))  # type: ignore[arg-type]
            cells += [spread(site_vals(loc, "aji"))] + [spread(site_vals(n, "aji")) for n in fed]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _bar_plot(rows: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Mean Dice, AJI and PQ per variant with sd error bars (over seeds)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    names = list(rows)
    metrics = [k for k in ("dice", "aji", "pq") if any(rows[n]["overall"].get(k) is not None for n in names)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 3.6))
    width = 0.8 / max(1, len(metrics))
    for j, k in enumerate(metrics):
        ys = [rows[n]["overall"].get(k) or 0.0 for n in names]
        es = [rows[n]["overall"].get(f"{k}_sd") or 0.0 for n in names]
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=k.upper() if k != "dice" else "Dice")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("mean over sites' test images")
    n_seeds = max((r["n_seeds"] for r in rows.values()), default=0)
    ax.set_title(f"held-out test images, mean ± sd over {n_seeds} seeds")
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_html(path: Path, md: str, plot: Path | None, title: str = "Experiment: held-out test images") -> None:
    """A small self-contained report: the tables and the plot."""
    import base64
    import html

    img = ""
    if plot is not None and plot.exists():
        img = f'<img alt="bar plot" src="data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()}">'
    body = []
    for line in md.splitlines():
        if line.startswith("|") and set(line.replace("|", "").strip()) <= {"-"}:
            continue
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        else:
            body.append(f"</table><p>{html.escape(line)}</p><table border=1 cellspacing=0 cellpadding=3>")
    path.write_text(
        f"<!doctype html><meta charset=utf-8><title>fedpath: {html.escape(title)}</title>"
        f"<h1>{html.escape(title)}</h1><table border=1 cellspacing=0 cellpadding=3>"
        + "\n".join(body) + f"</table>{img}\n"
    )  # fmt: skip
