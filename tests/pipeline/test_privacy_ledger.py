"""The privacy ledger: ε survives batch jobs exactly, budgets are enforced, group privacy is the closed form."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from pipeline.errors import PrivacyBudgetExceeded
from pipeline.privacy import PrivacyLedger, epsilon_of, group_epsilon, noise_for_target

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
    ledger.save()
    spent = ledger.epsilon
    ledger = PrivacyLedger.load(path, site="b", accountant="rdp")
    # a job within the budget passes and returns the planned ε
    planned = ledger.check_budget("round-1", SIGMA, Q, 10, DELTA, budget=spent + 5)
    assert spent < planned < spent + 5
    with pytest.raises(PrivacyBudgetExceeded) as err:
        ledger.check_budget("round-1", SIGMA, Q, 5000, DELTA, budget=spent + 0.5)
    msg = str(err.value)
    assert "'b'" in msg and f"eps={spent:.3f}" in msg and "budget" in msg and "\n" not in msg
    # refusing changed nothing on disk
    assert PrivacyLedger.load(path, site="b", accountant="rdp").epsilon == spent


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
    from pipeline.errors import FedpathError

    with pytest.raises(FedpathError, match="accountant='rdp'"):
        PrivacyLedger.load(path, site="c", accountant="prv")
