"""The strategy base class: a few hooks, one algorithm per module, DP added by wrapping.

A strategy is an ABC; a new method implements :meth:`Strategy.apply` (required) and overrides only the
hooks it needs:

* **payload** -- :meth:`upload_spec` declares the tensors a site uploads (default: a full delta of the
  global model), :meth:`encode_update` turns the site's delta into them, :meth:`iter_delta` decodes a
  stored upload back into delta tensors one at a time on the server;
* **site side** -- :meth:`configure_fit` (per round and per site) says how to train locally,
  :meth:`client_update` may transform the delta before upload (update-level DP);
* **event-driven aggregation** -- :meth:`on_update` folds one accepted update into an
  :class:`Accumulator` as it arrives (memory: one model, whatever the number of sites),
  :meth:`should_publish` decides when a new global version is due, :meth:`finish` turns the accumulator
  into the averaged delta and :meth:`apply` into the next global model. Round-based FedAvg is one policy
  of :meth:`should_publish`; a strategy whose statistic cannot be streamed (the coordinate-wise median)
  sets ``streaming = False`` and overrides :meth:`average`, which sees every stored update at the close;
* **durable state** -- :meth:`state_dict` / :meth:`load_state_dict`, saved with every version.

Each strategy module also declares its config (a pydantic model whose ``name`` is the discriminator)
and ``from_config``; :mod:`federation.strategies.registry` lists the strategies, one line each.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from federation.payloads import FitConfig, PayloadSpec, full_delta_spec
from federation.wire import TensorSpec, iter_tensors
from pipeline.dprandom import NoiseSource

if TYPE_CHECKING:
    from federation.site import SiteAlgorithm
    from pipeline.config import ModelConfig

State = dict[str, torch.Tensor]


class StrategyConfig(BaseModel):
    """Base of every strategy's config; ``name`` picks the strategy (the union's discriminator)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str


class FullDeltaConfig(StrategyConfig):
    """Config of a strategy whose sites upload a full delta of the model: its head may stay per site."""

    heads: Literal["shared", "per_site"] = Field(
        "shared",
        description="per_site: the output head never leaves a site (kept in sites/<s>/state/), only the "
        "body is uploaded and averaged, so sites with different class counts federate together",
    )


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
    kind: str = "full_delta"

    @property
    def based_on(self) -> int:
        """The global version the site trained from."""
        return self.round if self.late_from is None else self.late_from

    @property
    def staleness(self) -> int:
        """Versions published between the one the site trained from and the one this update counts in."""
        return self.round - self.based_on


@dataclass
class ClientUpdateResult:
    """The delta a site uploads and, for update-level DP, what its accountant must record."""

    delta: State
    privacy: dict[str, Any] | None = None


@dataclass
class Accumulator:
    """The running sum of the updates of one version: ``sum_i coefficient(u_i) * delta_i``, O(model)."""

    round: int
    sum: State
    weight: float = 0.0
    updates: list[UpdateInfo] = field(default_factory=list)

    def holds(self, updates: Sequence[UpdateInfo]) -> bool:
        """Whether it holds exactly these updates (same files, same bytes)."""
        return sorted((u.site, u.sha256) for u in self.updates) == sorted((u.site, u.sha256) for u in updates)


@dataclass(frozen=True)
class PublishView:
    """What :meth:`Strategy.should_publish` may look at: the open version's updates and the clock."""

    accepted: int
    n_sites: int
    min_sites: int
    close_policy: str
    deadline_passed: bool
    resume: bool = False


@dataclass
class ServerContext:
    """What a strategy may use on the server besides the updates: the model and server-held data."""

    model_builder: Callable[[], torch.nn.Module] | None = None
    #: a server manifest naming unlabelled or public tiles (e.g. synthetic slides) for server-side
    #: distillation or restoration; None: the server holds no data
    server_manifest: Path | None = None
    #: those tiles, tiled by ``fedpath pretrain`` (None: not tiled yet)
    server_store: Path | None = None
    #: where the server stored ``(round, site)``'s accepted update (for methods that revisit old ones)
    update_path: Callable[[int, str], Path] | None = None
    #: labelled validation tiles the server holds (``federation.server_val_manifest``, tiled by ``fedpath
    #: pretrain``); None: the server holds no labels
    server_val_store: Path | None = None
    global_spec: Mapping[str, TensorSpec] = field(default_factory=dict)
    #: the network of the federation (the server's config; a site's own, whose class count may differ)
    model: ModelConfig | None = None


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


class Strategy(ABC):
    """Base strategy: FedAvg-style weighted averaging by training tiles; subclasses override hooks."""

    name = "base"
    #: the averaged delta can be accumulated update by update as they arrive
    streaming = True
    context: ServerContext | None = None
    #: the strategy's config model (its ``name`` literal is the discriminator of the config union)
    Config: type[StrategyConfig] = StrategyConfig

    @classmethod
    def from_config(cls, c: StrategyConfig) -> Strategy:
        """The strategy built from its validated config (each registered strategy defines this)."""
        raise TypeError(f"{cls.__name__} is not built from a config (it wraps another strategy)")

    def bind(self, context: ServerContext) -> None:
        """Give the strategy the server's context (model builder, server-held data)."""
        self.context = context

    # -- payload -----------------------------------------------------------------------------------
    def upload_spec(self, global_spec: Mapping[str, TensorSpec], max_norm: float | None) -> PayloadSpec:
        """The payload a site uploads; default: a full delta of the global model."""
        return full_delta_spec(global_spec, max_norm)

    def encode_update(self, delta: State, fit: FitConfig) -> State:
        """The tensors a site sends for ``delta`` (already through :meth:`client_update`)."""
        return delta

    def iter_delta(self, update: UpdateInfo, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The stored update decoded into delta tensors, one at a time (only ``names``)."""
        yield from iter_tensors(update.path, names)

    # -- site side ---------------------------------------------------------------------------------
    def configure_fit(self, round_index: int, site: str | None = None) -> FitConfig:
        return FitConfig()

    def client_update(
        self, delta: State, *, site: str, round_index: int, generator: NoiseSource | None = None
    ) -> ClientUpdateResult:
        return ClientUpdateResult(delta=delta)

    def download_payload(self) -> State | None:
        """The compressed form of the version just applied (its delta), if downloads are compressed."""
        return None

    def site_algorithm(self) -> SiteAlgorithm:
        """How a site fetches a version and trains locally (default: full download, plain DP-SGD)."""
        from federation.site import PlainSite

        return PlainSite()

    def update_epsilon(self, participations: int) -> tuple[float, float] | None:
        """Update-level (ε, δ) per site after ``participations`` releases, if the site adds noise."""
        return None

    def admit(self, site: str, round_index: int) -> str | None:
        """Why the strategy refuses an update of ``site`` for ``round_index`` (None: admitted)."""
        return None

    # -- server side: event-driven aggregation -------------------------------------------------------
    def weight(self, update: UpdateInfo) -> float:
        return float(update.n_tiles)

    def coefficient(self, update: UpdateInfo) -> float:
        """Factor of the update's delta in the running sum (default: its weight)."""
        return self.weight(update)

    def new_accumulator(self, global_state: State, round_index: int) -> Accumulator:
        names = float_names(global_state)
        return Accumulator(
            round_index, {k: torch.zeros_like(global_state[k], dtype=torch.float32) for k in names}
        )

    def on_update(self, acc: Accumulator, update: UpdateInfo) -> None:
        """Fold one accepted update into the running sum (one tensor of it resident at a time)."""
        c = float(self.coefficient(update))
        if c != 0.0:
            for name, t in self.iter_delta(update, list(acc.sum)):
                acc.sum[name].add_(t.to(torch.float32), alpha=c)
        acc.weight += float(self.weight(update))
        acc.updates.append(update)

    def should_publish(self, view: PublishView) -> bool:
        """Round-based policy: every site reported, or ``min_sites`` did and the policy or deadline allow."""
        m = view.accepted
        if view.resume and m >= view.min_sites:  # a publish already decided (or retried)
            return True
        if m >= view.n_sites:
            return True
        if m >= view.min_sites:
            return view.close_policy == "min_sites" or view.deadline_passed
        return False

    def finish(self, acc: Accumulator, round_index: int, generator: NoiseSource | None = None) -> State:
        """The averaged delta of an accumulator (it is left untouched, so a retried publish can reuse it)."""
        if not acc.updates:
            raise ValueError("average: no updates to aggregate")
        if acc.weight <= 0:
            raise ValueError("average: total update weight is zero")
        return {k: v / acc.weight for k, v in acc.sum.items()}

    def average(
        self,
        global_state: State,
        updates: Sequence[UpdateInfo],
        round_index: int,
        generator: NoiseSource | None = None,
    ) -> State:
        """Weighted mean of the updates' deltas (weights from :meth:`weight`), streamed from disk."""
        if not updates:
            raise ValueError("average: no updates to aggregate")
        acc = self.new_accumulator(global_state, round_index)
        for u in updates:
            self.on_update(acc, u)
        return self.finish(acc, round_index, generator)

    @abstractmethod
    def apply(self, global_state: State, avg_delta: State, round_index: int) -> State:
        """Turn the averaged delta into the next global model; non-float tensors are kept."""

    def aggregate(
        self,
        global_state: State,
        updates: Sequence[UpdateInfo],
        round_index: int,
        generator: NoiseSource | None = None,
        accumulated: Accumulator | None = None,
    ) -> State:
        """The next global model; uses ``accumulated`` when it holds exactly ``updates``."""
        if self.streaming and accumulated is not None and accumulated.holds(updates):
            avg = self.finish(accumulated, round_index, generator)
        else:
            avg = self.average(global_state, updates, round_index, generator)
        return self.apply(global_state, avg, round_index)

    # -- durable server-side state ---------------------------------------------------------------
    def begin_round(self, round_index: int, *attrs: str) -> None:
        """Server state ``attrs`` (dicts of tensors, e.g. a momentum) as :meth:`apply` of ``round_index``
        must start from. A publish retried after a crash applies the same round again: that retry starts
        from the state the round's first application started from, not from its result. Otherwise the
        state is kept for such a retry."""
        before: tuple[int, dict[str, State]] | None = getattr(self, "_before_round", None)
        if before is not None and before[0] == round_index:
            for a in attrs:
                setattr(self, a, dict(before[1][a]))
        else:
            self._before_round = (round_index, {a: dict(getattr(self, a)) for a in attrs})

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
        self.streaming = inner.streaming

    def bind(self, context: ServerContext) -> None:
        super().bind(context)
        self.inner.bind(context)

    def upload_spec(self, global_spec: Mapping[str, TensorSpec], max_norm: float | None) -> PayloadSpec:
        return self.inner.upload_spec(global_spec, max_norm)

    def encode_update(self, delta: State, fit: FitConfig) -> State:
        return self.inner.encode_update(delta, fit)

    def iter_delta(self, update: UpdateInfo, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        return self.inner.iter_delta(update, names)

    def configure_fit(self, round_index: int, site: str | None = None) -> FitConfig:
        return self.inner.configure_fit(round_index, site)

    def client_update(
        self, delta: State, *, site: str, round_index: int, generator: NoiseSource | None = None
    ) -> ClientUpdateResult:
        return self.inner.client_update(delta, site=site, round_index=round_index, generator=generator)

    def update_epsilon(self, participations: int) -> tuple[float, float] | None:
        return self.inner.update_epsilon(participations)

    def download_payload(self) -> State | None:
        return self.inner.download_payload()

    def site_algorithm(self) -> SiteAlgorithm:
        return self.inner.site_algorithm()

    def admit(self, site: str, round_index: int) -> str | None:
        return self.inner.admit(site, round_index)

    def weight(self, update: UpdateInfo) -> float:
        return self.inner.weight(update)

    def coefficient(self, update: UpdateInfo) -> float:
        return self.inner.coefficient(update)

    def new_accumulator(self, global_state: State, round_index: int) -> Accumulator:
        return self.inner.new_accumulator(global_state, round_index)

    def should_publish(self, view: PublishView) -> bool:
        return self.inner.should_publish(view)

    def finish(self, acc: Accumulator, round_index: int, generator: NoiseSource | None = None) -> State:
        return self.inner.finish(acc, round_index, generator)

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
