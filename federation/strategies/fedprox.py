"""FedProx (Li et al. 2020): FedAvg aggregation; each site adds (mu/2)||w - w_global||^2 to its loss.

The proximal term lives in local training (``pipeline.train.train_local(..., proximal_ref=...)``), so
this strategy only tells the sites which mu to use; aggregation is FedAvg's.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from federation.payloads import FitConfig
from federation.strategies.base import FullDeltaConfig, Strategy, StrategyConfig
from federation.strategies.fedavg import FedAvg


class FedProxConfig(FullDeltaConfig):
    name: Literal["fedprox"] = "fedprox"
    proximal_mu: float = Field(0.01, ge=0, description="weight of (mu/2)||w - w_global||^2")


class FedProx(FedAvg):
    name = "fedprox"
    Config = FedProxConfig

    @classmethod
    def from_config(cls, c: StrategyConfig) -> Strategy:
        assert isinstance(c, FedProxConfig)
        return cls(c.proximal_mu)

    def __init__(self, proximal_mu: float) -> None:
        if proximal_mu < 0:
            raise ValueError(f"FedProx: proximal_mu must be >= 0 (got {proximal_mu})")
        self.proximal_mu = float(proximal_mu)

    def configure_fit(self, round_index: int, site: str | None = None) -> FitConfig:
        return FitConfig(proximal_mu=self.proximal_mu)

    def describe(self) -> str:
        return f"fedprox(mu={self.proximal_mu})"
