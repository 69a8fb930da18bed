"""Update-level differential privacy, added to any strategy by wrapping it.

* :class:`LocalUpdateDP` (FedDP-style, local): each site clips its model update to L2 norm ``C`` and adds
  ``N(0, (sigma C)^2)`` to every coordinate before upload, so the aggregator only ever sees a Gaussian-
  mechanism release of the site's update. The site's accountant composes one full-participation Gaussian
  mechanism per round it takes part in (RDP, Opacus' analysis with q = 1).
* :class:`CentralDP` (DP-FedAvg, McMahan et al. 2018): the trusted server clips each site's update to
  ``C``, averages them with uniform weights (a site's influence on the sum is then at most ``C``), adds
  ``N(0, (sigma C)^2)`` to the sum, i.e. ``sigma C / m`` to the mean of ``m`` updates, and keeps a
  client-level RDP accountant over rounds with sampling rate ``q = m / n``.

Both compose with sample-level DP-SGD in local training: the tile-level ε is recorded by local training,
the update/client-level ε here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from federation.strategies.base import (
    ClientUpdateResult,
    State,
    Strategy,
    StrategyWrapper,
    UpdateInfo,
    float_names,
    new_generator,
    streaming_sum,
)

#: RDP orders (Opacus' RDPAccountant defaults)
RDP_ORDERS: list[float] = [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)]


def gaussian_rdp_epsilon(rounds: Sequence[tuple[float, float]], delta: float) -> float:
    """ε(δ) of composing sampled Gaussian mechanisms, one ``(q, noise_multiplier)`` per round."""
    # imported here: importing opacus pulls in its whole privacy engine (seconds), which the
    # aggregator does not need unless it accounts
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    if not rounds:
        return 0.0
    if any(sigma <= 0 for _, sigma in rounds):
        return math.inf
    rdp = np.zeros(len(RDP_ORDERS))
    for q, sigma in rounds:
        rdp = rdp + np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDP_ORDERS))
    eps, _ = get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def l2_norm(state: State) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in state.values() if t.is_floating_point()))


def clip_and_noise(
    delta: State, clip_norm: float, noise_multiplier: float, generator: torch.Generator
) -> tuple[State, float]:
    """Scale ``delta`` to L2 norm at most ``clip_norm`` and add N(0, (sigma*clip_norm)^2) per coordinate."""
    norm = l2_norm(delta)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    std = noise_multiplier * clip_norm
    out: State = {}
    for k, t in delta.items():
        if not t.is_floating_point():
            out[k] = t
            continue
        x = t.to(torch.float32) * factor
        if std > 0:
            x = x + torch.randn(x.shape, generator=generator, dtype=torch.float32) * std
        out[k] = x.to(t.dtype)
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
        self, delta: State, *, site: str, round_index: int, generator: torch.Generator | None = None
    ) -> ClientUpdateResult:
        inner = self.inner.client_update(delta, site=site, round_index=round_index, generator=generator)
        noised, norm = clip_and_noise(
            inner.delta, self.clip_norm, self.noise_multiplier, generator or new_generator()
        )
        return ClientUpdateResult(
            delta=noised,
            privacy={
                "mechanism": "update_gaussian",
                "clip_norm": self.clip_norm,
                "noise_multiplier": self.noise_multiplier,
                "delta": self.delta,
                "pre_clip_norm": norm,
                "clipped": norm > self.clip_norm,
            },
        )

    def epsilon(self, participations: int) -> float:
        """Update-level ε(δ) after a site has released ``participations`` noised updates."""
        return gaussian_rdp_epsilon([(1.0, self.noise_multiplier)] * participations, self.delta)

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

    def weight(self, update: UpdateInfo) -> float:
        return 1.0

    def average(
        self,
        global_state: State,
        updates: Sequence[UpdateInfo],
        round_index: int,
        generator: torch.Generator | None = None,
    ) -> State:
        if not updates:
            raise ValueError("CentralDP: no updates to aggregate")
        m = len(updates)
        c = self.clip_norm

        def coef(u: UpdateInfo) -> float:
            return min(1.0, c / u.norm) if u.norm > 0 else 1.0

        total = streaming_sum(updates, coef, float_names(global_state), global_state)
        gen = generator or new_generator()
        std = self.noise_multiplier * c
        for t in total.values():
            if std > 0:
                t.add_(torch.randn(t.shape, generator=gen, dtype=torch.float32), alpha=std)
            t.div_(m)
        # keyed by round: a retried close replaces its entry instead of spending the round twice
        self.history = [h for h in self.history if h["round"] != round_index]
        self.history.append(
            {
                "round": round_index,
                "sites": m,
                "q": min(1.0, m / self.n_sites),
                "noise_multiplier": self.noise_multiplier,
                "clipped": sum(1 for u in updates if u.norm > c),
            }
        )
        return total

    def epsilon(self) -> float:
        return gaussian_rdp_epsilon([(h["q"], h["noise_multiplier"]) for h in self.history], self.delta)

    def state_dict(self) -> tuple[State, dict[str, Any]]:
        tensors, meta = super().state_dict()
        return tensors, meta | {"central_dp_history": self.history}

    def load_state_dict(self, tensors: State, meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        self.history = list(meta.get("central_dp_history", []))

    def privacy_report(self) -> dict[str, Any] | None:
        return {
            "mechanism": "dp_fedavg_central",
            "unit": "client (site)",
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "rounds": len(self.history),
            "epsilon": self.epsilon(),
            "accountant": "rdp (opacus.accountants.analysis.rdp), q = reporting sites / provisioned sites",
            "history": self.history,
        }

    def describe(self) -> str:
        return f"CentralDP({self.inner.describe()}, C={self.clip_norm}, sigma={self.noise_multiplier})"
