"""Metrics and membership inference against known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from federation.attack.membership import loss_threshold_attack, roc_auc, roc_curve, tpr_at_fpr
from federation.attack.metrics import leakage, mse, psnr, ssim, summarise


def test_identical_images_have_ssim_one_and_infinite_psnr() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((16, 16, 3))
    assert ssim(img, img) == pytest.approx(1.0)
    assert mse(img, img) == 0.0
    assert math.isinf(psnr(img, img))


def test_psnr_of_a_known_mse() -> None:
    a = np.zeros((8, 8, 3))
    b = np.full((8, 8, 3), 0.1)  # MSE 0.01 -> PSNR = 10 log10(1 / 0.01) = 20 dB
    assert mse(a, b) == pytest.approx(0.01)
    assert psnr(a, b) == pytest.approx(20.0)


def test_tensor_and_array_layouts_agree() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.random((16, 16, 3)), rng.random((16, 16, 3))
    ta, tb = torch.from_numpy(a).permute(2, 0, 1), torch.from_numpy(b).permute(2, 0, 1)
    assert ssim(ta, tb) == pytest.approx(ssim(a, b))
    assert ssim(a, b) < 0.2  # independent noise images are structurally unrelated


def test_leakage_formula_on_a_constructed_pool() -> None:
    rng = np.random.default_rng(2)
    pool = torch.from_numpy(rng.random((5, 3, 16, 16)))
    prior = pool.mean(0)
    truth = pool[3]
    exact = leakage(truth, truth, pool, prior)  # a perfect reconstruction
    assert exact.nearest_index == 3
    assert exact.ssim == pytest.approx(1.0)
    assert exact.leakage == pytest.approx(1.0 / ssim(prior, pool[3]))
    assert exact.excess_ssim == pytest.approx(1.0 - ssim(prior, truth))
    as_prior = leakage(prior, truth, pool, prior)  # reconstructing the prior: no excess over it
    assert as_prior.excess_ssim == pytest.approx(0.0)
    k = as_prior.nearest_index
    assert as_prior.leakage == pytest.approx(ssim(prior, pool[k]) / ssim(prior, pool[k]))
    s = summarise([exact, as_prior])
    assert s["mean_ssim"] == pytest.approx((1.0 + as_prior.ssim) / 2)
    assert s["n"] == 2


def test_roc_auc_and_low_fpr_tpr_on_constructed_scores() -> None:
    members = np.array([0.9, 0.8, 0.7, 0.3])
    nonmembers = np.array([0.6, 0.5, 0.2, 0.1])
    # pairs where member > non-member: 0.9,0.8,0.7 beat all 4 (12) + 0.3 beats 0.2,0.1 (2) -> 14/16
    assert roc_auc(members, nonmembers) == pytest.approx(14 / 16)
    assert roc_auc(nonmembers, members) == pytest.approx(2 / 16)
    assert roc_auc(np.ones(3), np.ones(3)) == pytest.approx(0.5)
    # at FPR 0 the best threshold (0.7) catches 3 of 4 members
    assert tpr_at_fpr(members, nonmembers, 0.01) == pytest.approx(0.75)
    fpr, tpr = roc_curve(members, nonmembers)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(14 / 16)


def test_loss_threshold_attack_separates_memorised_tiles(tiny_net) -> None:
    """A network overfitted on 8 tiles: their loss is lower than on 8 other tiles, AUC near 1."""
    from federation.attack.common import segmentation_loss

    g = torch.Generator().manual_seed(0)
    x = torch.rand((16, 3, 16, 16), generator=g)
    m = (torch.rand((16, 16, 16), generator=g) > 0.5).long()  # random masks: only memorisation fits them
    loss_fn = segmentation_loss("ce")
    opt = torch.optim.Adam(tiny_net.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        loss_fn(tiny_net(x[:8]), m[:8]).backward()
        opt.step()
    res = loss_threshold_attack(tiny_net, (x[:8], m[:8]), (x[8:], m[8:]), loss_fn)
    assert res.auc > 0.95
    assert res.tpr_at_1pct_fpr > 0.5
    assert res.mean_member_loss < res.mean_nonmember_loss
