"""``bench/bench_upload_load.py --smoke``: 3 sites upload a tiny UNet's updates for 2 rounds to a real
aggregator (TLS loopback) and the bench reports its ratios against plain durable file writes. No timing
assertion."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest


def test_bench_upload_load_smoke(
    run_smoke: Callable[..., tuple[ModuleType, dict[str, Any]]],
    bench_dir_untouched: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench, report = run_smoke("bench_upload_load")
    agg = report["aggregator"]
    assert agg["sites"] == 3 and agg["rounds"] == 2 and agg["uploads"] == 6
    ratios = report["ratios"]
    assert set(ratios) == {
        "uploads_per_s_vs_file_writes",
        "p99_vs_file_write_p99",
        "p99_vs_round_written_in_turn",
        "rss_growth_vs_round_bytes",
    }
    assert ratios["uploads_per_s_vs_file_writes"] > 0
    assert ratios["p99_vs_file_write_p99"] > 0 and ratios["p99_vs_round_written_in_turn"] > 0
    # the aggregator's RSS growth over a round's bytes: a memory ratio, not a timing one; with a tiny
    # model it can be anything from 0 (no growth sampled) up
    assert math.isfinite(ratios["rss_growth_vs_round_bytes"]) and ratios["rss_growth_vs_round_bytes"] >= 0
    printed = capsys.readouterr().out
    assert "ratios: uploads/s" in printed and "file-write p99" in printed and "RSS growth" in printed
