"""Typed payloads: a message is a named set of tensors plus typed metadata, checked against a declaration.

Each strategy declares the payload a site uploads (:meth:`Strategy.upload_spec`): FedAvg a full delta of
the global model, FedMIC truncated-SVD factors whose rank each site picks per tensor, a data-vector
method one scalar per site. The aggregator validates an upload against that declaration, never against
the global model directly:

* :class:`TensorDecl` fixes a tensor's dtype and shape; a dimension may be a *symbol* (``"r:enc.w"``)
  bound by the first tensor that uses it, so the ``U`` and ``V`` factors of one tensor must agree on
  their rank, and :attr:`PayloadSpec.dims` bounds every symbol (``1 <= r <= min(rows, cols)``);
* :attr:`PayloadSpec.max_abs` bounds the values (a data vector's τ), :attr:`PayloadSpec.max_norm` the
  L2 norm of what the payload decodes to (checked by the server, one tensor resident at a time).

The metadata travels as typed envelopes, built on the strict pydantic base the configs use:
:class:`UpdateMeta` (site -> server, in the safetensors header), :class:`RoundStatus` carrying a
:class:`FitConfig` (server -> site, the JSON of ``/v1/status``). Unknown fields are refused, so a typo or
a forged field is an error, not an ignored key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from federation.wire import FLOAT_CODES, UPDATE_META_KEY, TensorSpec, WireError

Dim = int | str


@dataclass(frozen=True)
class TensorDecl:
    """One declared tensor: allowed dtype codes and a shape whose entries are sizes or dimension symbols."""

    dtypes: frozenset[str]
    shape: tuple[Dim, ...]

    @classmethod
    def like(cls, spec: TensorSpec) -> TensorDecl:
        return cls(frozenset({spec.dtype}), tuple(spec.shape))


@dataclass(frozen=True)
class PayloadSpec:
    """What one message must contain: exactly these tensors, the symbols' bounds and the value bounds."""

    kind: str
    tensors: Mapping[str, TensorDecl]
    dims: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    max_abs: float | None = None
    max_norm: float | None = None

    def validate(self, got: Mapping[str, TensorSpec], what: str) -> dict[str, int]:
        """Check names, dtypes and shapes; return the value bound to each dimension symbol (the ranks).

        Raises a :class:`WireError` naming the first tensor that does not fit.
        """
        missing = [k for k in self.tensors if k not in got]
        extra = [k for k in got if k not in self.tensors]
        if missing:
            raise WireError(f"{what}: missing tensor {missing[0]!r} ({len(missing)} missing, {self.kind} payload)")
        if extra:
            raise WireError(f"{what}: unexpected tensor {extra[0]!r} ({len(extra)} not in the {self.kind} payload)")
        bound: dict[str, int] = {}
        for name, decl in self.tensors.items():
            g = got[name]
            if g.dtype not in decl.dtypes:
                raise WireError(
                    f"{what}: tensor {name!r} has dtype {g.dtype}, the {self.kind} payload's is "
                    f"{'/'.join(sorted(decl.dtypes))}"
                )
            if len(g.shape) != len(decl.shape):
                raise WireError(
                    f"{what}: tensor {name!r} has shape {list(g.shape)}, the {self.kind} payload's is "
                    f"{list(decl.shape)}"
                )
            for axis, (have, want) in enumerate(zip(g.shape, decl.shape, strict=True)):
                if isinstance(want, int):
                    if have != want:
                        raise WireError(
                            f"{what}: tensor {name!r} has shape {list(g.shape)}, the {self.kind} payload's "
                            f"is {list(decl.shape)}"
                        )
                    continue
                if want in bound:
                    if bound[want] != have:
                        raise WireError(
                            f"{what}: tensor {name!r} axis {axis} is {have}, but {want!r} is {bound[want]} "
                            "elsewhere in the payload"
                        )
                    continue
                lo, hi = self.dims.get(want, (0, 2**31))
                if not lo <= have <= hi:
                    raise WireError(f"{what}: tensor {name!r}: {want!r} = {have} outside [{lo}, {hi}]")
                bound[want] = have
        return bound


def full_delta_spec(global_spec: Mapping[str, TensorSpec], max_norm: float | None) -> PayloadSpec:
    """FedAvg's payload: a delta of every tensor of the global model, same names, shapes and dtypes."""
    return PayloadSpec(
        kind="full_delta",
        tensors={k: TensorDecl.like(s) for k, s in global_spec.items()},
        max_norm=max_norm,
    )


def is_float_code(code: str) -> bool:
    return code in FLOAT_CODES


# -- typed envelopes ----------------------------------------------------------------------------------
class _Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class UpdateMeta(_Envelope):
    """What a site says about its upload (inside the safetensors header): never trusted beyond its checks."""

    site: str = Field(pattern="^[a-z0-9_-]{1,64}$")
    round: int = Field(ge=0, lt=2**31, description="the global version the site trained from")
    n_tiles: int = Field(ge=1, description="training tiles: the FedAvg weight")
    epsilon: float | None = Field(None, description="sample-level ε the site reports (inf: no noise)")
    update_id: str = Field("", max_length=128)
    kind: str = Field("full_delta", max_length=64, description="the payload kind (the strategy's declaration)")
    extra: dict[str, Any] = Field(default_factory=dict, description="free-form, for the site's own records")

    @field_validator("round", "n_tiles", mode="before")
    @classmethod
    def _int_not_bool(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError("must be an integer")
        return v

    @field_validator("epsilon")
    @classmethod
    def _eps(cls, v: float | None) -> float | None:
        # inf is legitimate (DP-SGD without noise: no guarantee); NaN and negatives are not
        if v is not None and (math.isnan(v) or v < 0):
            raise ValueError("must be a non-negative number, inf or null")
        return v

    def to_header(self) -> dict[str, str]:
        return {UPDATE_META_KEY: json.dumps(self.model_dump(mode="json"), sort_keys=True)}

    @classmethod
    def from_header(cls, metadata: Mapping[str, str], what: str, max_n_tiles: int | None = None) -> UpdateMeta:
        """The checked metadata of an upload; ``max_n_tiles`` None: stored before (lenient on the bound)."""
        raw = metadata.get(UPDATE_META_KEY)
        if raw is None:
            raise WireError(f"{what}: no '{UPDATE_META_KEY}' metadata in the safetensors header")
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            raise WireError(f"{what}: '{UPDATE_META_KEY}' metadata is not JSON") from None
        if not isinstance(data, dict):
            raise WireError(f"{what}: '{UPDATE_META_KEY}' metadata is not an object")
        # metadata of older versions had its free-form fields at the top level
        known = set(cls.model_fields)
        extra = {k: data.pop(k) for k in list(data) if k not in known}
        if extra:
            data["extra"] = {**extra, **(data.get("extra") or {})}
        try:
            meta = cls.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            got = str(first.get("input"))[:40]
            raise WireError(f"{what}: metadata '{loc}': {first['msg'].lower()} (got {got})") from None
        if max_n_tiles is not None and meta.n_tiles > max_n_tiles:
            raise WireError(f"{what}: metadata 'n_tiles' {meta.n_tiles} exceeds federation.max_n_tiles={max_n_tiles}")
        return meta


class FitConfig(_Envelope):
    """Local-training options a strategy asks of the sites for one round (may differ per site)."""

    proximal_mu: float = Field(0.0, ge=0)
    #: FedMIC: share of singular-value energy each uploaded factor pair must keep this round
    energy: float | None = Field(None, gt=0, le=1)
    extra: dict[str, Any] = Field(default_factory=dict)


class RoundStatus(_Envelope):
    """The aggregator's answer to ``/v1/status``: what is open, what the site should do, the limits."""

    round: int
    phase: Literal["open", "aggregating", "finished"]
    rounds: int
    k: int
    n: int
    sites_reported: list[str]
    submitted: bool | None
    opened_at: float
    deadline: float
    close_policy: str
    global_round: int
    version: int = Field(description="the published global version sites train from")
    strategy: str
    payload: str = Field(description="the payload kind the strategy expects")
    fit: FitConfig
    central_privacy: dict[str, Any] | None
    publish_error: str | None
    publish_failures: int
    state_saved: bool
    limits: dict[str, float]


__all__ = [
    "FitConfig",
    "PayloadSpec",
    "RoundStatus",
    "TensorDecl",
    "UpdateMeta",
    "full_delta_spec",
]
