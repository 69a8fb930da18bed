"""``bench/bench_simulate.py --smoke``: the bench runs end to end and reports its ratios. No timing assertion:
the smoke run is far too small to mean anything; the figures come from the full run (README)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.realdata


def test_bench_simulate_smoke(
    data_root: Path, repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEDPATH_DATA_ROOT", str(data_root))
    spec = importlib.util.spec_from_file_location("bench_simulate", repo_root / "bench" / "bench_simulate.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "simulate.json"
    report = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
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
