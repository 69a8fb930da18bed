"""Per-sample clipping and noise against oracles: a batch-of-1 autograd loop and the closed form σ·C."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from pipeline.config import ModelConfig
from pipeline.models import build_model, per_sample_only, register_fast_grad_samplers


def _net(upsample: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name="unet", channels=[8, 16], strides=[2], groups=4, upsample=upsample))


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, reduction="sum")


def _oracle_clipped_sum(net: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> list[torch.Tensor]:
    """Σ_i clip(∇ℓ_i, C), each ∇ℓ_i from its own backward pass (batch of one)."""
    params = [p for p in net.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(_loss(net(x[i : i + 1]), y[i : i + 1]), params)
        norm = torch.stack([(g.double() ** 2).sum() for g in grads]).sum().sqrt()
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += g * factor
    return total


@pytest.mark.parametrize(
    ("upsample", "skip_summed"), [("nontrainable", False), ("deconv", False), ("deconv", True)]
)
def test_clipped_sum_matches_batch_of_one_loop(upsample: str, skip_summed: bool) -> None:
    register_fast_grad_samplers()  # fedpath's grouped-conv per-sample gradients (Conv2d, ConvTranspose2d)
    net = _net(upsample)
    x = torch.rand(6, 3, 16, 16)
    y = (torch.rand(6, 16, 16) > 0.6).long()
    clip = 0.05  # small enough that every sample is clipped
    oracle = _oracle_clipped_sum(net, x, y, clip)
    params0 = [p for p in net.parameters() if p.requires_grad]
    ref = {i: torch.autograd.grad(_loss(net(x[i : i + 1]), y[i : i + 1]), params0) for i in (0, 5)}

    if skip_summed:
        per_sample_only(net)  # fedpath's training path: autograd skips the summed conv weight gradients
    gsm = GradSampleModule(net, loss_reduction="sum")
    params = [p for p in gsm.parameters() if p.requires_grad]
    opt = DPOptimizer(
        torch.optim.SGD(params, lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=6,
        loss_reduction="sum",
    )
    _loss(gsm(x), y).backward()
    # per-sample gradients themselves against the oracle
    for i in (0, 5):
        for p, r in zip(params, ref[i], strict=True):
            torch.testing.assert_close(p.grad_sample[i], r, rtol=1e-3, atol=1e-4)
    opt.pre_step()
    for p, o in zip(params, oracle, strict=True):
        torch.testing.assert_close(p.summed_grad, o, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p.grad, o, rtol=1e-4, atol=1e-6)  # σ = 0: no noise


def test_noise_std_is_sigma_times_clip() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(400, 250)  # 100,250 noise draws per step
    gsm = GradSampleModule(lin, loss_reduction="sum")
    sigma, clip = 1.7, 0.3
    opt = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=4,
        loss_reduction="sum",
    )
    x = torch.randn(4, 400)
    gsm(x).sum().backward()
    opt.pre_step()
    noise = torch.cat([(p.grad - p.summed_grad).flatten() for p in gsm.parameters()])
    n = noise.numel()
    std = float(noise.std())
    # std of a sample std of n Gaussians ≈ σC / sqrt(2n): 5 of those is a safe band
    assert abs(std - sigma * clip) < 5 * sigma * clip / (2 * n) ** 0.5
    assert abs(float(noise.mean())) < 5 * sigma * clip / n**0.5


@pytest.mark.parametrize("fused", [True, False])
def test_fedpath_training_path_matches_batch_of_one_loop(fused: bool) -> None:
    """``make_private`` as training builds it: fedpath's conv per-sample gradients, the summed conv weight
    gradients skipped, the fused (or Opacus') clip-and-accumulate, CSPRNG noise at σ = 0."""
    from pipeline.dprandom import SecureRandom
    from pipeline.dpsgd import make_private

    net = _net("deconv")
    x = torch.rand(6, 3, 16, 16)
    y = (torch.rand(6, 16, 16) > 0.6).long()
    clip = 0.05
    oracle = _oracle_clipped_sum(net, x, y, clip)
    params0 = [p for p in net.parameters() if p.requires_grad]
    ref = {i: torch.autograd.grad(_loss(net(x[i : i + 1]), y[i : i + 1]), params0) for i in (0, 5)}
    model, opt = make_private(
        net, torch.optim.SGD(net.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
        expected_batch_size=6, rng=SecureRandom(), fused=fused,
    )  # fmt: skip
    assert opt.fused is fused
    (_loss(model(x), y) / 6).backward()  # mean reduction: Opacus scales the per-sample gradients back
    params = [p for p in model.parameters() if p.requires_grad]
    for i in (0, 5):
        for p, r in zip(params, ref[i], strict=True):
            torch.testing.assert_close(p.grad_sample[i], r, rtol=1e-3, atol=1e-4)
    opt.pre_step()
    for p, o in zip(params, oracle, strict=True):
        torch.testing.assert_close(p.summed_grad, o, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p.grad, o / 6, rtol=1e-4, atol=1e-6)  # σ = 0; mean over q·n = 6


def test_slide_clipping_matches_a_batch_of_one_slide_loop() -> None:
    """Slide-level DP-SGD: each slide's mean per-tile gradient is clipped as one unit. Oracle: for each
    slide alone, autograd of the mean loss over its tiles, clipped to C, summed over slides."""
    from pipeline.dprandom import SecureRandom
    from pipeline.dpsgd import SlideDPOptimizer

    register_fast_grad_samplers()
    net = _net("nontrainable")
    x = torch.rand(7, 3, 16, 16)
    y = (torch.rand(7, 16, 16) > 0.6).long()
    groups = torch.tensor([5, 5, 5, 2, 2, 9, 9])  # three slides, any labels, rows of a slide together
    clip = 0.05
    params0 = [p for p in net.parameters() if p.requires_grad]
    oracle = [torch.zeros_like(p) for p in params0]
    for g in (5, 2, 9):
        rows = groups == g
        grads = torch.autograd.grad(_loss(net(x[rows]), y[rows]) / int(rows.sum()), params0)
        norm = torch.stack([(t.double() ** 2).sum() for t in grads]).sum().sqrt()
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for o, t in zip(oracle, grads, strict=True):
            o += t * factor

    gsm = GradSampleModule(net, loss_reduction="sum")
    params = [p for p in gsm.parameters() if p.requires_grad]
    opt = SlideDPOptimizer(
        torch.optim.SGD(params, lr=0.0),
        rng=SecureRandom(),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=3,
        loss_reduction="sum",
    )
    opt.set_groups(groups)
    _loss(gsm(x), y).backward()
    opt.pre_step()
    for p, o in zip(params, oracle, strict=True):
        torch.testing.assert_close(p.summed_grad, o, rtol=1e-4, atol=1e-6)
    # and per-tile clipping would have given something else: the unit really is the slide
    per_tile = _oracle_clipped_sum(net, x, y, clip)
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(per_tile, oracle, strict=True))


def test_secure_optimizer_noise_std_is_sigma_times_clip() -> None:
    from pipeline.dprandom import SecureRandom
    from pipeline.dpsgd import SecureDPOptimizer

    lin = nn.Linear(400, 250)
    gsm = GradSampleModule(lin, loss_reduction="sum")
    sigma, clip = 1.7, 0.3
    opt = SecureDPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.0),
        rng=SecureRandom(),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=4,
        loss_reduction="sum",
    )
    torch.manual_seed(1)
    gsm(torch.randn(4, 400)).sum().backward()
    opt.pre_step()
    noise = torch.cat([(p.grad - p.summed_grad).flatten() for p in gsm.parameters()])
    n = noise.numel()
    assert abs(float(noise.std()) - sigma * clip) < 5 * sigma * clip / (2 * n) ** 0.5
    assert abs(float(noise.mean())) < 5 * sigma * clip / n**0.5


def test_fused_clipping_of_an_empty_poisson_batch_adds_only_noise() -> None:
    """Poisson sampling can draw no sample at all: the fused clip must give a zero sum, not crash."""
    from pipeline.dprandom import SecureRandom
    from pipeline.dpsgd import SecureDPOptimizer

    conv = nn.Conv2d(3, 4, 3)
    gsm = GradSampleModule(conv, loss_reduction="sum")
    opt = SecureDPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.0), rng=SecureRandom(), noise_multiplier=1.0,
        max_grad_norm=1.0, expected_batch_size=4, loss_reduction="sum",
    )
    gsm(torch.randn(0, 3, 8, 8)).sum().backward()
    opt.pre_step()
    for p in gsm.parameters():
        assert p.summed_grad is not None and torch.count_nonzero(p.summed_grad) == 0
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_autocast_gradients_are_clipped_to_c_in_float32(fused: bool) -> None:
    """``train.precision: bfloat16``: the forward runs under CPU autocast, so some per-sample gradients come
    out in bf16. The clip still bounds each sample's contribution by C, computed in float32, and the
    result matches the float32 oracle to bf16 accuracy."""
    from pipeline.dprandom import SecureRandom
    from pipeline.dpsgd import make_private
    from pipeline.models import autocast

    net = _net("deconv")
    x = torch.rand(4, 3, 16, 16)
    y = (torch.rand(4, 16, 16) > 0.6).long()
    clip = 0.05
    oracle = _oracle_clipped_sum(net, x, y, clip)
    model, opt = make_private(
        net, torch.optim.SGD(net.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
        expected_batch_size=1, rng=SecureRandom(), fused=fused,
    )  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(4):  # one sample per step: its clipped gradient is the step's whole sum
        with autocast("bfloat16"):
            out = model(x[i : i + 1])
        assert out.dtype == torch.bfloat16
        _loss(out.float(), y[i : i + 1]).backward()
        assert any(p.grad_sample.dtype == torch.bfloat16 for p in params)
        opt.pre_step()
        assert all(p.summed_grad.dtype == torch.float32 for p in params)
        norm = float(torch.stack([p.summed_grad.double().norm() for p in params]).norm())
        assert clip * 0.99 < norm <= clip * (1 + 1e-5)  # clipped (every sample is), never above C
        for t, p in zip(total, params, strict=True):
            t += p.summed_grad
        opt.zero_grad(set_to_none=True)
        for p in params:
            p.summed_grad = None
    num = torch.cat([(t - o).reshape(-1) for t, o in zip(total, oracle, strict=True)]).norm()
    den = torch.cat([o.reshape(-1) for o in oracle]).norm()
    assert float(num / den) < 0.05  # bf16 forward: ~1% off the float32 oracle, not a different gradient


def test_augmentation_multiplicity_clips_each_tiles_mean_over_its_views() -> None:
    """DP-SGD with K augmentations per tile (``privacy.augment_multiplicity``): the training step clips and
    sums one gradient per tile, the mean of its K views' gradients. Oracle: per tile, autograd of its loss
    averaged over its views, clipped to C; the step moves the weights by -lr * (sum / expected batch)."""
    from pipeline.dprandom import SecureRandom
    from pipeline.dpsgd import make_private
    from pipeline.train import _dp_physical_step

    net = _net("deconv")
    tiles, views = 4, 3
    x = torch.rand(tiles, views, 3, 16, 16)
    y = (torch.rand(tiles, views, 1, 16, 16) > 0.6).long()
    clip = 0.05  # every tile clipped

    def criterion(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, target[:, 0])

    params0 = [p for p in net.parameters() if p.requires_grad]
    oracle = [torch.zeros_like(p) for p in params0]
    per_view = [torch.zeros_like(p) for p in params0]  # without the averaging: each view clipped alone
    for i in range(tiles):
        grads = torch.autograd.grad(criterion(net(x[i]), y[i]), params0)
        norm = torch.stack([(g.double() ** 2).sum() for g in grads]).sum().sqrt()
        for t, g in zip(oracle, grads, strict=True):
            t += g * min(1.0, clip / (float(norm) + 1e-6))
        for v in range(views):
            gv = torch.autograd.grad(criterion(net(x[i, v : v + 1]), y[i, v : v + 1]), params0)
            nv = torch.stack([(g.double() ** 2).sum() for g in gv]).sum().sqrt()
            for t, g in zip(per_view, gv, strict=True):
                t += g * min(1.0, clip / (float(nv) + 1e-6))
    before = [p.detach().clone() for p in params0]
    model, opt = make_private(
        net, torch.optim.SGD(net.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=clip,
        expected_batch_size=tiles, rng=SecureRandom(),
    )  # fmt: skip
    losses: list[float] = []
    _dp_physical_step(model, opt, criterion, (x, y), losses)
    moved = [b - p.detach() for b, p in zip(before, params0, strict=True)]
    for m, o in zip(moved, oracle, strict=True):
        torch.testing.assert_close(m, o / tiles, rtol=1e-3, atol=1e-6)  # σ = 0: the mean clipped gradient
    # it is not the K·tiles views clipped one by one (the tile would count K times)
    far = sum(float((m - pv / tiles).abs().sum()) for m, pv in zip(moved, per_view, strict=True))
    assert far > 1e-3 * sum(float(o.abs().sum()) for o in oracle) / tiles


def test_clip_groups_clip_each_group_to_its_share_of_c() -> None:
    """Per-group clipping (FedMIC's student and teacher trained together): each sample's gradient restricted
    to a group is clipped to C·√share, so the whole stays within C and the noise σC is unchanged. Oracle:
    batch-of-one gradients clipped group by group."""
    from pipeline.dprandom import SecureRandom
    from pipeline.dpsgd import make_private
    from pipeline.errors import FedpathError
    from pipeline.train import clip_groups

    net = _net("deconv")
    x = torch.rand(5, 3, 16, 16)
    y = (torch.rand(5, 16, 16) > 0.6).long()
    clip, shares = 0.05, {"model.0.": 0.8, "": 0.2}  # the first block gets most of C
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    params0 = [p for p in net.parameters() if p.requires_grad]
    first = [n.startswith("model.0.") for n in names]
    assert any(first) and not all(first)
    oracle = [torch.zeros_like(p) for p in params0]
    for i in range(5):
        grads = torch.autograd.grad(_loss(net(x[i : i + 1]), y[i : i + 1]), params0)
        for part, c in ((True, clip * 0.8**0.5), (False, clip * 0.2**0.5)):
            sel = [g for g, f in zip(grads, first, strict=True) if f == part]
            norm = float(torch.stack([(g.double() ** 2).sum() for g in sel]).sum().sqrt())
            for t, g, f in zip(oracle, grads, first, strict=True):
                if f == part:
                    t += g * min(1.0, c / (norm + 1e-6))
    model, opt = make_private(
        net, torch.optim.SGD(net.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
        expected_batch_size=5, rng=SecureRandom(),
    )  # fmt: skip
    opt.set_clip_groups(clip_groups(net, shares, clip))
    (_loss(model(x), y) / 5).backward()
    opt.pre_step()
    for p, o in zip([p for p in model.parameters() if p.requires_grad], oracle, strict=True):
        torch.testing.assert_close(p.summed_grad, o, rtol=1e-4, atol=1e-6)
    # shares that do not add up to C², or a parameter left out, are refused
    with pytest.raises(FedpathError, match="sum to 1"):
        clip_groups(net, {"model.0.": 0.8, "": 0.1}, clip)
    with pytest.raises(FedpathError, match="matches no prefix"):
        clip_groups(net, {"model.0.": 1.0 - 1e-12, "nothing.": 1e-12}, clip)
