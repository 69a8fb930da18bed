"""`fedpath attack`: the attacks over a sweep of privacy settings, with utility and membership at each ε.

For every ε in ``attack.epsilons`` (``None`` = no DP) the sweep

1. turns ε into the DP-SGD noise multiplier σ that reaches it for the federation's planned training
   (sampling rate, steps, δ; :func:`pipeline.privacy.noise_for_target` with the configured accountant);
2. lets the honest-but-curious aggregator attack what a site would send at that σ: the DP-SGD gradient
   of one step (per-sample clipping to C plus N(0, σ²C²), exactly Opacus' release) for Inverting
   Gradients and DLG, and the update after ``local_steps`` DP-SGD steps for the multi-step attack;
   always the worst case (one tile, one step), plus the configured batch size when it is larger;
3. scores each reconstruction (SSIM/PSNR/MSE, leakage against the dataset-mean prior);
4. trains the configured network with DP-SGD through Opacus at that ε on real tiles (the sweep's own
   short training, labelled as such) and measures validation Dice and a loss-threshold membership
   inference attack on its members against held-out tiles.

When the run holds stored updates (``server/updates/<r>/<site>.safetensors``), the multi-step
inversion also runs against them from the round's global model and is scored against the site's
actual tiles. Everything goes to ``<run_dir>/attack/attack.json``, PNG grids per ε, and the summary.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedcore.summary import update_summary
from federation.attack.common import DPSGD, observed_gradient, segmentation_loss
from federation.attack.dlg import DLGSettings, dlg_attack
from federation.attack.inverting import InversionSettings, Reconstruction, invert_gradients
from federation.attack.membership import loss_threshold_attack
from federation.attack.metrics import Leakage, leakage, summarise
from federation.attack.multistep import LocalTraining, invert_update, local_update
from federation.attack.tiles import TileSet, load_monuseg_tiles, load_store_tiles, monuseg_dir
from pipeline.config import ExperimentConfig
from pipeline.errors import FedpathError

log = logging.getLogger(__name__)

ATTACK_JSON_VERSION = 1


@dataclass
class DPParams:
    """How ε maps to σ for this federation (the accounting inputs are reported with the results)."""

    sample_rate: float
    steps: int
    delta: float
    clip: float
    accountant: str
    source: str

    def sigma(self, epsilon: float | None) -> float:
        if epsilon is None:
            return 0.0
        from pipeline.privacy import noise_for_target

        return noise_for_target(epsilon, self.delta, self.sample_rate, self.steps, self.accountant)


def _eps_key(eps: float | None) -> str:
    return "none" if eps is None else f"{eps:g}"


def _site_store_tiles(cfg: ExperimentConfig) -> dict[str, int]:
    """Training tiles per site in the run's stores (empty when no store exists)."""
    out: dict[str, int] = {}
    for s in cfg.sites:
        p = cfg.store_path(s.name)
        if (p / "zarr.json").exists():
            from wsi.store import SiteStore

            st = SiteStore(p)
            n = sum(1 for _ in st.iter_index({"train"}))
            if n:
                out[s.name] = n
    return out


def dp_params(cfg: ExperimentConfig, n_pool: int) -> DPParams:
    """Accounting inputs: explicit ``attack.dp_*`` values, else the planned training of the smallest site."""
    a, tr, pv = cfg.attack, cfg.train, cfg.train.privacy
    site_tiles = _site_store_tiles(cfg)
    n = min(site_tiles.values()) if site_tiles else n_pool
    source = "site stores" if site_tiles else "attack tile pool"
    q = a.dp_sample_rate or min(1.0, tr.batch_size / max(1, n))
    rounds = cfg.federation.rounds if cfg.sites else 1
    per_round = tr.max_steps or max(1, math.ceil(tr.epochs / q))
    steps = a.dp_steps or per_round * rounds
    delta = a.dp_delta or pv.delta or 1.0 / (10 * n)
    return DPParams(q, steps, delta, a.clip or pv.max_grad_norm, pv.accountant, source)


def load_attack_tiles(
    cfg: ExperimentConfig, data_root: Path | None, tile_size: int, per_image: int
) -> TileSet:
    """MoNuSeg tiles from the data root, else the run's site stores; a clear error when neither exists."""
    mpp = cfg.attack.target_mpp or cfg.tiling.target_mpp
    if monuseg_dir(data_root) is not None:
        assert data_root is not None
        return load_monuseg_tiles(
            data_root,
            tile_size,
            mpp,
            per_image=per_image,
            max_images=cfg.attack.max_images,
            seed=cfg.attack.seed,
        )
    stores = [cfg.store_path(s.name) for s in cfg.sites if (cfg.store_path(s.name) / "zarr.json").exists()]
    if stores:
        parts = [load_store_tiles(p, 64, tile_size, seed=cfg.attack.seed) for p in stores]
        return TileSet(
            torch.cat([p.images for p in parts]),
            torch.cat([p.masks for p in parts]),
            [s for p in parts for s in p.sources],
        )
    raise FedpathError(
        f"{data_root or '<no data root>'}: no monuseg-train/ under the data root and no site stores in "
        f"{cfg.run_dir}/sites; the attack needs real tiles (pass --data-root or tile the sites first)"
    )


def split_by_source(tiles: TileSet, n_first: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of tiles whose source images are among the first ``n_first`` (shuffled) and the rest."""
    srcs = sorted(set(tiles.sources))
    rng = np.random.default_rng(seed)
    order = [srcs[i] for i in rng.permutation(len(srcs))]
    first = set(order[:n_first])
    a = [i for i, s in enumerate(tiles.sources) if s in first]
    b = [i for i, s in enumerate(tiles.sources) if s not in first]
    return a, b


def pick_targets(tiles: TileSet, n: int, seed: int) -> list[int]:
    """``n`` tile indices, one per source image in a shuffled order (round-robin when there are fewer
    images than targets), so the attacked tiles are not crops of one slide."""
    rng = np.random.default_rng(seed)
    srcs = sorted(set(tiles.sources))
    order = [srcs[i] for i in rng.permutation(len(srcs))]
    by_src = {s: [i for i, t in enumerate(tiles.sources) if t == s] for s in order}
    out: list[int] = []
    depth = 0
    while len(out) < n and depth < max(len(v) for v in by_src.values()):
        out += [by_src[s][depth] for s in order if depth < len(by_src[s])][: n - len(out)]
        depth += 1
    return out


def target_model(cfg: ExperimentConfig) -> tuple[nn.Module, str]:
    """The attacked network: the run's round-0 global model when it exists, else the config's network
    initialised with the federation seed (the same initial model the aggregator would publish)."""
    from pipeline.checkpoint import load_model
    from pipeline.models import build_model

    g0 = cfg.run_dir / "server" / "global" / "round_0.safetensors"
    if g0.is_file():
        net, _ = load_model(g0)
        return net.eval(), str(g0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.federation.seed)
        net = build_model(cfg.model)
    return net.eval(), f"build_model(config.model), seed {cfg.federation.seed}"


def _score(rec: Reconstruction, truth: Tensor, pool: Tensor, prior: Tensor) -> list[Leakage]:
    return [leakage(rec.images[i], truth[i], pool, prior) for i in range(truth.shape[0])]


def _grid_png(path: Path, rows: list[tuple[str, Tensor]], scale: int | None = None) -> Path:
    """Rows of tiles (label, (N, 3, H, W) in [0, 1]) as one PNG, upscaled (nearest) to about 128 px."""
    from PIL import Image, ImageDraw

    n = max(r[1].shape[0] for r in rows)
    h, w = rows[0][1].shape[-2:]
    scale = scale or max(1, 128 // max(h, w))
    label_w, pad = 110, 4
    canvas = np.full(
        (len(rows) * (h * scale + pad) + pad, label_w + n * (w * scale + pad) + pad, 3), 255, np.uint8
    )
    for r, (_, imgs) in enumerate(rows):
        for c in range(imgs.shape[0]):
            tile = (imgs[c].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            tile = tile.repeat(scale, 0).repeat(scale, 1)
            y, x = pad + r * (h * scale + pad), label_w + pad + c * (w * scale + pad)
            canvas[y : y + h * scale, x : x + w * scale] = tile
    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    for r, (label, _) in enumerate(rows):
        draw.text((4, pad + r * (h * scale + pad) + h * scale // 2 - 5), label, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def _short(key: str) -> str:
    """A grid row label: IG / DLG / multi-step N, with the batch size when above 1."""
    name, _, batch = key.partition("_batch")
    label = {"inverting_gradients": "IG", "dlg": "DLG"}.get(name, name.replace("multistep_", "multi-step "))
    return f"{label} (batch {batch})" if batch else label


def _threat_batches(a_batch: int) -> list[int]:
    return [1] if a_batch == 1 else [1, a_batch]


def _attack_one(
    name: str,
    cfg: ExperimentConfig,
    model: nn.Module,
    x: Tensor,
    m: Tensor,
    dp: DPSGD | None,
    gen: torch.Generator,
    prior: Tensor,
    seed: int,
) -> Reconstruction:
    a = cfg.attack
    loss_fn = segmentation_loss(a.loss)
    ig = InversionSettings.from_config(
        a, labels_known=a.labels_known, seed=seed, n_classes=cfg.model.out_channels
    )
    known = m if a.labels_known else None
    if name == "inverting_gradients":
        g = observed_gradient(model, x, m, loss_fn, dp, gen)
        return invert_gradients(model, g, x.shape, loss_fn, ig, masks=known, prior=prior)
    if name == "dlg":
        g = observed_gradient(model, x, m, loss_fn, dp, gen)
        s = DLGSettings(
            iterations=a.dlg_iterations,
            restarts=1,
            labels_known=a.labels_known,
            seed=seed,
            n_classes=cfg.model.out_channels,
        )
        return dlg_attack(model, g, x.shape, loss_fn, s, masks=known)
    if name == "multistep":
        sched = LocalTraining(
            steps=a.local_steps,
            batch_size=x.shape[0],
            lr=cfg.train.lr,
            optimizer=a.local_optimizer or cfg.train.optimizer,
        )
        upd = local_update(model, x, m, loss_fn, sched, dp, gen)
        return invert_update(
            model, upd, x.shape[0], x.shape[1:], loss_fn, sched, ig, masks=known, prior=prior
        )
    raise ValueError(f"unknown attack {name!r}")


def dp_train_and_evaluate(
    cfg: ExperimentConfig,
    members: TileSet,
    held_out: TileSet,
    epsilon: float | None,
    seed: int,
) -> dict[str, Any]:
    """The sweep's own short training of the configured network on real tiles, with Opacus DP-SGD at
    ``epsilon`` (Poisson sampling, per-sample clipping, σ from Opacus for this training's own sampling
    rate and steps), then validation Dice on held-out tiles and loss-threshold membership inference."""
    from monai.metrics import DiceMetric
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.dprandom import SecureRandom
    from pipeline.dpsgd import PoissonSampler, collate_or_none, make_private
    from pipeline.models import build_model
    from pipeline.privacy import epsilon_of, noise_for_target

    a, pv = cfg.attack, cfg.train.privacy
    loss_fn = segmentation_loss(a.loss)
    torch.manual_seed(seed)
    plain = build_model(cfg.model)
    net: nn.Module = plain
    n = len(members)
    bs = min(a.utility_batch_size, n)
    q = bs / n
    delta = 1.0 / (10 * n)
    clip = a.clip or pv.max_grad_norm
    opt = torch.optim.Adam(net.parameters(), lr=a.utility_lr)
    dataset = TensorDataset(members.images, members.masks)
    loader: Any = DataLoader(dataset, batch_size=bs, shuffle=True)
    sigma = 0.0
    if epsilon is not None:
        # fedpath's own DP-SGD path (CSPRNG noise and Poisson coins), as the sites run it
        sigma = noise_for_target(epsilon, delta, q, a.utility_steps, pv.accountant)
        rng = SecureRandom()
        net, opt = make_private(
            net, opt, noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=int(n * q), rng=rng
        )
        loader = DataLoader(
            dataset, batch_sampler=PoissonSampler(n, q, a.utility_steps, rng), collate_fn=collate_or_none
        )
    t0 = time.perf_counter()
    net.train()
    steps = 0
    while steps < a.utility_steps:
        for batch in loader:
            if steps >= a.utility_steps:
                break
            if batch is None:  # Poisson sampling may draw an empty batch; a noise-only step
                for p in opt.params:  # type: ignore[attr-defined]
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                opt.step()
                opt.zero_grad()
                steps += 1
                continue
            xb, mb = batch
            opt.zero_grad()
            loss_fn(net(xb), mb).backward()
            opt.step()
            steps += 1
    seconds = time.perf_counter() - t0
    spent = epsilon_of([(sigma, q, a.utility_steps)], delta, pv.accountant) if epsilon is not None else None
    plain.eval()  # Opacus' GradSampleModule wraps (and shares the parameters of) this module
    dice = DiceMetric(include_background=False, reduction="mean")
    with torch.no_grad():
        for i in range(0, len(held_out), 16):
            logits = plain(held_out.images[i : i + 16])
            pred = torch.nn.functional.one_hot(logits.argmax(1), cfg.model.out_channels).permute(0, 3, 1, 2)
            true = torch.nn.functional.one_hot(held_out.masks[i : i + 16], cfg.model.out_channels).permute(
                0, 3, 1, 2
            )
            dice(pred, true)
    out: dict[str, Any] = {
        "what": (
            f"sweep-local training of the configured network with fedpath's DP-SGD: {n} member tiles, "
            f"{a.utility_steps} steps, batch {bs} (Poisson), {a.utility_tile_size}px"
        ),
        "dice": float(torch.as_tensor(dice.aggregate()).item()),
        "noise_multiplier": sigma,
        "epsilon_spent": spent,
        "delta": delta,
        "sample_rate": q,
        "steps": a.utility_steps,
        "clip": clip,
        "seconds": seconds,
    }
    if a.membership:
        mres = loss_threshold_attack(
            plain, (members.images, members.masks), (held_out.images, held_out.masks), loss_fn
        )
        out["membership"] = mres.as_dict()
    return out


def _update_files(run_dir: Path) -> list[tuple[int, str, Path]]:
    base = run_dir / "server" / "updates"
    found: list[tuple[int, str, Path]] = []
    if not base.is_dir():
        return found
    for d in base.iterdir():
        if d.is_dir() and d.name.isdigit():
            found += [(int(d.name), p.stem, p) for p in sorted(d.glob("*.safetensors"))]
    return sorted(found)


def attack_stored_updates(cfg: ExperimentConfig, out_dir: Path) -> list[dict[str, Any]]:
    """Multi-step inversion of the updates the sites really uploaded, scored against the site's tiles.

    The attacker knows the round's global model, the local schedule (steps from the update's metadata
    or the config, batch size, lr, optimiser) but neither the tiles nor their masks, so masks are
    recovered jointly. For compute, dummy tiles are capped at ``attack.real_max_images`` and simulated
    steps at ``attack.real_max_steps`` (a capped simulation is a mis-specified, hence weaker, attack;
    both the assumed and the simulated schedule are reported).
    """
    from safetensors import safe_open

    from federation.wire import UPDATE_META_KEY
    from pipeline.checkpoint import load_model

    a, tr = cfg.attack, cfg.train
    results: list[dict[str, Any]] = []
    for rnd, site, path in _update_files(cfg.run_dir)[: a.real_max_updates]:
        gpath = cfg.run_dir / "server" / "global" / f"round_{rnd}.safetensors"
        if not gpath.is_file():
            raise FedpathError(f"{gpath}: global model of round {rnd} missing (needed to attack {path})")
        model, meta = load_model(gpath)
        model.eval()
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            update = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118
        umeta = json.loads(header.get(UPDATE_META_KEY, "{}"))
        n_tiles = int(umeta.get("n_tiles", 1))
        steps = int(
            umeta.get("steps") or tr.max_steps or max(1, math.ceil(tr.epochs * n_tiles / tr.batch_size))
        )
        batch = min(tr.batch_size, n_tiles)
        n_dummy = min(a.real_max_images, batch, n_tiles)
        store = cfg.store_path(site)
        truth = load_store_tiles(store, 256, None, seed=a.seed) if (store / "zarr.json").exists() else None
        size = int(truth.images.shape[-1]) if truth is not None else int(meta.tile_size)
        sim_steps = min(steps, a.real_max_steps)
        sched = LocalTraining(steps=sim_steps, batch_size=n_dummy, lr=tr.lr, optimizer=tr.optimizer)
        settings = InversionSettings.from_config(
            a, iterations=a.real_iterations, restarts=1, labels_known=False, seed=a.seed,
            n_classes=meta.model.out_channels,
        )  # fmt: skip
        prior = truth.images.mean(0) if truth is not None else None
        rec = invert_update(
            model,
            update,
            n_dummy,
            (meta.model.in_channels, size, size),
            segmentation_loss(a.loss),
            sched,
            settings,
            prior=prior,
        )
        entry: dict[str, Any] = {
            "round": rnd,
            "site": site,
            "update": str(path),
            "global_model": str(gpath),
            "n_tiles": n_tiles,
            "epsilon_reported": umeta.get("epsilon"),
            "local_steps_assumed": steps,
            "local_steps_simulated": sim_steps,
            "optimizer_simulated": tr.optimizer,
            "batch_size_assumed": batch,
            "dummy_tiles": n_dummy,
            "tile_size": size,
            "seconds": rec.seconds,
            "matching_cost": rec.cost,
        }
        if truth is not None:
            assert prior is not None
            rows = [leakage(rec.images[i], truth.images[0], truth.images, prior) for i in range(n_dummy)]
            # no true pairing is known: score each reconstruction against its nearest site tile
            entry["nearest_ssim"] = [r.nearest_ssim for r in rows]
            entry["prior_ssim"] = [r.prior_ssim for r in rows]
            entry["leakage"] = [r.leakage for r in rows]
            entry["mean_nearest_ssim"] = float(np.mean(entry["nearest_ssim"]))
            entry["mean_prior_ssim"] = float(np.mean(entry["prior_ssim"]))
            near = truth.images[[r.nearest_index for r in rows]]
            png = _grid_png(
                out_dir / f"real_round{rnd}_{site}.png",
                [("nearest tile", near), ("reconstructed", rec.images)],
            )
            entry["grid"] = str(png.relative_to(cfg.run_dir))
        else:
            entry["note"] = f"{store}: no site store, reconstructions not scored"
        results.append(entry)
        log.info("attack: stored update round %d site %s: %s", rnd, site, entry.get("mean_nearest_ssim"))
    return results


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    tmp.replace(path)


def _run_training_results(run_dir: Path) -> list[dict[str, Any]]:
    """The run's own training results (summary.json "train", pipeline.train), next to the sweep's DP
    training: sites, ε spent and validation Dice of each training job, when the run has them."""
    from fedcore.summary import read_summary

    train = read_summary(run_dir).get("train")
    rows: list[dict[str, Any]] = []
    if isinstance(train, dict):
        for key, t in sorted(train.items()):
            if isinstance(t, dict):
                m = t.get("metrics")
                metrics: dict[str, Any] = m if isinstance(m, dict) else {}
                rows.append(
                    {
                        "sites": key,
                        "epsilon": t.get("epsilon"),
                        "privacy": (t.get("privacy") or {}).get("text"),
                        "val_dice": metrics.get("val_dice", metrics.get("dice")),
                        "steps": t.get("steps"),
                    }
                )
    return rows


def run_attack(cfg: ExperimentConfig, data_root: Path | None) -> dict[str, Any]:
    """The CLI stage: the whole sweep; returns (and writes) the attack.json content."""
    a = cfg.attack
    if a.threads or cfg.train.threads:
        torch.set_num_threads(a.threads or cfg.train.threads or 1)
    out_dir = cfg.run_dir / "attack"
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    pool = load_attack_tiles(cfg, data_root, a.tile_size, per_image=4)
    tgt_idx = pick_targets(pool, a.n_targets * max(_threat_batches(a.batch_size)), a.seed)
    prior = pool.images.mean(0)
    model, model_src = target_model(cfg)
    dpp = dp_params(cfg, len(pool))

    util_tiles = load_attack_tiles(cfg, data_root, a.utility_tile_size, per_image=4)
    mem_idx, held_idx = split_by_source(util_tiles, max(1, len(set(util_tiles.sources)) // 2), a.seed + 1)
    members = util_tiles.subset(mem_idx[: a.utility_train_tiles])
    held_out = util_tiles.subset(held_idx[: a.utility_test_tiles])
    if len(members) < 2 or len(held_out) < 2:
        raise FedpathError(f"{data_root}: too few tiles for the utility/membership split ({len(util_tiles)})")

    def assemble(per_eps: list[dict[str, Any]], real: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
        run_utility = _run_training_results(cfg.run_dir)
        ig = next((e["attacks"].get("inverting_gradients") for e in per_eps if e["epsilon"] is None), None)
        undefended = ig["summary"]["mean_ssim"] if ig else None
        result: dict[str, Any] = {
            "version": ATTACK_JSON_VERSION,
            "tile_size": a.tile_size,
            "target_mpp": a.target_mpp or cfg.tiling.target_mpp,
            "tile_source": "monuseg-train (data root)" if monuseg_dir(data_root) else "site stores",
            "n_pool_tiles": len(pool),
            "model": {"source": model_src, "config": cfg.model.model_dump()},
            "threat_model": {
                "batch_sizes": _threat_batches(a.batch_size),
                "local_steps": a.local_steps,
                "local_optimizer": a.local_optimizer or cfg.train.optimizer,
                "labels_known": a.labels_known,
                "loss": a.loss,
            },
            "settings": a.model_dump(),
            "dp_accounting": {
                "sample_rate": dpp.sample_rate,
                "steps": dpp.steps,
                "delta": dpp.delta,
                "clip": dpp.clip,
                "accountant": dpp.accountant,
                "from": dpp.source,
            },
            "results": per_eps,
            "real_updates": real,
            "run_utility": run_utility,
            "undefended_mean_ssim": undefended,
            "strength_target_met": (undefended is not None and undefended >= 0.5),
            "seconds": time.perf_counter() - t_start,
            "complete": complete,
        }
        return result

    per_eps: list[dict[str, Any]] = []
    for k, eps in enumerate(a.epsilons):
        sigma = dpp.sigma(eps)
        dp = DPSGD(dpp.clip, sigma) if eps is not None else None
        gen = torch.Generator().manual_seed(a.seed + 1000 * k)
        entry: dict[str, Any] = {"epsilon": eps, "noise_multiplier": sigma, "attacks": {}}
        grid_rows: list[tuple[str, Tensor]] = []
        truth_row: Tensor | None = None
        for name in a.attacks:
            for bsz in _threat_batches(a.batch_size) if name != "multistep" else [a.batch_size]:
                rows: list[Leakage] = []
                secs: list[float] = []
                recs: list[Tensor] = []
                truths: list[Tensor] = []
                for j in range(a.n_targets):
                    idx = tgt_idx[j * bsz : (j + 1) * bsz]
                    if len(idx) < bsz:
                        break
                    x, m = pool.images[idx], pool.masks[idx]
                    rec = _attack_one(name, cfg, model, x, m, dp, gen, prior, a.seed + j)
                    rows += _score(rec, x, pool.images, prior)
                    secs.append(rec.seconds)
                    recs.append(rec.images[:1])
                    truths.append(x[:1])
                key = name if name != "multistep" else f"multistep_{a.local_steps}steps"
                key += f"_batch{bsz}" if bsz > 1 else ""
                entry["attacks"][key] = {
                    "batch_size": bsz,
                    "local_steps": a.local_steps if name == "multistep" else 1,
                    "labels_known": a.labels_known,
                    "summary": summarise(rows),
                    "per_tile": [r.as_dict() for r in rows],
                    "seconds_per_reconstruction": float(np.mean(secs)) if secs else None,
                }
                if recs and bsz == 1:  # grid columns are the batch-1 targets, the same for every attack
                    if truth_row is None:
                        truth_row = torch.cat(truths)
                    grid_rows.append((_short(key), torch.cat(recs)))
                log.info(
                    "attack: ε=%s %s SSIM %.3f",
                    _eps_key(eps),
                    key,
                    summarise(rows).get("mean_ssim", float("nan")),
                )
        if truth_row is not None:
            png = _grid_png(out_dir / f"grid_eps_{_eps_key(eps)}.png", [("true", truth_row), *grid_rows])
            entry["grid"] = str(png.relative_to(cfg.run_dir))
        entry["utility"] = dp_train_and_evaluate(cfg, members, held_out, eps, a.seed + k)
        per_eps.append(entry)
        _write_json(out_dir / "attack.json", assemble(per_eps, [], complete=False))  # partial, per ε

    real: list[dict[str, Any]] = []
    if a.real_updates and "multistep" in a.attacks:
        real = attack_stored_updates(cfg, out_dir)
    result = assemble(per_eps, real, complete=True)
    _write_json(out_dir / "attack.json", result)
    update_summary(cfg.run_dir, "attack", _summary(result))
    return result


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """The compact per-ε figures for summary.json."""
    rows = []
    for e in result["results"]:
        rows.append(
            {
                "epsilon": e["epsilon"],
                "noise_multiplier": e["noise_multiplier"],
                "ssim": {k: v["summary"].get("mean_ssim") for k, v in e["attacks"].items()},
                "prior_ssim": {k: v["summary"].get("mean_prior_ssim_true") for k, v in e["attacks"].items()},
                "dice": e["utility"]["dice"],
                "membership_auc": e["utility"].get("membership", {}).get("auc"),
            }
        )
    headline = {}
    for e in result["results"]:
        ig = e["attacks"].get("inverting_gradients") or next(iter(e["attacks"].values()), None)
        if ig is not None:
            label = "no DP" if e["epsilon"] is None else f"ε={e['epsilon']:g}"
            headline[label] = round(float(ig["summary"].get("mean_ssim", float("nan"))), 3)
    return {
        "attack_json": "attack/attack.json",
        "headline": headline,
        "tile_size": result["tile_size"],
        "undefended_mean_ssim": result["undefended_mean_ssim"],
        "strength_target_met": result["strength_target_met"],
        "per_epsilon": rows,
        "real_updates": [
            {k: r.get(k) for k in ("round", "site", "mean_nearest_ssim", "mean_prior_ssim")}
            for r in result["real_updates"]
        ],
    }
