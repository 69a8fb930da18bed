"""Loss-threshold membership inference (Yeom et al. 2018): a tile is called a training member when the
model's loss on it is below a threshold. Sweeping the threshold gives the ROC curve; we report its area
and the true-positive rate at 1% false-positive rate (Carlini et al. 2022's low-FPR figure).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from federation.attack.common import LossFn


@dataclass
class MembershipResult:
    auc: float
    tpr_at_1pct_fpr: float
    n_members: int
    n_nonmembers: int
    mean_member_loss: float
    mean_nonmember_loss: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def roc_curve(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every threshold, higher score = "member"; ties are broken as one threshold."""
    scores = np.concatenate([member_scores, nonmember_scores])
    labels = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0.0, tps / max(1, len(member_scores))]
    fpr = np.r_[0.0, fps / max(1, len(nonmember_scores))]
    return fpr, tpr


def roc_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """Area under the ROC curve = P(score(member) > score(non-member)) + ½ P(tie)."""
    m = np.asarray(member_scores, dtype=np.float64)[:, None]
    n = np.asarray(nonmember_scores, dtype=np.float64)[None, :]
    return float(((m > n).sum() + 0.5 * (m == n).sum()) / (m.size * n.size))


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, max_fpr: float = 0.01) -> float:
    """The highest TPR over thresholds whose FPR does not exceed ``max_fpr``."""
    fpr, tpr = roc_curve(np.asarray(member_scores), np.asarray(nonmember_scores))
    ok = fpr <= max_fpr + 1e-12
    return float(tpr[ok].max())


@torch.no_grad()
def per_sample_losses(
    model: nn.Module, images: Tensor, masks: Tensor, loss_fn: LossFn, batch: int = 16
) -> np.ndarray:
    """The victim's loss on each tile separately."""
    model.eval()
    out = []
    for i in range(images.shape[0]):
        out.append(float(loss_fn(model(images[i : i + 1]), masks[i : i + 1])))
    return np.asarray(out)


def loss_threshold_attack(
    model: nn.Module,
    members: tuple[Tensor, Tensor],
    nonmembers: tuple[Tensor, Tensor],
    loss_fn: LossFn,
) -> MembershipResult:
    """Score = -loss; members are the tiles the model trained on, non-members held-out tiles."""
    lm = per_sample_losses(model, *members, loss_fn)
    ln = per_sample_losses(model, *nonmembers, loss_fn)
    return MembershipResult(
        auc=roc_auc(-lm, -ln),
        tpr_at_1pct_fpr=tpr_at_fpr(-lm, -ln, 0.01),
        n_members=len(lm),
        n_nonmembers=len(ln),
        mean_member_loss=float(lm.mean()),
        mean_nonmember_loss=float(ln.mean()),
    )
