"""Shared pieces of the gradient-inversion attacks: the victim's loss, its gradients, the DP-SGD view.

The attacks work in pixel space: images are float tensors in [0, 1] of shape (B, 3, H, W), masks are
long tensors (B, H, W) with class 1 = nucleus. The victim network sees exactly these pixels (the
training pipeline feeds [0, 1] RGB), so the box constraint of Inverting Gradients is simply [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]


def segmentation_loss(kind: str = "dicece") -> LossFn:
    """The victim's training loss: MONAI Dice+CE on (logits, mask) as in local training, or plain CE.

    The returned function takes ``target`` either as a long mask (B, H, W) (labels known) or as class
    probabilities (B, C, H, W) (labels jointly recovered as softmax of logits).
    """
    from monai.losses import DiceCELoss

    dice_ce_hard = DiceCELoss(to_onehot_y=True, softmax=True)
    dice_ce_soft = DiceCELoss(to_onehot_y=False, softmax=True)

    def dicece(logits: Tensor, target: Tensor) -> Tensor:
        if target.dtype in (torch.int64, torch.int32, torch.uint8):
            return dice_ce_hard(logits, target.long().unsqueeze(1))
        return dice_ce_soft(logits, target)

    def ce(logits: Tensor, target: Tensor) -> Tensor:
        if target.dtype in (torch.int64, torch.int32, torch.uint8):
            return nn.functional.cross_entropy(logits, target.long())
        return nn.functional.cross_entropy(logits, target)

    if kind == "dicece":
        return dicece
    if kind == "ce":
        return ce
    raise ValueError(f"loss {kind!r}: expected 'dicece' or 'ce'")


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a site's update (and the attacker's view) covers, in a fixed order."""
    return [p for p in model.parameters() if p.requires_grad]


def model_gradients(
    model: nn.Module, images: Tensor, target: Tensor, loss_fn: LossFn, create_graph: bool = False
) -> list[Tensor]:
    """Gradient of the mean batch loss with respect to the trainable parameters."""
    loss = loss_fn(model(images), target)
    return list(torch.autograd.grad(loss, trainable(model), create_graph=create_graph))


@dataclass(frozen=True)
class DPSGD:
    """What one DP-SGD step releases (Opacus semantics): per-sample clipping to ``clip`` and
    N(0, (noise_multiplier * clip)^2) noise on the sum, divided by the expected batch size."""

    clip: float
    noise_multiplier: float

    def privatise(
        self,
        model: nn.Module,
        images: Tensor,
        target: Tensor,
        loss_fn: LossFn,
        generator: torch.Generator | None = None,
    ) -> list[Tensor]:
        params = trainable(model)
        total = [torch.zeros_like(p) for p in params]
        for i in range(images.shape[0]):
            g = torch.autograd.grad(loss_fn(model(images[i : i + 1]), target[i : i + 1]), params)
            norm = torch.sqrt(torch.stack([(x.detach() ** 2).sum() for x in g]).sum())
            scale = min(1.0, self.clip / (float(norm) + 1e-6))
            for t, x in zip(total, g, strict=True):
                t.add_(x.detach() * scale)
        std = self.noise_multiplier * self.clip
        if std > 0:
            for t in total:
                t.add_(torch.randn(t.shape, generator=generator, dtype=t.dtype) * std)
        return [t / images.shape[0] for t in total]


def observed_gradient(
    model: nn.Module,
    images: Tensor,
    target: Tensor,
    loss_fn: LossFn,
    dp: DPSGD | None = None,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """The gradient the aggregator receives for one local step: plain, or DP-SGD privatised."""
    if dp is None:
        return [g.detach() for g in model_gradients(model, images, target, loss_fn)]
    return dp.privatise(model, images, target, loss_fn, generator)


def cosine_cost(grads: Sequence[Tensor], target: Sequence[Tensor], layerwise: bool = False) -> Tensor:
    """1 - cosine similarity of the two gradients, concatenated over all tensors (Geiping et al.);
    ``layerwise``: the mean over tensors of 1 - their own cosine, so small early layers count as much
    as the large deep ones."""
    if layerwise:
        terms = [
            1 - (g * t).sum() / (g.pow(2).sum().sqrt() * t.pow(2).sum().sqrt() + 1e-12)
            for g, t in zip(grads, target, strict=True)
        ]
        return torch.stack(terms).mean()
    dot = torch.zeros((), dtype=grads[0].dtype)
    n1 = torch.zeros((), dtype=grads[0].dtype)
    n2 = torch.zeros((), dtype=grads[0].dtype)
    for g, t in zip(grads, target, strict=True):
        dot = dot + (g * t).sum()
        n1 = n1 + g.pow(2).sum()
        n2 = n2 + t.pow(2).sum()
    return 1 - dot / (n1.sqrt() * n2.sqrt() + 1e-12)


def kernel_cosine_cost(grads: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
    """Cosine matching at the finest granularity that still has a direction: 1 - cosine per kernel
    (one (out, in) slice of a conv weight; one row of a linear weight), averaged per tensor, then over
    the weight tensors (biases and norm parameters, vectors, are left out).

    The plain cosine over the concatenated gradient is dominated by the few largest tensors (in the
    UNet the last decoder convs carry over half the squared norm and are matched almost as well by the
    dataset-mean image as by the truth); per-kernel cosines make each filter's direction count, and the
    first-layer kernels are where the pixels are."""
    terms = []
    for g, t in zip(grads, target, strict=True):
        if g.dim() < 2:
            continue
        flat = 2 if g.dim() >= 3 else 1
        gf, tf = g.flatten(flat), t.flatten(flat)
        cos = (gf * tf).sum(-1) / (gf.norm(dim=-1) * tf.norm(dim=-1) + 1e-12)
        terms.append((1 - cos).mean())
    if not terms:  # only vectors: fall back to the per-tensor cosine
        return cosine_cost(grads, target, layerwise=True)
    return torch.stack(terms).mean()


Matching = str  # "cosine" | "layerwise" | "kernel"
MATCHINGS = ("cosine", "layerwise", "kernel")


def gradient_cost(grads: Sequence[Tensor], target: Sequence[Tensor], matching: Matching) -> Tensor:
    """The gradient-matching cost by name: Geiping's global cosine, per-tensor cosine, per-kernel cosine."""
    if matching == "cosine":
        return cosine_cost(grads, target)
    if matching == "layerwise":
        return cosine_cost(grads, target, layerwise=True)
    if matching == "kernel":
        return kernel_cosine_cost(grads, target)
    raise ValueError(f"matching {matching!r}: expected one of {MATCHINGS}")


def euclidean_cost(grads: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
    """Squared L2 distance of the two gradients (DLG)."""
    total = torch.zeros((), dtype=grads[0].dtype)
    for g, t in zip(grads, target, strict=True):
        total = total + (g - t).pow(2).sum()
    return total


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation (mean absolute neighbour difference), the image prior."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def soft_labels(logits: Tensor) -> Tensor:
    """Jointly recovered masks: class probabilities from free logits (B, C, H, W)."""
    return torch.softmax(logits, dim=1)


def decay_milestones(iterations: int) -> list[int]:
    """Geiping et al.'s step decay points: 3/8, 5/8 and 7/8 of the iterations."""
    return sorted({max(1, int(iterations * f)) for f in (3 / 8, 5 / 8, 7 / 8)})
