"""``bench/bench_simulate.py --smoke``: the bench runs end to end and reports its ratios. No timing assertion:
the smoke run is far too small to mean anything; the figures come from the full run (README)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.realdata


def test_bench_simulate_smoke(
    data_root: Path,
    run_smoke: Callable[..., tuple[ModuleType, dict[str, Any]]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEDPATH_DATA_ROOT", str(data_root))
    bench, report = run_smoke("bench_simulate")
    assert set(report["ratios"]) == {"cold_vs_central", "warm_vs_central", "cold_vs_warm"}
    assert all(v > 0 for v in report["ratios"].values())
    res = report["results"]
    # the same total number of optimiser steps in all three; every job succeeded, none fell back
    assert res["central"]["steps"] == res["cold"]["steps"] == res["warm"]["steps"] == 2 * 2 * 2
    for mode in ("cold", "warm"):
        assert res[mode]["fallbacks"] == []
        assert len(res[mode]["jobs"]) == 4 and all(j["rc"] == 0 for j in res[mode]["jobs"])
    printed = capsys.readouterr().out
    assert "ratio warm_vs_central" in printed and "simulate warm" in printed
