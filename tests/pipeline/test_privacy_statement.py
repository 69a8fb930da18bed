"""The run's privacy statement: every mechanism with unit, ε, δ and trust; composition; no vacuous figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from federation.strategies import CentralDP, FedAvg
from pipeline.dprandom import SECURE_SOURCE, SEEDED_SOURCE
from pipeline.privacy import PrivacyLedger
from pipeline.statement import STATEMENT_FILE, statement_lines, write_statement

DELTA = 1e-5


def _ledger(run: Path, site: str, source: str = SECURE_SOURCE) -> PrivacyLedger:
    ledger = PrivacyLedger.load(run / "sites" / site / "privacy.json", site=site, accountant="rdp")
    ledger.open_budget(8.0, DELTA, n_slides=12, noise_source=source)
    ledger.record(
        job="round-0",
        round_index=0,
        sample_rate=0.05,
        noise_multiplier=1.2,
        max_grad_norm=1.0,
        steps=60,
        planned_steps=60,
        delta=DELTA,
        n_units=320,
        max_tiles_per_slide=40,
        complete=True,
    )
    ledger.save()
    return ledger


def test_statement_composes_sample_and_update_level_per_unit(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, "a")
    upd = {
        "site": "a",
        "unit": "site",
        "epsilon": 3.0,
        "delta": 1e-6,
        "noise_source": SECURE_SOURCE,
        "accountant": "rdp",
        "entries": [{"round": 0, "epsilon": 3.0, "noise_source": SECURE_SOURCE}],
    }
    (tmp_path / "sites" / "a" / "update_privacy.json").write_text(json.dumps(upd))
    st = write_statement(tmp_path)
    assert json.loads((tmp_path / STATEMENT_FILE).read_text()) == st
    a = st["sites"]["a"]
    assert [m["level"] for m in a["mechanisms"]] == ["sample", "update"]
    assert all(m["delta"] is not None and m["unit"] in ("tile", "site") for m in a["mechanisms"])
    tile, site = a["against_aggregator"]["tile"], a["against_aggregator"]["site"]
    # a tile change is also a change of the site's data: both mechanisms protect a tile
    assert tile["epsilon"] == pytest.approx(ledger.epsilon + 3.0) and tile["delta"] == pytest.approx(DELTA + 1e-6)
    assert site["epsilon"] == 3.0 and site["mechanisms"] == ["update"]
    assert "no slide-level guarantee" in a["mechanisms"][0]["slide"]["text"]
    lines = dict(statement_lines(st))
    assert "per tile" in lines["privacy, site a"] and "delta=" in lines["privacy, site a"]


def test_central_dp_never_protects_against_the_aggregator(tmp_path: Path) -> None:
    _ledger(tmp_path, "b")
    central = CentralDP(FedAvg(), clip_norm=1.0, noise_multiplier=1.0, delta=DELTA, n_sites=3)
    central.history = [{"round": r, "sites": 3, "q": 1.0, "noise_multiplier": 1.0, "clipped": 0} for r in range(3)]
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "state.json").write_text(json.dumps({"central_privacy": central.privacy_report()}))
    b = write_statement(tmp_path)["sites"]["b"]
    cen = next(m for m in b["mechanisms"] if m["level"] == "central")
    assert "aggregator" in cen["trust"] and cen["unit"] == "site"
    # against the aggregator there is no site-level guarantee; model users get the central one
    assert b["against_aggregator"]["site"]["epsilon"] is None
    assert b["against_global_model_users"]["site"]["epsilon"] == pytest.approx(central.epsilon())


def test_seeded_debug_noise_voids_the_statement(tmp_path: Path) -> None:
    _ledger(tmp_path, "c", source=SEEDED_SOURCE)
    c = write_statement(tmp_path)["sites"]["c"]
    assert c["private"] is False
    assert all(v["epsilon"] is None for v in c["against_aggregator"].values())
    assert "NOT PRIVATE" in c["against_aggregator"]["tile"]["text"] and "NOT PRIVATE" in c["headline"]
    assert "NOT PRIVATE" in c["mechanisms"][0]["text"]
