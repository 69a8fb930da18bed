"""Helpers of the bench smoke tests: load a bench script as a module, and check that a smoke run leaves
the repository's bench/ folder (bench/out included) as it found it."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


@pytest.fixture
def load_bench(repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], ModuleType]:
    """``load_bench("bench_tiling")``: bench/bench_tiling.py, executed as a fresh module, registered in
    sys.modules for the test (a process pool pickles the bench's functions by module name)."""

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, repo_root / "bench" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        return module

    return load


def _bench_files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under bench/ (bytecode caches aside) with its size and mtime."""
    out = {}
    for p in root.rglob("*"):
        if "__pycache__" in p.parts or not p.is_file():
            continue
        st = p.stat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def bench_dir_untouched(repo_root: Path) -> Iterator[None]:
    """Fails the test when it created, changed or removed anything under bench/ (a smoke run writes only
    to its tmp dirs)."""
    before = _bench_files(repo_root / "bench")
    yield
    after = _bench_files(repo_root / "bench")
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the smoke run wrote into the repository: {changed[:10]}"


@pytest.fixture
def run_smoke(
    load_bench: Callable[[str], ModuleType], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., tuple[ModuleType, dict[str, Any]]]:
    """``bench, report = run_smoke("bench_tiling", "--workdir", d)``: the bench's ``--smoke`` run, its JSON
    written to the test's tmp dir and checked to be the report ``main`` returned. One torch/OpenMP thread
    (the benches set it by default; the setting is kept out of the session)."""

    def run(name: str, *args: str) -> tuple[ModuleType, dict[str, Any]]:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        bench = load_bench(name)
        out = tmp_path / f"{name}.json"
        report = bench.main(["--smoke", *args, "--out", str(out)])
        assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
        return bench, report

    return run
