"""FedMIC (Ren et al., arXiv 2407.02261; close to FedKD, Wu et al. 2022): a shared student, sent low-rank.

Each site trains two models by mutual distillation (:mod:`federation.fedmic_site`): a personal teacher,
larger and never sent, and the shared student, whose delta is the only thing uploaded. This strategy is
the federation side of it:

* the payload is the student's delta as truncated-SVD factors (:mod:`federation.lowrank`), the rank
  chosen per tensor and per round to keep an energy share that rises on a schedule
  (``energy_start`` -> ``energy_end`` over ``energy_rounds`` rounds), declared with bounded rank symbols
  so the server checks factor shapes before multiplying anything;
* aggregation is FedAvg's tile-weighted mean of the decoded deltas, streamed as updates arrive;
* the download is compressed the same way: the averaged delta is factorised again at the round's energy,
  and the next version is ``global + U @ V`` on the server, so a site that holds the previous version
  rebuilds the new one exactly from the factors (:meth:`download_payload`);
* error feedback (``error_feedback``, both directions): what a round's factors leave out of a delta is
  kept -- by each site for its uploads (its private state), by the server for the published deltas
  (:meth:`state_dict`, so it survives a restart) -- and added to the next round's delta before it is
  factorised, so compression delays part of an update instead of dropping it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, model_validator

from federation.lowrank import compress, compress_with_feedback, iter_decompressed, lowrank_spec
from federation.payloads import FitConfig, PayloadSpec
from federation.strategies.base import State, Strategy, StrategyConfig, UpdateInfo
from federation.wire import TensorSpec, iter_tensors

if TYPE_CHECKING:
    from federation.site import SiteAlgorithm

PAYLOAD_KIND = "lowrank_delta"
_CODES = {"float16": "F16", "float32": "F32", "int8": "I8"}
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "int8": torch.int8}


class FedMICConfig(StrategyConfig):
    name: Literal["fedmic"] = "fedmic"
    energy_start: float = Field(0.90, gt=0, le=1, description="energy share kept by the first round's factors")
    energy_end: float = Field(0.98, gt=0, le=1, description="energy share kept once the schedule has risen")
    energy_rounds: int = Field(4, ge=1, description="rounds over which the share rises linearly")
    max_rank_fraction: float = Field(
        1.0, gt=0, le=1,
        description="rank cap as a share of the rank where factors stop saving bytes (0.4 with fp16 factors, "
        "0.75 with int8: every factorised tensor ≥ 5× smaller than fp32, whatever the DP noise)",
    )
    temperature: float = Field(2.0, gt=0, description="softening of the outputs in the decision-level KL")
    kd_weight: float = Field(1.0, ge=0, description="weight of the decision-level (output) distillation")
    feature_weight: float = Field(1.0, ge=0, description="weight of the representation-level distillation")
    student_distill: float = Field(
        1.0, ge=0, le=1,
        description="weight of the student's distillation from the teacher, relative to the teacher's from the "
        "student (1: mutual; 0: one-way, the shared student learns only its task, as FedAvg's model does)",
    )
    teacher_width: float = Field(2.0, ge=1, description="teacher channels = student channels x this")
    personal: Literal["teacher", "student", "teacher+student", "student+local", "teacher+student+local", "auto"] = Field(
        "teacher",
        description="the model a site infers with: its teacher, the global student, or an ensemble (logits "
        "averaged, one network, `fedpath site-model`) of it or not with the global student and the site's own "
        "local student (its student after its last round's local steps, before averaging); auto: whichever of "
        "these scores best on the site's own validation split",
    )
    personal_select: Literal["best", "last"] = Field(
        "best",
        description="which of its rounds' teachers a site keeps as its personal model: the one with the best "
        "Dice on the site's own validation split (as a local model keeps its best checkpoint), or the last",
    )
    factor_dtype: Literal["float16", "float32", "int8"] = Field(
        "float16",
        description="dtype of the SVD factors on the wire (both directions); int8 adds one float32 scale per "
        "rank component and halves float16's bytes per rank",
    )
    dp_student_clip_share: float | None = Field(
        None, gt=0, lt=1,
        description="under DP-SGD: the student's share of C² when each sample's gradient is clipped per model "
        "(student to C·√share, teacher and projection to C·√(1 − share); the noise σC and ε unchanged). None: "
        "one clip over the pair, where the wider teacher takes most of C",
    )
    error_feedback: bool = Field(
        True, description="carry what the factors leave out of a delta into the next round's (sites and server)"
    )
    teacher_init: str | None = Field(
        None,
        description="site side: a model file of the teacher's architecture its first round starts from (e.g. "
        "the server's synthetic θ_pre of it, `fedpath.pretrain.run_teacher_pretrain`, handed out with the "
        "site's config); read from the site's own config, never from the server's round config. None: a "
        "seeded init",
    )

    @model_validator(mode="after")
    def _rising(self) -> FedMICConfig:
        if self.energy_end < self.energy_start:
            raise ValueError("energy_end must be >= energy_start")
        return self


class FedMIC(Strategy):
    name = "fedmic"
    Config = FedMICConfig

    def __init__(self, cfg: FedMICConfig | None = None) -> None:
        self.cfg = cfg or FedMICConfig()
        self._download: State | None = None
        self.residual: State = {}

    @classmethod
    def from_config(cls, c: StrategyConfig) -> Strategy:
        assert isinstance(c, FedMICConfig)
        return cls(c)

    @property
    def factor_dtype(self) -> torch.dtype:
        return _DTYPES[self.cfg.factor_dtype]

    def energy(self, round_index: int) -> float:
        """The energy share of round ``round_index`` (linear from start to end, then flat)."""
        c = self.cfg
        if c.energy_rounds <= 1:
            return c.energy_end
        f = min(1.0, round_index / (c.energy_rounds - 1))
        return c.energy_start + f * (c.energy_end - c.energy_start)

    # -- payload --------------------------------------------------------------------------------------
    def upload_spec(self, global_spec: Mapping[str, TensorSpec], max_norm: float | None) -> PayloadSpec:
        return lowrank_spec(global_spec, max_norm, PAYLOAD_KIND, _CODES[self.cfg.factor_dtype])

    def encode_update(self, delta: State, fit: FitConfig) -> State:
        if fit.energy is None:
            raise ValueError("fedmic: the round's fit config carries no energy share")
        return compress(delta, fit.energy, self.factor_dtype, self.cfg.max_rank_fraction)

    def iter_delta(self, update: UpdateInfo, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        if self.context is None or not self.context.global_spec:
            raise ValueError("fedmic: decoding needs the global model's specs (bind a ServerContext)")
        shapes = {k: s.shape for k, s in self.context.global_spec.items()}
        yield from iter_decompressed(iter_tensors(update.path), names, shapes)

    # -- site side -----------------------------------------------------------------------------------
    def configure_fit(self, round_index: int, site: str | None = None) -> FitConfig:
        c = self.cfg
        return FitConfig(
            energy=self.energy(round_index),
            extra={
                "temperature": c.temperature,
                "kd_weight": c.kd_weight,
                "feature_weight": c.feature_weight,
                "student_distill": c.student_distill,
                "teacher_width": c.teacher_width,
                "error_feedback": c.error_feedback,
                "dp_student_clip_share": c.dp_student_clip_share,
            },
        )

    # -- server side ---------------------------------------------------------------------------------
    def apply(self, global_state: State, avg_delta: State, round_index: int) -> State:
        """``global + U @ V`` of the averaged delta (plus the server's residual, with error feedback)
        compressed at the round's energy, as sites rebuild it."""
        self.begin_round(round_index, "residual")  # a retried publish starts from the residual before it
        energy, dtype, cap = self.energy(round_index), self.factor_dtype, self.cfg.max_rank_fraction
        payload, sent, left = compress_with_feedback(
            avg_delta, self.residual, lambda full: compress(full, energy, dtype, cap)
        )
        self._download = payload
        if self.cfg.error_feedback:
            self.residual = left
        out = {k: v.clone() for k, v in global_state.items()}
        for k, d in sent.items():
            out[k] = apply_delta(global_state[k], d)
        return out

    def state_dict(self) -> tuple[State, dict[str, Any]]:
        return {f"residual.{k}": t for k, t in self.residual.items()}, {}

    def load_state_dict(self, tensors: State, meta: dict[str, Any]) -> None:
        self.residual = {k[len("residual.") :]: t for k, t in tensors.items() if k.startswith("residual.")}

    def site_algorithm(self) -> SiteAlgorithm:
        """Teacher + student by mutual distillation; compressed downloads onto the kept version."""
        from federation.fedmic_site import FedMICSite

        return FedMICSite()

    def download_payload(self) -> State | None:
        """The factors of the last applied delta: what a site holding the previous version downloads."""
        return self._download

    def describe(self) -> str:
        c = self.cfg
        return f"fedmic(energy={c.energy_start}->{c.energy_end}/{c.energy_rounds} rounds, T={c.temperature})"


def apply_delta(g: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The one way a version is advanced by a decoded delta (server and site do exactly this)."""
    return (g.to(torch.float32) + d.to(torch.float32)).to(g.dtype)
