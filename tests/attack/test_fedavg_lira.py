"""The FedAvg-round victim is fedpath's trainer and the attacker's simulation of it is exact; LiRA's and
the prior comparison's statistics on constructed inputs; the report's verdict follows the evidence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call

from federation.attack.common import gradient_cost, segmentation_loss
from federation.attack.fedavg import SGD_MOMENTUM, invert_round, update_method, victim_round
from federation.attack.inverting import InversionSettings
from federation.attack.lira import lira_scores, summarise_lira
from federation.attack.metrics import bootstrap_ci, compare_to_prior, ssim
from federation.attack.multistep import LocalTraining, _FunctionalOptimizer
from federation.attack.sweep import target_model
from federation.attack.tiles import TileSet
from pipeline.config import ExperimentConfig
from pipeline.report import _verdict


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Relative L2 distance of two updates."""
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b, strict=True))
    return (num / sum(float(y.pow(2).sum()) for y in b)) ** 0.5


SMALL = {"channels": [8, 16], "strides": [2], "num_res_units": 1, "groups": 4}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_attacker_simulation_of_the_trainer_round_is_exact(tiles16: TileSet, optimizer: str) -> None:
    """Oracle: the trainer's real round (pipeline.train.train_local) and the attacker's differentiable
    simulation from the true tiles give the same update (cosine distance ~ 0)."""
    cfg = ExperimentConfig.model_validate(
        {"model": SMALL, "train": {"batch_size": 2, "lr": 0.01, "optimizer": optimizer, "threads": 1}}
    )
    tiles = tiles16.subset([0, 3])
    model, _ = target_model(cfg)
    g = {k: v.detach().clone() for k, v in model.state_dict().items()}
    v = victim_round(cfg, g, tiles, 3, None)
    assert v.steps == 3 and v.momentum == (SGD_MOMENTUM if optimizer == "sgd" else 0.0)
    sched = LocalTraining(steps=3, batch_size=2, lr=0.01, optimizer=optimizer, momentum=v.momentum)
    start = {k: p.detach() for k, p in model.named_parameters()}
    params = {k: t.clone().requires_grad_(True) for k, t in start.items()}
    fopt = _FunctionalOptimizer(sched, params)
    loss = segmentation_loss()
    for _ in range(3):
        grads = torch.autograd.grad(loss(functional_call(model, params, (v.images,)), v.masks), list(params.values()))
        params = fopt.step(params, dict(zip(params, grads, strict=True)))
    sim = [(params[k] - start[k]).detach() for k in start]
    real = [v.update[k] for k in start]
    # Adam divides by sqrt(v): coordinates with near-zero gradients amplify float rounding
    assert _rel(sim, real) < (1e-3 if optimizer == "sgd" else 0.05)
    assert float(gradient_cost(sim, real, "cosine")) < 1e-3
    # a wrong schedule (plain SGD without the trainer's momentum, or one step fewer) does not match
    if optimizer == "sgd":
        params2 = {k: t.clone().requires_grad_(True) for k, t in start.items()}
        f2 = _FunctionalOptimizer(LocalTraining(steps=3, batch_size=2, lr=0.01, optimizer="sgd"), params2)
        for _ in range(3):
            gr = torch.autograd.grad(loss(functional_call(model, params2, (v.images,)), v.masks), list(params2.values()))
            params2 = f2.step(params2, dict(zip(params2, gr, strict=True)))
        assert _rel([(params2[k] - start[k]).detach() for k in start], real) > 0.1


def test_direction_inversion_of_an_adam_round_beats_the_prior(data_root: Path) -> None:
    """An undefended round of 10 Adam steps on 4 real 32 px tiles (the trainer's), inverted by matching the
    update's direction: the reconstructions are closer to the truth than the public tiles' mean image is,
    and "auto" picks this inversion for Adam and the exact simulation for SGD."""
    from federation.attack.tiles import load_monuseg_tiles

    torch.set_num_threads(1)
    tiles = load_monuseg_tiles(data_root, 32, 0.5, per_image=2, max_images=6, seed=0)
    cfg = ExperimentConfig.model_validate(
        {"model": SMALL, "train": {"batch_size": 2, "lr": 0.002, "optimizer": "adam", "threads": 1}}
    )
    model, _ = target_model(cfg)
    g = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scored = [0, 3, 5, 8]
    v = victim_round(cfg, g, tiles.subset(scored), 10, None)
    prior = tiles.subset([i for i in range(len(tiles)) if i not in scored]).images.mean(0)
    st = InversionSettings(iterations=200, restarts=1, matching="kernel", chroma_tv_weight=3.0, scales=(1,))
    assert update_method(st, "adam") == "direction" and update_method(st, "sgd") == "simulate"
    rec = invert_round(model, v, st, segmentation_loss(), prior)
    got = np.array([ssim(rec.images[i], v.images[i]) for i in range(4)])
    base = np.array([ssim(prior, v.images[i]) for i in range(4)])
    assert got.mean() > base.mean() + 0.04 and (got > base).sum() >= 3, (got, base)
    with pytest.raises(ValueError, match="update_method"):
        update_method(InversionSettings(update_method="guess"), "adam")


def test_dp_round_is_noisy_and_clipped_by_the_trainer(tiles16: TileSet) -> None:
    cfg = ExperimentConfig.model_validate({"model": SMALL, "train": {"batch_size": 2, "lr": 0.01, "threads": 1}})
    model, _ = target_model(cfg)
    g = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tiles = tiles16.subset([0, 3])
    a = victim_round(cfg, g, tiles, 2, 2.0, clip=0.5)
    b = victim_round(cfg, g, tiles, 2, 2.0, clip=0.5)
    assert a.noise_multiplier == 2.0 and a.clip == 0.5
    diff = sum(float((a.update[k] - b.update[k]).abs().sum()) for k in a.update)
    assert diff > 0  # fresh CSPRNG noise per round: two rounds on the same tiles differ


def test_bootstrap_ci_and_prior_verdicts() -> None:
    lo, hi = bootstrap_ci(np.full(20, 0.3))
    assert lo == hi == pytest.approx(0.3)
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.5, 0.7, 30)
    prior = rng.uniform(0.1, 0.2, 30)
    assert compare_to_prior(truth.tolist(), prior.tolist())["status"] == "beats prior"
    assert compare_to_prior(prior.tolist(), truth.tolist())["status"] == "below prior"
    noise = (prior + rng.normal(0, 0.05, 30)).tolist()
    c = compare_to_prior(noise, prior.tolist())
    assert c["status"] == "indistinguishable from prior"
    assert c["difference"]["ci_low"] < 0 < c["difference"]["ci_high"]
    assert c["ssim"]["q1"] <= c["ssim"]["median"] <= c["ssim"]["q3"]


def test_lira_separates_memorised_tiles_and_not_unmemorised_ones() -> None:
    """Constructed scores: per-tile difficulty plus, for models that trained on a tile, a shift of 3
    (memorised) or 0 (nothing learnt about the tile)."""
    rng = np.random.default_rng(1)
    models, tiles = 16, 200
    inmask = np.zeros((models, tiles), bool)
    for m in range(models):
        inmask[m, rng.permutation(tiles)[: tiles // 2]] = True
    difficulty = rng.normal(0, 3, tiles)
    for shift, strong in ((3.0, True), (0.0, False)):
        scores = difficulty + rng.normal(0, 0.5, (models, tiles)) + shift * inmask
        s = summarise_lira(*lira_scores(scores, inmask))
        assert s["n_members"] + s["n_nonmembers"] == models * tiles
        if strong:
            assert s["auc"] > 0.95 and s["tpr_at_0_1pct_fpr"] > 0.5
        else:
            assert 0.4 < s["auc"] < 0.6 and s["tpr_at_1pct_fpr"] < 0.05
        assert s["roc"]["fpr"][0] == 0.0 and s["roc"]["tpr"][-1] == 1.0


def _attack_json(control: tuple[list[float], list[float]], dp: tuple[list[float], list[float]]) -> dict:
    def entry(eps: float | None, pair: tuple[list[float], list[float]]) -> dict:
        c = compare_to_prior(*pair)
        return {
            "epsilon": eps,
            "delta": None if eps is None else 1e-4,
            "unit": None if eps is None else "tile",
            "attacks": {"fedavg": {"summary": c, "status": c["status"]}},
        }

    return {
        "primary_attack": "fedavg",
        "results": [entry(None, control), entry(8.0, dp)],
        "indistinguishable_from": {"epsilon": 8.0},
    }


def test_verdict_says_nothing_either_way_when_the_control_does_not_beat_the_prior() -> None:
    rng = np.random.default_rng(2)
    prior = rng.uniform(0.4, 0.5, 12).tolist()
    weak = (np.asarray(prior) - 0.1).tolist()
    v = _verdict(_attack_json((weak, prior), (weak, prior)))
    text = " ".join(v["lines"])
    assert not v["informative"] and v["dp_within_prior"] is None
    assert "shows nothing either way" in text and "DP worked" not in text
    strong = (np.asarray(prior) + 0.2).tolist()
    v = _verdict(_attack_json((strong, prior), (weak, prior)))
    text = " ".join(v["lines"])
    assert v["informative"] and v["dp_within_prior"] is True
    assert "ε = 8 (δ = 1.00e-04, per tile)" in text and "indistinguishable from the prior from ε = 8" in text


def test_calibrate_config_errors_name_the_file(tmp_path: Path) -> None:
    from fedpath.calibrate import load_calibrate
    from pipeline.config import ConfigError

    p = tmp_path / "cal.yaml"
    p.write_text("experiment: nope.yaml\nutility_floor: 2\n")
    with pytest.raises(ConfigError, match="cal.yaml"):
        load_calibrate(p)


def test_lira_augmented_queries_add_evidence() -> None:
    """Constructed scores with a weak per-view membership signal: eight independent views of each tile
    give the attack more power at low FPR than one view (the LLRs of the views add up)."""
    rng = np.random.default_rng(2)
    models, tiles, views = 16, 400, 8
    inmask = np.zeros((models, tiles), bool)
    for m in range(models):
        inmask[m, rng.permutation(tiles)[: tiles // 2]] = True
    difficulty = rng.normal(0, 3, (1, tiles, 1))
    scores = difficulty + rng.normal(0, 1.0, (models, tiles, views)) + 0.8 * inmask[:, :, None]
    one = summarise_lira(*lira_scores(scores[:, :, :1], inmask))
    eight = summarise_lira(*lira_scores(scores, inmask))
    assert eight["auc"] > one["auc"] + 0.1
    assert eight["tpr_at_1pct_fpr"] > 2 * one["tpr_at_1pct_fpr"]


def test_dihedral_views_are_the_eight_symmetries_and_scores_have_a_column_each() -> None:
    from federation.attack.lira import dihedral, tile_scores

    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    seen = {tuple(dihedral(x, v).flatten().tolist()) for v in range(8)}
    assert len(seen) == 8 and tuple(dihedral(x, 0).flatten().tolist()) == tuple(x.flatten().tolist())
    net = torch.nn.Conv2d(3, 2, 3, padding=1)
    images, masks = torch.rand(5, 3, 8, 8), (torch.rand(5, 8, 8) > 0.5).long()
    s = tile_scores(net, images, masks, views=8)
    assert s.shape == (5, 8) and np.isfinite(s).all()
    # a rotation-equivariant input (constant image, constant mask) scores the same in every view
    c = tile_scores(net, torch.ones(2, 3, 8, 8), torch.ones(2, 8, 8).long(), views=8)
    assert np.allclose(c, c[:, :1], atol=1e-5)
