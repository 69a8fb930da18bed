"""The universal model (Radwan et al., arXiv 2407.14719): knowledge transfer from the sites' local models
into one global model on the server, without any site data.

Each stage, every site fine-tunes the published version with DP-SGD and uploads its delta, as in FedAvg.
Instead of averaging weights, the server rebuilds each site's local model (version + delta) and distils
the ensemble (averaged softened outputs, FedDF) into one student on tiles only the server holds (the
tiles of ``federation.server_manifest``, tiled by ``fedpath pretrain``). The student starts from the
current version, so transfer accumulates stage-wise: each stage's universal model initialises the next.

The local models are DP outputs; distilling them on public tiles is post-processing and spends no
site's budget. What the server learns about a site is its update, exactly as under FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from federation.strategies.base import ServerContext, State, Strategy, StrategyConfig, UpdateInfo, float_names


class UniversalConfig(StrategyConfig):
    name: Literal["universal"] = "universal"
    distil_steps: int = Field(200, ge=1, description="server-side distillation steps per stage")
    distil_batch: int = Field(16, ge=1)
    distil_lr: float = Field(1e-3, gt=0)
    temperature: float = Field(2.0, gt=0)
    weighted: bool = Field(True, description="weight each teacher by its site's training tiles")
    init: Literal["previous", "average"] = Field(
        "previous",
        description="the student starts from the previous stage's universal model (stage-wise transfer, "
        "Radwan et al.) or from the FedAvg average of the local models (FedDF)",
    )


def local_models(global_state: State, updates: Sequence[UpdateInfo], strategy: Strategy) -> list[State]:
    """Each site's local model: the version it trained from plus its decoded delta."""
    names = float_names(global_state)
    out = []
    for u in updates:
        m = {k: v.clone() for k, v in global_state.items()}
        for k, d in strategy.iter_delta(u, names):
            m[k] = (m[k].double() + d.double()).to(m[k].dtype)
        out.append(m)
    return out


def require_server_tiles(strategy: Strategy) -> ServerContext:
    """The strategy's context, if it has a model builder and server-held tiles; else a clear error."""
    ctx = strategy.context
    if ctx is None or ctx.model_builder is None:
        raise ValueError(f"{strategy.name}: needs the server's model builder (bind a ServerContext)")
    if ctx.server_store is None:
        raise ValueError(
            f"{strategy.name}: the server holds no tiles; set federation.server_manifest and run `fedpath pretrain`"
        )
    return ctx


def distil_on_server(
    strategy: Strategy, teachers: Sequence[State], init: State, weights: Sequence[float] | None,
    steps: int, batch: int, lr: float, temperature: float, seed: int,
) -> tuple[State, dict[str, Any]]:
    """FedDF on the server's tiles: the student (from ``init``) fits the teachers' averaged outputs."""
    from pipeline.transfer import UnlabelledTiles, distil_ensemble

    ctx = require_server_tiles(strategy)
    assert ctx.model_builder is not None and ctx.server_store is not None
    nets = []
    for t in teachers:
        net = ctx.model_builder()
        net.load_state_dict(t)
        nets.append(net)
    student = ctx.model_builder()
    student.load_state_dict(init)
    tiles = UnlabelledTiles(ctx.server_store, seed=seed)
    with torch.random.fork_rng(devices=[]):
        info = distil_ensemble(nets, student, tiles, steps=steps, batch_size=batch, lr=lr,
                               temperature=temperature, weights=weights, seed=seed)
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    return state, {"agreement": info["agreement"], "loss_first": info["losses"][0], "loss_last": info["losses"][-1]}


class Universal(Strategy):
    name = "universal"
    Config = UniversalConfig
    #: every site's full local model is needed at once (the ensemble), so nothing is streamed
    streaming = False

    def __init__(self, cfg: UniversalConfig | None = None) -> None:
        self.cfg = cfg or UniversalConfig()
        self.last_distillation: dict[str, Any] = {}

    @classmethod
    def from_config(cls, c: StrategyConfig) -> Strategy:
        assert isinstance(c, UniversalConfig)
        return cls(c)

    def aggregate(
        self, global_state: State, updates: Sequence[UpdateInfo], round_index: int,
        generator: Any = None, accumulated: Any = None,
    ) -> State:
        if not updates:
            raise ValueError("universal: no updates")
        require_server_tiles(self)
        teachers = local_models(global_state, updates, self)
        c = self.cfg
        weights = [float(u.n_tiles) for u in updates] if c.weighted else None
        init = global_state
        if c.init == "average":
            init = self.apply(global_state, self.average(global_state, updates, round_index), round_index)
        state, info = distil_on_server(
            self, teachers, init, weights, c.distil_steps, c.distil_batch, c.distil_lr,
            c.temperature, seed=round_index,
        )
        self.last_distillation = info | {"stage": round_index, "teachers": [u.site for u in updates]}
        return state

    def apply(self, global_state: State, avg_delta: State, round_index: int) -> State:
        """The FedAvg model (the student's starting point when ``init: average``)."""
        out = {k: v.clone() for k, v in global_state.items()}
        for k, d in avg_delta.items():
            out[k] = global_state[k] + d.to(global_state[k].dtype)
        return out

    def describe(self) -> str:
        return f"universal(distil_steps={self.cfg.distil_steps})"
