"""Site algorithms: how a site turns the downloaded global version into a trained local model.

The round job (:func:`federation.client.run_site_round`) is the same for every method: wait for an open
version, fetch it, train, encode the payload the strategy declares, upload. What differs is behind two
hooks of a :class:`SiteAlgorithm`:

* :meth:`SiteAlgorithm.fetch_global` -- download the version (full, or as a compressed delta applied to
  the copy kept in the site's private state);
* :meth:`SiteAlgorithm.train` -- local training from it (plain DP-SGD for FedAvg/FedProx/FedAdam; mutual
  distillation with a personal teacher for FedMIC, :mod:`federation.fedmic_site`);
* :meth:`SiteAlgorithm.personal_model` -- the model the site infers with, when it is not the global one
  (the body with the site's own head; FedMIC's teacher). Built from the site's private state, at the site;
* :meth:`SiteAlgorithm.encode_update` -- the payload from the trained delta (the strategy's encoding;
  FedMIC adds the error its earlier factors left out, kept in the site's private state).

A strategy returns its site algorithm from :meth:`Strategy.site_algorithm` (default: :class:`PlainSite`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from fedcore.layout import SiteLayout
from federation.payloads import FitConfig
from pipeline.config import ExperimentConfig, ModelConfig
from pipeline.errors import FedpathError

if TYPE_CHECKING:
    from federation.client import SiteClient
    from federation.strategies.base import Strategy
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

    def personal_model(
        self, cfg: ExperimentConfig, site: str, global_state: State
    ) -> tuple[State, ModelConfig] | None: ...

    def encode_update(
        self, strategy: Strategy, cfg: ExperimentConfig, site: str, r: int, delta: State, fit: FitConfig
    ) -> State: ...


class PlainSite:
    """Download the full version; DP-SGD from it (FedProx: with the proximal term towards it)."""

    def contributed_enough(self, cfg: ExperimentConfig, site: str, uploaded: list[int]) -> bool:
        """Whether the site has sent every update its method asks of it (``uploaded``: the earlier rounds
        it uploaded in); then its later round jobs do nothing. Round-based methods: never."""
        return False

    def personal_model(
        self, cfg: ExperimentConfig, site: str, global_state: State
    ) -> tuple[State, ModelConfig] | None:
        """The site's own inference model and its network, or None: here the site infers with the global
        model (``global_state``, a published version)."""
        return None

    def encode_update(
        self, strategy: Strategy, cfg: ExperimentConfig, site: str, r: int, delta: State, fit: FitConfig
    ) -> State:
        """Round ``r``'s payload from the site's delta: the strategy's encoding, with no state of the site's."""
        return strategy.encode_update(delta, fit)

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


def personal_model(cfg: ExperimentConfig, site: str, global_state: State) -> tuple[State, ModelConfig]:
    """The model ``site`` infers with under the configured strategy, from its private state and a published
    global version; a FedpathError when the strategy keeps no model of the site's own."""
    from federation.strategies import build_strategy, strategy_config

    own = build_strategy(cfg.federation, max(1, len(cfg.sites))).site_algorithm().personal_model(
        cfg, site, global_state
    )
    if own is None:
        name = strategy_config(cfg.federation).name
        raise FedpathError(
            f"site {site}: federation.strategy {name!r} keeps no model of the site's own; infer with the "
            "global model (fedpath infer --model <global round file>)"
        )
    return own


def write_site_model(
    cfg: ExperimentConfig, site: str, global_model: Path | None = None, out: Path | None = None
) -> Path:
    """Write ``site``'s own inference model (:func:`personal_model`) as a model file that ``fedpath infer
    --model`` runs: from the published version ``global_model`` (default: the run's latest), to ``out``
    (default: ``sites/<site>/model_personal.safetensors``). It is built and kept at the site."""
    from fedcore.layout import RunLayout
    from pipeline.checkpoint import ModelMeta, read_model_file, save_model
    from pipeline.models import build_model

    names = [s.name for s in cfg.sites]
    if site not in names:
        raise FedpathError(f"site {site!r}: not a site of this config ({', '.join(names) or 'none'})")
    layout = RunLayout(cfg.run_dir)
    src = Path(global_model) if global_model is not None else layout.server.latest_global()
    global_state, gmeta = read_model_file(src)
    state, net_cfg = personal_model(cfg, site, global_state)
    try:
        build_model(net_cfg).load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise FedpathError(f"site {site}: its personal state does not fit its network ({first})") from None
    meta = ModelMeta(
        model=net_cfg,
        tile_size=cfg.tiling.tile_size,
        target_mpp=cfg.tiling.target_mpp,
        source="personal",
        round=gmeta.round,
        extra={"site": site, "global_model": str(src)},
    )
    return save_model(out or layout.site(site).personal_model, state, meta)
