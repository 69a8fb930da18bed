"""FedTrimmedAvg (Yin et al. 2018): per coordinate, drop the ``beta`` share of largest and smallest
values and average the rest, as Flower's FedTrimmedAvg (``beta = 0.2`` by default).

With ``m`` sites, ``int(beta * m)`` values are cut at each end, so up to that many malicious sites cannot
drag any coordinate outside the range of the honest values. Weights (``n_tiles``) are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from federation.strategies.base import (
    FullDeltaConfig,
    State,
    Strategy,
    StrategyConfig,
    UpdateInfo,
    float_names,
)
from federation.strategies.coordinatewise import reduce_coordinatewise
from federation.strategies.fedavg import FedAvg
from pipeline.dprandom import NoiseSource


class FedTrimmedAvgConfig(FullDeltaConfig):
    name: Literal["fedtrimmedavg"] = "fedtrimmedavg"
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="share cut at each end, per coordinate")


class FedTrimmedAvg(FedAvg):
    """``global + trimmed_mean_i(delta_i)`` coordinate by coordinate."""

    name = "fedtrimmedavg"
    Config = FedTrimmedAvgConfig
    streaming = False  # a trimmed mean needs every site's value of a coordinate at once

    @classmethod
    def from_config(cls, c: StrategyConfig) -> Strategy:
        assert isinstance(c, FedTrimmedAvgConfig)
        return cls(c.trim_fraction)

    def __init__(self, beta: float = 0.2) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError(f"FedTrimmedAvg: beta must be in [0, 0.5) (got {beta})")
        self.beta = float(beta)

    def trimmed(self, m: int) -> int:
        """Values cut at each end of ``m``: ``int(beta * m)``, leaving at least one."""
        return min(int(self.beta * m), (m - 1) // 2)

    def average(
        self,
        global_state: State,
        updates: Sequence[UpdateInfo],
        round_index: int,
        generator: NoiseSource | None = None,
    ) -> State:
        k = self.trimmed(len(updates))

        def mean_of_middle(sorted_stack: torch.Tensor) -> torch.Tensor:
            return sorted_stack[k : sorted_stack.shape[0] - k].mean(dim=0)

        return reduce_coordinatewise(updates, float_names(global_state), global_state, mean_of_middle)

    def describe(self) -> str:
        return f"fedtrimmedavg(beta={self.beta})"
