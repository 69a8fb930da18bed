"""MONAI segmentation networks built DP-ready: GroupNorm (never BatchNorm), no in-place activations.

The norm, activation and upsampling are chosen at construction (MONAI's own ``norm``/``act`` arguments
and blocks), not patched afterwards, so the network that trains privately is exactly the one that was
configured. Decoder upsampling: Opacus 1.6 has per-sample gradient code for ``Conv2d`` and ``GroupNorm``
but none for ``ConvTranspose2d`` (it would fall back to functorch), so fedpath registers its own for both
convolutions with Opacus' registry (:func:`register_fast_grad_samplers`: one grouped convolution backward
per layer). Measured on this CPU (bench/bench_dp.py) MONAI's transposed convolutions are then both the
fastest network and the fastest DP path, so ``upsample: deconv`` is the default; ``nontrainable``
(nearest resize + Conv2d, :class:`DPUNet`) stays available and needs nothing but Opacus' own layers.

:func:`check_dp_model` is the gate before private training: it runs Opacus' own validator (BatchNorm,
running statistics, unsupported layers) plus fedpath's checks (in-place activations, layers that would
fall back to functorch) and raises a one-line :class:`~pipeline.errors.FedpathError` naming the module.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.layers.factories import Norm
from monai.networks.nets import UNet
from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import FedpathError

# LeakyReLU/ReLU have no parameters, so Opacus never needs a per-sample gradient for them; PReLU
# (MONAI's UNet default) would force the slow functorch fallback.
_ACT = ("LEAKYRELU", {"negative_slope": 0.1, "inplace": False})


def bf16_native() -> bool:
    """Whether this CPU runs bfloat16 convolutions natively (AVX512-BF16 or AMX, through oneDNN)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str) -> str:
    """``train.precision`` / ``inference.precision`` as run: ``auto`` is bfloat16 where the CPU has native
    bf16, else float32."""
    if precision == "auto":
        return "bfloat16" if bf16_native() else "float32"
    return precision


def autocast(precision: str) -> contextlib.AbstractContextManager[Any]:
    """CPU bfloat16 autocast for ``precision="bfloat16"`` (as resolved), else no change. Weights, gradients
    and optimiser state stay float32; convolutions and matmuls run in bf16."""
    if precision == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def as_float(out: Any) -> Any:
    """A network's output (a tensor or a tuple of them) in float32, so losses never run in bf16."""
    if isinstance(out, torch.Tensor):
        return out.float()
    if isinstance(out, tuple):
        return tuple(as_float(o) for o in out)
    return out


#: test-time augmentation: the views a prediction averages (rot90 turns, then a left-right flip)
TTA_VIEWS: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "flips": ((0, False), (0, True), (2, False), (2, True)),  # identity, ↔, 180°, ↕ (= 180° then ↔)
    "dihedral": tuple((k, f) for k in range(4) for f in (False, True)),
}


def tta_logits(net: nn.Module, x: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """``net``'s logits for (n, c, h, w) ``x``, averaged over the ``mode``'s views (:data:`TTA_VIEWS`):
    each view turns and flips the input, runs the network and turns the logits back. H&E has no
    orientation, and training augments with the same flips and turns, so every view is a valid reading of
    the tile; averaging them removes the network's orientation-dependent errors (``none``: one plain pass)."""
    views = TTA_VIEWS[mode]
    if len(views) == 1:
        return net(x)
    total: torch.Tensor | None = None
    for k, flip in views:
        v = torch.flip(x, (-1,)) if flip else x
        out = net(torch.rot90(v, k, (-2, -1)) if k else v).float()
        out = torch.rot90(out, -k, (-2, -1)) if k else out
        out = torch.flip(out, (-1,)) if flip else out
        total = out if total is None else total.add_(out)
    assert total is not None
    return total.div_(len(views))


def foreground_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(n, h, w) probability that each pixel is foreground -- any class but background, so a 3-class
    (background, inside, boundary) map's nucleus includes its boundary -- from (n, C, h, w) logits: the
    sigmoid of a single channel, else 1 - softmax's background. The one definition that validation, test
    scoring, slide masks and instances threshold (at 0.5 it is a 2-class model's argmax, not a 3-class
    model's: a pixel at 0.4 background, 0.3 inside, 0.3 boundary is a nucleus pixel)."""
    logits = logits.float()
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0])
    return 1.0 - torch.softmax(logits, dim=1)[:, 0]


def group_norm(num_groups: int, num_channels: int, affine: bool = True, eps: float = 1e-5) -> nn.GroupNorm:
    """A plain ``nn.GroupNorm`` whose group count divides the layer's channels (2-class heads included).

    It returns the exact torch class, so Opacus uses its own GroupNorm per-sample gradient code.
    """
    return nn.GroupNorm(math.gcd(num_groups, num_channels), num_channels, eps=eps, affine=affine)


if "FEDPATH_GROUP" not in Norm.names:
    Norm.add_factory_callable("FEDPATH_GROUP", lambda dim=None: group_norm)


def _norm(groups: int) -> tuple[str, dict[str, int | bool]]:
    return ("FEDPATH_GROUP", {"num_groups": groups, "affine": True})


def _resize_conv(
    in_channels: int,
    out_channels: int,
    scale: int,
    kernel_size: int,
    act: Any,
    norm: Any,
    dropout: float,
    conv_only: bool = False,
) -> nn.Sequential:
    """Nearest-neighbour upsampling by ``scale`` then a stride-1 MONAI convolution (no checkerboard, and
    Opacus' Conv2d per-sample gradients instead of a functorch fallback for ConvTranspose2d)."""
    return nn.Sequential(
        nn.Upsample(scale_factor=scale, mode="nearest"),
        Convolution(
            2,
            in_channels,
            out_channels,
            strides=1,
            kernel_size=kernel_size,
            act=act,
            norm=norm,
            dropout=dropout,
            conv_only=conv_only,
        ),
    )


class DPUNet(UNet):
    """MONAI ``UNet`` whose decoder upsamples by resize + convolution instead of transposed convolution."""

    def _get_up_layer(self, in_channels: int, out_channels: int, strides: int, is_top: bool) -> nn.Module:
        conv: nn.Module = _resize_conv(
            in_channels,
            out_channels,
            int(strides),
            int(self.up_kernel_size),  # type: ignore[arg-type]
            self.act,
            self.norm,
            float(self.dropout) if self.dropout else 0.0,
            conv_only=is_top and self.num_res_units == 0,
        )
        if self.num_res_units > 0:
            ru = ResidualUnit(
                self.dimensions,
                out_channels,
                out_channels,
                strides=1,
                kernel_size=self.kernel_size,
                subunits=1,
                act=self.act,
                norm=self.norm,
                dropout=self.dropout,
                bias=self.bias,
                last_conv_only=is_top,
                adn_ordering=self.adn_ordering,
            )
            conv = nn.Sequential(conv, ru)
        return conv


# -- Attention U-Net (Oktay et al. 2018), MONAI's blocks with GroupNorm chosen at construction ------------
# MONAI's ``AttentionUnet`` hard-codes ``Norm.BATCH`` inside its blocks (and PReLU + InstanceNorm in the
# merge convolution), so the same architecture is assembled here from MONAI's ``Convolution`` with the
# norm/activation passed in. Parameter names follow MONAI's (``model.1.attention.W_g...``).
class _ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, strides: int, groups: int, dropout: float, kernel_size: int = 3):
        super().__init__()
        kw: dict[str, Any] = {
            "kernel_size": kernel_size,
            "act": _ACT,
            "norm": _norm(groups),
            "dropout": dropout,
            "adn_ordering": "NDA",
        }
        self.conv = nn.Sequential(
            Convolution(2, cin, cout, strides=strides, **kw), Convolution(2, cout, cout, strides=1, **kw)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x)
        return out


class _AttentionBlock(nn.Module):
    def __init__(self, f_int: int, f_g: int, f_l: int, groups: int):
        super().__init__()
        self.W_g = nn.Sequential(
            Convolution(2, f_g, f_int, kernel_size=1, conv_only=True), group_norm(groups, f_int)
        )
        self.W_x = nn.Sequential(
            Convolution(2, f_l, f_int, kernel_size=1, conv_only=True), group_norm(groups, f_int)
        )
        # one attention channel: GroupNorm(1, 1) normalises it per sample (BatchNorm did it over the batch)
        self.psi = nn.Sequential(
            Convolution(2, f_int, 1, kernel_size=1, conv_only=True), group_norm(1, 1), nn.Sigmoid()
        )
        self.relu = nn.ReLU(inplace=False)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        psi: torch.Tensor = self.psi(self.relu(self.W_g(g) + self.W_x(x)))
        return x * psi


class _AttentionLayer(nn.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        submodule: nn.Module,
        strides: int,
        groups: int,
        dropout: float,
        upsample: str,
    ):
        super().__init__()
        self.attention = _AttentionBlock(f_int=max(cin // 2, 1), f_g=cin, f_l=cin, groups=groups)
        if upsample == "deconv":
            self.upconv: nn.Module = Convolution(
                2,
                cout,
                cin,
                strides=strides,
                kernel_size=3,
                act=_ACT,
                norm=_norm(groups),
                adn_ordering="NDA",
                dropout=dropout,
                is_transposed=True,
            )
        else:
            self.upconv = _resize_conv(cout, cin, strides, 3, _ACT, _norm(groups), dropout)
        self.merge = Convolution(2, 2 * cin, cin, act=_ACT, norm=_norm(groups), dropout=dropout)
        self.submodule = submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fromlower = self.upconv(self.submodule(x))
        att = self.attention(g=fromlower, x=x)
        out: torch.Tensor = self.merge(torch.cat((att, fromlower), dim=1))
        return out


class DPAttentionUnet(nn.Module):
    """Attention U-Net from MONAI's building blocks, GroupNorm and non-in-place activations throughout."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        strides: Sequence[int],
        groups: int,
        dropout: float = 0.0,
        upsample: str = "nontrainable",
    ):
        super().__init__()
        if len(channels) < 2 or len(strides) != len(channels) - 1:
            raise FedpathError(
                f"attentionunet: needs >= 2 channels and len(strides) == len(channels) - 1 "
                f"(got channels={list(channels)}, strides={list(strides)})"
            )

        def block(ch: Sequence[int], st: Sequence[int]) -> nn.Module:
            down = _ConvBlock(ch[0], ch[1], int(st[0]), groups, dropout)
            sub = nn.Sequential(down, block(ch[1:], st[1:])) if len(ch) > 2 else down
            return _AttentionLayer(ch[0], ch[1], sub, int(st[0]), groups, dropout, upsample)

        head = _ConvBlock(in_channels, channels[0], 1, groups, dropout)
        reduce = Convolution(2, channels[0], out_channels, kernel_size=1, conv_only=True)
        self.model = nn.Sequential(head, block(channels, strides), reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)
        return out


#: a stride-1 ``Conv2d`` with at most this many channels in and out runs in channels-last memory format
TINY_CONV_CHANNELS = 4


def _to_channels_last(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def _to_contiguous(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
    return out.contiguous()


def channels_last_tiny_convs(net: nn.Module) -> nn.Module:
    """Run each stride-1 ``Conv2d`` with ≤ :data:`TINY_CONV_CHANNELS` channels on both sides (the UNet's
    last 3 → 3 convolution at full resolution) in channels-last memory format, by hooks on its input and
    output: the same arithmetic, but oneDNN's NCHW kernels for 3-channel maps are slow on CPU (fwd+bwd
    13.0 against 5.0 ms at batch 16, 128 px, bf16; a training step 1.19× faster, bench/bench_dp.py). The module
    stays a ``Conv2d`` with its contiguous weight, so state dicts and Opacus' per-sample code are unchanged.
    Every other layer stays NCHW: channels-last for the whole network is 1.2× slower here."""
    for m in net.modules():
        if (
            type(m) is nn.Conv2d
            and max(m.in_channels, m.out_channels) <= TINY_CONV_CHANNELS
            and m.stride == (1, 1)
            and m.groups == 1
        ):
            m.register_forward_pre_hook(_to_channels_last)
            m.register_forward_hook(_to_contiguous)
    return net


def build_model(cfg: ModelConfig, tiny_channels_last: bool = True) -> nn.Module:
    """A 2-D MONAI network from the config (logits, ``out_channels`` classes); ``tiny_channels_last``:
    :func:`channels_last_tiny_convs` (off only to measure it, bench/bench_dp.py)."""
    net = _build(cfg)
    return channels_last_tiny_convs(net) if tiny_channels_last else net


def _build(cfg: ModelConfig) -> nn.Module:
    from monai.networks import nets

    if cfg.name == "unet":
        cls = DPUNet if cfg.upsample == "nontrainable" else nets.UNet
        return cls(
            spatial_dims=2,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            channels=cfg.channels,
            strides=cfg.strides,
            num_res_units=cfg.num_res_units,
            act=_ACT,
            norm=_norm(cfg.groups),
            dropout=cfg.dropout,
        )
    if cfg.name == "basicunet":
        feats = list(cfg.channels) + [cfg.channels[0]] * max(0, 6 - len(cfg.channels))
        return nets.BasicUNet(
            spatial_dims=2,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            features=tuple(feats[:6]),
            act=_ACT,
            norm=_norm(cfg.groups),
            dropout=cfg.dropout,
            upsample=cfg.upsample,
        )
    if cfg.name == "segresnet":
        return nets.SegResNet(
            spatial_dims=2,
            init_filters=cfg.channels[0],
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            act=("RELU", {"inplace": False}),
            norm=_norm(cfg.groups),
            num_groups=cfg.groups,
            dropout_prob=cfg.dropout or None,
            upsample_mode=cfg.upsample,
        )
    if cfg.name == "attentionunet":
        return DPAttentionUnet(
            cfg.in_channels,
            cfg.out_channels,
            cfg.channels,
            cfg.strides,
            cfg.groups,
            cfg.dropout,
            cfg.upsample,
        )
    if cfg.name == "ensemble":
        return LogitMean([_build(m) for m in cfg.members])
    raise FedpathError(
        f"model {cfg.name!r}: not supported (unet, basicunet, segresnet, attentionunet, ensemble)"
    )


def ensemble_state(
    members: Sequence[tuple[dict[str, torch.Tensor], ModelConfig]],
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """One network of ``members`` (state, config), logits averaged (:class:`LogitMean`): its state
    (``members.<i>.*``) and its config (``name: ensemble``); a single member is returned as it is."""
    if len(members) == 1:
        return members[0]
    state: dict[str, torch.Tensor] = {}
    for i, (st, _) in enumerate(members):
        state.update({f"members.{i}.{k}": v for k, v in st.items()})
    cfg = ModelConfig(name="ensemble", out_channels=members[0][1].out_channels, members=[m for _, m in members])
    return state, cfg


class LogitMean(nn.Module):
    """An inference ensemble: the mean of its members' logits (state keys ``members.<i>.*``)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


# -- the pre-training check ----------------------------------------------------------------------------
_INPLACE_TYPES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.SiLU,
    nn.Mish,
    nn.Threshold,
    nn.Dropout,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)


def dp_model_problems(model: nn.Module, allow_functorch: bool = True) -> list[str]:
    """Every reason Opacus cannot (or should not) train ``model`` privately, one line per module."""
    from opacus.grad_sample import GradSampleModule
    from opacus.validators import ModuleValidator
    from opacus.validators.errors import IllegalModuleConfigurationError

    problems: list[str] = []
    if not model.training:
        problems.append(f"{type(model).__name__}: model is in eval mode; Opacus needs it in training mode")
    # Opacus' validators, run module by module so each reason names the module it is about.
    for name, mod in model.named_modules():
        where = name or "<root>"
        found = []
        if type(mod) in ModuleValidator.VALIDATORS:
            for err in ModuleValidator.validate(mod, strict=False):
                if isinstance(err, IllegalModuleConfigurationError):
                    continue  # the training-mode check, done once above for the whole model
                found.append(f"{where} ({type(mod).__name__}): {_first_sentences(str(err))}")
        problems += found
        if not found and isinstance(mod, nn.modules.batchnorm._BatchNorm):
            # no trainable parameters, so Opacus' validator skips it, but its batch statistics still mix
            # samples (and leak through running_mean/var)
            problems.append(
                f"{where} ({type(mod).__name__}): BatchNorm normalises each sample with statistics of the "
                "whole batch, so one sample's output depends on the others; use GroupNorm"
            )
    for name, mod in model.named_modules():
        where = name or "<root>"
        if isinstance(mod, _INPLACE_TYPES) and getattr(mod, "inplace", False):
            problems.append(
                f"{where} ({type(mod).__name__}): in-place activation; it overwrites the layer input that "
                "Opacus' backward hooks need for per-sample gradients"
            )
        own = [p for p in mod.parameters(recurse=False) if p.requires_grad]
        if own and type(mod) not in GradSampleModule.GRAD_SAMPLERS and not allow_functorch:
            problems.append(
                f"{where} ({type(mod).__name__}): Opacus has no per-sample gradient code for it "
                "(functorch fallback is slow); use a Conv2d/GroupNorm/Linear alternative"
            )
    return problems


def _first_sentences(text: str, n: int = 2) -> str:
    """The first ``n`` sentences of an Opacus error (its BatchNorm message runs to a paragraph), one line."""
    flat = " ".join(text.split())
    parts = re.split(r"(?<=[.!?])\s+", flat)
    return " ".join(parts[:n])


def check_dp_model(model: nn.Module, allow_functorch: bool = True) -> None:
    """Refuse a model that cannot be trained with DP-SGD, naming the first offending module and why."""
    register_fast_grad_samplers()
    problems = dp_model_problems(model, allow_functorch=allow_functorch)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise FedpathError(f"model {type(model).__name__}: not DP-trainable: {problems[0]}{more}")


def functorch_layers(model: nn.Module) -> list[str]:
    """Names of trainable modules that Opacus would handle with its functorch fallback."""
    from opacus.grad_sample import GradSampleModule

    return [
        f"{n} ({type(m).__name__})"
        for n, m in model.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
        and type(m) not in GradSampleModule.GRAD_SAMPLERS
    ]


# -- fast per-sample gradients for convolutions -----------------------------------------------------------
def _grouped_conv_grad_sample(
    layer: nn.Conv2d | nn.ConvTranspose2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample weight gradients of a 2-D (transposed) convolution as ONE grouped convolution backward.

    The batch is folded into the channel axis (``(1, N*C, H, W)``) and the weight repeated N times with
    ``groups = N * layer.groups``, so the weight gradient of group ``n`` is exactly sample ``n``'s gradient
    (Rochette et al. 2019, "Efficient per-example gradient computations in convolutional neural
    networks"). It is the same arithmetic as the ordinary weight gradient, done by the same oneDNN kernel,
    whereas Opacus' default im2col path materialises a k*k-times larger copy of every activation.
    """
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    ret: dict[nn.Parameter, torch.Tensor] = {}
    transposed = isinstance(layer, nn.ConvTranspose2d)
    if layer.weight.requires_grad:
        w = layer.weight.detach()
        xi = x.reshape(1, n * x.shape[1], *x.shape[2:])
        gi = backprops.reshape(1, n * backprops.shape[1], *backprops.shape[2:])
        w_rep = w.repeat(n, 1, 1, 1)
        out_pad = list(layer.output_padding) if transposed else [0, 0]
        _, gw, _ = torch.ops.aten.convolution_backward(
            gi,
            xi,
            w_rep,
            None,
            list(layer.stride),
            list(layer.padding),
            list(layer.dilation),  # type: ignore[arg-type]
            transposed,
            out_pad,
            n * layer.groups,
            [False, True, False],
        )
        ret[layer.weight] = gw.view(n, *w.shape)  # type: ignore[index]
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum(dim=(2, 3))  # type: ignore[index]
    return ret


def _fast_conv2d(
    layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Conv2d: the grouped path, except where Opacus' im2col path is as good or the only exact one."""
    from opacus.grad_sample.conv import compute_conv_grad_sample

    # Opacus' im2col (``unfold2d``) takes strides for a contiguous NCHW tensor: a channels-last input
    # (:func:`channels_last_tiny_convs`) must be made contiguous first, or its per-sample gradients are wrong
    activations = [a.contiguous() for a in activations]
    if (
        isinstance(layer.padding, str)
        or layer.padding_mode != "zeros"
        or layer.in_channels // layer.groups <= 4  # first layers: im2col of 3 channels is cheap
        or activations[0].shape[0] == 0
    ):
        return compute_conv_grad_sample(layer, activations, backprops)  # type: ignore[no-any-return]
    return _grouped_conv_grad_sample(layer, activations, backprops)


_FAST_REGISTERED = False


def register_fast_grad_samplers() -> None:
    """Register the grouped-convolution per-sample gradients for Conv2d and ConvTranspose2d with Opacus.

    Opacus' registry maps a layer type to its per-sample gradient function; ConvTranspose2d has none in
    Opacus 1.6 (it would fall back to functorch), and its Conv2d one is several times slower than the
    layer's ordinary backward on CPU. Idempotent; affects every GradSampleModule built afterwards.
    """
    global _FAST_REGISTERED
    if _FAST_REGISTERED:
        return
    from opacus.grad_sample.utils import register_grad_sampler

    register_grad_sampler(nn.Conv2d)(_fast_conv2d)
    register_grad_sampler(nn.ConvTranspose2d)(_grouped_conv_grad_sample)
    _FAST_REGISTERED = True


def per_sample_only(model: nn.Module) -> list[Any]:
    """Stop autograd from computing the *summed* weight gradient of convolutions under DP-SGD.

    Opacus' hooks compute every per-sample gradient from the layer's input and output gradient, and DP-SGD
    only uses those (clipped, summed, noised); the ordinary ``weight.grad`` autograd also computes is
    thrown away, yet it costs as much as the per-sample ones. A forward pre-hook lets the convolution run
    with its parameters detached from the graph (only the input gradient is propagated), and a forward
    hook re-enables them before Opacus' own forward hook records the activations. Register BEFORE the
    model is wrapped by Opacus (hook order). Layers whose input needs no gradient (the first) are left
    alone, so their backward still runs and Opacus still sees their output gradient. Returns the hook
    handles (``.remove()`` them to undo).
    """
    handles: list[Any] = []

    def pre(mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if mod.training and torch.is_grad_enabled() and inputs[0].requires_grad:
            mod._fedpath_frozen = [p for p in mod.parameters(recurse=False) if p.requires_grad]  # type: ignore[assignment]
            for p in mod._fedpath_frozen:  # type: ignore[union-attr]
                p.requires_grad_(False)

    def post(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        for p in getattr(mod, "_fedpath_frozen", []):
            p.requires_grad_(True)
        mod._fedpath_frozen = []  # type: ignore[assignment]

    for m in model.modules():
        if type(m) in (nn.Conv2d, nn.ConvTranspose2d):
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
    return handles
