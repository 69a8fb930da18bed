"""Resolution (µm per pixel at level 0) with a declared fallback order.

Slides lie about their resolution: a 96-dpi default in the TIFF tags reads as 264.58 µm/px, some files
carry no resolution at all. The order is fixed and recorded so a tile's provenance says where its scale
came from:

1. ``manifest``: the per-slide override in the manifest (an operator's statement wins),
2. ``vendor``: a scanner property (``aperio.MPP``, ``openslide.mpp-x`` of a vendor format, OME
   ``PhysicalSizeX``),
3. ``tiff_tags``: ``XResolution`` with ``ResolutionUnit`` (centimetre or inch),
4. ``config``: ``tiling.default_mpp``.

A value outside :data:`PLAUSIBLE_MPP` is rejected with a logged warning in favour of the next source.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import NamedTuple

from wsi.errors import SlideOpenError

log = logging.getLogger(__name__)

#: µm/px a brightfield scan can plausibly have (100x oil ~0.05, a 0.5x overview ~20).
PLAUSIBLE_MPP: tuple[float, float] = (0.05, 20.0)

#: The sources in fallback order, as recorded in provenance (``mpp_source``).
MPP_SOURCES: tuple[str, ...] = ("manifest", "vendor", "tiff_tags", "config")


class RejectedMpp(NamedTuple):
    """A candidate that was present but not used, and why."""

    source: str
    value: float
    reason: str


class MppResolution(NamedTuple):
    """The resolved MPP, the source that gave it, and every candidate rejected on the way."""

    mpp: float
    source: str
    rejected: list[RejectedMpp]


def _as_float(value: object) -> float | None:
    if value is None:
        return None
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def vendor_mpp(properties: Mapping[str, str]) -> float | None:
    """MPP from OpenSlide properties of a vendor format (None when absent or unparsable).

    For OpenSlide's ``generic-tiff`` vendor, ``openslide.mpp-x`` is derived from the TIFF resolution tags,
    so it is not a vendor statement: callers pass those properties to :func:`tiff_tag_mpp` instead.
    """
    for key in ("openslide.mpp-x", "aperio.MPP", "openslide.mpp-y"):
        v = _as_float(properties.get(key))
        if v is not None and v > 0:
            return v
    return None


def tiff_tag_mpp(x_resolution: object, resolution_unit: object) -> float | None:
    """MPP from the TIFF ``XResolution`` (pixels per unit) and ``ResolutionUnit`` tags.

    ``x_resolution`` may be a rational tuple ``(num, den)`` or a number; ``resolution_unit`` is the TIFF
    code (2 = inch, 3 = centimetre) or its name. Unit ``1``/``none`` carries no physical scale: None.
    """
    if x_resolution is None or resolution_unit is None:
        return None
    if isinstance(x_resolution, tuple | list):
        if len(x_resolution) != 2 or not x_resolution[1]:
            return None
        px_per_unit = _as_float(x_resolution[0])
        den = _as_float(x_resolution[1])
        if px_per_unit is None or den is None:
            return None
        px_per_unit /= den
    else:
        px_per_unit = _as_float(x_resolution)
    if not px_per_unit or px_per_unit <= 0:
        return None
    unit = str(getattr(resolution_unit, "name", resolution_unit)).strip().lower()
    um_per_unit = {"2": 25400.0, "inch": 25400.0, "3": 10000.0, "centimeter": 10000.0, "centimetre": 10000.0}
    if unit not in um_per_unit:
        return None
    return um_per_unit[unit] / px_per_unit


def resolve_mpp(
    path: object,
    *,
    manifest: float | None = None,
    vendor: float | None = None,
    tiff_tags: float | None = None,
    config: float | None = None,
    plausible: tuple[float, float] = PLAUSIBLE_MPP,
) -> MppResolution:
    """Pick the first plausible MPP in the order manifest, vendor, tiff_tags, config.

    Raises :class:`wsi.errors.SlideOpenError` naming ``path`` when no source gives a plausible value.
    """
    lo, hi = plausible
    rejected: list[RejectedMpp] = []
    for source, value in zip(MPP_SOURCES, (manifest, vendor, tiff_tags, config), strict=True):
        if value is None:
            continue
        if not (lo <= value <= hi):
            reason = f"outside the plausible range [{lo}, {hi}] µm/px"
            if source == "tiff_tags" and (abs(value - 264.5833) < 0.01 or abs(value - 352.7778) < 0.01):
                reason += " (a 96/72-dpi screen default, not a scan resolution)"
            rejected.append(RejectedMpp(source, value, reason))
            log.warning("%s: rejected %s MPP %.4g µm/px: %s", path, source, value, reason)
            continue
        if rejected:
            log.warning("%s: using %s MPP %.4g µm/px instead", path, source, value)
        return MppResolution(float(value), source, rejected)
    tried = "; ".join(f"{r.source}={r.value:.4g} ({r.reason})" for r in rejected) or "none present"
    raise SlideOpenError(
        f"{path}: no plausible MPP (tried {tried}); give an mpp override in the manifest or set tiling.default_mpp"
    )
