"""``bench/bench_augment.py --smoke``: fedpath's tile augmentation against skimage's colour deconvolution
on the same tiles and draws; the bench itself refuses to report when the two differ. No timing assertion."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


def test_bench_augment_smoke(
    run_smoke: Callable[..., tuple[ModuleType, dict[str, Any]]],
    bench_dir_untouched: None,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    bench, report = run_smoke("bench_augment")
    assert report["tiles"] == 64 and report["repeat"] == 1 and report["tile_px"] == 128
    assert set(report["ms_per_tile"]) == {"skimage", "fedpath"}
    assert all(v > 0 for v in report["ms_per_tile"].values()) and report["ratio_skimage_vs_fedpath"] > 0
    assert "speed-up" in capsys.readouterr().out
