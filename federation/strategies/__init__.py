"""Aggregation strategies (one algorithm per module) and the DP wrappers; :func:`build_strategy`."""

from __future__ import annotations

from federation.strategies.base import (
    ClientUpdateResult,
    FitConfig,
    State,
    Strategy,
    StrategyWrapper,
    UpdateInfo,
)
from federation.strategies.dp import CentralDP, LocalUpdateDP
from federation.strategies.fedadam import FedAdam
from federation.strategies.fedavg import FedAvg
from federation.strategies.fedprox import FedProx
from federation.strategies.median import FedMedian
from federation.strategies.trimmed_mean import FedTrimmedAvg
from pipeline.config import FederationConfig


def build_strategy(fed: FederationConfig, n_sites: int) -> Strategy:
    """The configured strategy, wrapped with update-level DP when ``federation.update_dp.mode`` asks."""
    base: Strategy
    if fed.strategy == "fedavg":
        base = FedAvg()
    elif fed.strategy == "fedprox":
        base = FedProx(fed.proximal_mu)
    elif fed.strategy == "fedadam":
        base = FedAdam(fed.server_lr, fed.server_beta1, fed.server_beta2, fed.server_tau)
    elif fed.strategy == "fedmedian":
        base = FedMedian()
    elif fed.strategy == "fedtrimmedavg":
        base = FedTrimmedAvg(fed.trim_fraction)
    else:  # pragma: no cover - pydantic restricts the literal
        raise ValueError(f"unknown strategy {fed.strategy!r}")
    dp = fed.update_dp
    if dp.mode == "local":
        return LocalUpdateDP(base, dp.clip_norm, dp.noise_multiplier, dp.delta)
    if dp.mode == "central":
        return CentralDP(base, dp.clip_norm, dp.noise_multiplier, dp.delta, n_sites)
    return base


__all__ = [
    "CentralDP",
    "ClientUpdateResult",
    "FedAdam",
    "FedAvg",
    "FedMedian",
    "FedProx",
    "FedTrimmedAvg",
    "FitConfig",
    "LocalUpdateDP",
    "State",
    "Strategy",
    "StrategyWrapper",
    "UpdateInfo",
    "build_strategy",
]
