"""Multi-step update inversion: what FedAvg actually sends is ``w_after_E_steps - w_before``.

As in Geiping et al.'s FedAvg experiments, the attacker (who knows the global model, the number of
local steps, the batch size, the learning rate and the optimiser, but not the data) simulates those E
local steps on dummy data with a differentiable functional copy of the network, and matches the
simulated update to the observed one by cosine similarity with a TV prior (same optimiser as
Inverting Gradients: signed Adam, step decay, pixels boxed to [0, 1], restarts).

:func:`local_update` is the victim's side for synthetic experiments: E steps of (DP-)SGD or Adam on a
site's tiles, returning the update the site would upload.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from federation.attack.common import DPSGD, LossFn, gradient_cost, observed_gradient
from federation.attack.inverting import InversionSettings, Reconstruction, invert_gradients, optimise_images


@dataclass(frozen=True)
class LocalTraining:
    """The victim's local schedule, known to the attacker: steps, batch size, lr and optimiser.

    Step ``t`` uses tiles ``[(t * batch_size) % n, ...)`` of the site's ``n`` tiles, cyclically; the
    attacker's dummy tiles occupy the same slots (their order is arbitrary, so this loses nothing).
    """

    steps: int = 1
    batch_size: int = 1
    lr: float = 1e-3
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.0  # SGD's (torch semantics: the first step's buffer is the gradient itself)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def batch_indices(self, n: int, step: int) -> list[int]:
        start = (step * self.batch_size) % n
        return [(start + j) % n for j in range(min(self.batch_size, n))]


class _FunctionalOptimizer:
    """SGD or Adam written out on tensors so the simulated steps stay differentiable."""

    def __init__(self, sched: LocalTraining, params: dict[str, Tensor]) -> None:
        self.s = sched
        self.t = 0
        self.m = {k: torch.zeros_like(v) for k, v in params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in params.items()}

    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor]) -> dict[str, Tensor]:
        s = self.s
        if s.optimizer == "sgd":
            if s.momentum == 0:
                return {k: params[k] - s.lr * grads[k] for k in params}
            for k in params:
                self.m[k] = grads[k] if self.t == 0 else s.momentum * self.m[k] + grads[k]
            self.t += 1
            return {k: params[k] - s.lr * self.m[k] for k in params}
        self.t += 1
        b1, b2 = s.betas
        out = {}
        for k in params:
            self.m[k] = b1 * self.m[k] + (1 - b1) * grads[k]
            self.v[k] = b2 * self.v[k] + (1 - b2) * grads[k] * grads[k]
            mhat = self.m[k] / (1 - b1**self.t)
            vhat = self.v[k] / (1 - b2**self.t)
            out[k] = params[k] - s.lr * mhat / (torch.sqrt(vhat + 1e-20) + s.eps)
        return out


def _named_trainable(model: nn.Module) -> dict[str, Tensor]:
    return {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}


def local_update(
    model: nn.Module,
    images: Tensor,
    masks: Tensor,
    loss_fn: LossFn,
    sched: LocalTraining,
    dp: DPSGD | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The victim: ``sched.steps`` local steps (DP-SGD privatised when ``dp``) from the model's current
    weights; returns ``w_after - w_before`` per parameter name and leaves ``model`` unchanged."""
    import copy

    local = copy.deepcopy(model)
    local.eval()
    before = _named_trainable(local)
    opt = _FunctionalOptimizer(sched, before)
    w = {k: v.clone() for k, v in before.items()}
    names = list(w)
    for t in range(sched.steps):
        with torch.no_grad():
            for k, p in local.named_parameters():
                p.copy_(w[k])
        idx = sched.batch_indices(images.shape[0], t)
        grads = observed_gradient(local, images[idx], masks[idx], loss_fn, dp, generator)
        w = opt.step(w, dict(zip(names, grads, strict=True)))
    return {k: (w[k] - before[k]).detach() for k in names}


def _update_in_model_order(update: dict[str, Tensor], names: list[str]) -> list[Tensor]:
    """The update's tensors (float, detached) in the order of the model's trainable ``names``."""
    missing = sorted(set(names) - set(update))
    if missing:
        raise ValueError(f"update lacks parameters of the model, e.g. {missing[0]!r}")
    return [update[k].detach().float() for k in names]


def invert_update(
    model: nn.Module,
    update: dict[str, Tensor],
    n_images: int,
    image_shape: Sequence[int],
    loss_fn: LossFn,
    sched: LocalTraining,
    settings: InversionSettings,
    masks: Tensor | None = None,
    prior: Tensor | None = None,
) -> Reconstruction:
    """Reconstruct ``n_images`` tiles of ``image_shape`` (3, H, W) from one observed model update."""
    model.eval()
    start = _named_trainable(model)
    names = list(start)
    target = _update_in_model_order(update, names)
    b = n_images

    def match(x: Tensor, tgt_all: Tensor) -> Tensor:
        params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        fopt = _FunctionalOptimizer(sched, params)
        for t in range(sched.steps):
            idx = sched.batch_indices(b, t)
            loss = loss_fn(functional_call(model, params, (x[idx],)), tgt_all[idx])
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = fopt.step(params, dict(zip(names, grads, strict=True)))
        return gradient_cost([params[k] - start[k] for k in names], target, settings.match_kind)

    known = masks if settings.labels_known else None
    return optimise_images(match, (n_images, *image_shape), settings, known, prior)


def invert_update_direction(
    model: nn.Module,
    update: dict[str, Tensor],
    n_images: int,
    image_shape: Sequence[int],
    loss_fn: LossFn,
    settings: InversionSettings,
    masks: Tensor | None = None,
    prior: Tensor | None = None,
) -> Reconstruction:
    """Reconstruct ``n_images`` tiles from a round of *Adam* steps by matching its direction.

    Adam normalises every coordinate: its first step is ``-lr * g / (|g| + eps)``, the sign of the
    gradient, and each later one ``-lr * m_hat / sqrt(v_hat)`` is invariant to the gradient's scale. A
    round of E steps on the same tiles (a small lr moves the weights little) therefore uploads about
    ``-sum(lr_t) * sign(g)`` where ``g`` is the tiles' gradient at the global model, softened where the
    sign changed during the round. Simulating those Adam steps differentiably (:func:`invert_update`) is
    exact, but ``g / |g|`` has zero derivative almost everywhere: the pixels get signal only through how
    the gradient changes over the round, and each iteration costs E double backwards. Here the attacker
    matches the gradient of its dummy tiles at the global model to ``-update`` by the settings' matching
    cost (per-kernel cosine by default): Inverting Gradients (:func:`invert_gradients`) with the update's
    direction as the observed gradient, which rewards the right signs, is smooth in the pixels, and costs
    one double backward per iteration.

    Measured on 4 real MoNuSeg 64 px tiles of the tuning images (10 Adam steps at lr 0.002, the
    experiment's UNet [16, 32, 64, 128], 2 threads), undefended, prior 0.131: this matching reaches mean
    SSIM 0.178 in 50 s (1000 iterations) and 0.184 in 149 s (3000); the exact simulation 0.082 in 71 s
    (100) and 0.131 in 171 s (300). On a much smaller UNet at 32 px the simulation wins per iteration
    (0.33 against 0.22 at 200), at 12 times the cost. The true batch gradient, which no aggregator sees,
    gives 0.232 at 1000 iterations: the sign pattern loses little of what gradient matching recovers.
    """
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    target = [-u for u in _update_in_model_order(update, names)]
    return invert_gradients(model, target, (n_images, *image_shape), loss_fn, settings, masks, prior)
