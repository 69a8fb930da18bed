"""The update-level DP ledger of one site (``sites/<site>/update_privacy.json``), beside the sample-level
:class:`pipeline.privacy.PrivacyLedger`: one load/save persistor instead of dict handling in the client.

Each round's Gaussian release is one entry keyed by round: re-recording a round (a re-run job) replaces
its entry instead of spending twice. ε is composed by the strategy's accountant
(:meth:`Strategy.update_epsilon`) over the participations recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcore.errors import FedpathError
from fedcore.io import atomic_write_json

ACCOUNTANT = "rdp (opacus.accountants.analysis.rdp), one Gaussian per round, q=1, sensitivity 2C (replacement)"


@dataclass
class UpdateLedger:
    path: Path
    site: str
    entries: list[dict[str, Any]] = field(default_factory=list)
    epsilon: float | None = None
    delta: float | None = None
    noise_source: str | None = None

    @classmethod
    def load(cls, path: Path, site: str) -> UpdateLedger:
        if not path.is_file():
            return cls(path, site)
        try:
            data = json.loads(path.read_text())
            return cls(
                path,
                site,
                list(data["entries"]),
                data.get("epsilon"),
                data.get("delta"),
                data.get("noise_source"),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FedpathError(f"{path}: unreadable update-level privacy ledger ({type(exc).__name__})") from None

    def record(self, round_index: int, entry: dict[str, Any], epsilon_of: Any) -> dict[str, Any]:
        """Record round ``round_index``'s release; ``epsilon_of(participations) -> (ε, δ)``. Saves."""
        entries = [e for e in self.entries if e["round"] != round_index]
        participations = len(entries) + 1
        eps, delta = epsilon_of(participations)
        entries.append(entry | {"round": round_index, "participations": participations, "epsilon": eps})
        self.entries = sorted(entries, key=lambda e: e["round"])
        self.epsilon, self.delta, self.noise_source = eps, delta, entry.get("noise_source")
        self.save()
        return self.as_dict()

    def as_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "unit": "site",
            "entries": self.entries,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "noise_source": self.noise_source,
            "accountant": ACCOUNTANT,
        }

    def save(self) -> None:
        atomic_write_json(self.path, self.as_dict())
