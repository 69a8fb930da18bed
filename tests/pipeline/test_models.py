"""The model factory builds DP-ready networks, and the DP check rejects what Opacus cannot train, saying why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.checkpoint import ModelMeta, load_model, save_model
from pipeline.config import ModelConfig
from pipeline.errors import FedpathError
from pipeline.models import (
    build_model,
    check_dp_model,
    dp_model_problems,
    functorch_layers,
    register_fast_grad_samplers,
)


@pytest.mark.parametrize("name", ["unet", "basicunet", "segresnet", "attentionunet"])
def test_models_are_dp_ready(name: str) -> None:
    net = build_model(ModelConfig(name=name, channels=[8, 16, 32], strides=[2, 2], groups=4))
    y = net(torch.rand(2, 3, 32, 32))
    assert y.shape == (2, 2, 32, 32)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert not any(getattr(m, "inplace", False) for m in net.modules())
    check_dp_model(net)  # passes
    assert functorch_layers(net) == []  # every trainable layer has Opacus per-sample code


def test_deconv_needs_the_registered_sampler() -> None:
    net = build_model(ModelConfig(name="unet", channels=[8, 16], strides=[2], upsample="deconv"))
    register_fast_grad_samplers()
    assert functorch_layers(net) == []
    check_dp_model(net, allow_functorch=False)


def test_check_rejects_batchnorm_naming_the_module() -> None:
    from monai.networks.nets import AttentionUnet

    net = AttentionUnet(spatial_dims=2, in_channels=3, out_channels=2, channels=[8, 16], strides=[2])
    with pytest.raises(FedpathError) as err:
        check_dp_model(net)
    msg = str(err.value)
    assert "model.0.conv.0.adn.N (BatchNorm2d)" in msg and "batch" in msg.lower() and "\n" not in msg


def test_check_rejects_inplace_activation_and_untracked_batchnorm() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(4, affine=False))
    problems = dp_model_problems(net)
    assert any(p.startswith("1 (ReLU): in-place activation") for p in problems)
    assert any(p.startswith("2 (BatchNorm2d)") for p in problems)


def test_model_file_round_trip(tmp_path: Path) -> None:
    cfg = ModelConfig(name="attentionunet", channels=[8, 16, 32], strides=[2, 2], groups=4)
    net = build_model(cfg)
    path = save_model(
        tmp_path / "m.safetensors", net.state_dict(), ModelMeta(model=cfg, tile_size=64, target_mpp=0.5)
    )
    net2, meta = load_model(path)
    x = torch.rand(1, 3, 32, 32)
    net.eval()
    net2.eval()
    assert torch.equal(net(x), net2(x)) and meta.model == cfg


def test_ensemble_model_file_averages_its_members_logits(tmp_path: Path) -> None:
    """An ensemble (a FedMIC site's teacher + student) is one model file whose output is the mean of its
    members' logits; a malformed ensemble is a one-line config error."""
    small = ModelConfig(out_channels=3, channels=[8, 16], strides=[2], groups=4)
    wide = ModelConfig(out_channels=3, channels=[12, 24], strides=[2], groups=4)
    cfg = ModelConfig(name="ensemble", out_channels=3, members=[small, wide])
    a, b = build_model(small).eval(), build_model(wide).eval()
    state = {f"members.0.{k}": v for k, v in a.state_dict().items()}
    state.update({f"members.1.{k}": v for k, v in b.state_dict().items()})
    path = save_model(tmp_path / "e.safetensors", state, ModelMeta(model=cfg, tile_size=32, target_mpp=0.5))
    net, meta = load_model(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), (a(x) + b(x)) / 2, atol=1e-6)
    assert meta.model.members == [small, wide]
    for bad in (
        {"members": [small]},
        {"members": [small, cfg]},
        {"members": [small, small.model_copy(update={"out_channels": 2})]},
    ):
        with pytest.raises(ValueError, match="ensemble"):
            ModelConfig.model_validate({"name": "ensemble", "out_channels": 3, **bad})
    with pytest.raises(ValueError, match="members are for name: ensemble"):
        ModelConfig(members=[small, wide])


def test_tiny_convs_run_channels_last_with_the_same_outputs_gradients_and_state() -> None:
    """The 3 -> 3 convolution at full resolution runs channels-last (hooks only): same state dict keys,
    same logits and gradients as the all-NCHW network, and Opacus' per-sample gradients still agree."""
    from pipeline.dprandom import SecureRandom
    from pipeline.dpsgd import make_private
    from pipeline.models import channels_last_tiny_convs

    cfg = ModelConfig(name="unet", channels=[8, 16], strides=[2], num_res_units=2, groups=4, out_channels=3)
    torch.manual_seed(0)
    plain = build_model(cfg, tiny_channels_last=False)
    fast = build_model(cfg)
    fast.load_state_dict(plain.state_dict())
    assert list(fast.state_dict()) == list(plain.state_dict())
    hooked = [n for n, m in fast.named_modules() if m._forward_pre_hooks]
    assert hooked and all(
        m.in_channels <= 4 and m.out_channels <= 4 for n, m in fast.named_modules() if n in hooked
    )
    x = torch.rand(4, 3, 32, 32)
    seen: list[bool] = []
    conv = dict(fast.named_modules())[hooked[-1]]
    conv.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last))
    )
    out_p, out_f = plain(x), fast(x)
    assert seen == [True] and out_f.is_contiguous()
    torch.testing.assert_close(out_f, out_p, rtol=1e-4, atol=1e-5)
    out_p.square().sum().backward()
    out_f.square().sum().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), fast.named_parameters(), strict=True):
        assert float((b.grad - a.grad).norm() / a.grad.norm()) < 1e-5, n  # summation order only
    # DP-SGD: per-sample gradients of the hooked layer through fedpath's private wrapper
    register_fast_grad_samplers()
    nets = [
        channels_last_tiny_convs(build_model(cfg, tiny_channels_last=False)),
        build_model(cfg, tiny_channels_last=False),
    ]
    nets[0].load_state_dict(plain.state_dict())
    nets[1].load_state_dict(plain.state_dict())
    grads = []
    for net in nets:
        opt = torch.optim.SGD(net.parameters(), lr=0.0)
        model, opt = make_private(
            net, opt, noise_multiplier=0.0, max_grad_norm=1e6, expected_batch_size=4, rng=SecureRandom()
        )
        model(x).square().sum().backward()
        grads.append(
            {n: p.grad_sample.clone() for n, p in net.named_parameters() if p.grad_sample is not None}
        )
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert float((grads[0][n] - grads[1][n]).norm() / grads[1][n].norm()) < 1e-5, n
