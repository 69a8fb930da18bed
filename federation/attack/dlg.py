"""Deep Leakage from Gradients (Zhu et al. 2019) and iDLG (Zhao et al. 2020) for segmentation networks.

DLG matches the observed gradient in (relative) Euclidean distance with L-BFGS over dummy images (and dummy
labels). iDLG's contribution, reading the label off the sign of the last layer's gradient, applies to
classification with a softmax-CE head (:func:`idlg_infer_label`); for segmentation masks the attacker
either knows the masks or recovers them jointly as logits through a softmax, as in DLG.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from federation.attack.common import LossFn, euclidean_cost, soft_labels, trainable
from federation.attack.inverting import Reconstruction


@dataclass
class DLGSettings:
    iterations: int = 50
    restarts: int = 1
    lr: float = 1.0
    history_size: int = 100
    labels_known: bool = True
    seed: int = 0
    n_classes: int = 2


def idlg_infer_label(last_weight_grad: Tensor) -> int:
    """iDLG for one sample through a softmax-CE classifier: the true class is the only output row of
    the last linear layer whose gradient is negative (dL/dz_c = p_c - 1 < 0 only for the label), so it
    is the row with the smallest gradient sum."""
    g = last_weight_grad.reshape(last_weight_grad.shape[0], -1)
    return int(torch.argmin(g.sum(dim=1)))


def dlg_attack(
    model: nn.Module,
    target_grads: Sequence[Tensor],
    shape: Sequence[int],
    loss_fn: LossFn,
    settings: DLGSettings,
    masks: Tensor | None = None,
) -> Reconstruction:
    """Reconstruct a batch of ``shape`` (B, 3, H, W) by Euclidean gradient matching with L-BFGS.

    L-BFGS runs on an unconstrained variable that a sigmoid maps to pixels in [0, 1], so the iterate
    stays a valid image without breaking the optimiser's line search by clamping.
    """
    if settings.labels_known and masks is None:
        raise ValueError("dlg_attack: labels_known=True needs the masks")
    model.eval()
    params = trainable(model)
    target = [t.detach() for t in target_grads]
    gen = torch.Generator().manual_seed(settings.seed)
    b, _, h, w = shape
    best: Reconstruction | None = None
    costs: list[float] = []
    t0 = time.perf_counter()
    for _ in range(settings.restarts):
        x, logits, c = _one_restart(model, params, target, shape, loss_fn, settings, masks, gen)
        costs.append(c)
        if best is None or c < best.cost:
            rec_masks = (
                soft_labels(logits).argmax(1)
                if logits is not None
                else masks.detach().clone()
                if masks is not None
                else torch.zeros((b, h, w), dtype=torch.long)
            )
            best = Reconstruction(x, rec_masks, c, 0.0)
    assert best is not None
    best.seconds = time.perf_counter() - t0
    best.restart_costs = costs
    return best


def _one_restart(
    model: nn.Module,
    params: list[nn.Parameter],
    target: list[Tensor],
    shape: Sequence[int],
    loss_fn: LossFn,
    settings: DLGSettings,
    masks: Tensor | None,
    gen: torch.Generator,
) -> tuple[Tensor, Tensor | None, float]:
    b, _, h, w = shape
    scale = float(sum((t**2).sum() for t in target)) + 1e-30  # relative squared error, well scaled
    z = (0.5 * torch.randn(tuple(shape), generator=gen)).requires_grad_(True)
    opt_vars = [z]
    logits: Tensor | None = None
    if not settings.labels_known:
        logits = (0.1 * torch.randn((b, settings.n_classes, h, w), generator=gen)).requires_grad_(True)
        opt_vars.append(logits)
    opt = torch.optim.LBFGS(
        opt_vars,
        lr=settings.lr,
        max_iter=1,
        history_size=settings.history_size,
        line_search_fn="strong_wolfe",
    )

    def cost() -> Tensor:
        tgt = soft_labels(logits) if logits is not None else masks
        assert tgt is not None
        grads = torch.autograd.grad(loss_fn(model(torch.sigmoid(z)), tgt), params, create_graph=True)
        return euclidean_cost(grads, target) / scale

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        c = cost()
        c.backward(inputs=opt_vars)
        return c

    for _ in range(settings.iterations):
        opt.step(closure)
    c = float(cost().detach())
    c = c if math.isfinite(c) else float("inf")  # L-BFGS diverged: score it worst
    return torch.sigmoid(z.detach()), (logits.detach() if logits is not None else None), c
