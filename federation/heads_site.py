"""Per-site heads on the site: the body comes from the federation, the output head is the site's own.

Under ``federation.strategy: {name: ..., heads: per_site}`` (:mod:`federation.strategies.heads`) a site
trains ``body of the open version + its own head`` and uploads the body's delta only. The head lives in
``sites/<site>/state/head.safetensors`` (:class:`~federation.site_state.HeadState`, atomic writes) and
never leaves the site:

* the first job of a site takes its starting head from the global model when its class count
  (``model.out_channels`` of the site's config) equals the global model's, and otherwise asks the
  aggregator's ``/v1/model/task?classes=N`` for the base model with a fresh head for N classes
  (deterministic from the architecture and N, so every site asking for N gets the same head);
* each round trains from the head the previous round ended with; the starting head of a round is kept
  until the round's training ends, so a job killed mid-round and re-run starts from the same model,
  matches its checkpoint and resumes it (head included) without spending ε twice;
* the network must be the global model's apart from the class count.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from fedcore.layout import RunLayout
from federation.payloads import FitConfig
from federation.site import PlainSite
from federation.site_state import HeadState, SiteState
from pipeline.checkpoint import strip_wrappers
from pipeline.config import ExperimentConfig, ModelConfig
from pipeline.errors import FedpathError

if TYPE_CHECKING:
    from federation.client import SiteClient
    from pipeline.train import TrainResult

log = logging.getLogger(__name__)
State = dict[str, torch.Tensor]


def head_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The head tensors' names and shapes for this network and class count (built on ``meta``: free)."""
    from pipeline.models import build_model
    from pipeline.transfer import head_keys

    keys = head_keys(model)
    with torch.device("meta"):
        sd = build_model(model).state_dict()
    return {k: tuple(sd[k].shape) for k in sorted(keys)}


def _site_state(cfg: ExperimentConfig, site: str) -> SiteState:
    return SiteState(RunLayout(cfg.run_dir).site(site).state)


def _check_head(head: State, model: ModelConfig, what: str) -> None:
    want = head_shapes(model)
    got = {k: tuple(v.shape) for k, v in head.items()}
    if got != want:
        bad = next((k for k in sorted(set(want) | set(got)) if got.get(k) != want.get(k)), "?")
        raise FedpathError(
            f"{what}: head tensor {bad!r} is {got.get(bad)}, a {model.out_channels}-class head needs {want.get(bad)}"
        )


def site_model(cfg: ExperimentConfig, site: str, global_state: State) -> State:
    """The site's own model: the body of ``global_state`` (any published version) with the site's head."""
    held = _site_state(cfg, site).load_head()
    if held is None:
        raise FedpathError(f"site {site}: no head of its own yet (sites/{site}/state/head.safetensors)")
    _check_head(held.latest, cfg.model, f"site {site}: head state")
    return {k: v for k, v in global_state.items() if k not in held.latest} | held.latest


class PerSiteHeadSite(PlainSite):
    """Fetch the version's body, keep the site's head between jobs, train both, return the body only."""

    def personal_model(
        self, cfg: ExperimentConfig, site: str, global_state: State
    ) -> tuple[State, ModelConfig] | None:
        """The version's body with the site's own head: its class count, the site's network."""
        return site_model(cfg, site, global_state), cfg.model

    def fetch_global(self, client: SiteClient, cfg: ExperimentConfig, site: str, r: int) -> State:
        global_state, gmeta = client.download_model(r)
        mine = cfg.model
        if gmeta.model.model_copy(update={"out_channels": mine.out_channels}) != mine:
            raise FedpathError(
                f"global model round {r}: its network differs from this site's model: (beyond the class count)"
            )
        shapes = head_shapes(mine)
        store = _site_state(cfg, site)
        held = store.load_head()
        what = f"site {site}: {store.head_path}"
        if held is not None:
            if held.classes != mine.out_channels:
                raise FedpathError(
                    f"{what}: the kept head has {held.classes} classes, model.out_channels is "
                    f"{mine.out_channels}; move the file aside to start a new head"
                )
            if held.round > r:
                raise FedpathError(
                    f"{what}: the kept head is from round {held.round}, after the open round {r} (another "
                    "federation in this run directory?)"
                )
            if held.round < r:  # a new round starts from the head the last trained round ended with
                store.save_head(HeadState(r, held.classes, held.latest))
            return {k: v for k, v in global_state.items() if k not in shapes}
        if gmeta.model.out_channels == mine.out_channels:
            start = {k: global_state[k].clone() for k in shapes}
            source = f"global version {r}"
        else:
            task, _ = client.download_task_model(mine.out_channels, r)
            start = {k: v for k, v in task.items() if k in shapes}
            source = f"/v1/model/task (version {r}, fresh {mine.out_channels}-class head)"
        _check_head(start, mine, what)
        store.save_head(HeadState(r, mine.out_channels, start))
        log.info("site %s: own %d-class head from %s", site, mine.out_channels, source)
        return {k: v for k, v in global_state.items() if k not in shapes}

    def train(self, cfg: ExperimentConfig, site: str, r: int, global_state: State, fit: FitConfig) -> TrainResult:
        from pipeline.train import train_local

        store = _site_state(cfg, site)
        held = store.load_head()
        if held is None or held.round != r:
            raise FedpathError(f"site {site}: no head state for round {r} ({store.head_path}); fetch the version first")
        _check_head(held.start, cfg.model, f"site {site}: {store.head_path}")
        init = {k: v.clone() for k, v in global_state.items()} | {k: v.clone() for k, v in held.start.items()}
        mu = fit.proximal_mu
        result = train_local(
            cfg,
            [site],
            cfg.run_dir,
            init_state=init,
            round_index=r,
            proximal_ref=global_state if mu > 0 else None,  # the body only: the head is not pulled back
            proximal_mu=mu,
            job_id=f"round-{r}",
            progress=False,
        )
        state = strip_wrappers(result.state)
        trained = {k: state[k].detach().cpu().clone() for k in held.start}
        store.save_head(HeadState(r, held.classes, held.start, trained))  # atomic: the round's commit point
        result.state = {k: v for k, v in state.items() if k not in held.start}
        result.extra["head"] = {
            "classes": held.classes,
            "state": str(store.head_path),
            "resumed_from": result.resumed_from,
        }
        return result
