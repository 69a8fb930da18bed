"""Strategies against hand-computed results, and the DP wrappers against their closed forms."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from federation.strategies import (
    CentralDP,
    FedAdam,
    FedAvg,
    FedProx,
    LocalUpdateDP,
    UpdateInfo,
    build_strategy,
)
from federation.strategies.dp import clip_and_noise, l2_norm
from federation.wire import atomic_write_bytes, encode_state, update_metadata
from pipeline.config import FederationConfig, UpdateDPConfig
from pipeline.dprandom import SecureRandom, SeededRandom


def _store(tmp_path: Path, site: str, delta: dict[str, torch.Tensor], n_tiles: int) -> UpdateInfo:
    path = tmp_path / f"{site}.safetensors"
    meta = update_metadata(site=site, round=0, n_tiles=n_tiles, epsilon=None, update_id=site)
    atomic_write_bytes(path, encode_state(delta, meta))
    return UpdateInfo(
        site=site,
        round=0,
        n_tiles=n_tiles,
        epsilon=None,
        path=path,
        sha256="",
        update_id=site,
        norm=l2_norm(delta),
    )


GLOBAL = {
    "w": torch.tensor([1.0, 2.0]),
    "b": torch.tensor([0.5]),
    "steps": torch.tensor([7], dtype=torch.int64),
}
D1 = {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.2]), "steps": torch.tensor([0], dtype=torch.int64)}
D2 = {
    "w": torch.tensor([-1.0, 2.0]),
    "b": torch.tensor([-0.4]),
    "steps": torch.tensor([0], dtype=torch.int64),
}


def test_fedavg_weights_by_training_tiles(tmp_path: Path) -> None:
    ups = [_store(tmp_path, "a", D1, 1), _store(tmp_path, "b", D2, 3)]
    new = FedAvg().aggregate(GLOBAL, ups, 0)
    # by hand: mean delta w = (1*[1,0] + 3*[-1,2]) / 4 = [-0.5, 1.5]; b = (0.2 - 1.2) / 4 = -0.25
    assert new["w"].tolist() == pytest.approx([0.5, 3.5])
    assert new["b"].tolist() == pytest.approx([0.25])
    assert new["steps"].tolist() == [7]  # integer buffers are not averaged
    assert new["w"].dtype == torch.float32


def test_fedprox_asks_sites_for_mu_and_aggregates_like_fedavg(tmp_path: Path) -> None:
    ups = [_store(tmp_path, "a", D1, 1), _store(tmp_path, "b", D2, 3)]
    s = FedProx(0.05)
    assert s.configure_fit(3).proximal_mu == 0.05
    assert FedAvg().configure_fit(3).proximal_mu == 0.0
    assert s.aggregate(GLOBAL, ups, 0)["w"].tolist() == pytest.approx([0.5, 3.5])


def test_fedavgm_server_momentum_by_hand_across_a_restart_and_a_retried_round(tmp_path: Path) -> None:
    """FedAvgM: m = beta m + D, x = x + lr m; the momentum survives a restart, a retried round does not
    advance it twice, and lr 1 with beta 0 is FedAvg exactly."""
    lr, beta = 0.5, 0.9
    s = FedAvg(lr, beta)
    ups = [_store(tmp_path, "a", D1, 1), _store(tmp_path, "b", D2, 3)]  # mean delta w [-0.5, 1.5]
    g1 = s.aggregate(GLOBAL, ups, 0)
    assert g1["w"].tolist() == pytest.approx([1.0 - 0.25, 2.0 + 0.75])
    assert g1["steps"].tolist() == [7]
    tensors, meta = s.state_dict()
    s2 = FedAvg(lr, beta)
    s2.load_state_dict(tensors, meta)
    (tmp_path / "r2").mkdir()
    d3 = {"w": torch.tensor([0.3, -0.1]), "b": torch.tensor([0.0]), "steps": torch.tensor([0], dtype=torch.int64)}
    up3 = [_store(tmp_path / "r2", "a", d3, 5)]
    m2 = [beta * -0.5 + 0.3, beta * 1.5 - 0.1]
    want = [g1["w"][0].item() + lr * m2[0], g1["w"][1].item() + lr * m2[1]]
    assert s2.aggregate(g1, up3, 1)["w"].tolist() == pytest.approx(want, rel=1e-6)
    assert s2.aggregate(g1, up3, 1)["w"].tolist() == pytest.approx(want, rel=1e-6)  # retried round 1
    plain = FedAvg(1.0, 0.0)
    assert plain.state_dict() == ({}, {})
    assert plain.aggregate(GLOBAL, ups, 0)["w"].tolist() == pytest.approx([0.5, 3.5])
    cfg = FederationConfig(strategy={"name": "fedavg", "server_step": lr, "server_momentum": beta})
    assert build_strategy(cfg, 2).describe() == "fedavgm(step=0.5, momentum=0.9)"
    # the name form takes same-named flat federation.* keys: FedAdam's server_lr (0.01) is not FedAvg's step
    plain_by_name = build_strategy(FederationConfig(strategy="fedavg", server_lr=0.01), 2)
    assert plain_by_name.describe() == "fedavg"
    assert plain_by_name.aggregate(GLOBAL, ups, 0)["w"].tolist() == pytest.approx([0.5, 3.5])


def _adam_by_hand(
    x: list[float], ds: list[list[float]], lr: float, b1: float, b2: float, tau: float
) -> list[float]:
    m = [0.0] * len(x)
    v = [tau * tau] * len(x)
    x = list(x)
    for d in ds:
        for i, di in enumerate(d):
            m[i] = b1 * m[i] + (1 - b1) * di
            v[i] = b2 * v[i] + (1 - b2) * di * di
            x[i] = x[i] + lr * m[i] / (math.sqrt(v[i]) + tau)
    return x


def test_fedadam_matches_hand_computed_and_survives_a_restart(tmp_path: Path) -> None:
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    s = FedAdam(lr, b1, b2, tau)
    ups = [_store(tmp_path, "a", D1, 1), _store(tmp_path, "b", D2, 3)]
    g1 = s.aggregate(GLOBAL, ups, 0)
    assert g1["w"].tolist() == pytest.approx(
        _adam_by_hand([1.0, 2.0], [[-0.5, 1.5]], lr, b1, b2, tau), rel=1e-5
    )
    assert g1["b"].tolist() == pytest.approx(_adam_by_hand([0.5], [[-0.25]], lr, b1, b2, tau), rel=1e-5)
    # round 2 runs in a fresh strategy restored from the saved server state, as after a restart
    tensors, meta = s.state_dict()
    s2 = FedAdam(lr, b1, b2, tau)
    s2.load_state_dict(tensors, meta)
    (tmp_path / "r2").mkdir()
    d3 = {
        "w": torch.tensor([0.3, -0.1]),
        "b": torch.tensor([0.0]),
        "steps": torch.tensor([0], dtype=torch.int64),
    }
    g2 = s2.aggregate(g1, [_store(tmp_path / "r2", "a", d3, 5)], 1)
    want = _adam_by_hand([1.0, 2.0], [[-0.5, 1.5], [0.3, -0.1]], lr, b1, b2, tau)
    assert g2["w"].tolist() == pytest.approx(want, rel=1e-5)


def test_clipping_scales_to_the_bound_and_keeps_direction() -> None:
    gen = SecureRandom()
    delta = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}  # norm 5
    out, norm = clip_and_noise(delta, clip_norm=1.0, noise_multiplier=0.0, rng=gen)
    assert norm == pytest.approx(5.0)
    assert out["a"].tolist() == pytest.approx([0.6, 0.8])
    small = {"a": torch.tensor([0.3, 0.4])}
    out2, _ = clip_and_noise(small, clip_norm=1.0, noise_multiplier=0.0, rng=gen)
    assert out2["a"].tolist() == pytest.approx([0.3, 0.4])  # below the bound: unchanged


def test_local_update_dp_noise_std_is_sigma_times_clip() -> None:
    sigma, clip = 0.7, 2.0
    s = LocalUpdateDP(FedAvg(), clip_norm=clip, noise_multiplier=sigma, delta=1e-5)
    n = 200_000
    delta = {"w": torch.full((n,), 1.0)}  # norm sqrt(n) >> clip: clipped to clip/sqrt(n) per coordinate
    res = s.client_update(delta, site="a", round_index=0)  # the default: the site's own CSPRNG
    noise = (res.delta["w"] - clip / math.sqrt(n)).double()
    # sample std of n Gaussian draws: relative standard error 1/sqrt(2n) ~ 0.16%; allow 1%
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.01)
    assert abs(noise.mean().item()) < 5 * sigma * clip / math.sqrt(n)
    assert (
        res.privacy is not None
        and res.privacy["clipped"]
        and res.privacy["pre_clip_norm"] == pytest.approx(math.sqrt(n))
    )


def _gaussian_eps_rdp(sigma_eff: float, rounds: int, delta: float) -> float:
    """An independent RDP accountant: the Gaussian mechanism's RDP a / (2 sigma_eff^2) per release on a
    dense grid of orders of its own, with the conversion of Balle et al. 2020 (Opacus' one)."""
    best = math.inf
    for a in np.concatenate([np.linspace(1.01, 3, 400), np.linspace(3, 2000, 4000)]):
        rdp = rounds * a / (2 * sigma_eff**2)
        best = min(best, rdp + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1))
    return best


def _gaussian_eps_exact(sigma_eff: float, rounds: int, delta: float) -> float:
    """The exact ε(δ) of ``rounds`` Gaussian releases (Balle & Wang 2018, analytic Gaussian): the
    composition is one Gaussian with mu = sqrt(rounds) / sigma_eff. A lower bound for any accountant."""
    from scipy.stats import norm

    mu = math.sqrt(rounds) / sigma_eff

    def delta_of(eps: float) -> float:
        return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2))

    lo, hi = 0.0, 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def test_local_update_dp_accounts_sensitivity_2c_under_replacement() -> None:
    """Replacing a site's data moves its clipped update by up to 2C: the effective noise multiplier is σ/2.
    The issue's figure: σ = 2 over 3 rounds is ε ≈ 9.0 at δ = 1e-5, not the 4.0 sensitivity C gave."""
    s = LocalUpdateDP(FedAvg(), clip_norm=1.0, noise_multiplier=2.0, delta=1e-5)
    assert s.epsilon(3) == pytest.approx(9.0, abs=0.05)
    for sigma in (1.5, 2.0, 4.0):
        s = LocalUpdateDP(FedAvg(), clip_norm=1.0, noise_multiplier=sigma, delta=1e-5)
        for k in (1, 3, 10):
            assert s.epsilon(k) == pytest.approx(_gaussian_eps_rdp(sigma / 2, k, 1e-5), rel=0.01)
            assert s.epsilon(k) >= _gaussian_eps_exact(sigma / 2, k, 1e-5)  # no accountant beats exact
    assert s.epsilon(1) < s.epsilon(3) < s.epsilon(10)
    assert LocalUpdateDP(FedAvg(), 1.0, 0.0, 1e-5).epsilon(1) == math.inf


def test_central_dp_clips_each_update_and_averages_uniformly(tmp_path: Path) -> None:
    big = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}  # norm 5 -> clipped to norm 1
    small = {"w": torch.tensor([0.0, 0.5]), "b": torch.tensor([0.0])}  # norm 0.5 -> kept
    g = {"w": torch.zeros(2), "b": torch.zeros(1)}
    ups = [_store(tmp_path, "a", big, 100), _store(tmp_path, "b", small, 1)]
    s = CentralDP(FedAvg(), clip_norm=1.0, noise_multiplier=0.0, delta=1e-5, n_sites=2)
    new = s.aggregate(g, ups, 0)
    # uniform weights (n_tiles ignored): ([0.6, 0.8] + [0, 0.5]) / 2
    assert new["w"].tolist() == pytest.approx([0.3, 0.65])
    assert s.history[0]["clipped"] == 1


def test_central_dp_noise_on_the_mean_is_sigma_clip_over_m(tmp_path: Path) -> None:
    n, m, sigma, clip = 100_000, 4, 2.0, 0.5
    g = {"w": torch.zeros(n)}
    ups = [_store(tmp_path, f"s{i}", {"w": torch.zeros(n)}, 1) for i in range(m)]
    s = CentralDP(FedAvg(), clip_norm=clip, noise_multiplier=sigma, delta=1e-5, n_sites=8)
    new = s.aggregate(g, ups, 0)
    assert new["w"].double().std().item() == pytest.approx(sigma * clip / m, rel=0.015)
    # no client sampling happens (every site is asked every round): the accountant uses q = 1, not m/n
    assert s.history[0]["q"] == 1.0
    assert s.epsilon() == pytest.approx(_gaussian_eps_rdp(sigma, 1, 1e-5), rel=0.01)
    full = CentralDP(FedAvg(), clip_norm=clip, noise_multiplier=sigma, delta=1e-5, n_sites=m)
    for r in range(3):
        full.aggregate(g, ups, r, generator=SeededRandom(r))
    assert full.epsilon() == pytest.approx(_gaussian_eps_rdp(sigma, 3, 1e-5), rel=0.01)
    restored = CentralDP(FedAvg(), clip_norm=clip, noise_multiplier=sigma, delta=1e-5, n_sites=m)
    restored.load_state_dict(*full.state_dict())
    assert restored.epsilon() == full.epsilon()
    report = full.privacy_report()
    assert report is not None and np.isfinite(report["epsilon"]) and report["unit"] == "site"
    assert "aggregator" in report["trust"]


def test_build_strategy_wraps_dp_around_the_configured_algorithm() -> None:
    fed = FederationConfig(strategy="fedadam", update_dp=UpdateDPConfig(mode="local", noise_multiplier=1.0))
    s = build_strategy(fed, 3)
    assert isinstance(s, LocalUpdateDP) and isinstance(s.inner, FedAdam)
    c = build_strategy(FederationConfig(strategy="fedprox", update_dp=UpdateDPConfig(mode="central")), 3)
    assert isinstance(c, CentralDP) and isinstance(c.inner, FedProx)
    assert c.configure_fit(0).proximal_mu == FederationConfig().proximal_mu


@pytest.mark.parametrize("m", [4, 5])
def test_median_and_trimmed_mean_against_numpy(tmp_path: Path, m: int) -> None:
    """Coordinate-wise median (np.median) and trimmed mean (sort, cut int(beta*m) each end) vs numpy."""
    from federation.strategies import FedMedian, FedTrimmedAvg

    rng = np.random.default_rng(m)
    like = {"w": torch.zeros(3, 4), "b": torch.zeros(5), "steps": torch.tensor([7], dtype=torch.int64)}
    deltas = [
        {
            "w": torch.tensor(rng.normal(size=(3, 4)), dtype=torch.float32),
            "b": torch.tensor(rng.normal(size=5), dtype=torch.float32),
            "steps": torch.tensor([0], dtype=torch.int64),
        }
        for _ in range(m)
    ]
    ups = [_store(tmp_path, f"s{i}", d, 10**i) for i, d in enumerate(deltas)]  # weights must not matter
    med = FedMedian().aggregate(like, ups, 0)
    trimmed = FedTrimmedAvg(0.25).aggregate(like, ups, 0)
    k = int(0.25 * m)
    for name in ("w", "b"):
        stack = np.stack([d[name].numpy() for d in deltas])
        np.testing.assert_allclose(med[name].numpy(), np.median(stack, axis=0), rtol=1e-6, atol=1e-6)
        cut = np.sort(stack, axis=0)[k : m - k]
        np.testing.assert_allclose(trimmed[name].numpy(), cut.mean(axis=0), rtol=1e-6, atol=1e-6)
    assert med["steps"].tolist() == [7] and trimmed["steps"].tolist() == [7]
    for name in ("fedmedian", "fedtrimmedavg"):
        assert build_strategy(FederationConfig(strategy=name), m).name == name  # type: ignore[arg-type]
