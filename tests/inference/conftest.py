"""Fixtures of the inference tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from infer_utils import write_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "tiny.safetensors")
