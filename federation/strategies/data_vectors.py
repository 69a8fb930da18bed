"""Data vectors (Tian et al., arXiv 2408.13038): one-shot, asynchronous merging of fine-tuned models.

Every site fine-tunes the published θ_pre (version 0: the server's pretrained model, or the configured
initial model) once, whenever it is ready, with DP-SGD on its own ledger, and uploads its data vector
τ_i = θ_i − θ_pre **once**. The server publishes θ_pre + λ·Σ τ_i as soon as ``min_sites`` vectors have
arrived, then a new version whenever a later vector arrives; no site waits for another and no site
re-runs. Each version's header records which vectors it contains (the server's version history).

* λ: ``sum`` (λ = 1, the seed paper), ``mean`` (λ = 1/n), or a number.
* The payload is a full delta of the model's tensors (one τ), checked like FedAvg's, and a site may
  contribute only one vector: a second one is refused (409), whatever the site claims.
* Sites always train from version 0 (:class:`DataVectorSite`), so a late vector is never stale: it is
  relative to the same θ_pre as the others.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from federation.site import PlainSite, SiteAlgorithm
from federation.strategies.base import Accumulator, PublishView, State, Strategy, StrategyConfig
from pipeline.merging import merge

PREFIX_PRE, PREFIX_SUM = "pre.", "sum."


class DataVectorsConfig(StrategyConfig):
    name: Literal["data_vectors"] = "data_vectors"
    lam: Literal["sum", "mean"] | float = Field(
        "sum", description="merge coefficient: 'sum' (λ=1, the seed paper), 'mean' (λ=1/n) or a number"
    )
    restore: Literal["none", "distil"] = Field(
        "none",
        description="restoration of the merged model: none, or distillation from the sites' local models "
        "(θ_pre + τ_i) onto the server's own tiles (needs federation.server_manifest, `fedpath pretrain`)",
    )
    distil_steps: int = Field(100, ge=1)
    distil_batch: int = Field(16, ge=1)
    distil_lr: float = Field(5e-4, gt=0)
    temperature: float = Field(2.0, gt=0)


class DataVectorSite(PlainSite):
    """Fine-tune θ_pre (version 0) whatever version is open; the job uploads τ = θ_site − θ_pre."""

    one_shot = True

    def fetch_global(self, client: Any, cfg: Any, site: str, r: int) -> State:
        return super().fetch_global(client, cfg, site, 0)

    def train(self, cfg: Any, site: str, r: int, global_state: State, fit: Any) -> Any:
        from pipeline.train import train_local

        return train_local(
            cfg, [site], cfg.run_dir, init_state={k: v.clone() for k, v in global_state.items()},
            round_index=r, job_id="data-vector", progress=False,
        )


class DataVectors(Strategy):
    name = "data_vectors"
    Config = DataVectorsConfig

    def __init__(self, cfg: DataVectorsConfig | None = None) -> None:
        self.cfg = cfg or DataVectorsConfig()
        self._pre: State | None = None
        self._total: State | None = None  # Σ τ over every published version
        self._base_total: State | None = None  # Σ τ before the version being published
        self._n = 0
        self._base_n = 0
        self._last_round = -1
        self._pending_n = 0
        #: site -> the round its vector was counted in (a site contributes once)
        self.contributed: dict[str, int] = {}
        self._pending_sites: list[str] = []
        self.last_restoration: dict[str, Any] = {}

    @classmethod
    def from_config(cls, c: StrategyConfig) -> Strategy:
        assert isinstance(c, DataVectorsConfig)
        return cls(c)

    def site_algorithm(self) -> SiteAlgorithm:
        return DataVectorSite()

    def admit(self, site: str, round_index: int) -> str | None:
        r = self.contributed.get(site)
        if r is not None and r != round_index:
            return f"site {site!r} already contributed its data vector (counted in round {r}); one per site"
        return None

    def weight(self, update: Any) -> float:
        return 1.0

    def should_publish(self, view: PublishView) -> bool:
        """The first version waits for ``min_sites`` vectors; every later vector publishes at once."""
        need = view.min_sites if self._n == 0 else 1
        if view.resume and view.accepted >= need:
            return True
        return view.accepted >= need

    def finish(self, acc: Accumulator, round_index: int, generator: Any = None) -> State:
        if not acc.updates:
            raise ValueError("data_vectors: no vectors to merge")
        self._pending_n = len(acc.updates)
        self._pending_sites = [u.site for u in acc.updates]
        return {k: v.clone() for k, v in acc.sum.items()}  # Σ τ of this version (weights are 1)

    def lam(self, n: int) -> float:
        c = self.cfg.lam
        return 1.0 if c == "sum" else 1.0 / n if c == "mean" else float(c)

    def apply(self, global_state: State, avg_delta: State, round_index: int) -> State:
        if self._pre is None:  # the first publish: the current global model is θ_pre
            self._pre = {k: v.detach().clone() for k, v in global_state.items()}
        if round_index != self._last_round:  # a retried publish of the same version reuses the base
            self._base_total, self._base_n = self._total, self._n
            self._last_round = round_index
        base = self._base_total or {k: torch.zeros_like(v, dtype=torch.float64) for k, v in avg_delta.items()}
        self._total = {k: base[k] + avg_delta[k].double() for k in avg_delta}
        self._n = self._base_n + self._pending_n
        for s in self._pending_sites:
            self.contributed[s] = round_index
        out = merge(self._pre, [self._total], self.lam(self._n))  # θ_pre + λ·Σ τ_i (pipeline.merging)
        if self.cfg.restore == "distil":
            out = self._restore(out)
        return out

    def _restore(self, merged: State) -> State:
        """Distil every contributed local model (θ_pre + τ_i) into the merged model on server tiles."""
        from federation.strategies.universal import distil_on_server
        from federation.wire import iter_tensors

        ctx = self.context
        if ctx is None or ctx.update_path is None or self._pre is None:
            raise ValueError("data_vectors: restoration needs the server context (update paths)")
        teachers = []
        for site, r in sorted(self.contributed.items()):
            m = {k: v.clone() for k, v in self._pre.items()}
            for k, d in iter_tensors(ctx.update_path(r, site), [k for k in m if m[k].is_floating_point()]):
                m[k] = (m[k].double() + d.double()).to(m[k].dtype)
            teachers.append(m)
        c = self.cfg
        state, self.last_restoration = distil_on_server(
            self, teachers, merged, None, c.distil_steps, c.distil_batch, c.distil_lr, c.temperature, seed=self._n
        )
        return state

    def state_dict(self) -> tuple[State, dict[str, Any]]:
        if self._pre is None or self._total is None:
            return {}, {"n": 0, "contributed": self.contributed}
        tensors = {PREFIX_PRE + k: v.contiguous() for k, v in self._pre.items()}
        tensors |= {PREFIX_SUM + k: v.contiguous() for k, v in self._total.items()}
        return tensors, {"n": self._n, "last_round": self._last_round, "contributed": self.contributed}

    def load_state_dict(self, tensors: State, meta: dict[str, Any]) -> None:
        pre = {k[len(PREFIX_PRE):]: v for k, v in tensors.items() if k.startswith(PREFIX_PRE)}
        tot = {k[len(PREFIX_SUM):]: v for k, v in tensors.items() if k.startswith(PREFIX_SUM)}
        self._pre = pre or None
        self._total = tot or None
        self._n = int(meta.get("n", 0))
        self._last_round = int(meta.get("last_round", -1))
        self.contributed = {str(s): int(r) for s, r in dict(meta.get("contributed", {})).items()}

    def describe(self) -> str:
        return f"data_vectors(lam={self.cfg.lam})"
