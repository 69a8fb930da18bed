"""``bench/bench_readers.py --smoke``: the region-read bench (raw decode, TiffSlideReader, OpenSlide,
tifffile's zarr store, unaligned reads) runs on a small slide and reports its ratios. Real H&E pixels when
the data root is there, a synthetic pattern otherwise. No timing assertion."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


def test_bench_readers_smoke(
    tmp_path: Path,
    run_smoke: Callable[..., tuple[ModuleType, dict[str, Any]]],
    bench_dir_untouched: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench, report = run_smoke("bench_readers", "--workdir", str(tmp_path))
    assert report["size"] == 2048 and report["repeat"] == 1 and report["n_tiles"] == 64
    assert set(report["tiles_per_s"]) == {
        "raw_decode",
        "tiffslidereader",
        "openslide",
        "tifffile_zarr",
        "tiffslidereader_unaligned",
        "openslide_unaligned",
    }
    assert all(v > 0 for v in report["tiles_per_s"].values())
    ratios = report["ratios"]
    assert set(ratios) == {"ours_vs_raw", "ours_vs_openslide", "ours_vs_tifffile_zarr", "unaligned_ours_vs_openslide"}
    assert all(v > 0 for v in ratios.values()), ratios
    assert [p.name for p in tmp_path.iterdir()] == ["bench_readers.json"]  # the scratch slide is gone
    printed = capsys.readouterr().out
    for k in ratios:
        assert f"{k:28s}" in printed
