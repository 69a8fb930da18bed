"""Per-site heads: the output head never leaves a site; only the body is uploaded, averaged and published.

``federation.strategy: {name: fedavg, heads: per_site}`` (any strategy whose config is a
:class:`~federation.strategies.base.FullDeltaConfig`: fedavg, fedprox, fedadam, fedmedian, fedtrimmedavg)
wraps the strategy in :class:`PerSiteHeads`, which adds one cross-cutting rule to every hook:

* **payload** -- the declared upload is the inner strategy's over the *body* (the global model's tensors
  minus the head, :func:`pipeline.transfer.head_keys`), so the aggregator refuses an upload that carries
  a head tensor ("unexpected tensor") or a body tensor of the wrong shape before it stores anything;
* **site side** -- :class:`~federation.heads_site.PerSiteHeadSite` trains the body of the open version
  with the site's own head, kept in ``sites/<s>/state/head.safetensors`` (atomic, resumable); a site
  whose class count differs from the global model's starts its head from ``/v1/model/task``;
  :meth:`PerSiteHeads.client_update` drops any head tensor before update-level DP and encoding;
* **aggregation** -- the inner strategy averages and applies the body only; the published version keeps
  version 0's head unchanged (no site's head is in it).

Sites with different ``model.out_channels`` can therefore federate together. Update-level DP wraps this
wrapper (``LocalUpdateDP(PerSiteHeads(FedAvg))``), so it clips and noises exactly what is uploaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

from federation.payloads import PayloadSpec
from federation.strategies.base import (
    Accumulator,
    ClientUpdateResult,
    ServerContext,
    State,
    Strategy,
    StrategyWrapper,
    UpdateInfo,
)
from federation.wire import TensorSpec
from pipeline.dprandom import NoiseSource

if TYPE_CHECKING:
    from federation.site import SiteAlgorithm

V = TypeVar("V")


class PerSiteHeads(StrategyWrapper):
    """The inner strategy on the model's body; every site keeps its own head (never sent, never averaged)."""

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)
        self.head: frozenset[str] = frozenset()

    def bind(self, context: ServerContext) -> None:
        if context.model is None:
            raise ValueError("per-site heads: the strategy must be bound with the model config (head keys)")
        from pipeline.transfer import head_keys

        self.head = frozenset(head_keys(context.model))
        self.context = context
        self.inner.bind(dataclasses.replace(context, global_spec=self.body(context.global_spec)))

    def body(self, state: Mapping[str, V]) -> dict[str, V]:
        """``state`` without the head's tensors."""
        return {k: v for k, v in state.items() if k not in self.head}

    # -- payload: the body only -----------------------------------------------------------------------
    def upload_spec(self, global_spec: Mapping[str, TensorSpec], max_norm: float | None) -> PayloadSpec:
        return self.inner.upload_spec(self.body(global_spec), max_norm)

    # -- site side ---------------------------------------------------------------------------------------
    def client_update(
        self, delta: State, *, site: str, round_index: int, generator: NoiseSource | None = None
    ) -> ClientUpdateResult:
        return self.inner.client_update(
            self.body(delta), site=site, round_index=round_index, generator=generator
        )

    def site_algorithm(self) -> SiteAlgorithm:
        from federation.heads_site import PerSiteHeadSite

        return PerSiteHeadSite()

    # -- server side: average and apply the body; the published head stays version 0's ------------------
    def new_accumulator(self, global_state: State, round_index: int) -> Accumulator:
        return self.inner.new_accumulator(self.body(global_state), round_index)

    def average(
        self,
        global_state: State,
        updates: Sequence[UpdateInfo],
        round_index: int,
        generator: NoiseSource | None = None,
    ) -> State:
        return self.inner.average(self.body(global_state), updates, round_index, generator)

    def apply(self, global_state: State, avg_delta: State, round_index: int) -> State:
        stray = sorted(k for k in avg_delta if k in self.head)
        if stray:
            raise ValueError(f"per-site heads: the averaged delta holds head tensor {stray[0]!r}")
        new_body = self.inner.apply(self.body(global_state), avg_delta, round_index)
        return {k: (v if k in self.head else new_body[k]) for k, v in global_state.items()}

    def describe(self) -> str:
        return f"PerSiteHeads({self.inner.describe()})"
