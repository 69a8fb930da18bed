"""``bench/bench_dp.py --smoke``: every DP path of the bench (fedpath's, Opacus' hooks, Opacus' ghost
clipping, channels-last) runs a full step and the ratios are reported. No timing assertion."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


def test_bench_dp_smoke(repo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_dp", repo_root / "bench" / "bench_dp.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "dp.json"
    report = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    paths = report["paths"]
    assert {"no_dp", "dp_fedpath", "dp_opacus_ghost", "dp_fedpath_cl", "no_dp_cl", "dp_fedpath_unfused"} <= set(paths)
    assert all(p["ratio_cpu"] > 0 and p["images_per_s_wall"] > 0 for p in paths.values())
    assert report["best_dp_path"] in paths
    assert "fastest DP path" in capsys.readouterr().out
