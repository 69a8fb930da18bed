"""FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

The tile-weighted mean delta is a pseudo-gradient for a server-side Adam without bias correction:
``m = b1 m + (1-b1) D``, ``v = b2 v + (1-b2) D^2``, ``x = x + lr * m / (sqrt(v) + tau)``, with
``m_0 = 0`` and ``v_0 = tau^2`` (the paper's initialisation ``v_{-1} >= tau^2``). The moments are
server state: they are saved with every global model so a restarted aggregator continues exactly.

Each step is keyed by its round: applying round ``r`` again (a close that is retried after a failed
publish) starts again from the moments as they were before round ``r``, so they never advance twice.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from federation.strategies.base import FullDeltaConfig, State, Strategy, StrategyConfig


class FedAdamConfig(FullDeltaConfig):
    name: Literal["fedadam"] = "fedadam"
    server_lr: float = Field(0.01, gt=0)
    server_beta1: float = Field(0.9, ge=0, lt=1)
    server_beta2: float = Field(0.99, ge=0, lt=1)
    server_tau: float = Field(1e-3, gt=0)


class FedAdam(Strategy):
    name = "fedadam"
    Config = FedAdamConfig

    @classmethod
    def from_config(cls, c: StrategyConfig) -> Strategy:
        assert isinstance(c, FedAdamConfig)
        return cls(c.server_lr, c.server_beta1, c.server_beta2, c.server_tau)

    def __init__(self, lr: float, beta1: float, beta2: float, tau: float) -> None:
        self.lr, self.beta1, self.beta2, self.tau = float(lr), float(beta1), float(beta2), float(tau)
        self.m: State = {}
        self.v: State = {}

    def apply(self, global_state: State, avg_delta: State, round_index: int) -> State:
        self.begin_round(round_index, "m", "v")  # a retried round starts from the moments before it
        out = {k: v.clone() for k, v in global_state.items()}
        for k, d in avg_delta.items():
            d64 = d.to(torch.float64)
            m = self.m.get(k, torch.zeros_like(d64))
            v = self.v.get(k, torch.full_like(d64, self.tau**2))
            m = self.beta1 * m.to(torch.float64) + (1 - self.beta1) * d64
            v = self.beta2 * v.to(torch.float64) + (1 - self.beta2) * d64 * d64
            self.m[k], self.v[k] = m.to(torch.float32), v.to(torch.float32)
            g = global_state[k]
            out[k] = (g.to(torch.float64) + self.lr * m / (v.sqrt() + self.tau)).to(g.dtype)
        return out

    def state_dict(self) -> tuple[State, dict[str, Any]]:
        tensors = {f"m.{k}": t for k, t in self.m.items()} | {f"v.{k}": t for k, t in self.v.items()}
        return tensors, {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}

    def load_state_dict(self, tensors: State, meta: dict[str, Any]) -> None:
        self.m = {k[2:]: t for k, t in tensors.items() if k.startswith("m.")}
        self.v = {k[2:]: t for k, t in tensors.items() if k.startswith("v.")}

    def describe(self) -> str:
        return f"fedadam(lr={self.lr}, b1={self.beta1}, b2={self.beta2}, tau={self.tau})"
