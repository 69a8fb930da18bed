"""``bench/bench_tiling.py --smoke``: every phase of the tiling bench (fedpath with 1 and 2 workers, the raw
decode in one and two processes, the decode-plus-write floor, the disk, OpenSlide and MONAI) runs on a small
generated slide and the ratios are reported. No timing assertion: the smoke run is far too small to mean
anything; the figures come from the full run (README)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

RATIOS = {
    "fedpath1_over_raw",
    "fedpath1_over_decode_write_floor",
    "fedpath1_over_openslide",
    "fedpath1_over_monai",
    "fedpath1_over_best_peer",
    "fedpath2_over_fedpath1",
    "fedpath2_over_two_worker_limit",
    "raw2_over_raw1",
    "fedpath_scaling_over_raw_scaling",
    "fedpath2_share_of_disk_bandwidth",
    "cpu_fedpath1_over_raw",
    "cpu_fedpath1_over_openslide",
}


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")  # MONAI's peer reader
def test_bench_tiling_smoke(
    tmp_path: Path,
    run_smoke: Callable[..., tuple[ModuleType, dict[str, Any]]],
    bench_dir_untouched: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench, report = run_smoke("bench_tiling", "--workdir", str(tmp_path))
    assert set(report["ratios"]) == RATIOS
    assert all(v > 0 for v in report["ratios"].values()), report["ratios"]
    assert report["size"] == 4096
    one, two = report["fedpath_1"], report["fedpath_2"]
    assert one["tiles"] == two["tiles"] == report["raw_decode"]["tiles"] > 0
    assert report["raw_decode_2procs"]["procs"] == 2 and report["raw_decode_2procs"]["tiles"] == one["tiles"]
    assert 0 < report["openslide_loop"]["tiles"] <= 16 and 0 < report["monai"]["tiles"] <= 16
    assert all(len(v) == 1 for v in report["repeats"].values())  # one repeat of each phase
    assert [p.name for p in tmp_path.iterdir()] == ["bench_tiling.json"]  # the scratch folder is gone
    printed = capsys.readouterr().out
    for line in (
        "fedpath(1) / raw decode   =",
        "fedpath(1) / OpenSlide    =",
        "fedpath(2) / fedpath(1)   =",
        "raw decode, 2 processes / 1 =",
        "fedpath scaling / raw scaling =",
        "fedpath(2) / min(2 x fedpath(1), disk) =",
    ):
        assert line in printed
