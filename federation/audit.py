"""The aggregator's audit log: one JSON line per request (site, round, outcome, reason), appended durably.

Strings are clipped (a client chooses some of them), and a failing disk never turns a request's answer
into an error: the failure is logged and counted instead.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: longest string value written to the audit log
MAX_FIELD_CHARS = 512


class AuditLog:
    """Append-only JSON-lines file; each line is flushed and fsynced before the response goes out."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.failures = 0

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
        entry = {k: v[:MAX_FIELD_CHARS] if isinstance(v, str) else v for k, v in entry.items()}
        line = json.dumps(entry, sort_keys=True, default=str) + "\n"
        try:
            with self._lock, open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            self.failures += 1
            log.error("audit: could not append to %s (%s)", self.path, exc.strerror or exc)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
