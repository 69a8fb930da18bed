"""Reconstruction quality: MSE, PSNR, SSIM (scikit-image), and leakage relative to a prior.

Images are float arrays in [0, 1], (H, W, 3) or torch (3, H, W). Leakage answers "did the attacker
learn more than the dataset average already tells?": the SSIM of a reconstruction to its nearest
training tile divided by the SSIM that the dataset-mean image achieves against that same tile. A
value near 1 (or below) means the reconstruction is no better than the prior.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def to_hwc(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A (3, H, W) tensor or (H, W, 3) array as a float64 (H, W, 3) array in [0, 1]."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    return np.clip(a.astype(np.float64), 0.0, 1.0)


def mse(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    return float(np.mean((to_hwc(a) - to_hwc(b)) ** 2))


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """PSNR in dB for data range 1 (infinite for identical images)."""
    x, y = to_hwc(a), to_hwc(b)
    if np.array_equal(x, y):
        return float("inf")
    return float(peak_signal_noise_ratio(x, y, data_range=1.0))


def ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Mean SSIM over the RGB channels (Gaussian-free 7x7 window, data range 1)."""
    x, y = to_hwc(a), to_hwc(b)
    win = min(7, x.shape[0], x.shape[1])
    win -= 1 - win % 2  # odd
    return float(structural_similarity(x, y, data_range=1.0, channel_axis=-1, win_size=win))


@dataclass
class Leakage:
    """One reconstruction against the truth and against the prior."""

    ssim: float
    psnr: float
    mse: float
    nearest_index: int
    nearest_ssim: float
    prior_ssim: float
    prior_ssim_true: float
    leakage: float
    excess_ssim: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def leakage(
    recon: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    pool: np.ndarray | torch.Tensor,
    prior: np.ndarray | torch.Tensor,
) -> Leakage:
    """Score one reconstruction.

    ``pool`` are the training tiles the attacker could have hit (N, 3, H, W), the true one included;
    ``prior`` is the dataset-mean image. ``leakage`` = SSIM(recon, nearest) / SSIM(prior, nearest);
    ``excess_ssim`` = SSIM(recon, truth) - SSIM(prior, truth), the "better than the prior by" figure.
    """
    scores = [ssim(recon, pool[i]) for i in range(len(pool))]
    k = int(np.argmax(scores))
    prior_near = ssim(prior, pool[k])
    s_true = ssim(recon, truth)
    prior_true = ssim(prior, truth)
    ratio = scores[k] / prior_near if abs(prior_near) > 1e-6 else float("inf")
    return Leakage(
        ssim=s_true,
        psnr=psnr(recon, truth),
        mse=mse(recon, truth),
        nearest_index=k,
        nearest_ssim=scores[k],
        prior_ssim=prior_near,
        prior_ssim_true=prior_true,
        leakage=ratio,
        excess_ssim=s_true - prior_true,
    )


def summarise(rows: list[Leakage]) -> dict[str, float]:
    """Means of every field over reconstructions (finite values only for PSNR)."""
    if not rows:
        return {}
    out: dict[str, float] = {}
    for key in (
        "ssim",
        "psnr",
        "mse",
        "nearest_ssim",
        "prior_ssim",
        "prior_ssim_true",
        "leakage",
        "excess_ssim",
    ):
        vals = np.array([getattr(r, key) for r in rows], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        out[f"mean_{key}"] = float(vals.mean()) if vals.size else float("nan")
    out["n"] = float(len(rows))
    return out


def bootstrap_ci(
    values: np.ndarray | list[float], level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (resampled with replacement)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def spread(values: np.ndarray | list[float]) -> dict[str, float]:
    """Median, interquartile range, mean and a 95% bootstrap CI of the mean."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0.0}
    q1, med, q3 = np.quantile(v, [0.25, 0.5, 0.75])
    lo, hi = bootstrap_ci(v)
    return {
        "n": float(v.size),
        "mean": float(v.mean()),
        "median": float(med),
        "q1": float(q1),
        "q3": float(q3),
        "ci_low": lo,
        "ci_high": hi,
    }


def compare_to_prior(ssims: list[float], priors: list[float]) -> dict[str, Any]:
    """Reconstruction SSIM against the prior's SSIM on the same tiles: the spread of both and of their
    per-tile difference, and the verdict the difference's 95% bootstrap CI supports: ``"beats prior"``
    (CI above 0), ``"below prior"`` (CI below 0) or ``"indistinguishable from prior"`` (CI holds 0)."""
    diff = np.asarray(ssims, dtype=np.float64) - np.asarray(priors, dtype=np.float64)
    d = spread(diff)
    if d.get("n", 0) == 0:
        status = "not measured"
    elif d["ci_low"] > 0:
        status = "beats prior"
    elif d["ci_high"] < 0:
        status = "below prior"
    else:
        status = "indistinguishable from prior"
    return {"ssim": spread(ssims), "prior_ssim": spread(priors), "difference": d, "status": status}


def prior_ssims(truth: torch.Tensor, public: torch.Tensor, mean_image: torch.Tensor) -> dict[str, Any]:
    """What an attacker who knows only the data distribution achieves on ``truth`` (3, H, W): the SSIM
    of the public set's mean image, and of the public tile nearest to the truth (an oracle pick, so an
    upper bound on any guess from public data); ``prior_ssim`` is the better of the two."""
    mean_s = ssim(mean_image, truth)
    pub = [ssim(public[i], truth) for i in range(public.shape[0])]
    k = int(np.argmax(pub)) if pub else -1
    best_pub = pub[k] if pub else float("-inf")
    return {
        "prior_ssim": float(max(mean_s, best_pub)),
        "prior_mean_ssim": float(mean_s),
        "prior_public_ssim": float(best_pub) if pub else None,
        "prior_public_index": k,
    }
