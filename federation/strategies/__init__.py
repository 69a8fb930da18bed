"""Aggregation strategies (one algorithm per module, listed in :mod:`.registry`), the DP wrappers and
:func:`build_strategy`."""

from __future__ import annotations

from federation.payloads import FitConfig
from federation.strategies.base import (
    Accumulator,
    ClientUpdateResult,
    PublishView,
    ServerContext,
    State,
    Strategy,
    StrategyConfig,
    StrategyWrapper,
    UpdateInfo,
)
from federation.strategies.dp import CentralDP, LocalUpdateDP
from federation.strategies.fedadam import FedAdam
from federation.strategies.fedavg import FedAvg
from federation.strategies.fedmic import FedMIC
from federation.strategies.fedprox import FedProx
from federation.strategies.median import FedMedian
from federation.strategies.registry import REGISTRY, build_base_strategy, strategy_config
from federation.strategies.trimmed_mean import FedTrimmedAvg
from pipeline.config import FederationConfig


def build_strategy(fed: FederationConfig, n_sites: int) -> Strategy:
    """The configured strategy, wrapped with update-level DP when ``federation.update_dp.mode`` asks."""
    base = build_base_strategy(fed)
    dp = fed.update_dp
    if dp.mode == "local":
        return LocalUpdateDP(base, dp.clip_norm, dp.noise_multiplier, dp.delta)
    if dp.mode == "central":
        return CentralDP(base, dp.clip_norm, dp.noise_multiplier, dp.delta, n_sites)
    return base


__all__ = [
    "REGISTRY",
    "Accumulator",
    "CentralDP",
    "ClientUpdateResult",
    "FedAdam",
    "FedAvg",
    "FedMIC",
    "FedMedian",
    "FedProx",
    "FedTrimmedAvg",
    "FitConfig",
    "LocalUpdateDP",
    "PublishView",
    "ServerContext",
    "State",
    "Strategy",
    "StrategyConfig",
    "StrategyWrapper",
    "UpdateInfo",
    "build_base_strategy",
    "build_strategy",
    "strategy_config",
]
