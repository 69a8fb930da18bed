"""The run's machine-readable summary: ``<run_dir>/summary.json`` with one key per stage.

The one writer: every stage merges its key under an exclusive file lock, then replaces the file
atomically, so concurrent stages (site jobs, tiling workers) never lose each other's keys.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any

from fedcore.io import atomic_write_bytes


def update_summary(run_dir: Path | str, stage: str, data: Any, key: str | None = None) -> Path:
    """Merge ``{stage: data}`` (or ``{stage: {key: data}}``, keeping the stage's other keys)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "summary.json"
    with open(run_dir / ".summary.lock", "w") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        current: dict[str, Any] = {}
        if path.exists():
            try:
                current = json.loads(path.read_text())
            except json.JSONDecodeError:
                current = {}
        if key is None:
            current[stage] = data
        else:
            section = current.get(stage)
            section = section if isinstance(section, dict) else {}
            section[key] = data
            current[stage] = section
        atomic_write_bytes(path, json.dumps(current, indent=2, default=str).encode())
    return path


def read_summary(run_dir: Path | str) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}
