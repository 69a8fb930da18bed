"""One privacy statement per run: ``<run_dir>/privacy_statement.json``, read by the CLI, report and README.

Per site it lists every mechanism that touched the site's data, each with its unit, ε, δ, accountant,
noise source and who must be trusted, and the composed guarantee against each observer:

* **sample-level DP-SGD** (``sites/<s>/privacy.json``): unit tile (or slide with ``privacy.unit: slide``);
  noise added at the site, so it holds against everyone, the aggregator included.
* **update-level DP** (``sites/<s>/update_privacy.json``, FedDP-style local noise on the update): unit
  site (replacement, sensitivity 2C); added at the site, holds against everyone.
* **central DP-FedAvg** (``server/state.json``): unit site; the aggregator adds the noise after seeing
  raw updates, so it holds only against those who see the published global models, never against the
  aggregator.

Composition is basic (ε and δ add). A change of one tile is also a change of its slide and of its site's
data, so a site-level mechanism protects every finer unit too: against the aggregator, the tile-level
total is DP-SGD's (ε, δ) plus update-level's. A mechanism run with seeded debug noise voids the site's
statement: it says "no guarantee" and no ε of it is printed as one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedcore.layout import RunLayout
from pipeline.errors import FedpathError
from pipeline.privacy import PrivacyLedger, format_epsilon

STATEMENT_FILE = "privacy_statement.json"
STATEMENT_VERSION = 1
_FINER = {"tile": 0, "slide": 1, "site": 2}


def _read(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FedpathError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FedpathError(f"{path}: not a JSON object")
    return data


def _sample_level(path: Path, site: str) -> dict[str, Any] | None:
    data = _read(path)
    if data is None:
        return None
    ledger = PrivacyLedger.load(path, site=data.get("site") or site, accountant=data.get("accountant", "prv"),
                                unit=data.get("unit", "tile"))
    st = ledger.statement()
    st["level"] = "sample"
    st["source"] = str(path)
    return st


def _update_level(path: Path) -> dict[str, Any] | None:
    data = _read(path)
    if data is None or not data.get("entries"):
        return None
    eps, delta = data.get("epsilon"), data.get("delta")
    source = data.get("noise_source") or next(
        (e.get("noise_source") for e in data["entries"] if e.get("noise_source")), None
    )
    private = source is None or "NOT PRIVATE" not in source
    return {
        "level": "update",
        "mechanism": "update-level Gaussian (site clips its update to C, adds N(0, (sigma C)^2))",
        "unit": "site",
        "epsilon": eps,
        "delta": delta,
        "accountant": data.get("accountant"),
        "noise_source": source,
        "private": private,
        "releases": len(data["entries"]),
        "text": format_epsilon(eps, delta, "site", private),
        "trust": "nobody: noise is added at the site before upload",
        "source": str(path),
    }


def _central(state_path: Path) -> dict[str, Any] | None:
    data = _read(state_path)
    report = (data or {}).get("central_privacy")
    if not isinstance(report, dict):
        return None
    eps, delta = report.get("epsilon"), report.get("delta")
    return {
        "level": "central",
        "mechanism": "central DP-FedAvg (server clips each update to C, noise on the sum)",
        "unit": "site",
        "epsilon": eps,
        "delta": delta,
        "accountant": report.get("accountant"),
        "noise_source": report.get("noise_source"),
        "private": True,
        "rounds": report.get("rounds"),
        "text": format_epsilon(eps, delta, "site"),
        "trust": report.get("trust")
        or "the aggregator (it sees raw updates); holds against whoever sees only the global models",
        "source": str(state_path),
    }


def _compose(mechs: list[dict[str, Any]], unit: str) -> dict[str, Any]:
    """Basic composition of the mechanisms that protect ``unit`` (those of that unit or a coarser one)."""
    use = [m for m in mechs if _FINER.get(m["unit"], 2) >= _FINER[unit]]
    if not use:
        return {"unit": unit, "epsilon": None, "delta": None, "text": f"no {unit}-level guarantee"}
    if not all(m.get("private", True) for m in use):
        return {"unit": unit, "epsilon": None, "delta": None, "private": False,
                "text": "no guarantee: seeded debug noise (NOT PRIVATE)"}
    eps = [m["epsilon"] for m in use]
    deltas = [m["delta"] for m in use]
    if any(e is None for e in eps) or any(d is None for d in deltas):
        return {"unit": unit, "epsilon": None, "delta": None, "text": f"no {unit}-level guarantee"}
    e, d = float(sum(eps)), float(sum(deltas))
    return {
        "unit": unit,
        "epsilon": e,
        "delta": d,
        "mechanisms": [m["level"] for m in use],
        "text": format_epsilon(e, d, unit) if not math.isinf(e) else f"no {unit}-level guarantee (eps=inf)",
    }


def site_statement(run_dir: Path, site: str) -> dict[str, Any]:
    lay = RunLayout(run_dir).site(site)
    sample = _sample_level(lay.privacy, site)
    update = _update_level(lay.update_privacy)
    central = _central(RunLayout(run_dir).server.state)
    local = [m for m in (sample, update) if m is not None]
    units = sorted({m["unit"] for m in local} | {"site"}, key=lambda u: _FINER.get(u, 2))
    against_aggregator = {u: _compose(local, u) for u in units}
    against_model_users = dict(against_aggregator)
    if central is not None:
        # whoever sees only the global models: the central guarantee also holds (post-processing), and
        # so does every local one; each holds on its own, the best per unit is what they can rely on
        cen = _compose([central], "site")
        best = against_model_users.get("site")
        if best is None or best.get("epsilon") is None or (
            cen.get("epsilon") is not None and cen["epsilon"] < best["epsilon"]
        ):
            against_model_users["site"] = cen
    return {
        "site": site,
        "mechanisms": [m for m in (sample, update, central) if m is not None],
        "against_aggregator": against_aggregator,
        "against_global_model_users": against_model_users,
        "private": all(m.get("private", True) for m in local),
        "headline": against_aggregator[units[0]]["text"] if local else "no DP mechanism ran at this site",
    }


def build_statement(run_dir: Path | str) -> dict[str, Any]:
    run_dir = Path(run_dir)
    sites = sorted(
        p.name for p in (run_dir / "sites").glob("*")
        if p.is_dir() and ((p / "privacy.json").is_file() or (p / "update_privacy.json").is_file())
    ) if (run_dir / "sites").is_dir() else []
    return {
        "version": STATEMENT_VERSION,
        "run_dir": str(run_dir),
        "composition": "basic (eps and delta add); a site-level mechanism protects every finer unit",
        "trust": {
            "sample": "nobody (noise at the site)",
            "update": "nobody (noise at the site)",
            "central": "the aggregator, which sees raw updates",
        },
        "sites": {s: site_statement(run_dir, s) for s in sites},
    }


def write_statement(run_dir: Path | str) -> dict[str, Any]:
    """Build and atomically write ``privacy_statement.json``; returns it."""
    from fedcore.io import atomic_write_json

    run_dir = Path(run_dir)
    st = build_statement(run_dir)
    atomic_write_json(run_dir / STATEMENT_FILE, st)
    return st


def statement_lines(st: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) per site for a terminal table: the guarantee against the aggregator, finest unit
    first, and the site-level one."""
    out: list[tuple[str, str]] = []
    for site, s in st["sites"].items():
        parts = [v["text"] for v in s["against_aggregator"].values()]
        out.append((f"privacy, site {site}", "; ".join(dict.fromkeys(parts)) or s["headline"]))
    return out
