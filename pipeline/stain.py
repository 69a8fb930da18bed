"""Stain normalisation as a tile transform, its reference computed from the site's own tiles.

Macenko goes through MONAI's ``ExtractHEStains``/``NormalizeHEStains`` (monai.apps.pathology); Reinhard
matches per-channel LAB means and standard deviations (skimage colour conversion). The reference is a
small JSON-able dict, recorded with the run so a model's inputs can be reproduced at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.config import StainConfig
from pipeline.errors import FedpathError


def _mosaic(tiles: Sequence[np.ndarray]) -> np.ndarray:
    """Tiles side by side in one RGB image (Macenko's percentiles are then over all of them)."""
    return np.concatenate([np.asarray(t, dtype=np.uint8) for t in tiles], axis=1)


def fit_reference(method: str, tiles: Sequence[np.ndarray]) -> dict[str, Any]:
    """The stain reference of ``tiles`` (uint8 RGB) for ``method`` (macenko | reinhard)."""
    if not tiles:
        raise FedpathError("stain normalisation: no tiles to compute the reference from")
    img = _mosaic(tiles)
    if method == "macenko":
        from monai.apps.pathology.transforms import ExtractHEStains

        try:
            he = ExtractHEStains()(img)
        except ValueError as exc:
            raise FedpathError(f"stain normalisation: Macenko reference failed ({exc})") from None
        # reference max concentrations: 99th percentile of the stain concentrations under ``he``
        od = -np.log((img.reshape(-1, 3).astype(np.float64) + 1.0).clip(max=240) / 240)
        conc = np.linalg.lstsq(he, od.T, rcond=None)[0]
        max_c = [float(np.percentile(conc[0], 99)), float(np.percentile(conc[1], 99))]
        return {"method": "macenko", "target_he": np.asarray(he).tolist(), "max_cref": max_c}
    if method == "reinhard":
        from skimage.color import rgb2lab

        lab = rgb2lab(img).reshape(-1, 3)
        return {"method": "reinhard", "mean": lab.mean(0).tolist(), "std": lab.std(0).tolist()}
    raise FedpathError(f"stain normalisation: unknown method {method!r}")


class StainNormalizer:
    """A picklable ``uint8 HWC -> uint8 HWC`` transform; a tile it cannot normalise (e.g. no stain at all)
    is returned unchanged rather than failing the batch."""

    def __init__(self, reference: dict[str, Any]) -> None:
        self.reference = reference
        self._fn: Any = None

    def _build(self) -> Any:
        ref = self.reference
        if ref["method"] == "macenko":
            from monai.apps.pathology.transforms import NormalizeHEStains

            return NormalizeHEStains(
                target_he=np.asarray(ref["target_he"]), max_cref=np.asarray(ref["max_cref"])
            )
        mean, std = np.asarray(ref["mean"]), np.asarray(ref["std"])

        def reinhard(img: np.ndarray) -> np.ndarray:
            from skimage.color import lab2rgb, rgb2lab

            lab = rgb2lab(img)
            flat = lab.reshape(-1, 3)
            m, s = flat.mean(0), flat.std(0) + 1e-6
            out = lab2rgb(((lab - m) / s) * std + mean)
            return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)

        return reinhard

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self._fn is None:
            self._fn = self._build()
        try:
            return np.asarray(self._fn(image), dtype=np.uint8)
        except (ValueError, np.linalg.LinAlgError):
            return image

    def __getstate__(self) -> dict[str, Any]:
        return {"reference": self.reference, "_fn": None}


def build_stain(
    cfg: StainConfig, tiles: Sequence[np.ndarray]
) -> tuple[StainNormalizer | None, dict[str, Any] | None]:
    """The transform and its reference for the config (``none``: no transform)."""
    if cfg.method == "none":
        return None, None
    ref = fit_reference(cfg.method, tiles)
    return StainNormalizer(ref), ref
