"""Inversion of a real FedAvg update: the victim runs fedpath's own trainer, the attacker simulates it.

What the aggregator receives from a site in one round is ``w_after - w_global`` after ``steps`` local
optimiser steps of DP-SGD (or plain SGD/Adam without DP) on the site's tiles. Here the victim's side is
*fedpath's trainer itself* (:func:`pipeline.train.train_local`, which runs :func:`pipeline.dpsgd.make_private`
with CSPRNG noise and Poisson sampling): the attacked tiles are written into a site store in a scratch run
directory, and one federation round is trained from the known global model. Nothing of DP-SGD is
re-implemented on this side.

The attacker (Geiping et al.'s FedAvg reconstructor) knows the global model, the loss, the number of local
steps, the batch size, the learning rate and the optimiser, but no pixel: it simulates the local steps on
dummy tiles with a differentiable functional copy of the network and matches the simulated update to the
observed one (:func:`federation.attack.multistep.invert_update`).

Threat-model choices, reported with the results: the site's round uses exactly ``batch`` tiles (so every
step sees every tile: the attacker needs no knowledge of the shuffling order), no augmentation (the
attacker cannot know the random flips), masks known or recovered as configured.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from federation.attack.inverting import InversionSettings, Reconstruction
from federation.attack.multistep import LocalTraining, invert_update, invert_update_direction
from federation.attack.tiles import TileSet
from pipeline.config import ExperimentConfig

log = logging.getLogger(__name__)

SITE = "victim"
SGD_MOMENTUM = 0.9  # pipeline.train's SGD (a fixed choice of the trainer, known to the attacker)


@dataclass
class VictimRound:
    """One site round as the aggregator sees it, plus what only the evaluator knows (the tiles)."""

    update: dict[str, Tensor]
    images: Tensor  # the true tiles as the trainer saw them (uint8-quantised in the store)
    masks: Tensor
    steps: int
    batch_size: int
    lr: float
    optimizer: str
    momentum: float  # the trainer's SGD momentum (0 for Adam)
    noise_multiplier: float | None
    clip: float | None
    job_epsilon: float | None  # ε this single round spent by the trainer's own accounting (q = 1)
    job_delta: float | None


def quantise(images: Tensor) -> Tensor:
    """Tiles as a site store holds them: uint8 per channel."""
    return (images.clamp(0, 1) * 255).round() / 255


def write_store(store_path: Path, tiles: TileSet) -> None:
    from wsi.store import SiteStore

    n, _, t, _ = tiles.images.shape
    store = SiteStore.create(store_path, site=SITE, target_mpp=0.5, tile_size=int(t), overlap=0)
    w = store.begin_slide("attacked", n, int(t), True)
    imgs = (tiles.images.permute(0, 2, 3, 1).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    w.write(
        slice(0, n),
        imgs,
        np.zeros((n, 4), np.int64),
        np.ones(n, np.float32),
        tiles.masks.numpy().astype(np.uint8),
    )
    store.commit_slide("attacked", {"split": "train"})


def victim_config(
    cfg: ExperimentConfig,
    run_dir: Path,
    batch: int,
    steps: int,
    sigma: float | None,
    clip: float | None = None,
    optimizer: str | None = None,
) -> ExperimentConfig:
    """The experiment's training settings for one attacked site round: ``batch`` tiles (all of the site's),
    ``steps`` local steps, no augmentation, no validation split; DP-SGD at noise multiplier ``sigma`` with
    clip ``clip`` (default: the experiment's; ``sigma=None``: DP off, the undefended control)."""
    data = cfg.model_dump(mode="json")
    data["run_dir"] = str(run_dir)
    data["sites"] = [{"name": SITE, "manifest": str(run_dir / "none.csv")}]
    tr = data["train"]
    tr.update(
        batch_size=batch,
        physical_batch_size=batch,
        max_steps=steps,
        val_fraction=0.0,
        checkpoint_every=10_000,
        augment={"flips": False, "rot90": False, "hed_jitter": 0.0, "brightness": 0.0},
        stain={"method": "none"},
    )
    if optimizer is not None:
        tr["optimizer"] = optimizer
    pv = tr["privacy"]
    if clip is not None:
        pv["max_grad_norm"] = float(clip)
    if sigma is None:
        pv["enabled"] = False
    else:
        # σ is the federation's (the sweep maps ε to σ); this one round's own ledger is scratch. It samples
        # every tile (q = 1), where the PRV accountant takes log(1 - q): RDP handles q = 1 exactly
        pv.update(
            enabled=True,
            noise_multiplier=float(sigma),
            target_epsilon=None,
            budget_epsilon="unlimited",
            accountant="rdp",
        )
    data["federation"]["rounds"] = 1
    return ExperimentConfig.model_validate(data)


def victim_round(
    cfg: ExperimentConfig,
    global_state: dict[str, Tensor],
    tiles: TileSet,
    steps: int,
    sigma: float | None,
    clip: float | None = None,
    optimizer: str | None = None,
    workdir: Path | None = None,
) -> VictimRound:
    """One site round through :func:`pipeline.train.train_local` on ``tiles`` (all in every batch),
    starting from ``global_state``; returns the update the site would upload."""
    from pipeline.train import train_local

    batch = len(tiles)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        run = Path(tmp)
        vcfg = victim_config(cfg, run, batch, steps, sigma, clip, optimizer)
        write_store(vcfg.store_path(SITE), tiles)
        res = train_local(vcfg, [SITE], run, init_state=global_state, round_index=0, progress=False)
    update = {k: (res.state[k].float() - global_state[k].float()) for k in global_state}
    return VictimRound(
        update=update,
        images=quantise(tiles.images),
        masks=tiles.masks.clone(),
        steps=res.steps,
        batch_size=batch,
        lr=vcfg.train.lr,
        optimizer=vcfg.train.optimizer,
        momentum=SGD_MOMENTUM if vcfg.train.optimizer == "sgd" else 0.0,
        noise_multiplier=res.noise_multiplier,
        clip=vcfg.train.privacy.max_grad_norm if sigma is not None else None,
        job_epsilon=res.epsilon,
        job_delta=res.delta,
    )


def update_method(settings: InversionSettings, optimizer: str) -> str:
    """The round inversion in use: ``settings.update_method``, "auto" resolved by the round's optimiser."""
    if settings.update_method == "auto":
        return "direction" if optimizer == "adam" else "simulate"
    if settings.update_method not in ("simulate", "direction"):
        raise ValueError(f"update_method {settings.update_method!r}: expected auto, simulate or direction")
    return settings.update_method


def invert_round(
    model: nn.Module,
    victim: VictimRound,
    settings: InversionSettings,
    loss_fn: Any,
    prior: Tensor | None,
) -> Reconstruction:
    """The attacker: simulate the round's local steps on dummy tiles and match the whole update (SGD), or
    match the update's direction with the tiles' gradient at the global model (Adam; see
    :func:`federation.attack.multistep.invert_update_direction`)."""
    sched = LocalTraining(
        steps=victim.steps,
        batch_size=victim.batch_size,
        lr=victim.lr,
        optimizer=victim.optimizer,
        momentum=victim.momentum,
    )
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    update = {k: victim.update[k] for k in names}
    shape = tuple(victim.images.shape[1:])
    known = victim.masks if settings.labels_known else None
    if update_method(settings, victim.optimizer) == "direction":
        return invert_update_direction(
            model, update, victim.batch_size, shape, loss_fn, settings, masks=known, prior=prior
        )
    return invert_update(
        model, update, victim.batch_size, shape, loss_fn, sched, settings, masks=known, prior=prior
    )
