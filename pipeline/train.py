"""Local training with DP-SGD (Opacus): what every site runs, alone or once per federation round.

One job = :func:`train_local`. Its shape:

1. Data: the site's training slides (split by slide) as a :class:`~pipeline.data.TileDataset`.
2. Privacy plan: sampling rate q (tile unit: ``batch_size / tiles``; slide unit: slides sampled with
   probability q, up to ``max_tiles_per_slide`` tiles each, clipped together as one unit), noise
   multiplier σ from the config or from the target ε over the *whole planned training* (every federation
   round), δ below 1/n. The :class:`~pipeline.privacy.PrivacyLedger` stores the site's budget at its
   first job and refuses a job that would pass it or that asks for another budget, δ or unit.
3. DP-SGD (:func:`pipeline.dpsgd.make_private`): the model check, Opacus' per-sample gradients (hooks,
   with fedpath's grouped-convolution grad samplers), clipping, and noise and Poisson coins from a per-job
   CSPRNG seeded by OS entropy (:mod:`pipeline.dprandom`), never from the config seed. The config seed
   still drives model init, augmentation and non-DP shuffling. A ``BatchMemoryManager`` splits logical
   batches: the logical batch is a privacy parameter, the physical batch a memory one.
4. Loop: DiceCE loss, per-sample clipping and noise by Opacus, the FedProx proximal gradient
   ``mu * (w - w_global)`` added *after* clipping and noise (it does not depend on any sample, so it
   needs no clipping and costs no privacy; inside the loss Opacus would not see it per sample and it
   would vanish from the clipped gradient).
5. Every ``checkpoint_every`` steps: the ledger first (steps spent so far), then a checkpoint directory
   (model + optimizer as safetensors), then ``progress.json`` pointing at it (the commit point). A killed
   job re-run resumes from its last checkpoint; steps the ledger already counted beyond that checkpoint
   stay counted (conservative), so ε is never spent twice nor under-reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from fedcore.layout import RunLayout
from pipeline.checkpoint import ModelMeta, save_model, strip_wrappers
from pipeline.config import ExperimentConfig
from pipeline.data import TileDataset, batch_zoom, split_by_slide
from pipeline.dprandom import NoiseSource, noise_source
from pipeline.dpsgd import (
    PoissonSampler,
    PoissonSlideSampler,
    SlideDPOptimizer,
    WithSlideIds,
    collate_or_none,
    make_private,
)
from pipeline.errors import FedpathError
from pipeline.metrics import confusion_counts, metrics_from_counts
from pipeline.models import as_float, autocast, build_model, foreground_from_logits, resolve_precision
from pipeline.privacy import PrivacyLedger, budget_of, ledger_lock, noise_source_name
from wsi.store import SiteStore

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a job produced: the weights (plain names), how much data and privacy it used, its metrics."""

    state: dict[str, torch.Tensor]
    n_train_tiles: int
    steps: int
    epsilon: float | None
    delta: float | None
    noise_multiplier: float | None
    metrics: dict[str, Any]
    seconds: float
    sample_rate: float | None = None
    epsilon_slide: float | None = None
    job_id: str = "train"
    resumed_from: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# -- helpers ----------------------------------------------------------------------------------------------
def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state as flat tensors (safetensors) plus its JSON-able scalars and param groups."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def load_optimizer_tensors(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in info["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def _fingerprint(
    cfg: ExperimentConfig, sites: list[str], round_index: int | None, init: dict[str, torch.Tensor] | None
) -> str:
    h = hashlib.sha256()
    h.update(cfg.model.model_dump_json().encode())
    h.update(cfg.train.model_dump_json(exclude={"threads", "num_workers", "checkpoint_every"}).encode())
    h.update(json.dumps([sites, round_index]).encode())
    if init is not None:
        for k in sorted(init):
            h.update(k.encode())
            h.update(init[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def evaluate_dataset(
    net: nn.Module,
    ds: Dataset[Any],
    batch_size: int = 16,
    max_tiles: int | None = None,
    precision: str = "float32",
) -> dict[str, Any]:
    """Dice, Jaccard, pixel accuracy of ``net`` over a tile dataset, foreground as the test images score it
    (:func:`pipeline.models.foreground_from_logits` above 0.5): the mean over slides (FedDP's convention)
    and pooled over all pixels. ``precision`` as resolved
    (:func:`pipeline.models.resolve_precision`)."""
    was = net.training
    net.eval()
    n = len(ds)  # type: ignore[arg-type]
    items = (
        np.arange(n)
        if not max_tiles or n <= max_tiles
        else np.linspace(0, n - 1, max_tiles).round().astype(int)
    )
    per_slide: dict[str, torch.Tensor] = {}
    pooled = torch.zeros(4, dtype=torch.int64)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        xs, ys = zip(*(ds[int(i)] for i in chunk), strict=True)
        with autocast(precision):  # the function runs under no_grad
            pred = foreground_from_logits(net(torch.stack(xs))) > 0.5
        for j, i in enumerate(chunk):
            c = confusion_counts(pred[j], ys[j][0])
            sid = _slide_of(ds, int(i))
            per_slide[sid] = per_slide.get(sid, torch.zeros(4, dtype=torch.int64)) + c
            pooled += c
    net.train(was)
    if not per_slide:
        return {"n_tiles": 0, "n_slides": 0}
    slide_m = {s: metrics_from_counts(c) for s, c in per_slide.items()}
    out: dict[str, Any] = {
        k: float(np.mean([m[k] for m in slide_m.values()])) for k in ("dice", "jaccard", "pixel_accuracy")
    }
    out.update({"pooled": metrics_from_counts(pooled), "n_tiles": len(items), "n_slides": len(per_slide)})
    return out


def _slide_of(ds: Dataset[Any], item: int) -> str:
    if isinstance(ds, TileDataset):
        return ds.slide_of(item)
    if isinstance(ds, ConcatDataset):
        import bisect

        k = bisect.bisect_right(ds.cumulative_sizes, item)
        base = 0 if k == 0 else ds.cumulative_sizes[k - 1]
        sub = ds.datasets[k]
        return f"{k}:{_slide_of(sub, item - base)}"
    return "all"


def job_checkpoint(job_dir: Path) -> Path | None:
    """A training job's latest checkpoint directory (``model.safetensors``, optimiser state), as its
    ``progress.json`` names it; a finished job's is its final weights. None before the first one."""
    prog = job_dir / "progress.json"
    if not prog.is_file():
        return None
    name = json.loads(prog.read_text()).get("checkpoint")
    return job_dir / name if name else None


def _concat(parts: list[TileDataset]) -> Dataset[Any]:
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def _site_paths(run_dir: Path, sites: list[str], round_index: int | None) -> tuple[Path, Path]:
    """(job directory, ledger path): a site's own, or ``central/`` for the pooled baseline."""
    lay = RunLayout(run_dir)
    base = lay.site(sites[0]) if len(sites) == 1 else lay.central
    job = base.train if round_index is None else base.round(round_index)
    return job, base.privacy


# -- the job ----------------------------------------------------------------------------------------------
def site_datasets(
    cfg: ExperimentConfig, run_dir: Path, sites: list[str]
) -> tuple[list[TileDataset], list[TileDataset], dict[str, Any], dict[str, Any] | None]:
    """Each site's training and validation tiles (its store split by slide, ``train.val_fraction`` and
    ``train.seed``), stain-normalised as ``train.stain`` says: (train parts, validation parts, the split per site,
    the stain reference)."""
    tc = cfg.train
    train_parts: list[TileDataset] = []
    val_parts: list[TileDataset] = []
    split_info: dict[str, Any] = {}
    ref_tiles: list[np.ndarray] = []
    for i, site in enumerate(sites):
        store_path = RunLayout(run_dir).site(site).store
        split = split_by_slide(SiteStore(store_path), tc.val_fraction, tc.seed)
        split_info[site] = {"train": split.train, "val": split.val, "source": split.source}
        classes = 3 if cfg.model.out_channels == 3 else 2  # a 3-class model learns inside/boundary
        train_parts.append(TileDataset(store_path, split.train, tc.augment, None, seed=tc.seed + i, classes=classes))
        if split.val:
            val_parts.append(TileDataset(store_path, split.val, None, None, seed=tc.seed + i, classes=classes))
        if tc.stain.method != "none":
            ds0 = train_parts[-1]
            pick = np.linspace(0, len(ds0) - 1, min(tc.stain.reference_tiles, len(ds0))).round().astype(int)
            ref_tiles += [ds0.read(int(k))[0] for k in pick]
    stain_ref = None
    if tc.stain.method != "none":
        from pipeline.stain import build_stain

        stain_fn, stain_ref = build_stain(tc.stain, ref_tiles)
        for d in train_parts + val_parts:
            d.stain = stain_fn
    return train_parts, val_parts, split_info, stain_ref


def validation_score(cfg: ExperimentConfig, run_dir: Path, site: str, net: nn.Module) -> float | None:
    """``net``'s Dice on ``site``'s own validation tiles, as its training's early stopping reads it (the
    mean over validation slides, ``train.max_val_tiles``); None when the site has no validation slide."""
    _, val_parts, _, _ = site_datasets(cfg, run_dir, [site])
    if not val_parts:
        return None
    got = evaluate_dataset(net, _concat(val_parts), max_tiles=cfg.train.max_val_tiles, precision=resolve_precision(cfg.train.precision))
    dice = got.get("dice")
    return None if dice is None else float(dice)


def train_local(
    cfg: ExperimentConfig,
    sites: list[str],
    run_dir: Path | str,
    *,
    init_state: dict[str, torch.Tensor] | None = None,
    round_index: int | None = None,
    proximal_ref: dict[str, torch.Tensor] | None = None,
    proximal_mu: float = 0.0,
    job_id: str | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    hooks: Any = None,
    plan_steps: int | None = None,
) -> TrainResult:
    """Train on ``sites``' training slides (several = pooled) with DP-SGD when enabled; resumable.

    ``hooks`` (e.g. ``federation.fedmic_site.MutualHooks``) adds models and losses: ``wrap(net)`` returns
    the module actually trained (DP-SGD then clips and noises all its parameters together, one mechanism),
    ``criterion(base)`` the loss over its output, ``on_optimizer(opt)`` may restore optimiser state,
    ``shared_state(module)`` the weights returned as the job's result, ``shared_model(module)`` the model
    validated, and optionally ``validated_models(module)`` more models scored on the same validation tiles
    (``val_<name>_dice`` in the job's metrics, which stay at the site). ``plan_steps``: the steps σ is
    calibrated over for ``target_epsilon`` (default: the planned rounds × this job's steps); jobs of one
    site that share it share one σ and end at the target together.
    """
    t_start = time.perf_counter()
    if not sites:
        raise FedpathError("train: no site given")
    run_dir = Path(run_dir)
    tc, pc = cfg.train, cfg.train.privacy
    if tc.threads:
        torch.set_num_threads(tc.threads)
    job = job_id or ("train" if round_index is None else f"round-{round_index}")
    job_dir, ledger_path = _site_paths(run_dir, sites, round_index)
    job_dir.mkdir(parents=True, exist_ok=True)
    mu = proximal_mu or (cfg.federation.proximal_mu if proximal_ref is not None else 0.0)

    # -- data ------------------------------------------------------------------------------------------
    train_parts, val_parts, split_info, stain_ref = site_datasets(cfg, run_dir, sites)
    if cfg.train.stain.method != "none":
        _atomic_json(job_dir / "stain.json", stain_ref or {})
    if pc.enabled and pc.augment_multiplicity > 1 and tc.augment is not None:
        for d in train_parts:  # K augmentations per sampled tile, averaged per tile before clipping
            d.views = pc.augment_multiplicity
    train_ds = _concat(train_parts)
    n_train = len(train_ds)  # type: ignore[arg-type]
    if n_train == 0:
        raise FedpathError(f"train {sites}: the training slides have no tiles")
    tiles_per_slide = [n for d in train_parts for n in d.tiles_per_slide.values()]
    n_slides = len(tiles_per_slide)
    max_per_slide = max(tiles_per_slide)

    # -- privacy plan ----------------------------------------------------------------------------------
    dp = pc.enabled
    slide_unit = dp and pc.unit == "slide"
    cap = pc.max_tiles_per_slide or (min(max_per_slide, tc.physical_batch_size) if slide_unit else max_per_slide)
    if slide_unit:
        # slides join a batch with probability q; each brings up to `cap` tiles, clipped together as one unit
        slides_per_batch = max(1.0, tc.batch_size / cap)
        sample_rate = min(1.0, slides_per_batch / n_slides)
        n_units = n_slides
    else:
        sample_rate = 1.0 / math.ceil(n_train / tc.batch_size)  # Opacus' Poisson rate: 1 / len(loader)
        n_units = n_train
    steps_per_job = max_steps or tc.max_steps or max(1, math.ceil(tc.epochs / sample_rate))
    rounds_planned = cfg.federation.rounds if round_index is not None else 1
    sigma: float | None = None
    delta: float | None = None
    ledger: PrivacyLedger | None = None
    fingerprint = _fingerprint(cfg, sites, round_index, init_state)
    # -- resume ----------------------------------------------------------------------------------------
    progress_path = job_dir / "progress.json"
    prog: dict[str, Any] = json.loads(progress_path.read_text()) if progress_path.is_file() else {}
    if prog and prog.get("job") != job:
        prog = {}  # another job's leftovers in this directory: start over
    if prog and prog.get("fingerprint") != fingerprint:
        raise FedpathError(
            f"{progress_path}: job {job!r} was started with another config or initial model; "
            "use a new job id or run directory"
        )

    lock = ledger_lock(ledger_path) if dp else None
    if lock is not None:
        lock.__enter__()
    try:
        if dp:
            ledger = PrivacyLedger.load(
                ledger_path, site="+".join(sites), accountant=pc.accountant, unit=pc.unit
            )
            delta = pc.delta or ledger.delta or 1.0 / (10 * n_units)
            if delta >= 1.0 / n_units:
                log.warning("delta=%g is not below 1/n=%g: the guarantee is weak", delta, 1.0 / n_units)
            if pc.target_epsilon is not None and pc.noise_multiplier is None:
                planned = plan_steps or rounds_planned * steps_per_job
                sigma = ledger.noise_for(pc.target_epsilon, delta, sample_rate, planned)
            elif pc.noise_multiplier is not None:
                sigma = float(pc.noise_multiplier)
            else:
                raise FedpathError("train.privacy: set target_epsilon or noise_multiplier")
            entry = ledger.entry(job)
            if entry is not None and entry.noise_multiplier != sigma:
                sigma = entry.noise_multiplier  # a resumed job keeps the σ it started with
            ledger.open_budget(
                budget_of(pc), delta, n_slides=n_slides, noise_source=noise_source_name(pc.reproducible_noise)
            )
            done_ckpt = int(prog.get("step", 0))
            already = entry.steps if entry is not None else 0
            offset = max(0, already - done_ckpt)  # steps counted but lost with a kill: stay spent
            if not prog.get("done"):
                ledger.check_budget(job, sigma, sample_rate, offset + steps_per_job, delta)
        result = _run(
            cfg,
            sites,
            job,
            job_dir,
            train_ds,
            val_parts,
            train_parts,
            prog,
            fingerprint,
            init_state,
            proximal_ref,
            mu,
            steps_per_job,
            sample_rate,
            sigma,
            cap if slide_unit else None,
            ledger,
            delta,
            round_index,
            n_units,
            max_per_slide if not slide_unit else cap,
            progress,
            hooks,
        )
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
    result.n_train_tiles = n_train
    result.seconds = time.perf_counter() - t_start
    result.extra.update(
        {
            "split": split_info,
            "stain": stain_ref,
            "n_train_slides": n_slides,
            "max_tiles_per_slide": max_per_slide,
            "rounds_planned": rounds_planned,
            "unit": pc.unit if dp else None,
            "proximal_mu": mu,
        }
    )
    return result


def _loader(
    train_ds: Dataset[Any],
    train_parts: list[TileDataset],
    cfg: ExperimentConfig,
    sample_rate: float,
    slide_cap: int | None,
    steps: int,
    seed: int,
    rng: NoiseSource | None,
    optimizer: Any = None,
) -> DataLoader[Any]:
    """The training batches. Without DP: seeded shuffling (reproducible). With DP: Poisson sampling whose
    coins come from the job's CSPRNG, over tiles, or over slides (``slide_cap`` tiles each, whole slides per
    physical batch, items tagged with their slide for per-slide clipping)."""
    tc = cfg.train
    if rng is None:
        g = torch.Generator().manual_seed(seed)
        return DataLoader(
            train_ds, batch_size=tc.batch_size, shuffle=True, generator=g, num_workers=tc.num_workers
        )
    n = len(train_ds)  # type: ignore[arg-type]
    if slide_cap is None:
        sampler = PoissonSampler(n, sample_rate, steps, rng)
        return DataLoader(
            train_ds, batch_sampler=sampler, collate_fn=collate_or_none, num_workers=tc.num_workers
        )
    groups: list[list[int]] = []
    slide_of_item = np.zeros(n, dtype=np.int64)
    base = 0
    for d in train_parts:
        for sid in d.slide_ids:
            idx = np.flatnonzero(d.index[:, 0] == d.slide_ids.index(sid)) + base
            slide_of_item[idx] = len(groups)
            groups.append(idx.tolist())
        base += len(d)
    slide_sampler = PoissonSlideSampler(
        groups, sample_rate, slide_cap, steps, tc.physical_batch_size, rng, optimizer
    )
    return DataLoader(
        WithSlideIds(train_ds, slide_of_item),
        batch_sampler=slide_sampler,
        collate_fn=collate_or_none,
        num_workers=tc.num_workers,
    )


def _forever(dl: Any) -> Iterator[Any]:
    while True:
        yield from dl


def _run(
    cfg: ExperimentConfig,
    sites: list[str],
    job: str,
    job_dir: Path,
    train_ds: Dataset[Any],
    val_parts: list[TileDataset],
    train_parts: list[TileDataset],
    prog: dict[str, Any],
    fingerprint: str,
    init_state: dict[str, torch.Tensor] | None,
    proximal_ref: dict[str, torch.Tensor] | None,
    mu: float,
    steps_total: int,
    sample_rate: float,
    sigma: float | None,
    slide_cap: int | None,
    ledger: PrivacyLedger | None,
    delta: float | None,
    round_index: int | None,
    n_units: int,
    group_k: int,
    show_progress: bool,
    hooks: Any = None,
) -> TrainResult:
    from monai.losses import DiceCELoss

    tc, pc = cfg.train, cfg.train.privacy
    dp = sigma is not None
    precision = resolve_precision(tc.precision)  # what runs, not "auto"
    torch.manual_seed(tc.seed + (round_index or 0))
    if cfg.model.name == "ensemble":
        raise FedpathError("model.name: ensemble is an inference model (a site's personal model); train one network")
    net = build_model(cfg.model)
    if init_state is not None:
        net.load_state_dict(strip_wrappers(init_state))
    if hooks is not None:  # extra models trained (and checkpointed) together with net
        net = hooks.wrap(net)
    params = [p for p in net.parameters() if p.requires_grad]
    if tc.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=tc.lr, momentum=0.9, weight_decay=tc.weight_decay)
    if hooks is not None:
        hooks.on_optimizer(opt)

    ema = _ema_model(net, tc.ema_decay)
    step = 0
    if prog.get("checkpoint"):
        ck = job_dir / prog["checkpoint"]
        net.load_state_dict(strip_wrappers(load_file(str(ck / "model.safetensors"))))
        if ema is not None and (ck / "ema.safetensors").is_file():
            ema.module.load_state_dict(load_file(str(ck / "ema.safetensors")))
            ema.n_averaged.fill_(max(1, int(prog.get("step", 1))))
        load_optimizer_tensors(
            opt, load_file(str(ck / "optimizer.safetensors")), json.loads((ck / "optimizer.json").read_text())
        )
        step = int(prog["step"])
        log.info("%s: resuming job %r from step %d", job_dir, job, step)
    resumed_from = step
    spent_offset = 0
    if ledger is not None:
        e = ledger.entry(job)
        spent_offset = max(0, (e.steps if e else 0) - step)

    ref = None
    if proximal_ref is not None and mu > 0:
        ref = {k: v.detach().clone().float() for k, v in strip_wrappers(proximal_ref).items()}
    criterion: Any = DiceCELoss(to_onehot_y=True, softmax=True)
    if hooks is not None:
        criterion = hooks.criterion(criterion)
    seed = tc.seed * 1_000_003 + (round_index or 0) * 7919 + step

    model: nn.Module = net
    rng: NoiseSource | None = None
    if dp:
        # the job's DP randomness: OS entropy, never the config seed, never written down (unless the
        # config's debug switch asks for seeded noise, which marks the whole site "not private")
        rng = noise_source(pc.reproducible_noise, seed, "+".join(sites) + ":" + job)
        model, opt = make_private(
            net,
            opt,
            noise_multiplier=float(sigma),  # type: ignore[arg-type]
            max_grad_norm=pc.max_grad_norm,
            expected_batch_size=sample_rate * n_units if slide_cap else int(n_units * sample_rate),
            rng=rng,
            slide_level=slide_cap is not None,
        )
        shares = hooks.clip_shares() if hooks is not None and hasattr(hooks, "clip_shares") else None
        if shares:
            opt.set_clip_groups(clip_groups(net, shares, pc.max_grad_norm))  # type: ignore[attr-defined]
    dl = _loader(train_ds, train_parts, cfg, sample_rate, slide_cap, steps_total - step, seed, rng, opt)
    if dp:
        if ref is not None:
            # FedProx with DP-SGD: the proximal gradient joins *after* clipping, noise and averaging, just
            # before the inner optimizer's step (Opacus' step hook runs there); it depends on no sample.
            # fedpath accounts privacy in its own ledger, so no accountant hook is attached to replace.
            def _hook(o: Any) -> None:
                _add_proximal_grad(net, ref, mu)  # type: ignore[arg-type]

            opt.attach_step_hook(_hook)  # type: ignore[union-attr,attr-defined]

    set_lr = _lr_schedule(cfg, opt, steps_total, round_index)
    set_lr(step)
    # early stopping (local and pooled jobs; a federation picks its best round instead): validation Dice
    # every `val_every` steps, the best model kept, stop after `patience` checks without improvement
    stopper = (
        _EarlyStopping(
            net if ema is None else ema.module, _concat(val_parts), tc.val_every, tc.patience, tc.max_val_tiles, precision,
            start=int(tc.early_stop_start * steps_total),
        )  # fmt: skip
        if tc.val_every and val_parts and round_index is None
        else None
    )

    def commit(step_now: int, done: bool, metrics: dict[str, Any] | None = None) -> None:
        # 1. the ledger (steps spent so far), 2. the checkpoint, 3. progress.json pointing at it
        if ledger is not None and delta is not None and sigma is not None:
            ledger.record(
                job=job,
                round_index=round_index,
                sample_rate=sample_rate,
                noise_multiplier=sigma,
                max_grad_norm=pc.max_grad_norm,
                steps=step_now + spent_offset,
                planned_steps=steps_total,
                delta=delta,
                n_units=n_units,
                max_tiles_per_slide=group_k,
                complete=done,
            )
            ledger.save()
        name = f"ckpt_{step_now:07d}"
        tmp = job_dir / (name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in strip_wrappers(net.state_dict()).items()},
            str(tmp / "model.safetensors"),
        )
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.module.state_dict().items()}, str(tmp / "ema.safetensors"))
        ot, oi = optimizer_tensors(opt.original_optimizer if dp else opt)  # type: ignore[attr-defined]
        save_file(ot, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(oi))
        final = job_dir / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_json(
            job_dir / "progress.json",
            {
                "job": job,
                "fingerprint": fingerprint,
                "step": step_now,
                "planned_steps": steps_total,
                "done": done,
                "checkpoint": name,
                "sites": sites,
                "round": round_index,
                "metrics": metrics or {},
                "time": time.time(),
            },
        )
        for old in job_dir.glob("ckpt_*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    if prog.get("done"):
        metrics = prog.get("metrics", {})
    else:
        losses: list[float] = []
        phys = tc.physical_batch_size
        prog_bar = _progress(show_progress)
        task = prog_bar.add_task(
            f"train {'+'.join(sites)} {job}",
            total=steps_total,
            completed=step,
            loss=float("nan"),
            eps=float("nan"),
        )
        with prog_bar:
            if dp:
                from opacus.utils.batch_memory_manager import BatchMemoryManager

                # tile unit: Opacus splits each logical batch into physical ones; slide unit: the slide
                # sampler already yields physical batches of whole slides and signals the optimizer
                batches = (
                    BatchMemoryManager(data_loader=dl, max_physical_batch_size=phys, optimizer=opt)
                    if slide_cap is None
                    else contextlib.nullcontext(dl)
                )
                with batches as mdl:
                    for batch in _forever(mdl):
                        if step >= steps_total:
                            break
                        _dp_physical_step(model, opt, criterion, batch, losses, precision, tc.augment.scale)
                        # Opacus has no public flag for "this physical step only accumulated"; its own
                        # BatchMemoryManager reads the same attribute, so it moves with Opacus' API
                        if opt._is_last_step_skipped:  # type: ignore[attr-defined]
                            continue  # a physical chunk of a larger logical batch
                        if ema is not None:
                            ema.update_parameters(net)
                        step += 1
                        step = _after_step(
                            step,
                            steps_total,
                            tc.checkpoint_every,
                            commit,
                            prog_bar,
                            task,
                            losses,
                            ledger,
                            job,
                        )
                        set_lr(step)
                        if stopper is not None and stopper.check(step):
                            break
            else:
                for x, y in _forever(dl):
                    if step >= steps_total:
                        break
                    x, y = batch_zoom(x, y, tc.augment.scale)
                    opt.zero_grad(set_to_none=True)
                    n = x.shape[0]
                    for s in range(0, n, phys):
                        xb, yb = x[s : s + phys], y[s : s + phys]
                        with autocast(precision):
                            out = model(xb)
                        loss = criterion(as_float(out), yb) * (xb.shape[0] / n)
                        loss.backward()  # type: ignore[no-untyped-call]
                        losses.append(float(loss.detach()) * n / xb.shape[0])
                    if ref is not None:
                        _add_proximal_grad(net, ref, mu)
                    opt.step()
                    if ema is not None:
                        ema.update_parameters(net)
                    step += 1
                    step = _after_step(
                        step, steps_total, tc.checkpoint_every, commit, prog_bar, task, losses, None, job
                    )
                    set_lr(step)
                    if stopper is not None and stopper.check(step):
                        break
        if stopper is not None:
            stopper.restore_best()  # into the average, when there is one
        if ema is not None and int(ema.n_averaged) > 0:
            net.load_state_dict(ema.module.state_dict())  # the job's result is the average
        val_ds = _concat(val_parts) if val_parts else None
        val_net = hooks.shared_model(net) if hooks is not None else net
        metrics = (
            evaluate_dataset(val_net, val_ds, max_tiles=tc.max_val_tiles, precision=precision)
            if val_ds is not None
            else {}
        )
        metrics = {
            f"val_{k}" if k in ("dice", "jaccard", "pixel_accuracy") else k: v for k, v in metrics.items()
        }
        if val_ds is not None and hooks is not None and hasattr(hooks, "validated_models"):
            for name, m in hooks.validated_models(net).items():  # e.g. FedMIC's personal teacher
                got = evaluate_dataset(m, val_ds, max_tiles=tc.max_val_tiles, precision=precision)
                metrics[f"val_{name}_dice"] = got.get("dice")
        metrics["train_loss_last"] = float(np.mean(losses[-10:])) if losses else None
        metrics["precision"] = precision
        if stopper is not None:
            metrics["early_stopping"] = stopper.report()
        commit(step, True, metrics)
    entry = ledger.entry(job) if ledger is not None else None
    final = hooks.shared_state(net) if hooks is not None else strip_wrappers(net.state_dict())
    return TrainResult(
        state={k: v.detach().cpu().clone() for k, v in final.items()},
        n_train_tiles=0,
        steps=int(prog.get("step", step)) if prog.get("done") else step,
        epsilon=entry.epsilon if entry else None,
        delta=delta,
        noise_multiplier=sigma,
        metrics=metrics,
        seconds=0.0,
        sample_rate=sample_rate if dp else None,
        epsilon_slide=entry.epsilon_slide if entry else None,
        job_id=job,
        resumed_from=resumed_from,
        extra={
            "delta_slide": entry.delta_slide if entry else None,
            "noise_source": rng.source if rng is not None else None,
            "privacy": ledger.statement() if ledger is not None else None,
        },
    )


def clip_groups(net: nn.Module, shares: dict[str, float], clip: float) -> list[tuple[list[int], float]]:
    """DP-SGD clip groups from ``{name prefix: share of C²}`` (the longest matching prefix wins; "" matches
    every name): each group's parameters, in the optimizer's order, and its norm C·√share."""
    if abs(sum(shares.values()) - 1.0) > 1e-9 or any(v <= 0 for v in shares.values()):
        raise FedpathError(f"DP-SGD clip shares must be positive and sum to 1 (got {shares})")
    members: dict[str, list[int]] = {k: [] for k in shares}
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    for i, name in enumerate(trainable):
        prefix = max((k for k in shares if name.startswith(k)), key=len, default=None)
        if prefix is None:
            raise FedpathError(f"DP-SGD clip shares: parameter {name!r} matches no prefix of {list(shares)}")
        members[prefix].append(i)
    return [(idx, clip * shares[k] ** 0.5) for k, idx in members.items() if idx]


def _ema_model(net: nn.Module, decay: float | None) -> Any:
    """torch's AveragedModel keeping an exponential moving average of ``net``'s weights (and buffers), or None."""
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _lr_schedule(
    cfg: ExperimentConfig, opt: torch.optim.Optimizer, steps_total: int, round_index: int | None
) -> Any:
    """A function of the job's step that sets the optimizer's learning rate: constant, or cosine from
    ``lr`` to ``lr_min`` over the whole training (a federation's rounds 0..R-1 are one horizon)."""
    tc = cfg.train

    def set_lr(step_now: int) -> None:
        if tc.lr_schedule != "cosine":
            return
        if round_index is None:
            pos = step_now / max(1, steps_total)
        else:
            done = round_index * steps_total + step_now  # rounds count from 0 (round_0 trains first)
            pos = done / max(1, cfg.federation.rounds * steps_total)
        pos = min(1.0, max(0.0, pos))
        lr = tc.lr_min + (tc.lr - tc.lr_min) * 0.5 * (1.0 + math.cos(math.pi * pos))
        for g in opt.param_groups:
            g["lr"] = lr

    return set_lr


class _EarlyStopping:
    """Validation Dice every ``every`` steps; the best weights are kept; ``check`` says stop after
    ``patience`` checks without improvement, counting only checks after step ``start``."""

    def __init__(
        self, net: nn.Module, val: Dataset[Any], every: int, patience: int, max_tiles: int | None, precision: str,
        start: int = 0,
    ):  # fmt: skip
        self.net, self.val, self.every, self.patience, self.max_tiles = net, val, every, patience, max_tiles
        self.start = start
        self.precision = precision
        self.best = -1.0
        self.best_step = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad = 0
        self.history: list[tuple[int, float]] = []
        self.stopped_at: int | None = None

    def check(self, step: int) -> bool:
        if step % self.every:
            return False
        d = float(evaluate_dataset(self.net, self.val, max_tiles=self.max_tiles, precision=self.precision).get(
            "dice", 0.0
        ))
        self.history.append((step, round(d, 4)))
        if d > self.best:
            self.best, self.best_step, self.bad = d, step, 0
            self.best_state = {k: v.detach().clone() for k, v in strip_wrappers(self.net.state_dict()).items()}
        elif step > self.start:
            self.bad += 1
        if self.bad >= self.patience:
            self.stopped_at = step
            log.info("early stopping at step %d: best validation Dice %.4f at step %d", step, self.best, self.best_step)
            return True
        return False

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.net.load_state_dict(self.best_state)

    def report(self) -> dict[str, Any]:
        return {"best_val_dice": self.best, "best_step": self.best_step, "stopped_at": self.stopped_at, "history": self.history}


def _dp_physical_step(
    model: nn.Module, opt: Any, criterion: nn.Module, batch: Any, losses: list[float], precision: str = "float32",
    zoom: float = 0.0,
) -> None:
    """Forward/backward of one physical batch, then the DP optimizer's step (a real step on the last
    chunk of a logical batch). An empty logical batch (Poisson sampling can draw none) still takes its
    noise-only step: zero per-sample gradients for every parameter, then the noise is added. Slide-level
    batches carry each tile's slide as a third element, which the optimizer clips by."""
    x = None if batch is None else batch[0]
    if isinstance(opt, SlideDPOptimizer):
        opt.set_groups(torch.zeros(0, dtype=torch.int64) if x is None or x.shape[0] == 0 else batch[2])
    if x is None or x.shape[0] == 0:
        for p in opt.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return
    target = batch[1]
    views = 1
    if x.dim() == 5:  # (tiles, views, C, H, W): augmentation multiplicity, every view a row of its own
        views = x.shape[1]
        x, target = x.flatten(0, 1), target.flatten(0, 1)
    x, target = batch_zoom(x, target, zoom)
    with autocast(precision):  # bf16 per-sample gradients; the optimizer clips them in float32
        out = model(x)
    loss = criterion(as_float(out), target)
    loss.backward()
    losses.append(float(loss.detach()))
    if views > 1:
        _mean_over_views(opt.params, views)
    opt.step()
    opt.zero_grad(set_to_none=True)  # clears grad_sample; keeps summed_grad across a skipped (partial) step


def _mean_over_views(params: Any, views: int) -> None:
    """Each tile's per-sample gradient is the mean of its ``views`` augmentations' (rows ``i*views`` to
    ``(i+1)*views - 1``): the optimizer then clips and noises one gradient per tile, so the tile stays the
    unit of privacy. Opacus scales each row as the gradient of that row's own loss (``loss_reduction``
    "mean" times the rows), so the mean is the gradient of the tile's loss averaged over its views."""
    for p in params:
        gs = p.grad_sample
        if isinstance(gs, list):  # several backward passes before a step: Opacus concatenates them
            gs = torch.cat(gs, 0)
        if gs is None:
            continue
        p.grad_sample = gs.reshape(gs.shape[0] // views, views, *gs.shape[1:]).mean(1)


def _add_proximal_grad(net: nn.Module, ref: dict[str, torch.Tensor], mu: float) -> None:
    """grad += mu * (w - w_global): the gradient of FedProx's (mu/2)||w - w_global||^2."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.requires_grad and name in ref:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(p.detach() - ref[name], alpha=mu)


def _after_step(
    step: int,
    total: int,
    every: int,
    commit: Any,
    bar: Any,
    task: Any,
    losses: list[float],
    ledger: PrivacyLedger | None,
    job: str,
) -> int:
    if step % every == 0 and step < total:
        commit(step, False)
    eps = float("nan")
    if ledger is not None:  # ε as of the last checkpoint (the ledger is written with each one)
        e = ledger.entry(job)
        eps = e.epsilon if e is not None else ledger.epsilon
    bar.update(task, completed=step, loss=float(np.mean(losses[-5:])) if losses else float("nan"), eps=eps)
    return step


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("ε {task.fields[eps]:.2f}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


# -- the CLI stage ----------------------------------------------------------------------------------------
def run_train(cfg: ExperimentConfig, sites: list[str], job_id: str | None = None) -> dict[str, Any]:
    """``fedpath train``: one site locally, or several pooled (the centralised baseline); writes the model
    and ``summary.json`` key "train". The job id derives from the config, so re-running the same command
    resumes (or returns) the same job, and a changed config is a new job whose ε adds to the ledger."""
    from fedcore.summary import update_summary

    for s in sites:
        cfg.site(s)  # unknown site: one-line error
    job_id = job_id or f"train-{_fingerprint(cfg, sites, None, None)[:8]}"
    res = train_local(cfg, sites, cfg.run_dir, job_id=job_id)
    store = SiteStore(cfg.store_path(sites[0])).attrs
    lay = RunLayout(cfg.run_dir)
    out = lay.site(sites[0]) if len(sites) == 1 else lay.central
    meta = ModelMeta(
        model=cfg.model,
        tile_size=int(store.get("tile_size", 0)),
        target_mpp=float(store.get("target_mpp", 0.0)),
        source="local" if len(sites) == 1 else "central",
        extra={"sites": sites, "steps": res.steps, "epsilon": res.epsilon, "delta": res.delta},
    )
    path = save_model(out.model, res.state, meta)
    summary = {
        "sites": sites,
        "model": str(path),
        "steps": res.steps,
        "n_train_tiles": res.n_train_tiles,
        "epsilon": res.epsilon,
        "delta": res.delta,
        "unit": cfg.train.privacy.unit if res.epsilon is not None else None,
        "privacy": res.extra.get("privacy"),
        "noise_multiplier": res.noise_multiplier,
        "sample_rate": res.sample_rate,
        "metrics": res.metrics,
        "seconds": res.seconds,
        "resumed_from": res.resumed_from,
        **{k: v for k, v in res.extra.items() if k != "split"},
        "split": res.extra.get("split"),
    }
    key_summary = {"+".join(sites): summary}
    from fedcore.summary import read_summary

    prev = read_summary(cfg.run_dir).get("train", {})
    update_summary(cfg.run_dir, "train", {**(prev if isinstance(prev, dict) else {}), **key_summary})
    privacy = res.extra.get("privacy") or {}
    log.info(
        "train %s: %d steps, %s, val dice=%s -> %s",
        sites,
        res.steps,
        privacy.get("text", "no DP"),
        res.metrics.get("val_dice"),
        path,
    )
    return summary
