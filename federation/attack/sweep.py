"""`fedpath attack`: what a curious aggregator reconstructs from what sites upload, over a sweep of ε.

For every ε in ``attack.epsilons`` (``None`` = no DP: the undefended control, always in the same sweep)
the sweep

1. turns ε into the DP-SGD noise multiplier σ that reaches it for the federation's planned training
   (sampling rate, steps, δ; :func:`pipeline.privacy.noise_for_target` with the configured accountant);
2. has fedpath's own trainer (:func:`federation.attack.fedavg.victim_round` → :func:`pipeline.train.train_local`)
   run one site round at that σ on real tiles: ``local_steps`` steps at ``batch_size`` tiles from the
   known global model (``multistep``), and, as the worst-case upper bound, one step of one tile
   (``inverting_gradients``, ``dlg``);
3. inverts each upload (Geiping et al.'s FedAvg reconstructor: simulate the local steps, match the whole
   update) and scores every reconstructed tile against the truth and against the prior: the best SSIM an
   attacker knowing only the data distribution gets (the public set's mean image, or the public tile
   nearest to the truth);
4. reports per ε the median, IQR and a bootstrap CI of SSIM − prior, and whether leakage is
   distinguishable from the prior.

Tiles come from three disjoint sets of source images, all named in attack.json: the public set (the
prior), the tuning set (where ``attack.tuning`` candidates are ranked) and the scored set. When the run
holds stored updates (``server/updates/<r>/<site>.safetensors``) the update inversion also runs against
them. Everything goes to ``<run_dir>/attack/attack.json``, PNG grids per ε, and the summary.
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

from fedcore.layout import RunLayout
from fedcore.summary import update_summary
from federation.attack.common import segmentation_loss
from federation.attack.dlg import DLGSettings, dlg_attack
from federation.attack.fedavg import VictimRound, invert_round, update_method, victim_round
from federation.attack.inverting import InversionSettings, Reconstruction
from federation.attack.metrics import compare_to_prior, leakage, mse, prior_ssims, psnr, ssim
from federation.attack.multistep import LocalTraining, invert_update
from federation.attack.tiles import TileSet, load_monuseg_tiles, load_store_tiles, monuseg_dir
from pipeline.config import ExperimentConfig
from pipeline.errors import FedpathError

log = logging.getLogger(__name__)

ATTACK_JSON_VERSION = 2
UPPER_BOUND = "worst-case upper bound: one tile, one step (no site sends this)"


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
    sites = [s.name for s in cfg.sites if (cfg.store_path(s.name) / "zarr.json").exists()]
    if sites:
        parts = [load_store_tiles(cfg.store_path(s), 64, tile_size, seed=cfg.attack.seed) for s in sites]
        for site, p in zip(sites, parts, strict=True):
            # a store's tiles are named slide#index: group them by slide so the image split is by slide
            p.sources = [f"{site}/{src.split('#')[0]}" for src in p.sources]
        return TileSet(
            torch.cat([p.images for p in parts]),
            torch.cat([p.masks for p in parts]),
            [s for p in parts for s in p.sources],
        )
    raise FedpathError(
        f"{data_root or '<no data root>'}: no monuseg-train/ under the data root and no site stores in "
        f"{cfg.run_dir}/sites; the attack needs real tiles (pass --data-root or tile the sites first)"
    )


@dataclass
class TileSplit:
    """Disjoint source images: the public set (the prior), the tuning set, the scored set."""

    public: list[str]
    tuning: list[str]
    scored: list[str]

    def as_dict(self) -> dict[str, list[str]]:
        return {"public": self.public, "tuning": self.tuning, "scored": self.scored}


def split_images(tiles: TileSet, n_public: int, n_tuning: int, seed: int) -> TileSplit:
    """A seeded random split of the source images; at least one scored image must remain."""
    srcs = sorted(set(tiles.sources))
    order = [srcs[i] for i in np.random.default_rng(seed).permutation(len(srcs))]
    if n_public + n_tuning >= len(order):
        raise FedpathError(
            f"attack: {len(order)} source images cannot give {n_public} public + {n_tuning} tuning images "
            "and still leave images to score (lower attack.public_images / attack.tuning_images)"
        )
    return TileSplit(
        sorted(order[:n_public]),
        sorted(order[n_public : n_public + n_tuning]),
        sorted(order[n_public + n_tuning :]),
    )


def _subset_of(tiles: TileSet, images: list[str]) -> TileSet:
    keep = set(images)
    return tiles.subset([i for i, s in enumerate(tiles.sources) if s in keep])


def target_model(cfg: ExperimentConfig) -> tuple[nn.Module, str]:
    """The attacked network: the run's round-0 global model when it exists, else the config's network
    initialised with the federation seed (the same initial model the aggregator would publish)."""
    from pipeline.checkpoint import load_model
    from pipeline.models import build_model

    g0 = RunLayout(cfg.run_dir).server.global_model(0)
    if g0.is_file():
        net, _ = load_model(g0)
        return net.eval(), str(g0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.federation.seed)
        net = build_model(cfg.model)
    return net.eval(), f"build_model(config.model), seed {cfg.federation.seed}"


def tile_names(tiles: TileSet) -> list[str]:
    """``image#k``: the k-th tile cut from that source image in this pool."""
    seen: dict[str, int] = {}
    out = []
    for s in tiles.sources:
        out.append(f"{s}#{seen.get(s, 0)}")
        seen[s] = seen.get(s, 0) + 1
    return out


# -- one attack -------------------------------------------------------------------------------------------
@dataclass
class Prior:
    """The attacker's knowledge of the data distribution: a public tile set and its mean image."""

    public: Tensor
    mean: Tensor


def score_tiles(rec: Tensor, truth: Tensor, names: list[str], prior: Prior) -> list[dict[str, Any]]:
    """One row per reconstructed tile: SSIM/PSNR/MSE to the truth, and the prior's SSIM on that tile."""
    rows = []
    for i in range(truth.shape[0]):
        p = prior_ssims(truth[i], prior.public, prior.mean)
        rows.append(
            {
                "tile": names[i],
                "ssim": ssim(rec[i], truth[i]),
                "psnr": psnr(rec[i], truth[i]),
                "mse": mse(rec[i], truth[i]),
                **p,
            }
        )
    return rows


def _settings(cfg: ExperimentConfig, update: bool, seed: int, **over: Any) -> InversionSettings:
    a = cfg.attack
    base: dict[str, Any] = {"labels_known": a.labels_known, "seed": seed, "n_classes": cfg.model.out_channels}
    if update:
        base.update(iterations=a.update_iterations, restarts=a.update_restarts)
    return InversionSettings.from_config(a, **{**base, **over})


def attack_once(
    name: str,
    cfg: ExperimentConfig,
    model: nn.Module,
    global_state: dict[str, Tensor],
    tiles: TileSet,
    sigma: float | None,
    dpp: DPParams,
    prior: Prior,
    seed: int,
    overrides: dict[str, Any] | None = None,
) -> tuple[Reconstruction, VictimRound]:
    """Let fedpath's trainer run the site's round on ``tiles`` at noise ``sigma`` (None: no DP), then
    invert what it uploads. ``multistep``: the configured round (``local_steps`` steps, all tiles in each
    batch, the experiment's optimiser); ``inverting_gradients``/``dlg``: one SGD step (its update is
    −lr · the DP-SGD gradient), the worst-case upper bound."""
    a = cfg.attack
    loss_fn = segmentation_loss(a.loss)
    if name == "multistep":
        victim = victim_round(cfg, global_state, tiles, a.local_steps, sigma, clip=dpp.clip)
        rec = invert_round(
            model, victim, _settings(cfg, True, seed, **(overrides or {})), loss_fn, prior.mean
        )
        return rec, victim
    victim = victim_round(cfg, global_state, tiles, 1, sigma, clip=dpp.clip, optimizer="sgd")
    if name == "inverting_gradients":
        rec = invert_round(
            model, victim, _settings(cfg, False, seed, **(overrides or {})), loss_fn, prior.mean
        )
        return rec, victim
    if name == "dlg":
        names = [k for k, p in model.named_parameters() if p.requires_grad]
        grad = [-victim.update[k] / victim.lr for k in names]
        s = DLGSettings(
            iterations=a.dlg_iterations, restarts=1, labels_known=a.labels_known, seed=seed,
            n_classes=cfg.model.out_channels,
        )  # fmt: skip
        known = victim.masks if a.labels_known else None
        return dlg_attack(model, grad, tuple(victim.images.shape), loss_fn, s, masks=known), victim
    raise ValueError(f"unknown attack {name!r}")


ROUND_INVERSIONS = {
    "simulate": "simulate the round's local steps on dummy tiles and match the whole update (Geiping et al.)",
    "direction": "match the update's direction with the dummy tiles' gradient at the global model (Adam's "
    "steps are sign-like: a simulated Adam round gives the pixels almost no gradient)",
}


def attack_key(name: str, cfg: ExperimentConfig) -> str:
    a = cfg.attack
    if name == "multistep":
        return f"fedavg_round_{a.local_steps}steps_batch{a.batch_size}"
    return f"{name}_batch1_upper_bound"


def tune(
    cfg: ExperimentConfig,
    model: nn.Module,
    global_state: dict[str, Tensor],
    tuning: TileSet,
    prior: Prior,
    dpp: DPParams,
) -> dict[str, Any]:
    """Rank the ``attack.tuning`` candidates by mean SSIM of the undefended round inversion on tuning
    tiles (disjoint from the scored ones); the configured settings are always candidate 0."""
    a = cfg.attack
    cands: list[dict[str, Any]] = [{}] + [dict(c) for c in a.tuning]
    if len(cands) == 1 or len(tuning) < a.batch_size:
        return {"chosen": {}, "candidates": [], "tiles": tile_names(tuning)[: a.batch_size]}
    names = tile_names(tuning)
    idx = pick_targets(tuning, a.batch_size, a.seed + 7)
    batch = tuning.subset(idx)
    rows: list[dict[str, Any]] = []
    for c in cands:
        try:
            _settings(cfg, True, a.seed, **c)
        except TypeError as exc:
            raise FedpathError(f"attack.tuning: {c} is not a setting of the inversion ({exc})") from None
        rec, victim = attack_once("multistep", cfg, model, global_state, batch, None, dpp, prior, a.seed, c)
        s = [ssim(rec.images[i], victim.images[i]) for i in range(len(batch))]
        rows.append({"overrides": c, "mean_ssim": float(np.mean(s)), "cost": rec.cost})
        log.info("attack: tuning %s -> SSIM %.3f", c, rows[-1]["mean_ssim"])
    best = max(rows, key=lambda r: float(r["mean_ssim"]))
    return {"chosen": best["overrides"], "candidates": rows, "tiles": [names[i] for i in idx]}


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


def _update_files(run_dir: Path) -> list[tuple[int, str, Path]]:
    base = RunLayout(run_dir).server.updates_root
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
        gpath = RunLayout(cfg.run_dir).server.global_model(rnd)
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


def indistinguishable_from(results: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The largest ε from which on (it and every smaller ε in the sweep) the attack ``key`` is no better
    than the prior, by the CI of SSIM − prior; ``None`` when even the smallest ε beats the prior."""
    rows = sorted(
        [
            (e["epsilon"], e["attacks"][key]["status"])
            for e in results
            if e["epsilon"] is not None and key in e["attacks"]
        ],
        key=lambda r: -r[0],
    )
    control = next((e["attacks"].get(key, {}).get("status") for e in results if e["epsilon"] is None), None)
    eps_star: float | None = None
    for k, (eps, _) in enumerate(rows):
        if all(st != "beats prior" for _, st in rows[k:]):
            eps_star = eps
            break
    return {"attack": key, "control_status": control, "epsilon": eps_star}


def run_attack(cfg: ExperimentConfig, data_root: Path | None) -> dict[str, Any]:
    """The CLI stage: the whole sweep; returns (and writes) the attack.json content."""
    a = cfg.attack
    if a.threads or cfg.train.threads:
        torch.set_num_threads(a.threads or cfg.train.threads or 1)
    out_dir = cfg.run_dir / "attack"
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    pool = load_attack_tiles(cfg, data_root, a.tile_size, per_image=a.tiles_per_image)
    split = split_images(pool, a.public_images, a.tuning_images, a.seed)
    public, tuning, scored = (_subset_of(pool, s) for s in (split.public, split.tuning, split.scored))
    prior = Prior(public.images, public.images.mean(0))
    names = tile_names(scored)
    need = a.n_targets * a.batch_size if "multistep" in a.attacks else a.upper_bound_targets
    tgt = pick_targets(scored, max(need, a.upper_bound_targets), a.seed)
    if len(tgt) < need:
        raise FedpathError(
            f"attack: {len(scored)} scored tiles cannot fill {a.n_targets} rounds of {a.batch_size} tiles "
            "(raise attack.tiles_per_image or lower attack.n_targets / attack.batch_size)"
        )
    model, model_src = target_model(cfg)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dpp = dp_params(cfg, len(pool))
    tuned = tune(cfg, model, global_state, tuning, prior, dpp) if "multistep" in a.attacks else {}
    overrides = tuned.get("chosen") or {}

    def assemble(per_eps: list[dict[str, Any]], real: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
        primary = attack_key("multistep" if "multistep" in a.attacks else a.attacks[0], cfg)
        return {
            "version": ATTACK_JSON_VERSION,
            "tile_size": a.tile_size,
            "target_mpp": a.target_mpp or cfg.tiling.target_mpp,
            "tile_source": "monuseg-train (data root)" if monuseg_dir(data_root) else "site stores",
            "images": split.as_dict(),
            "scored_tiles": [names[i] for i in tgt],
            "tuning": tuned,
            "n_pool_tiles": len(pool),
            "model": {"source": model_src, "config": cfg.model.model_dump()},
            "threat_model": {
                "round": {
                    "local_steps": a.local_steps,
                    "batch_size": a.batch_size,
                    "optimizer": cfg.train.optimizer,
                    "lr": cfg.train.lr,
                    "trainer": "pipeline.train.train_local (fedpath's DP-SGD: pipeline.dpsgd.make_private)",
                    "augmentation": "off (the attacker cannot know the random draws)",
                    "inversion": ROUND_INVERSIONS[
                        update_method(_settings(cfg, True, a.seed, **overrides), cfg.train.optimizer)
                    ],
                },
                "upper_bound": UPPER_BOUND,
                "labels_known": a.labels_known,
                "loss": a.loss,
                "prior": "best of: the public set's mean image, the public tile nearest to the truth (oracle)",
            },
            "settings": {**a.model_dump(), "tuned_overrides": overrides},
            "dp_accounting": {
                "sample_rate": dpp.sample_rate,
                "steps": dpp.steps,
                "delta": dpp.delta,
                "clip": dpp.clip,
                "accountant": dpp.accountant,
                "unit": "tile",
                "from": dpp.source,
            },
            "primary_attack": primary,
            "indistinguishable_from": indistinguishable_from(per_eps, primary),
            "results": per_eps,
            "real_updates": real,
            "run_utility": _run_training_results(cfg.run_dir),
            "seconds": time.perf_counter() - t_start,
            "complete": complete,
        }

    per_eps: list[dict[str, Any]] = []
    for eps in a.epsilons:
        sigma = dpp.sigma(eps) if eps is not None else None
        entry: dict[str, Any] = {
            "epsilon": eps,
            "delta": dpp.delta if eps is not None else None,
            "unit": "tile" if eps is not None else None,
            "noise_multiplier": sigma or 0.0,
            "attacks": {},
        }
        grid_rows: list[tuple[str, Tensor]] = []
        truth_row: Tensor | None = None
        for name in a.attacks:
            key = attack_key(name, cfg)
            if name == "multistep":
                batches = [tgt[j * a.batch_size : (j + 1) * a.batch_size] for j in range(a.n_targets)]
            else:
                batches = [[i] for i in tgt[: a.upper_bound_targets]]
            rows: list[dict[str, Any]] = []
            secs: list[float] = []
            recs: list[Tensor] = []
            truths: list[Tensor] = []
            for j, idx in enumerate(batches):
                rec, victim = attack_once(
                    name,
                    cfg,
                    model,
                    global_state,
                    scored.subset(idx),
                    sigma,
                    dpp,
                    prior,
                    a.seed + j,
                    overrides,
                )
                rows += score_tiles(rec.images, victim.images, [names[i] for i in idx], prior)
                secs.append(rec.seconds)
                recs.append(rec.images)
                truths.append(victim.images)
            if not rows:
                continue
            cmp = compare_to_prior([r["ssim"] for r in rows], [r["prior_ssim"] for r in rows])
            entry["attacks"][key] = {
                "batch_size": a.batch_size if name == "multistep" else 1,
                "local_steps": a.local_steps if name == "multistep" else 1,
                "labels_known": a.labels_known,
                "upper_bound": name != "multistep",
                "summary": {
                    **cmp,
                    "mean_psnr": float(
                        np.mean([r["psnr"] for r in rows if math.isfinite(r["psnr"])] or [np.nan])
                    ),
                },
                "status": cmp["status"],
                "per_tile": rows,
                "seconds_per_reconstruction": float(np.mean(secs)) if secs else None,
            }
            rec_all, truth_all = torch.cat(recs), torch.cat(truths)
            if name == "multistep" or truth_row is None:
                truth_row = truth_all if truth_row is None else truth_row
            label = (
                f"round ({a.local_steps} steps)"
                if name == "multistep"
                else f"{'IG' if name == 'inverting_gradients' else 'DLG'} (1 tile, bound)"
            )
            grid_rows.append((label, _align(rec_all, truth_all, truth_row)))
            log.info("attack: ε=%s %s SSIM %.3f prior %.3f: %s", _eps_key(eps), key,
                     cmp["ssim"].get("mean", float("nan")), cmp["prior_ssim"].get("mean", float("nan")), cmp["status"])  # fmt: skip
        if truth_row is not None:
            near = torch.stack(
                [
                    prior.public[prior_ssims(t, prior.public, prior.mean)["prior_public_index"]]
                    for t in truth_row
                ]
            )
            png = _grid_png(
                out_dir / f"grid_eps_{_eps_key(eps)}.png",
                [("true", truth_row), *grid_rows, ("prior: nearest public", near)],
            )
            entry["grid"] = str(png.relative_to(cfg.run_dir))
        per_eps.append(entry)
        _write_json(out_dir / "attack.json", assemble(per_eps, [], complete=False))  # partial, per ε

    real: list[dict[str, Any]] = []
    if a.real_updates and "multistep" in a.attacks:
        real = attack_stored_updates(cfg, out_dir)
    result = assemble(per_eps, real, complete=True)
    _write_json(out_dir / "attack.json", result)
    update_summary(cfg.run_dir, "attack", _summary(result))
    return result


def _align(rec: Tensor, truth: Tensor, row: Tensor) -> Tensor:
    """Reconstructions placed under the grid's truth row (matched by identical truth tiles); a blank
    (white) cell where this attack did not target that tile."""
    out = torch.ones_like(row)
    for i in range(row.shape[0]):
        for j in range(truth.shape[0]):
            if torch.equal(truth[j], row[i]):
                out[i] = rec[j]
                break
    return out


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """The compact per-ε figures for summary.json."""
    rows = []
    headline = {}
    for e in result["results"]:
        rows.append(
            {
                "epsilon": e["epsilon"],
                "delta": e["delta"],
                "noise_multiplier": e["noise_multiplier"],
                "ssim": {k: v["summary"]["ssim"].get("mean") for k, v in e["attacks"].items()},
                "prior_ssim": {k: v["summary"]["prior_ssim"].get("mean") for k, v in e["attacks"].items()},
                "status": {k: v["status"] for k, v in e["attacks"].items()},
            }
        )
        main = e["attacks"].get(result["primary_attack"])
        if main is not None:
            label = "no DP" if e["epsilon"] is None else f"ε={e['epsilon']:g}"
            headline[label] = round(float(main["summary"]["ssim"].get("mean", float("nan"))), 3)
    return {
        "attack_json": "attack/attack.json",
        "primary_attack": result["primary_attack"],
        "headline": headline,
        "tile_size": result["tile_size"],
        "indistinguishable_from": result["indistinguishable_from"],
        "per_epsilon": rows,
        "real_updates": [
            {k: r.get(k) for k in ("round", "site", "mean_nearest_ssim", "mean_prior_ssim")}
            for r in result["real_updates"]
        ],
    }
