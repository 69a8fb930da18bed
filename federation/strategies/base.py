"""The strategy base class: a few hooks, one algorithm per module, DP added by wrapping.

A round on the server is ``aggregate = apply(global, average(updates))``: :meth:`Strategy.average`
streams the stored updates (one tensor of one update resident at a time, so memory does not grow with
the number of sites) into a weighted mean delta, and :meth:`Strategy.apply` turns that pseudo-gradient
into the next global model (FedAvg adds it, FedAdam takes an Adam step). On the site,
:meth:`Strategy.configure_fit` says how to train locally (FedProx's proximal term) and
:meth:`Strategy.client_update` may transform the delta before upload (update-level DP).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from federation.wire import iter_tensors
from pipeline.dprandom import NoiseSource

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FitConfig:
    """Local-training options a strategy asks of the sites for one round."""

    proximal_mu: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UpdateInfo:
    """One accepted, stored update: its metadata and where its tensors live (loaded lazily)."""

    site: str
    round: int
    n_tiles: int
    epsilon: float | None
    path: Path
    sha256: str
    update_id: str
    norm: float
    late_from: int | None = None


@dataclass
class ClientUpdateResult:
    """The delta a site uploads and, for update-level DP, what its accountant must record."""

    delta: State
    privacy: dict[str, Any] | None = None


def float_names(state: State) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def streaming_sum(
    updates: Sequence[UpdateInfo],
    coefficient: Callable[[UpdateInfo], float],
    names: list[str],
    like: State,
) -> State:
    """``sum_i coefficient(u_i) * u_i`` over float tensors, reading one update's tensors at a time."""
    acc = {k: torch.zeros_like(like[k], dtype=torch.float32) for k in names}
    for u in updates:
        c = float(coefficient(u))
        if c == 0.0:
            continue
        for name, t in iter_tensors(u.path, names):
            acc[name].add_(t.to(torch.float32), alpha=c)
    return acc


class Strategy:
    """Base strategy: FedAvg-style weighted averaging by training tiles; subclasses override hooks."""

    name = "base"

    # -- site side -------------------------------------------------------------------------------
    def configure_fit(self, round_index: int) -> FitConfig:
        return FitConfig()

    def client_update(
        self, delta: State, *, site: str, round_index: int, generator: NoiseSource | None = None
    ) -> ClientUpdateResult:
        return ClientUpdateResult(delta=delta)

    # -- server side -----------------------------------------------------------------------------
    def weight(self, update: UpdateInfo) -> float:
        return float(update.n_tiles)

    def average(
        self,
        global_state: State,
        updates: Sequence[UpdateInfo],
        round_index: int,
        generator: NoiseSource | None = None,
    ) -> State:
        """Weighted mean of the updates' deltas (weights from :meth:`weight`), streamed."""
        if not updates:
            raise ValueError("average: no updates to aggregate")
        total = sum(self.weight(u) for u in updates)
        if total <= 0:
            raise ValueError("average: total update weight is zero")
        return streaming_sum(
            updates, lambda u: self.weight(u) / total, float_names(global_state), global_state
        )

    def apply(self, global_state: State, avg_delta: State, round_index: int) -> State:
        """Turn the averaged delta into the next global model; non-float tensors are kept."""
        raise NotImplementedError

    def aggregate(
        self,
        global_state: State,
        updates: Sequence[UpdateInfo],
        round_index: int,
        generator: NoiseSource | None = None,
    ) -> State:
        return self.apply(
            global_state, self.average(global_state, updates, round_index, generator), round_index
        )

    # -- durable server-side state ---------------------------------------------------------------
    def state_dict(self) -> tuple[State, dict[str, Any]]:
        """Tensors and JSON-able metadata that must survive an aggregator restart."""
        return {}, {}

    def load_state_dict(self, tensors: State, meta: dict[str, Any]) -> None:
        return None

    def privacy_report(self) -> dict[str, Any] | None:
        """Server-side privacy accounting (central DP), if any."""
        return None

    def describe(self) -> str:
        return self.name


class StrategyWrapper(Strategy):
    """Adds cross-cutting behaviour (DP, clipping) to an inner strategy; delegates every hook."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.name = inner.name

    def configure_fit(self, round_index: int) -> FitConfig:
        return self.inner.configure_fit(round_index)

    def client_update(
        self, delta: State, *, site: str, round_index: int, generator: NoiseSource | None = None
    ) -> ClientUpdateResult:
        return self.inner.client_update(delta, site=site, round_index=round_index, generator=generator)

    def weight(self, update: UpdateInfo) -> float:
        return self.inner.weight(update)

    def average(
        self,
        global_state: State,
        updates: Sequence[UpdateInfo],
        round_index: int,
        generator: NoiseSource | None = None,
    ) -> State:
        return self.inner.average(global_state, updates, round_index, generator)

    def apply(self, global_state: State, avg_delta: State, round_index: int) -> State:
        return self.inner.apply(global_state, avg_delta, round_index)

    def state_dict(self) -> tuple[State, dict[str, Any]]:
        tensors, meta = self.inner.state_dict()
        return tensors, {"inner": meta}

    def load_state_dict(self, tensors: State, meta: dict[str, Any]) -> None:
        self.inner.load_state_dict(tensors, meta.get("inner", {}))

    def privacy_report(self) -> dict[str, Any] | None:
        return self.inner.privacy_report()

    def describe(self) -> str:
        return f"{type(self).__name__}({self.inner.describe()})"
