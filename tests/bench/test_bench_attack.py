"""``bench/bench_attack.py --smoke``: every attack of the bench (Inverting Gradients with and without
DP-SGD, DLG, multi-step) runs a few iterations on real MoNuSeg tiles and the per-iteration cost against the
forward+backward floor is reported. No timing or SSIM assertion: the smoke run is far too small."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.realdata


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """The bench sets torch's thread count: give the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bench_attack_smoke(
    data_root: Path,
    torch_threads: None,
    tmp_path: Path,
    run_smoke: Callable[..., tuple[ModuleType, dict[str, Any]]],
    bench_dir_untouched: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench, report = run_smoke("bench_attack", "--data-root", str(data_root))
    assert (tmp_path / "bench_attack_grid.png").stat().st_size > 0
    assert report["floor_forward_backward_s"] > 0 and report["targets"] == 1
    assert 0 < report["accounting"]["sample_rate"] < 1
    ig = report["inverting_gradients"]
    assert set(ig) == {"none", "8"}
    assert ig["none"]["sigma"] == 0 and ig["8"]["sigma"] > 0
    for r in ig.values():
        assert r["iteration_vs_floor"] > 0 and r["seconds_per_reconstruction"] > 0
        assert -1 <= r["mean_ssim"] <= 1
    assert report["dlg"]["seconds_per_reconstruction"] > 0 and report["multistep"]["seconds_per_reconstruction"] > 0
    printed = capsys.readouterr().out
    assert printed.count("x the floor") == 2
    assert "DLG (L-BFGS" in printed and "multi-step (" in printed
