"""MPP fallback order and plausibility checks."""

from __future__ import annotations

import logging

import pytest
import tifffile

from wsi.errors import SlideOpenError
from wsi.mpp import PLAUSIBLE_MPP, resolve_mpp, tiff_tag_mpp, vendor_mpp


def test_tiff_tag_units() -> None:
    assert tiff_tag_mpp((96, 1), 2) == pytest.approx(264.5833, rel=1e-5)  # the 96-dpi trap
    assert tiff_tag_mpp((72, 1), "inch") == pytest.approx(352.7778, rel=1e-5)
    assert tiff_tag_mpp((40000, 1), 3) == pytest.approx(0.25)
    assert tiff_tag_mpp(40000.0, "centimeter") == pytest.approx(0.25)
    assert tiff_tag_mpp((101600, 2), tifffile.RESUNIT.INCH) == pytest.approx(0.5)
    assert tiff_tag_mpp((20000, 1), tifffile.RESUNIT.CENTIMETER) == pytest.approx(0.5)
    # no physical unit, no resolution, nonsense: no candidate at all
    assert tiff_tag_mpp((300, 1), 1) is None
    assert tiff_tag_mpp(None, 2) is None
    assert tiff_tag_mpp((1, 0), 2) is None
    assert tiff_tag_mpp("abc", 3) is None


def test_vendor_properties() -> None:
    assert vendor_mpp({"aperio.MPP": "0.4990"}) == pytest.approx(0.499)
    assert vendor_mpp({"openslide.mpp-x": "0.2265", "aperio.MPP": "0.25"}) == pytest.approx(0.2265)
    assert vendor_mpp({"openslide.mpp-x": "nan"}) is None
    assert vendor_mpp({}) is None


def test_fallback_order_and_rejection(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_mpp("s.svs", manifest=0.3, vendor=0.5, tiff_tags=0.7, config=0.9) == (0.3, "manifest", [])
    assert resolve_mpp("s.svs", vendor=0.5, tiff_tags=0.7, config=0.9).source == "vendor"
    assert resolve_mpp("s.svs", tiff_tags=0.7, config=0.9).source == "tiff_tags"
    assert resolve_mpp("s.svs", config=0.9).source == "config"
    with caplog.at_level(logging.WARNING, logger="wsi.mpp"):
        res = resolve_mpp("breast.tiff", tiff_tags=264.5833, config=0.5)
    assert res.mpp == 0.5 and res.source == "config"
    assert [r.source for r in res.rejected] == ["tiff_tags"]
    assert "96/72-dpi" in res.rejected[0].reason
    assert any(r.levelno == logging.WARNING and "breast.tiff" in r.getMessage() for r in caplog.records)
    # an implausible override is rejected too (a typo in a manifest must not pass silently)
    res = resolve_mpp("s.svs", manifest=250.0, vendor=0.25)
    assert (res.mpp, res.source, res.rejected[0].source) == (0.25, "vendor", "manifest")
    lo, hi = PLAUSIBLE_MPP
    assert resolve_mpp("s", vendor=lo).mpp == lo and resolve_mpp("s", vendor=hi).mpp == hi


def test_no_plausible_mpp_is_a_clear_error() -> None:
    with pytest.raises(SlideOpenError) as e:
        resolve_mpp("gbm/07.tif", tiff_tags=352.78)
    msg = str(e.value)
    assert msg.startswith("gbm/07.tif: no plausible MPP")
    assert "tiff_tags=352.8" in msg and "tiling.default_mpp" in msg and "manifest" in msg
    with pytest.raises(SlideOpenError, match="none present"):
        resolve_mpp("x.png")
