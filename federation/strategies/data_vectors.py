"""Data vectors (Tian et al., arXiv 2408.13038): one-shot, asynchronous merging of fine-tuned models.

Every site fine-tunes the published θ_pre (version 0: the server's pretrained model, or the configured
initial model) once, whenever it is ready, with DP-SGD on its own ledger, and uploads its data vector
τ_i = θ_i − θ_pre **once**. The server publishes θ_pre + λ·Σ τ_i as soon as ``min_sites`` vectors have
arrived, then a new version whenever a later vector arrives; no site waits for another and no site
re-runs. Each version's header records which vectors it contains (the server's version history).

* λ: ``sum`` (λ = 1, the seed paper), ``mean`` (λ = 1/n), a number, or ``tuned``: the λ of a grid
  (1/n … 1.5) whose merged model scores the best Dice on the server's own labelled validation tiles
  (``federation.server_val_manifest``, tiled by ``fedpath pretrain``; never a site's data).
* The payload is a full delta of the model's tensors (one τ), checked like FedAvg's, and a site may
  contribute only one vector: a second one is refused (409), whatever the site claims.
* Sites always train from version 0 (:class:`DataVectorSite`), so a late vector is never stale: it is
  relative to the same θ_pre as the others.
* Restoration (GroupNorm has no statistics to re-align): ``restore: distil`` distils the sites' local
  models (θ_pre + τ_i) into the merged model on the server's own tiles; ``restore: finetune`` has one
  designated site (``restore_site``) fine-tune the first merged version for ``restore_steps`` DP-SGD steps
  on its own ledger and upload that delta, its one extra update. The site calibrates σ over its vector's
  steps plus the restoration's from the start, so both jobs together end at its ``target_epsilon``. The
  restoration delta is kept and added to every later merge (a late vector does not undo it; it was fitted
  to the first merge, so on a later one it is an approximation).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from federation.site import PlainSite, SiteAlgorithm, uploaded_rounds
from federation.strategies.base import Accumulator, PublishView, State, Strategy, StrategyConfig
from pipeline.merging import merge, tune_lambda, validation_dice

PREFIX_PRE, PREFIX_SUM, PREFIX_RESTORE = "pre.", "sum.", "restore."


class DataVectorsConfig(StrategyConfig):
    name: Literal["data_vectors"] = "data_vectors"
    lam: Literal["sum", "mean", "tuned"] | float = Field(
        "sum",
        description="merge coefficient: 'sum' (λ=1, the seed paper), 'mean' (λ=1/n), a number, or 'tuned' "
        "(best Dice on the server's labelled validation tiles, federation.server_val_manifest)",
    )
    restore: Literal["none", "distil", "finetune"] = Field(
        "none",
        description="restoration of the merged model: none; distil: distillation from the sites' local models "
        "(θ_pre + τ_i) onto the server's own tiles (needs federation.server_manifest, `fedpath pretrain`); "
        "finetune: a short DP fine-tune of the first merged version at restore_site, on its ledger",
    )
    restore_site: str | None = Field(None, description="restore: finetune: the site that fine-tunes")
    restore_steps: int = Field(30, ge=1, le=100_000, description="restore: finetune: its DP-SGD steps")
    distil_steps: int = Field(100, ge=1)
    distil_batch: int = Field(16, ge=1)
    distil_lr: float = Field(5e-4, gt=0)
    temperature: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _restore_site(self) -> DataVectorsConfig:
        if self.restore == "finetune" and not self.restore_site:
            raise ValueError("restore: finetune needs restore_site (the site that fine-tunes the merged model)")
        return self


class DataVectorSite(PlainSite):
    """Fine-tune θ_pre (version 0) whatever version is open; the job uploads τ = θ_site − θ_pre.

    The restoring site (``restore: finetune``) sends a second update: its next job after the vector
    fine-tunes the newest version (the merge) and uploads that delta."""

    def __init__(self, cfg: DataVectorsConfig | None = None) -> None:
        self.cfg = cfg or DataVectorsConfig()

    def restores(self, site: str) -> bool:
        return self.cfg.restore == "finetune" and site == self.cfg.restore_site

    def contributed_enough(self, cfg: Any, site: str, uploaded: list[int]) -> bool:
        return len(uploaded) >= (2 if self.restores(site) else 1)

    def _restoring(self, cfg: Any, site: str, r: int) -> bool:
        from fedcore.layout import RunLayout

        return self.restores(site) and len(uploaded_rounds(RunLayout(cfg.run_dir).site(site), r)) == 1

    def fetch_global(self, client: Any, cfg: Any, site: str, r: int) -> State:
        return super().fetch_global(client, cfg, site, r if self._restoring(cfg, site, r) else 0)

    def train(self, cfg: Any, site: str, r: int, global_state: State, fit: Any) -> Any:
        from pipeline.train import train_local

        steps = cfg.train.max_steps
        if steps is None:
            raise ValueError("data_vectors: set train.max_steps (the steps of a site's one fine-tune)")
        restoring = self._restoring(cfg, site, r)
        # the restoring site plans its σ over both jobs, so the two together end at its target ε
        plan = steps + self.cfg.restore_steps if self.restores(site) else steps
        return train_local(
            cfg, [site], cfg.run_dir, init_state={k: v.clone() for k, v in global_state.items()},
            round_index=r, job_id="restore" if restoring else "data-vector", progress=False,
            max_steps=self.cfg.restore_steps if restoring else steps, plan_steps=plan,
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
        #: restore: finetune: the restoring site's delta (added to every merge), the round it came in
        self._restoration: State | None = None
        self._base_restoration: State | None = None
        self._pending_restoration: State | None = None
        self.restoration_round: int | None = None
        self.last_restoration: dict[str, Any] = {}
        #: the last tuning of λ: the chosen λ and every λ's validation Dice
        self.last_tuning: dict[str, Any] = {}

    @classmethod
    def from_config(cls, c: StrategyConfig) -> Strategy:
        assert isinstance(c, DataVectorsConfig)
        return cls(c)

    def site_algorithm(self) -> SiteAlgorithm:
        return DataVectorSite(self.cfg)

    def _is_restoration(self, site: str, round_index: int) -> bool:
        r = self.contributed.get(site)
        return (
            self.cfg.restore == "finetune" and site == self.cfg.restore_site and r is not None and r != round_index
        )

    def admit(self, site: str, round_index: int) -> str | None:
        r = self.contributed.get(site)
        if r is None or r == round_index:
            return None
        if self._is_restoration(site, round_index) and self.restoration_round in (None, round_index):
            return None
        return f"site {site!r} already contributed its data vector (counted in round {r}); one per site"

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
        vectors = [u for u in acc.updates if not self._is_restoration(u.site, round_index)]
        restorations = [u for u in acc.updates if self._is_restoration(u.site, round_index)]
        self._pending_n = len(vectors)
        self._pending_sites = [u.site for u in vectors]
        total = {k: v.clone() for k, v in acc.sum.items()}  # Σ of this version's updates (weights are 1)
        self._pending_restoration = None
        if restorations:  # the restoration is not a vector: take it out of the sum
            names = list(total)
            restoration = dict(self.iter_delta(restorations[0], names))
            self._pending_restoration = {k: restoration[k].double() for k in names}
            total = {k: total[k].double() - self._pending_restoration[k] for k in names}
        return total

    def lam(self, n: int) -> float:
        c = self.cfg.lam
        if c == "tuned":
            raise ValueError("data_vectors: a tuned λ is chosen at merge time (tuned_lambda)")
        return 1.0 if c == "sum" else 1.0 / n if c == "mean" else float(c)

    def tuned_lambda(self, pre: State, total: State, n: int) -> float:
        """λ on the server's labelled validation tiles (Dice of θ_pre + λ·Σ τ over a grid)."""
        ctx = self.context
        if ctx is None or ctx.model_builder is None or ctx.server_val_store is None:
            raise ValueError(
                "data_vectors: lam 'tuned' needs labelled validation tiles on the server: set "
                "federation.server_val_manifest and run `fedpath pretrain`"
            )
        builder, store = ctx.model_builder, ctx.server_val_store
        best, scores = tune_lambda(pre, [total], lambda state: validation_dice(builder, state, store), n=n)
        self.last_tuning = {"lam": best, "scores": scores, "n": n}
        return best

    def apply(self, global_state: State, avg_delta: State, round_index: int) -> State:
        if self._pre is None:  # the first publish: the current global model is θ_pre
            self._pre = {k: v.detach().clone() for k, v in global_state.items()}
        if round_index != self._last_round:  # a retried publish of the same version reuses the base
            self._base_total, self._base_n = self._total, self._n
            self._base_restoration = self._restoration
            self._last_round = round_index
        base = self._base_total or {k: torch.zeros_like(v, dtype=torch.float64) for k, v in avg_delta.items()}
        self._total = {k: base[k] + avg_delta[k].double() for k in avg_delta}
        self._n = self._base_n + self._pending_n
        for s in self._pending_sites:
            self.contributed[s] = round_index
        lam = self.tuned_lambda(self._pre, self._total, self._n) if self.cfg.lam == "tuned" else self.lam(self._n)
        out = merge(self._pre, [self._total], lam)  # θ_pre + λ·Σ τ_i (pipeline.merging)
        if self.cfg.restore == "distil":
            out = self._restore(out)
        self._restoration = self._base_restoration
        if self._pending_restoration is not None:
            self._restoration = self._pending_restoration
            self.restoration_round = round_index
        if self._restoration is not None:  # the designated site's DP fine-tune of the merge
            out = {k: (v.double() + self._restoration[k]).to(v.dtype) if k in self._restoration else v
                   for k, v in out.items()}
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
        if self._restoration is not None:
            tensors |= {PREFIX_RESTORE + k: v.contiguous() for k, v in self._restoration.items()}
        return tensors, {"n": self._n, "last_round": self._last_round, "contributed": self.contributed,
                         "restoration_round": self.restoration_round}

    def load_state_dict(self, tensors: State, meta: dict[str, Any]) -> None:
        pre = {k[len(PREFIX_PRE):]: v for k, v in tensors.items() if k.startswith(PREFIX_PRE)}
        tot = {k[len(PREFIX_SUM):]: v for k, v in tensors.items() if k.startswith(PREFIX_SUM)}
        res = {k[len(PREFIX_RESTORE):]: v for k, v in tensors.items() if k.startswith(PREFIX_RESTORE)}
        self._pre = pre or None
        self._total = tot or None
        self._restoration = res or None
        rr = meta.get("restoration_round")
        self.restoration_round = None if rr is None else int(rr)
        self._n = int(meta.get("n", 0))
        self._last_round = int(meta.get("last_round", -1))
        self.contributed = {str(s): int(r) for s, r in dict(meta.get("contributed", {})).items()}

    def describe(self) -> str:
        restore = f", restore={self.cfg.restore}" + (f"@{self.cfg.restore_site}" if self.cfg.restore == "finetune" else "")
        return f"data_vectors(lam={self.cfg.lam}{restore})"
