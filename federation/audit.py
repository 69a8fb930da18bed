"""The aggregator's audit log: one JSON line per request (site, round, outcome, reason), appended durably."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any


class AuditLog:
    """Append-only JSON-lines file; each line is flushed and fsynced before the response goes out."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def record(
        self,
        *,
        action: str,
        site: str | None,
        round: int | None,
        outcome: str,
        status: int,
        reason: str = "",
        **extra: Any,
    ) -> None:
        entry = {
            "time": time.time(),
            "action": action,
            "site": site,
            "round": round,
            "outcome": outcome,
            "status": status,
            "reason": reason,
        } | extra
        line = json.dumps(entry, sort_keys=True, default=str) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
