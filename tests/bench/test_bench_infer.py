"""``bench/bench_infer.py --smoke``: the bench runs end to end (real-data model, MONAI next to fedpath on a
real slide, bf16 Dice, memory, synthetic region) and reports its ratios. No timing assertion: the smoke
run is far too small to mean anything; the figures come from the full run (README)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.realdata


def test_bench_infer_smoke(
    data_root: Path,
    tmp_path: Path,
    run_smoke: Callable[..., tuple[ModuleType, dict[str, Any]]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEDPATH_DATA_ROOT", str(data_root))
    bench, report = run_smoke("bench_infer", "--workdir", str(tmp_path))
    real = report["real"]
    assert real["ratio_float32_vs_monai"] > 0 and real["monai_s"] > 0
    assert 0 < real["windows_tissue"] < real["windows_total"]  # the real region has glass to skip
    assert 0 <= real["dice"]["float32"]["mean"] <= 1
    assert set(report["memory"]) == {"1024"} and report["throughput"]["ratio_vs_monai"] > 0
    printed = capsys.readouterr().out
    assert "real region CMU-1-Small-Region.svs" in printed and "held-out MoNuSeg Dice" in printed
