"""Mean ± sd over seeds, for the experiment's tables (one helper for every table that reports a spread)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample sd (None with fewer than two values) of the values that exist."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def pm(m: Any, sd: Any, nd: int = 3) -> str:
    """``m ± sd`` to ``nd`` decimals; ``m`` alone without a spread; ``-`` without a value."""
    if m is None:
        return "-"
    return f"{m:.{nd}f}" if sd is None else f"{m:.{nd}f} ± {sd:.{nd}f}"


def spread(values: Sequence[float | None], nd: int = 3) -> str:
    """:func:`pm` of :func:`mean_sd`: the values' mean ± sd as a table cell."""
    return pm(*mean_sd(values), nd)
