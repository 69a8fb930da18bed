"""FedProx (Li et al. 2020): FedAvg aggregation; each site adds (mu/2)||w - w_global||^2 to its loss.

The proximal term lives in local training (``pipeline.train.train_local(..., proximal_ref=...)``), so
this strategy only tells the sites which mu to use; aggregation is FedAvg's.
"""

from __future__ import annotations

from federation.strategies.base import FitConfig
from federation.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"

    def __init__(self, proximal_mu: float) -> None:
        if proximal_mu < 0:
            raise ValueError(f"FedProx: proximal_mu must be >= 0 (got {proximal_mu})")
        self.proximal_mu = float(proximal_mu)

    def configure_fit(self, round_index: int) -> FitConfig:
        return FitConfig(proximal_mu=self.proximal_mu)

    def describe(self) -> str:
        return f"fedprox(mu={self.proximal_mu})"
