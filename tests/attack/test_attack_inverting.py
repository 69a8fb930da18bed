"""Gradient inversion on a tiny network and real 16x16 MoNuSeg tiles: recovery, and failure under noise."""

from __future__ import annotations

import pytest
import torch

from federation.attack.common import (
    DPSGD,
    gradient_cost,
    kernel_cosine_cost,
    observed_gradient,
    segmentation_loss,
)
from federation.attack.dlg import DLGSettings, dlg_attack, idlg_infer_label
from federation.attack.inverting import InversionSettings, invert_gradients
from federation.attack.metrics import ssim
from federation.attack.multistep import LocalTraining, invert_update, local_update

FAST = InversionSettings(iterations=150, restarts=1, lr=0.1, tv_weight=1e-3, scales=(1,))


def test_inverting_gradients_recovers_a_real_tile(tiny_net, tiles16) -> None:
    x, m = tiles16.images[:1], tiles16.masks[:1]
    loss_fn = segmentation_loss("dicece")
    g = observed_gradient(tiny_net, x, m, loss_fn)
    rec = invert_gradients(tiny_net, g, x.shape, loss_fn, FAST, masks=m)
    assert rec.images.shape == x.shape
    assert float(rec.images.min()) >= 0 and float(rec.images.max()) <= 1  # boxed
    assert ssim(rec.images[0], x[0]) > 0.8


def test_inverting_gradients_fails_under_large_dp_noise(tiny_net, tiles16) -> None:
    x, m = tiles16.images[:1], tiles16.masks[:1]
    loss_fn = segmentation_loss("dicece")
    gen = torch.Generator().manual_seed(0)
    noisy = observed_gradient(tiny_net, x, m, loss_fn, DPSGD(clip=1.0, noise_multiplier=10.0), gen)
    rec = invert_gradients(tiny_net, noisy, x.shape, loss_fn, FAST, masks=m)
    assert ssim(rec.images[0], x[0]) < 0.3


def test_kernel_cosine_cost_is_per_kernel_and_skips_vectors() -> None:
    """Zero for the target itself and for any positive rescaling of single kernels (each kernel's
    direction is what counts); biases and other vectors are ignored; a flipped kernel costs 2/n."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn((4, 3, 3, 3), generator=gen)
    lin = torch.randn((5, 7), generator=gen)
    bias = torch.randn((4,), generator=gen)
    target = [w, bias, lin]
    scaled = w * torch.tensor([1.0, 3.0, 0.1, 7.0]).view(4, 1, 1, 1)
    assert float(kernel_cosine_cost(target, target)) == pytest.approx(0.0, abs=1e-6)
    assert float(kernel_cosine_cost([scaled, -bias, 2 * lin], target)) == pytest.approx(0.0, abs=1e-6)
    flipped = w.clone()
    flipped[0, 0] *= -1  # one of the 12 conv kernels points the other way
    cost = kernel_cosine_cost([flipped, bias, lin], target)
    assert float(cost) == pytest.approx((2 / 12) / 2, abs=1e-5)  # mean over the two weight tensors
    assert float(gradient_cost([flipped, bias, lin], target, "kernel")) == pytest.approx(float(cost))
    with pytest.raises(ValueError, match="matching"):
        gradient_cost(target, target, "nope")


def test_kernel_matching_recovers_a_real_tile(tiny_net, tiles16) -> None:
    x, m = tiles16.images[:1], tiles16.masks[:1]
    loss_fn = segmentation_loss("dicece")
    g = observed_gradient(tiny_net, x, m, loss_fn)
    s = InversionSettings(
        iterations=150,
        restarts=1,
        lr=0.1,
        tv_weight=1e-3,
        scales=(1,),
        matching="kernel",
        chroma_tv_weight=1e-3,
    )
    rec = invert_gradients(tiny_net, g, x.shape, loss_fn, s, masks=m)
    assert ssim(rec.images[0], x[0]) > 0.8


def test_jointly_recovered_masks(tiny_net, tiles16) -> None:
    """Labels unknown: the attacker optimises mask logits too and still gets the image back."""
    x, m = tiles16.images[1:2], tiles16.masks[1:2]
    loss_fn = segmentation_loss("ce")
    g = observed_gradient(tiny_net, x, m, loss_fn)
    s = InversionSettings(iterations=250, restarts=1, lr=0.1, tv_weight=1e-3, scales=(1,), labels_known=False)
    rec = invert_gradients(tiny_net, g, x.shape, loss_fn, s)
    assert ssim(rec.images[0], x[0]) > 0.6
    assert rec.masks.shape == m.shape


def test_dlg_lbfgs_recovers_a_real_tile(tiny_net, tiles16) -> None:
    x, m = tiles16.images[2:3], tiles16.masks[2:3]
    loss_fn = segmentation_loss("ce")
    g = observed_gradient(tiny_net, x, m, loss_fn)
    rec = dlg_attack(tiny_net, g, x.shape, loss_fn, DLGSettings(iterations=40), masks=m)
    assert ssim(rec.images[0], x[0]) > 0.7


def test_multistep_update_inversion(tiny_net, tiles16) -> None:
    """Three local SGD steps: the attacker inverts the update w_3 - w_0, not a gradient."""
    x, m = tiles16.images[3:4], tiles16.masks[3:4]
    loss_fn = segmentation_loss("ce")
    sched = LocalTraining(steps=3, batch_size=1, lr=0.05, optimizer="sgd")
    before = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    upd = local_update(tiny_net, x, m, loss_fn, sched)
    assert all(torch.equal(before[k], v) for k, v in tiny_net.state_dict().items())  # victim copy only
    assert set(upd) == {k for k, _ in tiny_net.named_parameters()}
    rec = invert_update(tiny_net, upd, 1, x.shape[1:], loss_fn, sched, FAST, masks=m)
    assert ssim(rec.images[0], x[0]) > 0.7


def test_dp_sgd_release_matches_opacus_semantics(tiny_net, tiles16) -> None:
    """Batch of 1, no noise: the release is the gradient clipped to norm C."""
    x, m = tiles16.images[:1], tiles16.masks[:1]
    loss_fn = segmentation_loss("ce")
    raw = observed_gradient(tiny_net, x, m, loss_fn)
    norm = float(torch.sqrt(sum((g**2).sum() for g in raw)))
    clipped = observed_gradient(tiny_net, x, m, loss_fn, DPSGD(clip=norm / 4, noise_multiplier=0.0))
    for r, c in zip(raw, clipped, strict=True):
        torch.testing.assert_close(c, r / 4, rtol=1e-4, atol=1e-7)
    # with noise: the added noise has standard deviation sigma * C
    gen = torch.Generator().manual_seed(1)
    noisy = observed_gradient(tiny_net, x, m, loss_fn, DPSGD(clip=1.0, noise_multiplier=2.0), gen)
    diff = torch.cat([(n - c * 4 / norm).flatten() for n, c in zip(noisy, clipped, strict=True)])
    assert abs(float(diff.std()) - 2.0) < 0.05


def test_idlg_reads_the_label_of_a_classifier() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    x = torch.rand(1, 3, 2, 2)
    for label in range(5):
        loss = torch.nn.functional.cross_entropy(net(x), torch.tensor([label]))
        gw = torch.autograd.grad(loss, net[1].weight)[0]
        assert idlg_infer_label(gw) == label
