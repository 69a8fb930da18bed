"""Shared fixtures. Real-data tests read the data root (FEDPATH_DATA_ROOT, default ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    env = os.environ.get("FEDPATH_DATA_ROOT")
    return Path(env) if env else (REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real-data root; a test that needs it is skipped (loudly) when it is absent."""
    root = _data_root()
    if not (root / "README.md").exists():
        if os.environ.get("CI"):
            pytest.fail(f"real data root {root} missing in CI")
        pytest.skip(f"real data root {root} not present")
    return root


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
