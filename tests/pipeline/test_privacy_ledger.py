"""The privacy ledger: ε survives batch jobs exactly, budgets are enforced, group privacy is the closed form."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from pipeline.config import PrivacyConfig
from pipeline.dprandom import SEEDED_SOURCE
from pipeline.errors import FedpathError, PrivacyBudgetExceeded
from pipeline.privacy import (
    PrivacyLedger,
    budget_of,
    epsilon_of,
    format_epsilon,
    group_epsilon,
    noise_for_target,
    slide_guarantee,
)

SIGMA, Q, STEPS, DELTA = 1.1, 0.02, 25, 1e-5


def _job(ledger: PrivacyLedger, r: int, steps: int = STEPS) -> None:
    ledger.record(
        job=f"round-{r}",
        round_index=r,
        sample_rate=Q,
        noise_multiplier=SIGMA,
        max_grad_norm=1.0,
        steps=steps,
        planned_steps=steps,
        delta=DELTA,
        n_units=500,
        max_tiles_per_slide=40,
        complete=True,
    )


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_k_separate_jobs_equal_one_k_round_process(tmp_path: Path, accountant: str) -> None:
    k = 4
    path = tmp_path / "sites" / "a" / "privacy.json"
    for r in range(k):  # k batch jobs: each a fresh load from disk, one round, save
        ledger = PrivacyLedger.load(path, site="a", accountant=accountant)
        _job(ledger, r)
        ledger.save()
    separate = PrivacyLedger.load(path, site="a", accountant=accountant)

    # one process running k rounds, with Opacus' own accountant stepping k * STEPS times
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for _ in range(k * STEPS):
        acc.step(noise_multiplier=SIGMA, sample_rate=Q)
    one_process = acc.get_epsilon(delta=DELTA)

    assert separate.entries[-1].epsilon == one_process  # exactly, not approximately
    assert separate.epsilon == one_process
    assert separate.history() == [(SIGMA, Q, k * STEPS)] == [tuple(h) for h in acc.history]
    eps = [e.epsilon for e in separate.entries]
    assert eps == sorted(eps) and len(set(eps)) == k  # ε so far grows per round


def test_budget_refusal_says_why(tmp_path: Path) -> None:
    path = tmp_path / "sites" / "b" / "privacy.json"
    ledger = PrivacyLedger.load(path, site="b", accountant="rdp")
    _job(ledger, 0, steps=200)
    spent = ledger.epsilon
    ledger.open_budget(spent + 0.5, DELTA)
    ledger.save()
    ledger = PrivacyLedger.load(path, site="b", accountant="rdp")
    assert ledger.budget == {"epsilon": spent + 0.5, "delta": DELTA, "unit": "tile", "accountant": "rdp"}
    # a job within the budget passes and returns the planned ε
    planned = ledger.check_budget("round-1", SIGMA, Q, 3, DELTA)
    assert spent < planned < spent + 0.5
    with pytest.raises(PrivacyBudgetExceeded) as err:
        ledger.check_budget("round-1", SIGMA, Q, 5000, DELTA)
    msg = str(err.value)
    assert "'b'" in msg and f"eps={spent:.3f}" in msg and "budget" in msg and "delta=1e-05" in msg
    assert "\n" not in msg
    # refusing changed nothing on disk
    assert PrivacyLedger.load(path, site="b", accountant="rdp").epsilon == spent


def test_budget_is_stored_at_the_first_job_and_a_different_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sites" / "d" / "privacy.json"
    ledger = PrivacyLedger.load(path, site="d", accountant="rdp")
    ledger.open_budget(8.0, DELTA, n_slides=10)
    _job(ledger, 0)
    ledger.save()
    again = PrivacyLedger.load(path, site="d", accountant="rdp")
    again.open_budget(8.0, DELTA)  # the same budget: fine
    for budget, delta, what in ((16.0, DELTA, "epsilon"), ("unlimited", DELTA, "epsilon"), (8.0, 1e-6, "delta")):
        with pytest.raises(FedpathError, match=f"opened its privacy budget with {what}="):
            PrivacyLedger.load(path, site="d", accountant="rdp").open_budget(budget, delta)
    with pytest.raises(FedpathError, match="unit='tile'"):
        PrivacyLedger.load(path, site="d", accountant="rdp", unit="slide")
    # secure noise once: the seeded debug switch can never join this site's history
    with pytest.raises(FedpathError, match="seeded-noise debug switch"):
        PrivacyLedger.load(path, site="d", accountant="rdp").open_budget(8.0, DELTA, noise_source=SEEDED_SOURCE)


def test_noise_without_a_budget_is_refused_unless_unlimited() -> None:
    fixed = PrivacyConfig(target_epsilon=None, noise_multiplier=1.0)
    with pytest.raises(FedpathError, match="budget_epsilon: unlimited"):
        budget_of(fixed)
    assert budget_of(fixed.model_copy(update={"budget_epsilon": "unlimited"})) == "unlimited"
    assert budget_of(fixed.model_copy(update={"budget_epsilon": 3.0})) == 3.0
    assert budget_of(PrivacyConfig(target_epsilon=8.0)) == 8.0
    with pytest.raises(ValueError):
        PrivacyConfig(budget_epsilon="lots")  # type: ignore[arg-type]


def test_unlimited_budget_never_refuses_and_says_so(tmp_path: Path) -> None:
    ledger = PrivacyLedger.load(tmp_path / "sites" / "u" / "privacy.json", site="u", accountant="rdp")
    ledger.open_budget("unlimited", DELTA)
    assert ledger.check_budget("round-0", SIGMA, Q, 100_000, DELTA) > 50  # far past any sane budget
    assert ledger.statement()["budget"]["epsilon"] == "unlimited"


def test_slide_figure_only_when_group_privacy_means_something(tmp_path: Path) -> None:
    ledger = PrivacyLedger.load(tmp_path / "sites" / "e" / "privacy.json", site="e", accountant="rdp")
    ledger.open_budget(8.0, DELTA, n_slides=20)
    _job(ledger, 0)  # 40 tiles per slide at ε ≈ 1: δ_slide = 40 e^{39 ε} δ >> 1
    st = ledger.statement()
    assert ledger.entries[-1].epsilon_slide is None and ledger.entries[-1].delta_slide is None
    assert st["slide"]["epsilon"] is None and "no slide-level guarantee" in st["slide"]["text"]
    assert st["text"].startswith("eps=") and "delta=1e-05" in st["text"] and "per tile" in st["text"]
    # a tiny ε and 2 tiles per slide: a meaningful slide-level (ε, δ), stated with its δ
    e, d = slide_guarantee(0.01, 1e-7, 2, 20)
    assert e == pytest.approx(0.02) and d is not None and d < 1 / 20
    assert slide_guarantee(0.01, 3e-2, 2, 20) == (None, None)  # δ_slide ≥ 1/slides: nothing


def test_epsilon_is_never_printed_without_delta_and_unit() -> None:
    assert format_epsilon(8.0, 1e-5, "tile") == "eps=8.00 (delta=1e-05) per tile"
    assert "no slide-level guarantee" in format_epsilon(512.0, 1.0, "slide")
    assert "NOT PRIVATE" in format_epsilon(8.0, 1e-5, "tile", private=False)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_raises_no_alpha_range_warning(accountant: str) -> None:
    """Opacus warns 'Optimal order is the largest alpha' when the RDP orders are too narrow (a looser
    bound than necessary): fedpath's orders and bracketing make it untrue, not filtered."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for eps, q, steps in ((8.0, 0.125, 90), (1.0, 0.01, 300), (64.0, 0.1, 30)):
            sigma = noise_for_target(eps, DELTA, q, steps, accountant)
            assert epsilon_of([(sigma, q, steps)], DELTA, accountant) <= eps


def test_target_epsilon_noise_spends_the_target() -> None:
    steps = 60
    sigma = noise_for_target(8.0, DELTA, Q, steps, "rdp")
    eps = epsilon_of([(sigma, Q, steps)], DELTA, "rdp")
    assert 7.9 <= eps <= 8.0


def test_group_privacy_closed_form() -> None:
    eps, delta, k = 0.5, 1e-6, 3
    e, d = group_epsilon(eps, delta, k)
    assert e == pytest.approx(k * eps) and d == pytest.approx(k * math.exp((k - 1) * eps) * delta)
    assert group_epsilon(8.0, 1e-5, 64) == (512.0, 1.0)  # δ >= 1: vacuous, reported as such
    assert group_epsilon(2.0, 1e-5, 1) == (2.0, 1e-5)


def test_ledger_keeps_one_accountant(tmp_path: Path) -> None:
    path = tmp_path / "sites" / "c" / "privacy.json"
    ledger = PrivacyLedger.load(path, site="c", accountant="rdp")
    _job(ledger, 0)
    ledger.save()
    with pytest.raises(FedpathError, match="accountant='rdp'"):
        PrivacyLedger.load(path, site="c", accountant="prv")
