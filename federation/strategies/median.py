"""FedMedian (Yin et al. 2018): the coordinate-wise median of the sites' deltas, as Flower's FedMedian.

Robust to a minority of arbitrary updates: each coordinate of the result lies between honest values
as long as fewer than half the sites are malicious. Sites' weights (``n_tiles``) are ignored, so a
site cannot buy influence by over-reporting them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

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


class FedMedianConfig(FullDeltaConfig):
    name: Literal["fedmedian"] = "fedmedian"


def _median(sorted_stack: torch.Tensor) -> torch.Tensor:
    m = sorted_stack.shape[0]
    if m % 2:
        return sorted_stack[m // 2]
    return (sorted_stack[m // 2 - 1] + sorted_stack[m // 2]) / 2


class FedMedian(FedAvg):
    """``global + median_i(delta_i)``, coordinate by coordinate (the mean of the middle two if m is even)."""

    name = "fedmedian"
    Config = FedMedianConfig
    streaming = False  # a median needs every site's value of a coordinate at once

    @classmethod
    def from_config(cls, c: StrategyConfig) -> Strategy:
        return cls()

    def average(
        self,
        global_state: State,
        updates: Sequence[UpdateInfo],
        round_index: int,
        generator: NoiseSource | None = None,
    ) -> State:
        return reduce_coordinatewise(updates, float_names(global_state), global_state, _median)
