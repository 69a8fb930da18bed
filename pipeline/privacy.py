"""A site's privacy ledger: the one object that owns its DP-SGD privacy state across batch jobs.

Every job (a local run or one federation round) is a new process, so the accountant's state must be
persisted or ε silently resets every round. ``sites/<site>/privacy.json`` holds one entry per job (sampling
rate, noise multiplier, clipping norm, steps actually spent, accountant, δ, ε so far) and the accountant
state itself: Opacus' ``history``, the list of ``(noise_multiplier, sample_rate, steps)`` its RDP and PRV
accountants compose. ε is always recomputed from the whole history with consecutive identical
``(σ, q)`` entries merged, so k one-round jobs give exactly the ε of one process that ran k rounds.

Slides: tiles of one slide are correlated, so next to the per-tile ε the ledger reports the group-privacy
guarantee for the largest number ``k`` of tiles one slide contributes, from the standard conversion for
(ε, δ)-DP (Dwork & Roth 2014, Lemma 2.2 / Vadhan 2017): a mechanism that is (ε, δ)-DP for one record is
``(k·ε, k·e^{(k-1)ε}·δ)``-DP for groups of k records. It is honest and usually vacuous for large k; the
slide-level mode (``privacy.unit: slide``) samples slides and caps tiles per slide, so the accounting unit
is the slide itself and the reported ε is a slide-level ε.
"""

from __future__ import annotations

import copy
import fcntl
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import FedpathError, PrivacyBudgetExceeded

LEDGER_VERSION = 1
History = list[tuple[float, float, int]]


def merge_history(history: History) -> History:
    """Merge consecutive entries with the same (σ, q): the same composition, summed in one place."""
    out: History = []
    for sigma, q, steps in history:
        if steps <= 0:
            continue
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + int(steps))
        else:
            out.append((float(sigma), float(q), int(steps)))
    return out


def make_accountant(name: str, history: History | None = None) -> Any:
    """An Opacus accountant (``rdp`` or ``prv``) whose state is ``history``."""
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=name)
    acc.history = list(merge_history(history or []))
    return acc


def epsilon_of(history: History, delta: float, accountant: str) -> float:
    """ε(δ) of a composition of subsampled Gaussian mechanisms (0 when nothing was spent)."""
    merged = merge_history(history)
    if not merged:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in merged):
        return math.inf
    return float(make_accountant(accountant, merged).get_epsilon(delta=delta))


def group_epsilon(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(k·ε, k·e^{(k-1)ε}·δ): the (ε, δ) guarantee for a group of k records (δ capped at 1 = vacuous)."""
    if k <= 1:
        return epsilon, delta
    if math.isinf(epsilon):
        return math.inf, 1.0
    log_d = math.log(k) + (k - 1) * epsilon + math.log(delta)
    return k * epsilon, 1.0 if log_d >= 0 else math.exp(log_d)


def noise_for_target(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """σ that spends ``target_epsilon`` over ``steps`` steps at ``sample_rate`` (Opacus' binary search)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=0.01,
        )
    )


@dataclass
class LedgerEntry:
    """One job's spend: what was planned, what was actually spent, and ε after it."""

    job: str
    round: int | None
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    steps: int
    planned_steps: int
    accountant: str
    delta: float
    unit: str  # tile | slide
    n_units: int  # training tiles (or slides) the sampling rate is relative to
    max_tiles_per_slide: int
    epsilon: float  # ε after this job (cumulative, per unit)
    epsilon_slide: float | None = None  # group privacy for a whole slide (tile unit)
    delta_slide: float | None = None
    complete: bool = False
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)


class PrivacyLedger:
    """``sites/<site>/privacy.json``: entries per job and the accountant state, saved atomically."""

    def __init__(
        self,
        path: Path,
        site: str,
        accountant: str,
        delta: float | None,
        unit: str,
        entries: list[LedgerEntry],
    ) -> None:
        self.path = Path(path)
        self.site = site
        self.accountant = accountant
        self.delta = delta
        self.unit = unit
        self.entries = entries

    # -- persistence ------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls, path: Path | str, site: str | None = None, accountant: str = "prv", unit: str = "tile"
    ) -> PrivacyLedger:
        """Read the ledger (a missing file is an empty ledger for ``site``)."""
        path = Path(path)
        site = site or path.parent.name
        if not path.is_file():
            return cls(path, site, accountant, None, unit, [])
        try:
            data = json.loads(path.read_text())
            entries = [LedgerEntry(**e) for e in data.get("entries", [])]
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise FedpathError(
                f"{path}: privacy ledger is not readable ({exc}); refusing to reset ε"
            ) from None
        if data.get("site") not in (None, site):
            raise FedpathError(f"{path}: ledger belongs to site {data.get('site')!r}, not {site!r}")
        for key, want in (("accountant", accountant), ("unit", unit)):
            have = data.get(key)
            if entries and have is not None and have != want:
                raise FedpathError(
                    f"{path}: the site's ε was accounted with {key}={have!r}; this job asks for {want!r} "
                    "(one site keeps one accountant and unit for its whole history)"
                )
        return cls(
            path, site, data.get("accountant", accountant), data.get("delta"), data.get("unit", unit), entries
        )

    def history(self, exclude_job: str | None = None) -> History:
        """The accountant state: every entry's (σ, q, steps spent), in order."""
        return merge_history(
            [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries if e.job != exclude_job]
        )

    @property
    def epsilon(self) -> float:
        return 0.0 if self.delta is None else epsilon_of(self.history(), self.delta, self.accountant)

    def to_dict(self) -> dict[str, Any]:
        last = self.entries[-1] if self.entries else None
        return {
            "version": LEDGER_VERSION,
            "site": self.site,
            "accountant": self.accountant,
            "unit": self.unit,
            "delta": self.delta,
            "epsilon": last.epsilon if last else 0.0,
            "epsilon_slide": last.epsilon_slide if last else None,
            "delta_slide": last.delta_slide if last else None,
            "group_privacy": "k tiles of one slide: (k*eps, k*exp((k-1)*eps)*delta) (Dwork & Roth 2014, Lemma 2.2)",
            "accountant_state": {"history": [list(h) for h in self.history()]},
            "entries": [asdict(e) for e in self.entries],
        }

    def save(self) -> None:
        """Atomic write (tmp file + rename, fsync'd): a kill never leaves a truncated ledger."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # -- the budget ---------------------------------------------------------------------------------------
    def entry(self, job: str) -> LedgerEntry | None:
        return next((e for e in self.entries if e.job == job), None)

    def planned_epsilon(
        self, job: str, noise_multiplier: float, sample_rate: float, steps_total: int, delta: float
    ) -> float:
        """ε after ``job`` has spent ``steps_total`` steps (its already recorded steps included)."""
        others = [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries if e.job != job]
        return epsilon_of(others + [(noise_multiplier, sample_rate, steps_total)], delta, self.accountant)

    def check_budget(
        self,
        job: str,
        noise_multiplier: float,
        sample_rate: float,
        steps_total: int,
        delta: float,
        budget: float | None,
    ) -> float:
        """Refuse (:class:`PrivacyBudgetExceeded`) a job whose planned steps would push ε past ``budget``."""
        if self.delta is not None and not math.isclose(self.delta, delta):
            raise FedpathError(
                f"{self.path}: site {self.site!r} was accounted at delta={self.delta:g}; this job asks for {delta:g}"
            )
        planned = self.planned_epsilon(job, noise_multiplier, sample_rate, steps_total, delta)
        if budget is not None and planned > budget * (1 + 1e-9):
            raise PrivacyBudgetExceeded(
                f"{self.path}: site {self.site!r} has spent eps={self.epsilon:.3f}; job {job!r} would bring it "
                f"to eps={planned:.3f}, past the budget {budget:g} (delta={delta:g}); refusing to start"
            )
        return planned

    def record(
        self,
        *,
        job: str,
        round_index: int | None,
        sample_rate: float,
        noise_multiplier: float,
        max_grad_norm: float,
        steps: int,
        planned_steps: int,
        delta: float,
        n_units: int,
        max_tiles_per_slide: int,
        complete: bool,
    ) -> LedgerEntry:
        """Record (or update) ``job``'s spend to ``steps`` steps and recompute ε; call :meth:`save` after."""
        if self.delta is None:
            self.delta = delta
        e = self.entry(job)
        if e is not None and (e.noise_multiplier != noise_multiplier or e.sample_rate != sample_rate):
            raise FedpathError(
                f"{self.path}: job {job!r} was started with sigma={e.noise_multiplier:g}, q={e.sample_rate:g}; "
                f"resuming it with sigma={noise_multiplier:g}, q={sample_rate:g} would misaccount ε"
            )
        if e is None:
            e = LedgerEntry(
                job=job,
                round=round_index,
                sample_rate=sample_rate,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                steps=0,
                planned_steps=planned_steps,
                accountant=self.accountant,
                delta=delta,
                unit=self.unit,
                n_units=n_units,
                max_tiles_per_slide=max_tiles_per_slide,
                epsilon=0.0,
            )
            self.entries.append(e)
        e.steps = max(e.steps, int(steps))  # steps spent never decrease (a resumed job continues its entry)
        e.complete = complete
        e.updated = time.time()
        # ε after this job: every entry up to and including it
        upto = self.entries[: self.entries.index(e) + 1]
        e.epsilon = epsilon_of(
            [(x.noise_multiplier, x.sample_rate, x.steps) for x in upto], delta, self.accountant
        )
        if self.unit == "tile":
            e.epsilon_slide, e.delta_slide = group_epsilon(e.epsilon, delta, max_tiles_per_slide)
        else:
            e.epsilon_slide, e.delta_slide = e.epsilon, delta
        return e


@contextmanager
def ledger_lock(path: Path) -> Iterator[None]:
    """An exclusive lock next to the ledger: two jobs of one site never spend concurrently."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lf:
        try:
            fcntl.flock(lf, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FedpathError(f"{path}: another job of this site is training now (ledger locked)") from None
        try:
            yield
        finally:
            fcntl.flock(lf, fcntl.LOCK_UN)


def copy_ledger(ledger: PrivacyLedger) -> PrivacyLedger:
    return copy.deepcopy(ledger)
