"""One class names every path of a run directory, so no file spells ``rounds/<r>`` or ``endpoint.json``.

The run directory's top level is fixed by the README (``sites/``, ``server/``, ``predictions/``,
``attack/``, ``report/``, ``summary.json``). Every component that comes from outside (a site name, a
round number) is checked here, the one place it meets the disk, so it can never escape the run folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fedcore.errors import FedpathError

#: what a path component taken from a site name may be (same rule as ``pipeline.config``'s site names)
_NAME_RE = re.compile("[a-z0-9_-]{1,64}")


def _name(name: str, what: str = "site name") -> str:
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise FedpathError(f"{what} {str(name)[:80]!r}: must match [a-z0-9_-]{{1,64}}")
    return name


def _index(r: int, what: str = "round") -> int:
    if isinstance(r, bool) or int(r) != r or int(r) < 0:
        raise FedpathError(f"{what} {r!r}: must be a non-negative integer")
    return int(r)


@dataclass(frozen=True)
class ServerLayout:
    """The aggregator's folder ``<run>/server/``: durable state, stored updates, published versions."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def audit(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def endpoint(self) -> Path:
        return self.root / "endpoint.json"

    @property
    def lock(self) -> Path:
        return self.root / "serve.lock"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    @property
    def versions(self) -> Path:
        """One JSON line per published version: the updates it contains and their staleness."""
        return self.root / "versions.jsonl"

    def corrupt_state(self, stamp: int) -> Path:
        return self.root / f"state.json.corrupt-{stamp}"

    def updates(self, r: int) -> Path:
        return self.updates_root / str(_index(r))

    def update(self, r: int, site: str) -> Path:
        return self.updates(r) / f"{_name(site)}.safetensors"

    def quarantine(self, r: int, name: str) -> Path:
        """Where an unusable file found in ``updates/<r>/`` is moved (kept, never counted)."""
        return self.updates(r) / "quarantine" / Path(name).name

    @property
    def updates_root(self) -> Path:
        """``updates/``: one folder per round, one stored update per site."""
        return self.root / "updates"

    @property
    def global_dir(self) -> Path:
        return self.root / "global"

    def global_model(self, r: int) -> Path:
        return self.global_dir / f"round_{_index(r)}.safetensors"

    def global_models(self) -> list[tuple[int, Path]]:
        """Every published ``global/round_<r>.safetensors``, oldest first (stray names are skipped)."""
        found = []
        for p in self.global_dir.glob("round_*.safetensors"):
            tail = p.stem.split("_", 1)[1]
            if tail.isdigit():
                found.append((int(tail), p))
        return sorted(found)

    def published_globals(self, hint: str = "") -> list[tuple[int, Path]]:
        """:meth:`global_models`, but a FedpathError naming the folder when there is none."""
        found = self.global_models()
        if not found:
            raise FedpathError(
                f"{self.global_dir}: the federation published no global model (round_<r>.safetensors){hint}"
            )
        return found

    def latest_global(self, hint: str = "") -> Path:
        """The newest published global model; FedpathError naming the folder when there is none."""
        return self.published_globals(hint)[-1][1]

    @property
    def data_store(self) -> Path:
        """The tiles of the server's own unlabelled slides (``federation.server_manifest``)."""
        return self.root / "data" / "store.zarr"

    @property
    def val_store(self) -> Path:
        """The tiles and masks of the server's labelled validation slides (``federation.server_val_manifest``)."""
        return self.root / "val" / "store.zarr"

    @property
    def pretrained(self) -> Path:
        """θ_pre from ``fedpath pretrain`` (masked image modelling on the server's slides)."""
        return self.root / "pretrained.safetensors"

    @property
    def synthetic_pretrained(self) -> Path:
        """θ_pre from ``fedpath pretrain`` with ``objective: synthetic`` (segmentation on synthetic slides)."""
        return self.root / "synthetic_pretrained.safetensors"

    @property
    def synthetic_teacher_pretrained(self) -> Path:
        """The same pretraining for FedMIC's teacher architecture (wider than the shared model)."""
        return self.root / "synthetic_teacher_pretrained.safetensors"

    @property
    def synthetic(self) -> Path:
        """``fedpath pretrain`` with ``objective: synthetic``: the server's own synthetic slides, masks and
        manifests (the data root of its pretraining)."""
        return self.root / "synthetic"

    @property
    def synthetic_run(self) -> Path:
        """The run folder of that pretraining: the synthetic sites' stores and the training job."""
        return self.root / "synthetic_run"

    @property
    def synthetic_teacher_run(self) -> Path:
        """The run folder of the teacher's pretraining."""
        return self.root / "synthetic_teacher_run"

    def global_delta(self, r: int) -> Path:
        """Version ``r`` as its compressed delta from ``r - 1`` (strategies that compress downloads)."""
        return self.root / "global" / f"delta_{_index(r)}.safetensors"

    def strategy_state(self, r: int) -> Path:
        return self.root / "strategy" / f"round_{_index(r)}.safetensors"


@dataclass(frozen=True)
class SiteLayout:
    """One site's folder ``<run>/sites/<site>/``: its store, its ledgers, its round jobs, its state."""

    root: Path

    @property
    def store(self) -> Path:
        return self.root / "store.zarr"

    @property
    def privacy(self) -> Path:
        """The sample-level DP ledger (``pipeline.privacy.PrivacyLedger``)."""
        return self.root / "privacy.json"

    @property
    def update_privacy(self) -> Path:
        """The update-level DP ledger (``federation.ledger.UpdateLedger``)."""
        return self.root / "update_privacy.json"

    @property
    def train(self) -> Path:
        """The job folder of a plain (non-federated) training run: ``fedpath train``'s checkpoints."""
        return self.root / "train"

    @property
    def model(self) -> Path:
        """The model a plain training run writes (``fedpath train``)."""
        return self.root / "model.safetensors"

    @property
    def personal_model(self) -> Path:
        """The site's own inference model (``fedpath site-model``): its head on the federation's body, or
        FedMIC's teacher; never sent."""
        return self.root / "model_personal.safetensors"

    @property
    def state(self) -> Path:
        """Private site state kept between batch jobs (personal model, optimiser, teacher); never sent."""
        return self.root / "state"

    def round(self, r: int) -> Path:
        return self.root / "rounds" / str(_index(r))

    def update(self, r: int) -> Path:
        return self.round(r) / "update.safetensors"

    def refused_update(self, r: int) -> Path:
        return self.round(r) / "update.refused.safetensors"

    def refused(self, r: int) -> Path:
        return self.round(r) / "refused.json"

    def done(self, r: int) -> Path:
        return self.round(r) / "done.json"

    def train_json(self, r: int) -> Path:
        return self.round(r) / "train.json"

    def job_log(self, r: int) -> Path:
        return self.round(r) / "job.log"


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run directory."""

    root: Path

    @property
    def server(self) -> ServerLayout:
        return ServerLayout(self.root / "server")

    @property
    def sites(self) -> Path:
        return self.root / "sites"

    def site(self, name: str) -> SiteLayout:
        return SiteLayout(self.sites / _name(name))

    @property
    def central(self) -> SiteLayout:
        """The pooled (centralised) baseline's folder ``<run>/central/``, laid out like a site's."""
        return SiteLayout(self.root / "central")

    @property
    def provision(self) -> Path:
        return self.root / "provision"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"


__all__ = ["RunLayout", "ServerLayout", "SiteLayout"]
