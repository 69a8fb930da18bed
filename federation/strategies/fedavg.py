"""FedAvg (McMahan et al. 2017): the next global model is the tile-weighted mean of the sites' models."""

from __future__ import annotations

from typing import Literal

from federation.strategies.base import FullDeltaConfig, State, Strategy, StrategyConfig


class FedAvgConfig(FullDeltaConfig):
    name: Literal["fedavg"] = "fedavg"


class FedAvg(Strategy):
    """``global + sum_i (n_i / sum n) * delta_i``; the weights are the sites' training tiles."""

    name = "fedavg"
    Config: type[StrategyConfig] = FedAvgConfig

    @classmethod
    def from_config(cls, c: StrategyConfig) -> Strategy:
        return cls()

    def apply(self, global_state: State, avg_delta: State, round_index: int) -> State:
        out = {k: v.clone() for k, v in global_state.items()}
        for k, d in avg_delta.items():
            g = global_state[k]
            out[k] = g + d.to(g.dtype)
        return out
