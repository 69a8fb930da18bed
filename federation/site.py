"""Site algorithms: how a site turns the downloaded global version into a trained local model.

The round job (:func:`federation.client.run_site_round`) is the same for every method: wait for an open
version, fetch it, train, encode the payload the strategy declares, upload. What differs is behind two
hooks of a :class:`SiteAlgorithm`:

* :meth:`SiteAlgorithm.fetch_global` -- download the version (full, or as a compressed delta applied to
  the copy kept in the site's private state);
* :meth:`SiteAlgorithm.train` -- local training from it (plain DP-SGD for FedAvg/FedProx/FedAdam; mutual
  distillation with a personal teacher for FedMIC, :mod:`federation.fedmic_site`).

A strategy returns its site algorithm from :meth:`Strategy.site_algorithm` (default: :class:`PlainSite`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Protocol

import torch

from fedcore.layout import SiteLayout
from federation.payloads import FitConfig
from pipeline.config import ExperimentConfig
from pipeline.errors import FedpathError

if TYPE_CHECKING:
    from federation.client import SiteClient
    from pipeline.train import TrainResult

State = dict[str, torch.Tensor]


def uploaded_rounds(layout: SiteLayout, before: int) -> list[int]:
    """The rounds before ``before`` in which the site's update was accepted (its ``done.json``)."""
    out = []
    for q in range(before):
        d = layout.done(q)
        if d.is_file() and json.loads(d.read_text()).get("outcome") == "uploaded":
            out.append(q)
    return out


class SiteAlgorithm(Protocol):
    def contributed_enough(self, cfg: ExperimentConfig, site: str, uploaded: list[int]) -> bool: ...

    def fetch_global(self, client: SiteClient, cfg: ExperimentConfig, site: str, r: int) -> State: ...

    def train(
        self, cfg: ExperimentConfig, site: str, r: int, global_state: State, fit: FitConfig
    ) -> TrainResult: ...


class PlainSite:
    """Download the full version; DP-SGD from it (FedProx: with the proximal term towards it)."""

    def contributed_enough(self, cfg: ExperimentConfig, site: str, uploaded: list[int]) -> bool:
        """Whether the site has sent every update its method asks of it (``uploaded``: the earlier rounds
        it uploaded in); then its later round jobs do nothing. Round-based methods: never."""
        return False

    def fetch_global(self, client: SiteClient, cfg: ExperimentConfig, site: str, r: int) -> State:
        global_state, gmeta = client.download_model(r)
        if gmeta.model != cfg.model:
            raise FedpathError(f"global model round {r}: its model config differs from this site's config")
        return global_state

    def train(self, cfg: ExperimentConfig, site: str, r: int, global_state: State, fit: FitConfig) -> TrainResult:
        from pipeline.train import train_local

        mu = fit.proximal_mu
        return train_local(
            cfg,
            [site],
            cfg.run_dir,
            init_state={k: v.clone() for k, v in global_state.items()},
            round_index=r,
            proximal_ref=global_state if mu > 0 else None,
            proximal_mu=mu,
            job_id=f"round-{r}",
            progress=False,
        )
