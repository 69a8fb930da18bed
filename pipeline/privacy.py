"""A site's privacy ledger: the one object that owns its DP-SGD privacy state across batch jobs.

Every job (a local run or one federation round) is a new process, so the accountant's state must be
persisted or ε silently resets every round. ``sites/<site>/privacy.json`` holds one entry per job (sampling
rate, noise multiplier, clipping norm, steps actually spent, accountant, δ, ε so far) and the accountant
state itself: Opacus' ``history``, the list of ``(noise_multiplier, sample_rate, steps)`` its RDP and PRV
accountants compose. ε is always recomputed from the whole history with consecutive identical
``(σ, q)`` entries merged, so k one-round jobs give exactly the ε of one process that ran k rounds.

Slides: tiles of one slide are correlated, so next to the per-tile ε the ledger states the group-privacy
guarantee for the largest number ``k`` of tiles one slide contributes, from the standard conversion for
(ε, δ)-DP (Dwork & Roth 2014, Lemma 2.2 / Vadhan 2017): a mechanism that is (ε, δ)-DP for one record is
``(k·ε, k·e^{(k-1)ε}·δ)``-DP for groups of k records. That δ is almost always far above 1, which is no
guarantee at all, so the figure is stated only when its δ is below 1/(number of slides); otherwise the
ledger says "no slide-level guarantee at this budget". Real slide-level DP is ``privacy.unit: slide``
(slides are sampled, and each slide's gradient is clipped as one unit), where the ledger's ε is per slide.

The budget (ε or ``unlimited``, δ, unit, accountant) is written at a site's first job; a later job that
asks for another is refused, so a site's history is one guarantee. So is the noise source: a ledger
opened with the debug switch for seeded noise stays "not private" for good.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.errors import FedpathError, PrivacyBudgetExceeded

LEDGER_VERSION = 2

#: RDP orders: Opacus' defaults (1.1 to 63) extended to 1.01 and 8192, so the optimal order is never the largest one
#: for fedpath's noise levels (a too-narrow range only loosens the bound, with Opacus warning about it)
RDP_ORDERS: list[float] = (
    [1.01, 1.02, 1.03, 1.05, 1.075]
    + [1 + x / 10.0 for x in range(1, 100)]
    + [float(a) for a in range(12, 64)]
    + [64.0, 80.0, 96.0, 128.0, 192.0, 256.0, 384.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0]
)

Budget = float | Literal["unlimited"]
UNITS = ("tile", "slide", "site")


def format_epsilon(epsilon: float | None, delta: float | None, unit: str, private: bool = True) -> str:
    """The one way fedpath prints a guarantee: ε with its δ and unit, or why there is none."""
    if not private:
        return f"no guarantee (seeded debug noise: NOT PRIVATE; nominal eps={epsilon} per {unit})"
    if epsilon is None or delta is None:
        return f"no {unit}-level guarantee"
    if delta >= 1.0:
        return f"no {unit}-level guarantee at this budget (delta >= 1)"
    if math.isinf(epsilon):
        return f"eps=inf per {unit} (no noise: no guarantee)"
    return f"eps={epsilon:.2f} (delta={delta:.2g}) per {unit}"
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

    _prv_domain_orders()
    acc = create_accountant(mechanism=name)
    if history:
        acc.load_state_dict({"history": list(merge_history(history)), "mechanism": acc.mechanism()})
    return acc


#: what Opacus' PRV accountant bounds its numerical domain with (an RDP accountant at δ/(8·4000·steps)):
#: its default orders end at 63, where at σ ≈ 2 the optimal order is the largest one (Opacus warns); up to
#: 4096 covers noise multipliers to about 10 at the rates fedpath uses, at milliseconds per evaluation
PRV_DOMAIN_ORDERS: list[float] = [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)] + [
    64.0, 80.0, 96.0, 128.0, 192.0, 256.0, 384.0, 512.0, 768.0, 1024.0, 2048.0, 4096.0
]


def _prv_domain_orders() -> None:
    """Make :data:`PRV_DOMAIN_ORDERS` the default orders of Opacus' RDP accountant in this process (the
    PRV accountant builds one internally and takes no orders argument)."""
    from opacus.accountants import RDPAccountant

    RDPAccountant.DEFAULT_ALPHAS = list(PRV_DOMAIN_ORDERS)


def _epsilon_kwargs(accountant: str) -> dict[str, Any]:
    return {"alphas": RDP_ORDERS} if accountant == "rdp" else {}


def epsilon_of(history: History, delta: float, accountant: str) -> float:
    """ε(δ) of a composition of subsampled Gaussian mechanisms (0 when nothing was spent)."""
    merged = merge_history(history)
    if not merged:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in merged):
        return math.inf
    return _epsilon_cached(tuple(merged), float(delta), accountant)


@functools.lru_cache(maxsize=1024)
def _epsilon_cached(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """The accountant's answer for one (history, δ): PRV takes ~0.3 s, and a job asks several times."""
    return float(make_accountant(accountant, list(history)).get_epsilon(delta=delta, **_epsilon_kwargs(accountant)))


def gaussian_epsilon(rounds: list[tuple[float, float]], delta: float) -> float:
    """ε(δ) of composing sampled Gaussian mechanisms, one ``(q, noise_multiplier)`` per release (RDP).

    ``noise_multiplier`` is relative to the mechanism's sensitivity: std / Δ."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    if not rounds:
        return 0.0
    if any(sigma <= 0 for _, sigma in rounds):
        return math.inf
    rdp = np.zeros(len(RDP_ORDERS))
    for q, sigma in rounds:
        rdp = rdp + np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDP_ORDERS))
    eps, _ = get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def group_epsilon(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(k·ε, k·e^{(k-1)ε}·δ): the (ε, δ) guarantee for a group of k records (δ capped at 1 = vacuous)."""
    if k <= 1:
        return epsilon, delta
    if math.isinf(epsilon):
        return math.inf, 1.0
    log_d = math.log(k) + (k - 1) * epsilon + math.log(delta)
    return k * epsilon, 1.0 if log_d >= 0 else math.exp(log_d)


@functools.lru_cache(maxsize=256)
def noise_for_target(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """The smallest σ (to 0.25%) that spends at most ``target_epsilon`` over ``steps`` steps at ``sample_rate``.

    A bisection like Opacus' ``get_noise_multiplier``, but bracketed around σ = 1 (halved or doubled until
    ε crosses the target) rather than from σ = 20: evaluations far from the answer are slow, and there the
    RDP bound's optimal order leaves any finite range of orders."""
    if target_epsilon <= 0 or steps <= 0:
        raise FedpathError(f"noise_for_target: target_epsilon={target_epsilon} and steps={steps} must be > 0")

    def eps(sigma: float) -> float:
        return epsilon_of([(sigma, sample_rate, steps)], delta, accountant)

    low, high = 0.5, 1.0
    if eps(high) > target_epsilon:
        while eps(high) > target_epsilon:
            low, high = high, 2 * high
            if high > 1e4:
                raise FedpathError(
                    f"noise_for_target: no noise multiplier up to 1e4 reaches eps={target_epsilon} "
                    f"(delta={delta:g}, q={sample_rate:g}, {steps} steps)"
                )
    else:
        while eps(low) <= target_epsilon:
            low, high = low / 2, low
            if low < 1e-3:
                return high
    while high - low > 0.0025 * high:
        mid = (low + high) / 2
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


def slide_guarantee(epsilon: float, delta: float, k: int, n_slides: int) -> tuple[float | None, float | None]:
    """Group privacy over the ``k`` tiles of one slide, or ``(None, None)`` when its δ is not below
    1/``n_slides`` (such a figure promises nothing and is never printed as a guarantee)."""
    eps_s, delta_s = group_epsilon(epsilon, delta, k)
    if math.isinf(eps_s) or delta_s >= 1.0 / max(1, n_slides):
        return None, None
    return eps_s, delta_s


def budget_of(pc: Any) -> Budget:
    """A site's budget from its privacy config: ``budget_epsilon``, else ``target_epsilon``. A job with a
    fixed noise multiplier and neither is refused unless ``budget_epsilon: unlimited`` says so plainly."""
    budget = pc.budget_epsilon if pc.budget_epsilon is not None else pc.target_epsilon
    if budget is None:
        raise FedpathError(
            "train.privacy: noise_multiplier is set but no budget: set budget_epsilon to the most ε this "
            "site may spend, or budget_epsilon: unlimited to run without one (the report says so)"
        )
    return "unlimited" if budget == "unlimited" else float(budget)


def noise_source_name(reproducible: bool) -> str:
    from pipeline.dprandom import SECURE_SOURCE, SEEDED_SOURCE

    return SEEDED_SOURCE if reproducible else SECURE_SOURCE


@dataclass
class LedgerEntry:
    """One job's spend: what was planned, what was actually spent, and ε after it (with its δ and unit)."""

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
    epsilon: float  # ε after this job (cumulative, per unit, at `delta`)
    epsilon_slide: float | None = None  # group privacy for a whole slide (tile unit), if meaningful
    delta_slide: float | None = None
    complete: bool = False
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)


class PrivacyLedger:
    """``sites/<site>/privacy.json``: the budget, entries per job and the accountant state, saved
    atomically. One object owns a site's sample-level privacy state, as Opacus' PrivacyEngine does."""

    def __init__(
        self,
        path: Path,
        site: str,
        accountant: str,
        delta: float | None,
        unit: str,
        entries: list[LedgerEntry],
        budget: dict[str, Any] | None = None,
        noise_source: str | None = None,
        private: bool = True,
        n_slides: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.site = site
        self.accountant = accountant
        self.delta = delta
        self.unit = unit
        self.entries = entries
        self.budget = budget
        self.noise_source = noise_source
        self.private = private
        self.n_slides = n_slides
        self.calibrations: dict[str, float] = {}

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
            if (entries or data.get("budget")) and have is not None and have != want:
                raise FedpathError(
                    f"{path}: the site's ε was accounted with {key}={have!r}; this job asks for {want!r} "
                    "(one site keeps one accountant and unit for its whole history)"
                )
        return cls(
            path,
            site,
            data.get("accountant", accountant),
            data.get("delta"),
            data.get("unit", unit),
            entries,
            budget=data.get("budget"),
            noise_source=data.get("noise_source"),
            private=bool(data.get("private", True)),
            n_slides=data.get("n_slides"),
        )._with_calibrations(data.get("calibrations", {}))

    def _with_calibrations(self, calibrations: dict[str, float]) -> PrivacyLedger:
        self.calibrations = {str(k): float(v) for k, v in calibrations.items()}
        return self

    def noise_for(self, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
        """:func:`noise_for_target` with this ledger's accountant, remembered in the ledger (σ is public;
        recalibrating every round costs seconds per job)."""
        key = f"eps={target_epsilon!r} delta={delta!r} q={sample_rate!r} steps={steps} acc={self.accountant}"
        if key not in self.calibrations:
            self.calibrations[key] = noise_for_target(target_epsilon, delta, sample_rate, steps, self.accountant)
        return self.calibrations[key]

    def history(self, exclude_job: str | None = None) -> History:
        """The accountant state: every entry's (σ, q, steps spent), in order."""
        return merge_history(
            [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries if e.job != exclude_job]
        )

    @property
    def epsilon(self) -> float:
        return 0.0 if self.delta is None else epsilon_of(self.history(), self.delta, self.accountant)

    def statement(self) -> dict[str, Any]:
        """This site's sample-level guarantee: ε with δ and unit, the slide-level figure or why there is
        none, the budget, the accountant and the noise source, and the text fedpath prints for it."""
        last = self.entries[-1] if self.entries else None
        eps = last.epsilon if last else 0.0
        out: dict[str, Any] = {
            "mechanism": "dp-sgd (sample-level, Opacus per-sample clipping + Gaussian noise)",
            "unit": self.unit,
            "epsilon": eps,
            "delta": self.delta,
            "accountant": self.accountant,
            "noise_source": self.noise_source,
            "private": self.private,
            "budget": self.budget,
            "text": format_epsilon(eps, self.delta, self.unit, self.private),
            "trust": "nobody: noise is added at the site before anything leaves it",
        }
        if self.unit == "tile":
            k = max((e.max_tiles_per_slide for e in self.entries), default=1)
            out["slide"] = {
                "epsilon": last.epsilon_slide if last else None,
                "delta": last.delta_slide if last else None,
                "tiles_per_slide": k,
                "n_slides": self.n_slides,
                "text": (
                    format_epsilon(last.epsilon_slide, last.delta_slide, "slide", self.private)
                    if last and last.epsilon_slide is not None
                    else "no slide-level guarantee at this budget (group privacy over "
                    f"{k} tiles gives delta >= 1/slides)"
                ),
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        last = self.entries[-1] if self.entries else None
        return {
            "version": LEDGER_VERSION,
            "site": self.site,
            "accountant": self.accountant,
            "unit": self.unit,
            "delta": self.delta,
            "budget": self.budget,
            "noise_source": self.noise_source,
            "private": self.private,
            "n_slides": self.n_slides,
            "epsilon": last.epsilon if last else 0.0,
            "epsilon_slide": last.epsilon_slide if last else None,
            "delta_slide": last.delta_slide if last else None,
            "statement": self.statement(),
            "group_privacy": "k tiles of one slide: (k*eps, k*exp((k-1)*eps)*delta) (Dwork & Roth 2014, "
            "Lemma 2.2), stated only when that delta < 1/slides",
            "accountant_state": {"history": [list(h) for h in self.history()]},
            "calibrations": self.calibrations,
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

    def open_budget(
        self, budget: Budget, delta: float, *, n_slides: int | None = None, noise_source: str | None = None
    ) -> None:
        """Write the site's budget (ε or unlimited, δ, unit, accountant) at its first job; refuse a job
        that asks for a different one, or that would mix seeded (not private) and secure noise."""
        want = {"epsilon": budget, "delta": float(delta), "unit": self.unit, "accountant": self.accountant}
        have = self.budget  # None: the first job (or a ledger from before budgets were stored)
        if have is not None:
            for key in ("epsilon", "delta", "unit", "accountant"):
                a, b = have.get(key), want[key]
                same = (
                    math.isclose(float(a), float(b), rel_tol=1e-9)
                    if isinstance(a, (int, float)) and isinstance(b, (int, float))
                    else a == b
                )
                if not same:
                    raise FedpathError(
                        f"{self.path}: site {self.site!r} opened its privacy budget with {key}={a!r}; this job "
                        f"asks for {key}={b!r} (one site keeps one budget; use a new run directory)"
                    )
        if self.delta is not None and not math.isclose(self.delta, delta):
            raise FedpathError(
                f"{self.path}: site {self.site!r} was accounted at delta={self.delta:g}; this job asks for {delta:g}"
            )
        private = noise_source is None or "NOT PRIVATE" not in noise_source
        if self.entries and self.private and not private:
            raise FedpathError(
                f"{self.path}: site {self.site!r} was trained with secure noise; the seeded-noise debug switch "
                "would make its guarantee void (use a new run directory for debugging)"
            )
        self.budget = want
        self.delta = float(delta)
        if noise_source is not None and (self.noise_source is None or not private):
            self.noise_source = noise_source
        self.private = self.private and private
        if n_slides is not None:
            self.n_slides = max(self.n_slides or 0, int(n_slides))

    def planned_epsilon(
        self, job: str, noise_multiplier: float, sample_rate: float, steps_total: int, delta: float
    ) -> float:
        """ε after ``job`` has spent ``steps_total`` steps (its already recorded steps included)."""
        others = [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries if e.job != job]
        return epsilon_of(others + [(noise_multiplier, sample_rate, steps_total)], delta, self.accountant)

    def check_budget(
        self, job: str, noise_multiplier: float, sample_rate: float, steps_total: int, delta: float
    ) -> float:
        """Refuse (:class:`PrivacyBudgetExceeded`) a job whose planned steps would push ε past the budget
        written by :meth:`open_budget` (call that first)."""
        if self.budget is None:
            raise FedpathError(f"{self.path}: no privacy budget was opened for site {self.site!r}")
        if self.delta is not None and not math.isclose(self.delta, delta):
            raise FedpathError(
                f"{self.path}: site {self.site!r} was accounted at delta={self.delta:g}; this job asks for {delta:g}"
            )
        planned = self.planned_epsilon(job, noise_multiplier, sample_rate, steps_total, delta)
        budget = self.budget["epsilon"]
        if budget != "unlimited" and planned > float(budget) * (1 + 1e-9):
            raise PrivacyBudgetExceeded(
                f"{self.path}: site {self.site!r} has spent eps={self.epsilon:.3f} (delta={delta:g}, per "
                f"{self.unit}); job {job!r} would bring it to eps={planned:.3f}, past the budget {budget:g}; "
                "refusing to start"
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
            n_slides = self.n_slides or 1
            e.epsilon_slide, e.delta_slide = slide_guarantee(e.epsilon, delta, max_tiles_per_slide, n_slides)
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
