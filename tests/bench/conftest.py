"""Helpers of the bench smoke tests: load a bench script as a module, and check that a smoke run leaves
the repository's bench/ folder (bench/out included) as it found it."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

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
