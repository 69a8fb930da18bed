"""``bench/bench_federation.py --smoke``: 2 and then 3 sites upload a tiny UNet's update at once to a real
aggregator (TLS loopback); the bench reports publish time against the write-and-average floor and the
aggregator's memory. No timing assertion."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest


def test_bench_federation_smoke(
    run_smoke: Callable[..., tuple[ModuleType, dict[str, Any]]],
    bench_dir_untouched: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench, report = run_smoke("bench_federation", "--plain")
    assert report["model"] == bench.SMOKE_MODEL
    res = report["results"]
    assert [r["sites"] for r in res] == [2, 3]
    for r in res:
        assert r["ratio"] > 0 and r["ratio_vs_nosync"] > 0
        assert r["agg_s"] > 0 and r["floor_s"] > 0 and r["rss_peak_mb"] > 0
        assert r["aggregate_s"] is not None
        assert r["agg_plain_s"] > 0 and r["ratio_plain"] > 0  # the same round without TLS
    assert set(report["per_update_ms"]) == {"sha256_ms", "write_ms", "write_fsync_ms", "validate_ms", "fold_ms"}
    assert all(v >= 0 for v in report["per_update_ms"].values())
    printed = capsys.readouterr().out
    assert "publish s" in printed and "ratio" in printed
    assert "peak RSS 2 -> 3 sites" in printed
    assert "sites without TLS" in printed and "per update, one thread (ms)" in printed
