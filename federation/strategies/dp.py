"""Update-level differential privacy, added to any strategy by wrapping it.

* :class:`LocalUpdateDP` (FedDP-style, local): each site clips its model update to L2 norm ``C`` and adds
  ``N(0, (sigma C)^2)`` to every coordinate before upload, so the aggregator only ever sees a Gaussian-
  mechanism release of the site's update. Unit: the site's whole dataset, under *replacement*: swapping
  any of the site's data for other data can move a clipped update from ``u`` to ``u'`` with
  ``||u - u'|| <= 2C``, so the sensitivity is 2C and the effective noise multiplier is ``sigma / 2``
  (with sensitivity C, as earlier versions used, ε was under-counted: 4.0 instead of 9.0 at σ = 2 over
  3 rounds). Who must be trusted: nobody; the noise is added at the site.
* :class:`CentralDP` (DP-FedAvg, McMahan et al. 2018): the server clips each site's update to ``C``,
  averages with uniform weights, adds ``N(0, (sigma C)^2)`` to the sum. Unit: one site (add/remove of a
  site's update, sensitivity C). Every provisioned site takes part in every round (the round protocol
  samples no clients), so the accountant composes one Gaussian per round with q = 1. Who must be
  trusted: the aggregator, which sees every raw update; the guarantee holds against whoever sees only the
  published global models.

The noise of both comes from a :class:`~pipeline.dprandom.SecureRandom` (OS entropy, per job), never from
a seed. Both compose with sample-level DP-SGD in local training: the tile-level ε is recorded by local
training, the update/client-level ε here; :mod:`pipeline.statement` states them together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from federation.strategies.base import (
    Accumulator,
    ClientUpdateResult,
    State,
    Strategy,
    StrategyWrapper,
    UpdateInfo,
)
from pipeline.dprandom import NoiseSource, SecureRandom
from pipeline.privacy import gaussian_epsilon

#: L2 sensitivity of a clipped update, in units of the clip norm: replacement moves it by up to 2C
LOCAL_SENSITIVITY = 2.0
#: DP-FedAvg: adding or removing one site's clipped update moves the (uniform-weight) sum by up to C
CENTRAL_SENSITIVITY = 1.0


def l2_norm(state: State) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in state.values() if t.is_floating_point()))


def clip_and_noise(
    delta: State, clip_norm: float, noise_multiplier: float, rng: NoiseSource
) -> tuple[State, float]:
    """Scale ``delta`` to L2 norm at most ``clip_norm`` and add N(0, (sigma*clip_norm)^2) per coordinate
    (in float64 from the CSPRNG, rounded once to the tensor's dtype)."""
    norm = l2_norm(delta)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    std = noise_multiplier * clip_norm
    out: State = {}
    for k, t in delta.items():
        if not t.is_floating_point():
            out[k] = t
            continue
        x = t.to(torch.float64) * factor
        out[k] = rng.add_gaussian(x, std).to(t.dtype)
    return out, norm


class LocalUpdateDP(StrategyWrapper):
    """Sites clip and noise their own update before upload (the aggregator is not trusted)."""

    def __init__(self, inner: Strategy, clip_norm: float, noise_multiplier: float, delta: float) -> None:
        super().__init__(inner)
        if clip_norm <= 0 or noise_multiplier < 0:
            raise ValueError("LocalUpdateDP: clip_norm must be > 0 and noise_multiplier >= 0")
        self.clip_norm, self.noise_multiplier, self.delta = (
            float(clip_norm),
            float(noise_multiplier),
            float(delta),
        )

    def client_update(
        self, delta: State, *, site: str, round_index: int, generator: NoiseSource | None = None
    ) -> ClientUpdateResult:
        inner = self.inner.client_update(delta, site=site, round_index=round_index, generator=generator)
        rng = generator or SecureRandom()
        noised, norm = clip_and_noise(inner.delta, self.clip_norm, self.noise_multiplier, rng)
        return ClientUpdateResult(
            delta=noised,
            privacy={
                "mechanism": "update_gaussian",
                "unit": "site",
                "sensitivity": f"{LOCAL_SENSITIVITY:g} * clip_norm (replacement of the site's data)",
                "noise_source": rng.source,
                "clip_norm": self.clip_norm,
                "noise_multiplier": self.noise_multiplier,
                "delta": self.delta,
                "pre_clip_norm": norm,
                "clipped": norm > self.clip_norm,
            },
        )

    def update_epsilon(self, participations: int) -> tuple[float, float] | None:
        return self.epsilon(participations), self.delta

    def epsilon(self, participations: int) -> float:
        """Update-level ε(δ), per site, after a site has released ``participations`` noised updates: a
        Gaussian mechanism of sensitivity 2C and std σC per release, composed (RDP)."""
        return gaussian_epsilon(
            [(1.0, self.noise_multiplier / LOCAL_SENSITIVITY)] * participations, self.delta
        )

    def describe(self) -> str:
        return f"LocalUpdateDP({self.inner.describe()}, C={self.clip_norm}, sigma={self.noise_multiplier})"


class CentralDP(StrategyWrapper):
    """DP-FedAvg: server-side clipping, uniform averaging, Gaussian noise on the sum, RDP over rounds."""

    def __init__(
        self, inner: Strategy, clip_norm: float, noise_multiplier: float, delta: float, n_sites: int
    ) -> None:
        super().__init__(inner)
        if clip_norm <= 0 or noise_multiplier < 0 or n_sites < 1:
            raise ValueError("CentralDP: clip_norm must be > 0, noise_multiplier >= 0, n_sites >= 1")
        self.clip_norm, self.noise_multiplier, self.delta = (
            float(clip_norm),
            float(noise_multiplier),
            float(delta),
        )
        self.n_sites = int(n_sites)
        self.history: list[dict[str, Any]] = []
        self.streaming = True  # clipping is per update: the clipped sum streams whatever the inner strategy

    def weight(self, update: UpdateInfo) -> float:
        return 1.0

    def coefficient(self, update: UpdateInfo) -> float:
        c = self.clip_norm
        return min(1.0, c / update.norm) if update.norm > 0 else 1.0

    def average(
        self,
        global_state: State,
        updates: Sequence[UpdateInfo],
        round_index: int,
        generator: NoiseSource | None = None,
    ) -> State:
        if not updates:
            raise ValueError("CentralDP: no updates to aggregate")
        return Strategy.average(self, global_state, updates, round_index, generator)

    def finish(self, acc: Accumulator, round_index: int, generator: NoiseSource | None = None) -> State:
        updates = acc.updates
        if not updates:
            raise ValueError("CentralDP: no updates to aggregate")
        m = len(updates)
        c = self.clip_norm
        rng = generator or SecureRandom()
        std = self.noise_multiplier * c
        total: State = {}
        for name, t in acc.sum.items():
            total[name] = rng.add_gaussian(t, std).div_(m)  # a new tensor: acc stays as it was
        # keyed by round: a retried close replaces its entry instead of spending the round twice
        self.history = [h for h in self.history if h["round"] != round_index]
        self.history.append(
            {
                "round": round_index,
                "sites": m,
                "q": 1.0,  # every provisioned site is asked every round: no client sampling to amplify
                "noise_multiplier": self.noise_multiplier,
                "clipped": sum(1 for u in updates if u.norm > c),
            }
        )
        return total

    def epsilon(self) -> float:
        return gaussian_epsilon(
            [(h["q"], h["noise_multiplier"] / CENTRAL_SENSITIVITY) for h in self.history], self.delta
        )

    def state_dict(self) -> tuple[State, dict[str, Any]]:
        tensors, meta = super().state_dict()
        return tensors, meta | {"central_dp_history": self.history}

    def load_state_dict(self, tensors: State, meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        self.history = list(meta.get("central_dp_history", []))

    def privacy_report(self) -> dict[str, Any] | None:
        return {
            "mechanism": "dp_fedavg_central",
            "unit": "site",
            "trust": "the aggregator sees every raw update; protects sites against whoever sees only the "
            "published global models",
            "noise_source": SecureRandom.source,
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "rounds": len(self.history),
            "epsilon": self.epsilon(),
            "accountant": "rdp (opacus.accountants.analysis.rdp), one Gaussian per round, q = 1 (no client "
            "sampling), sensitivity C",
            "history": self.history,
        }

    def describe(self) -> str:
        return f"CentralDP({self.inner.describe()}, C={self.clip_norm}, sigma={self.noise_multiplier})"
