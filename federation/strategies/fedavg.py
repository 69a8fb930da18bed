"""FedAvg (McMahan et al. 2017): the next global model is the tile-weighted mean of the sites' models.

With ``server_step`` and ``server_momentum`` it is FedAvgM (Hsu et al. 2019, "Measuring the effects of
non-identical data distribution"): the mean delta is a pseudo-gradient for server-side SGD with heavy-ball
momentum, ``m = beta m + D``, ``x = x + step m``. The defaults (1, 0) are plain FedAvg. The momentum is
server state, saved with every version; a retried round starts again from the momentum before it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from federation.strategies.base import FullDeltaConfig, State, Strategy, StrategyConfig


class FedAvgConfig(FullDeltaConfig):
    name: Literal["fedavg"] = "fedavg"
    server_step: float = Field(1.0, gt=0, le=10, description="factor on the mean delta (FedAvgM; 1: FedAvg)")
    server_momentum: float = Field(0.0, ge=0, lt=1, description="heavy-ball momentum of the server step")


class FedAvg(Strategy):
    """``global + step * m``, ``m = beta m + sum_i (n_i / sum n) * delta_i``; the weights are the sites'
    training tiles (plain FedAvg: step 1, beta 0)."""

    name = "fedavg"
    Config: type[StrategyConfig] = FedAvgConfig
    #: plain FedAvg for the subclasses that reuse :meth:`apply` (FedProx, the robust means)
    server_step = 1.0
    server_momentum = 0.0

    @classmethod
    def from_config(cls, c: StrategyConfig) -> Strategy:
        assert isinstance(c, FedAvgConfig)
        return cls(c.server_step, c.server_momentum)

    def __init__(self, server_step: float = 1.0, server_momentum: float = 0.0) -> None:
        self.server_step, self.server_momentum = float(server_step), float(server_momentum)
        self.m: State = {}

    def apply(self, global_state: State, avg_delta: State, round_index: int) -> State:
        if self.server_momentum > 0:
            self.begin_round(round_index, "m")  # a retried round starts from the momentum before it
        out = {k: v.clone() for k, v in global_state.items()}
        for k, d in avg_delta.items():
            g = global_state[k]
            step = d.to(torch.float32)
            if self.server_momentum > 0:
                step = self.server_momentum * self.m.get(k, torch.zeros_like(step)) + step
                self.m[k] = step
            out[k] = g + (self.server_step * step if self.server_step != 1.0 else step).to(g.dtype)
        return out

    def state_dict(self) -> tuple[State, dict[str, Any]]:
        if self.server_momentum == 0:
            return {}, {}
        return {f"m.{k}": t for k, t in self.m.items()}, {"step": self.server_step, "momentum": self.server_momentum}

    def load_state_dict(self, tensors: State, meta: dict[str, Any]) -> None:
        if self.server_momentum > 0:
            self.m = {k[2:]: t for k, t in tensors.items() if k.startswith("m.")}

    def describe(self) -> str:
        if self.server_step == 1.0 and self.server_momentum == 0.0:
            return "fedavg"
        return f"fedavgm(step={self.server_step}, momentum={self.server_momentum})"
