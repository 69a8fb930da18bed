"""Helpers shared by the federation tests: a tiny federation config and update bodies."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import torch
import yaml

from federation.wire import encode_state, update_metadata

TINY_MODEL = {"name": "unet", "channels": [4, 8], "strides": [2], "num_res_units": 0, "groups": 2}


def write_config(tmp_path: Path, sites: list[str], **federation: Any) -> Path:
    """A run config under ``tmp_path`` with a tiny UNet and the given federation settings."""
    fed: dict[str, Any] = {"rounds": 2, "min_sites": len(sites), "port": 0, "round_deadline_s": 3600.0}
    fed.update(federation)
    data = {
        "name": "fedtest",
        "run_dir": str(tmp_path / "run"),
        "sites": [{"name": s, "manifest": str(tmp_path / f"{s}.csv")} for s in sites],
        "model": TINY_MODEL,
        "tiling": {"tile_size": 32},
        "federation": fed,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def random_delta(like: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=torch.float32) * scale for k, v in like.items()}


def update_body(
    delta: dict[str, torch.Tensor], site: str, round_index: int, n_tiles: int, epsilon: float | None = 1.0
) -> bytes:
    return encode_state(
        delta,
        update_metadata(
            site=site, round=round_index, n_tiles=n_tiles, epsilon=epsilon, update_id=uuid.uuid4().hex
        ),
    )
