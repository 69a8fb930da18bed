"""The run's machine-readable summary: ``<run_dir>/summary.json`` with one key per stage."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any


def update_summary(run_dir: Path, stage: str, data: Any) -> Path:
    """Merge ``{stage: data}`` into the run's summary.json atomically (safe across processes)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "summary.json"
    lock = run_dir / ".summary.lock"
    with open(lock, "w") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        current: dict[str, Any] = {}
        if path.exists():
            try:
                current = json.loads(path.read_text())
            except json.JSONDecodeError:
                current = {}
        current[stage] = data
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(current, indent=2, default=str))
        os.replace(tmp, path)
    return path


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}
