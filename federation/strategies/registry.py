"""The one list of strategies: adding a strategy is one new module plus one line in :data:`REGISTRY`.

``federation.strategy`` in a config is either a name (``strategy: fedprox``, the older form: its options
come from the flat ``federation.*`` keys such as ``proximal_mu``) or a mapping validated against the
discriminated union of the strategies' configs (``strategy: {name: fedmic, energy_start: 0.9}``). A bad
name or key is a one-line :class:`~pipeline.config.ConfigError`. ``heads: per_site`` (an option of the
strategies whose config is a :class:`~federation.strategies.base.FullDeltaConfig`) wraps the strategy in
:class:`~federation.strategies.heads.PerSiteHeads`.
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter, ValidationError

from federation.strategies.base import FullDeltaConfig, Strategy, StrategyConfig
from federation.strategies.data_vectors import DataVectors
from federation.strategies.fedadam import FedAdam
from federation.strategies.fedavg import FedAvg
from federation.strategies.fedmic import FedMIC
from federation.strategies.fedprox import FedProx
from federation.strategies.heads import PerSiteHeads
from federation.strategies.median import FedMedian
from federation.strategies.trimmed_mean import FedTrimmedAvg
from federation.strategies.universal import Universal
from pipeline.config import ConfigError, FederationConfig

REGISTRY: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "fedmic": FedMIC,
    "data_vectors": DataVectors,
    "universal": Universal,
}


@cache
def _adapter() -> TypeAdapter[Any]:
    configs = tuple(cls.Config for cls in REGISTRY.values())
    union = Annotated[Union[configs], Field(discriminator="name")]  # type: ignore[valid-type]  # noqa: UP007
    return TypeAdapter(union)


def strategy_config(fed: FederationConfig, what: str = "federation.strategy") -> StrategyConfig:
    """The validated config of ``federation.strategy`` (a name or a mapping); one-line error if bad."""
    raw = fed.strategy
    if isinstance(raw, str):
        cls = REGISTRY.get(raw)
        if cls is None:
            raise ConfigError(f"{what}: unknown strategy {raw!r} (one of {', '.join(REGISTRY)})")
        # the older form: options from the flat federation.* keys of the same name
        flat = fed.model_dump()
        data: dict[str, Any] = {"name": raw} | {
            k: flat[k] for k in cls.Config.model_fields if k != "name" and k in flat
        }
    else:
        data = dict(raw)
        if data.get("name") not in REGISTRY:
            raise ConfigError(
                f"{what}.name: unknown strategy {str(data.get('name'))[:40]!r} (one of {', '.join(REGISTRY)})"
            )
    try:
        cfg = _adapter().validate_python(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"][1:]) or "<strategy>"
        if first["type"] == "extra_forbidden":
            if loc == "heads":
                full = ", ".join(k for k, v in REGISTRY.items() if issubclass(v.Config, FullDeltaConfig))
                raise ConfigError(
                    f"{what}: 'heads' is an option of the strategies that upload a full delta of the model "
                    f"({full}), not of {data['name']}"
                ) from None
            raise ConfigError(f"{what}: unknown key '{loc}' for strategy {data['name']}") from None
        raise ConfigError(f"{what}.{loc}: {first['msg']} (got {first.get('input')!r})") from None
    assert isinstance(cfg, StrategyConfig)
    return cfg


def build_base_strategy(fed: FederationConfig) -> Strategy:
    """The configured algorithm (with per-site heads if asked), without the update-level DP wrappers."""
    c = strategy_config(fed)
    strategy = REGISTRY[c.name].from_config(c)
    if isinstance(c, FullDeltaConfig) and c.heads == "per_site":
        return PerSiteHeads(strategy)
    return strategy
