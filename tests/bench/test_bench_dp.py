"""``bench/bench_dp.py --smoke``: every DP path of the bench (fedpath's, Opacus' hooks, Opacus' ghost
clipping, channels-last, bf16 autocast where the CPU has it) runs a full step and the ratios are reported.
No timing assertion."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest


def test_bench_dp_smoke(
    run_smoke: Callable[..., tuple[ModuleType, dict[str, Any]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench, report = run_smoke("bench_dp")
    paths = report["paths"]
    assert {"no_dp", "dp_fedpath", "dp_opacus_ghost", "dp_fedpath_cl", "no_dp_cl", "dp_fedpath_unfused"} <= set(paths)
    assert all(p["ratio_cpu"] > 0 and p["images_per_s_wall"] > 0 for p in paths.values())
    assert report["best_dp_path"] in paths
    assert "fastest DP path" in capsys.readouterr().out
    from pipeline.models import bf16_native

    if bf16_native():
        assert {"no_dp_bf16", "dp_fedpath_bf16"} <= set(paths)
        assert all(v["cpu"] > 0 for v in report["bf16_vs_float32"].values())
        assert not report["best_dp_path"].endswith("_bf16")  # the float32 ratio stays float32's
