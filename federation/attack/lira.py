"""LiRA membership inference (Carlini et al., "Membership Inference Attacks From First Principles", 2022).

Every model here is trained by fedpath's own trainer (:func:`pipeline.train.train_local`, DP-SGD through
:func:`pipeline.dpsgd.make_private` at the requested ε): ``n_models`` models, each on a random half of one
tile pool (members and non-members come from the same images, split tile by tile). Each model in turn is
the target and the other ``n_models - 1`` are its shadow models (the online variant, leave one out, as in
Carlini et al.'s evaluation): for a tile, the shadows that trained on it give the "in" distribution of its
score, the others the "out" one, each a Gaussian; the attack's score is the log-likelihood ratio of the
target model's score under the two. A tile's score is the mean over its pixels of the logit-scaled
confidence in the true class, log(p / (1 - p)). With ``views`` > 1 the attacker queries each tile in
several dihedral views (rotations, flips: what the trainer's augmentation shows the model) and the
log-likelihood ratios of the views add up (a Gaussian per view, diagonal covariance), as Carlini et al.
do with augmented queries: more evidence per tile, more power at low false-positive rates.

Reported as ML Privacy Meter and Carlini et al. do: ROC AUC, TPR at 0.1% and 1% FPR, the ROC on log axes.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from federation.attack.fedavg import SITE, write_store
from federation.attack.membership import roc_auc, roc_curve, tpr_at_fpr
from federation.attack.tiles import TileSet
from pipeline.config import ExperimentConfig

log = logging.getLogger(__name__)


@dataclass
class LiraResult:
    auc: float
    tpr_at_0_1pct_fpr: float
    tpr_at_1pct_fpr: float
    n_members: int
    n_nonmembers: int
    n_shadows: int
    n_models: int
    views: int
    roc: dict[str, list[float]]
    epsilon: float | None
    delta: float | None
    dice: float | None = None
    seconds: float = 0.0
    models: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def dihedral(x: Tensor, view: int) -> Tensor:
    """View ``view`` (0..7) of the dihedral group on the last two axes: rotations by 90° × optional flip."""
    y = torch.rot90(x, view % 4, dims=(-2, -1))
    return torch.flip(y, dims=(-1,)) if view >= 4 else y


@torch.no_grad()
def tile_scores(model: nn.Module, images: Tensor, masks: Tensor, batch: int = 32, views: int = 1) -> np.ndarray:
    """Per tile and view: the mean over pixels of log(p / (1 - p)) of the true class (Carlini's logit
    scaling), shape (tiles, views); view 0 is the tile as stored."""
    if not 1 <= views <= 8:
        raise ValueError(f"lira: views must be 1..8 (dihedral views), not {views}")
    model.eval()
    out = []
    for v in range(views):
        col = []
        for i in range(0, images.shape[0], batch):
            x, m = dihedral(images[i : i + batch], v), dihedral(masks[i : i + batch], v)
            logp = torch.log_softmax(model(x).double(), dim=1)
            lp = logp.gather(1, m.long().unsqueeze(1)).squeeze(1)
            # log(p/(1-p)) = log p - log(1 - p), stable via log1p(-exp(log p)) with p < 1
            l1m = torch.log1p(-torch.exp(lp).clamp(max=1 - 1e-12))
            col.append((lp - l1m).flatten(1).mean(1).float().numpy())
        out.append(np.concatenate(col))
    return np.stack(out, axis=1)


def lira_scores(scores: np.ndarray, inmask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Online LiRA, leave one model out. ``scores`` (models, tiles) or (models, tiles, views) of every
    model on every pool tile, ``inmask`` (models, tiles) whether that model trained on that tile. Returns
    the attack's scores of member and of non-member (model, tile) pairs (higher = "member"); the views'
    log-likelihood ratios add up."""
    if scores.ndim == 3:
        parts = [lira_scores(scores[:, :, v], inmask) for v in range(scores.shape[2])]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)  # type: ignore[return-value]
    m_models = scores.shape[0]
    mem: list[float] = []
    non: list[float] = []
    for t in range(m_models):
        others = np.arange(m_models) != t
        s_o, in_o = scores[others], inmask[others]
        # per-tile means, one pooled variance per side (Carlini's "fixed variance", robust with few shadows)
        cnt_in, cnt_out = in_o.sum(0), (~in_o).sum(0)
        mu_in = np.where(cnt_in > 0, (s_o * in_o).sum(0) / np.maximum(cnt_in, 1), np.nan)
        mu_out = np.where(cnt_out > 0, (s_o * ~in_o).sum(0) / np.maximum(cnt_out, 1), np.nan)
        var_in = np.nanvar(np.where(in_o, s_o - mu_in, np.nan)) + 1e-12
        var_out = np.nanvar(np.where(~in_o, s_o - mu_out, np.nan)) + 1e-12
        ok = (cnt_in > 0) & (cnt_out > 0)
        x = scores[t]
        lr = (-((x - mu_in) ** 2) / (2 * var_in) - 0.5 * np.log(var_in)) - (
            -((x - mu_out) ** 2) / (2 * var_out) - 0.5 * np.log(var_out)
        )
        mem += lr[ok & inmask[t]].tolist()
        non += lr[ok & ~inmask[t]].tolist()
    return np.asarray(mem), np.asarray(non)


def summarise_lira(member: np.ndarray, nonmember: np.ndarray, points: int = 200) -> dict[str, Any]:
    """AUC, TPR at 0.1% and 1% FPR, and the ROC thinned to about ``points`` points (log-spaced in FPR)."""
    fpr, tpr = roc_curve(member, nonmember)
    grid = np.unique(np.r_[0.0, np.logspace(-4, 0, points)])
    keep = np.unique(np.searchsorted(fpr, grid, side="right") - 1).clip(0, len(fpr) - 1)
    return {
        "auc": roc_auc(member, nonmember),
        "tpr_at_0_1pct_fpr": tpr_at_fpr(member, nonmember, 0.001),
        "tpr_at_1pct_fpr": tpr_at_fpr(member, nonmember, 0.01),
        "roc": {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()},
        "n_members": int(len(member)),
        "n_nonmembers": int(len(nonmember)),
    }


def model_config(
    cfg: ExperimentConfig, run_dir: Path, epsilon: float | None, steps: int, overrides: dict[str, Any]
) -> ExperimentConfig:
    """The experiment's training config for one LiRA model: ``steps`` steps, DP-SGD at ``epsilon`` (None:
    no DP) over those steps, no validation split, and ``overrides`` (dotted keys, e.g. "model.channels")."""
    data = cfg.model_dump(mode="json")
    data["run_dir"] = str(run_dir)
    data["sites"] = [{"name": SITE, "manifest": str(run_dir / "none.csv")}]
    data["federation"]["rounds"] = 1
    tr = data["train"]
    tr.update(max_steps=steps, val_fraction=0.0, checkpoint_every=100_000)
    pv = tr["privacy"]
    if epsilon is None:
        pv["enabled"] = False
    else:
        pv.update(enabled=True, target_epsilon=float(epsilon), noise_multiplier=None, budget_epsilon=None)
    for key, value in overrides.items():
        node = data
        *path, last = key.split(".")
        for k in path:
            node = node[k]
        node[last] = value
    return ExperimentConfig.model_validate(data)


def train_one(vcfg: ExperimentConfig, members: TileSet) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """One model by fedpath's trainer on ``members``; returns its weights and its ledger figures."""
    from pipeline.train import train_local

    write_store(vcfg.store_path(SITE), members)
    res = train_local(vcfg, [SITE], vcfg.run_dir, job_id="lira", progress=False)
    return res.state, {"epsilon": res.epsilon, "delta": res.delta, "noise_multiplier": res.noise_multiplier}


def run_lira(
    cfg: ExperimentConfig,
    pool: TileSet,
    held_out: TileSet | None,
    epsilon: float | None,
    n_models: int,
    steps: int,
    overrides: dict[str, Any],
    seed: int,
    workdir: Path | None = None,
    views: int = 1,
) -> LiraResult:
    """Train ``n_models`` models (each on a seeded random half of ``pool``) at ``epsilon``; LiRA on every
    model with the others as shadows; the mean held-out Dice of the models on ``held_out`` when given."""
    from pipeline.models import build_model
    from pipeline.train import evaluate_dataset

    t0 = time.perf_counter()
    n = len(pool)
    rng = np.random.default_rng(seed)
    inmask = np.zeros((n_models, n), dtype=bool)
    for m in range(n_models):
        inmask[m, rng.permutation(n)[: n // 2]] = True
    scores = np.zeros((n_models, n, views))
    info: list[dict[str, Any]] = []
    dices: list[float] = []
    for m in range(n_models):
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            vcfg = model_config(cfg, Path(tmp), epsilon, steps, overrides)
            state, led = train_one(vcfg, pool.subset(np.flatnonzero(inmask[m])))
            net = build_model(vcfg.model)
            net.load_state_dict(state)
            scores[m] = tile_scores(net, pool.images, pool.masks, views=views)
            if held_out is not None:
                dices.append(float(evaluate_dataset(net, _TensorTiles(held_out)).get("dice", float("nan"))))
        info.append(led)
        log.info("lira: ε=%s model %d/%d trained (%s)", epsilon, m + 1, n_models, led)
    mem, non = lira_scores(scores, inmask)
    s = summarise_lira(mem, non)
    return LiraResult(
        **s,
        n_shadows=n_models - 1,
        n_models=n_models,
        views=views,
        epsilon=info[0]["epsilon"] if epsilon is not None else None,
        delta=info[0]["delta"] if epsilon is not None else None,
        dice=float(np.nanmean(dices)) if dices else None,
        seconds=time.perf_counter() - t0,
        models=info,
    )


class _TensorTiles(torch.utils.data.Dataset[tuple[Tensor, Tensor]]):
    """Tiles in memory as the trainer's evaluation reads them: (image (3,H,W), label (1,H,W))."""

    def __init__(self, tiles: TileSet) -> None:
        self.tiles = tiles

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.tiles.images[i], self.tiles.masks[i].unsqueeze(0)
