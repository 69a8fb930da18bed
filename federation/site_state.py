"""A site's private state between batch jobs: personal model, optimiser state, the last global version,
and the site's own output head (per-site heads).

It lives in ``sites/<site>/state/`` and never leaves the site (nothing here is ever uploaded). Every
file is written atomically (:func:`fedcore.io.atomic_write_bytes`: tmp, fsync, rename, fsync dir), so a
job killed at any point leaves either the previous round's state or the new one, never a torn file. The
personal file is the commit point: the optimiser state is written first and carries the same round, and
is used only when the rounds agree.

The compression residual (FedMIC's error feedback) keeps both the residual a round's upload started from
and the one it left, under that round: a job killed after saving it and re-run for the same round starts
again from the same input, so nothing is added twice.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from fedcore.errors import FedpathError
from fedcore.io import atomic_write_bytes
from federation.wire import encode_state

State = dict[str, torch.Tensor]
_META = "fedpath_site_state"


@dataclass(frozen=True)
class HeadState:
    """The site's own output head (``heads: per_site``): what round ``round`` trains from, and its result.

    ``start`` stays fixed for the round, so a job killed and re-run trains from the same initial model
    (its checkpoint fingerprint matches and it resumes); ``trained`` is written when the round's training
    ended, and becomes the next round's ``start``.
    """

    round: int
    classes: int
    start: State
    trained: State | None = None

    @property
    def latest(self) -> State:
        return self.trained if self.trained is not None else self.start


class SiteState:
    """Load/save of the site's private files (one persistor, like FLARE's model persistors)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def personal_path(self) -> Path:
        return self.root / "personal.safetensors"

    @property
    def optimizer_path(self) -> Path:
        return self.root / "optimizer.safetensors"

    @property
    def global_path(self) -> Path:
        return self.root / "global.safetensors"

    def _save(self, path: Path, tensors: State, meta: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, encode_state(tensors, {_META: json.dumps(meta)}))

    def _load(self, path: Path) -> tuple[State, dict[str, Any]] | None:
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(_META, "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        except (SafetensorError, OSError, json.JSONDecodeError) as exc:
            raise FedpathError(f"{path}: unreadable site state ({exc})") from None
        return tensors, meta

    # -- personal model (teacher, projection) and its optimiser state ---------------------------------
    def save_personal(
        self, round_index: int, personal: State, optimizer: tuple[State, dict[str, Any]] | None = None
    ) -> None:
        if optimizer is not None:
            self._save(self.optimizer_path, optimizer[0], {"round": round_index, "info": optimizer[1]})
        self._save(self.personal_path, personal, {"round": round_index})

    def personal_round(self) -> int | None:
        got = self._load(self.personal_path)
        return None if got is None else int(got[1]["round"])

    def load_personal(self) -> State | None:
        got = self._load(self.personal_path)
        return None if got is None else got[0]

    def load_optimizer(self) -> tuple[State, dict[str, Any]] | None:
        opt, personal = self._load(self.optimizer_path), self._load(self.personal_path)
        if opt is None or personal is None or opt[1].get("round") != personal[1].get("round"):
            return None
        return opt[0], opt[1]["info"]

    @property
    def choice_path(self) -> Path:
        """``personal: auto``: which personal model the site chose, and every candidate's validation Dice."""
        return self.root / "personal_choice.json"

    # -- the best personal model so far, by validation Dice on the site's own split -------------------------
    @property
    def best_path(self) -> Path:
        return self.root / "personal_best.safetensors"

    def offer_best(self, round_index: int, personal: State, score: float) -> bool:
        """Keep ``personal`` (round ``round_index``'s, validation Dice ``score``) as the site's best personal
        model if it scores at least the best so far; a re-run of the best's own round replaces it. Returns
        whether it was kept."""
        if not math.isfinite(score):
            raise FedpathError(f"{self.best_path}: validation Dice {score} of round {round_index} is not finite")
        got = self._load(self.best_path)
        if got is not None:
            r, best = int(got[1].get("round", -1)), float(got[1].get("val_dice", -1.0))
            if r != round_index and score < best:
                return False
        self._save(self.best_path, personal, {"round": round_index, "val_dice": score})
        return True

    def load_best(self) -> tuple[State, dict[str, Any]] | None:
        """(tensors, {"round", "val_dice"}) of the best personal model kept, or None."""
        return self._load(self.best_path)

    # -- the site's own head (per-site heads) -------------------------------------------------------------
    @property
    def head_path(self) -> Path:
        return self.root / "head.safetensors"

    def save_head(self, head: HeadState) -> None:
        tensors = {f"start.{k}": v for k, v in head.start.items()}
        if head.trained is not None:
            tensors |= {f"trained.{k}": v for k, v in head.trained.items()}
        meta = {"round": head.round, "classes": head.classes, "trained": head.trained is not None}
        self._save(self.head_path, tensors, meta)

    def load_head(self) -> HeadState | None:
        got = self._load(self.head_path)
        if got is None:
            return None
        tensors, meta = got
        try:
            start = {k[6:]: v for k, v in tensors.items() if k.startswith("start.")}
            trained = {k[8:]: v for k, v in tensors.items() if k.startswith("trained.")}
            return HeadState(
                int(meta["round"]), int(meta["classes"]), start, trained if meta["trained"] else None
            )
        except (KeyError, TypeError, ValueError):
            raise FedpathError(f"{self.head_path}: unreadable head state (bad metadata)") from None

    # -- the last global version (what a compressed download is applied to) ------------------------------
    def save_global(self, version: int, state: State) -> None:
        self._save(self.global_path, state, {"version": version})

    def load_global(self) -> tuple[int, State] | None:
        got = self._load(self.global_path)
        return None if got is None else (int(got[1]["version"]), got[0])

    # -- error feedback: what the compressed uploads have left out so far ----------------------------------
    @property
    def residual_path(self) -> Path:
        return self.root / "residual.safetensors"

    def save_residual(self, round_index: int, used: State, left: State) -> None:
        tensors = {f"used.{k}": v for k, v in used.items()} | {f"left.{k}": v for k, v in left.items()}
        self._save(self.residual_path, tensors, {"round": round_index})

    def residual_for(self, round_index: int) -> State:
        """The residual round ``round_index``'s upload adds to its delta: the one the latest earlier round
        left, or (a re-run of the same round) the one that round started from; empty before any."""
        got = self._load(self.residual_path)
        if got is None:
            return {}
        tensors, meta = got
        r = int(meta.get("round", -1))
        if r > round_index:
            raise FedpathError(f"{self.residual_path}: residual of round {r} is newer than round {round_index}")
        part = "used." if r == round_index else "left."
        return {k[len(part) :]: v for k, v in tensors.items() if k.startswith(part)}
