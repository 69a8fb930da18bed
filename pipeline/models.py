"""MONAI segmentation networks built DP-ready: GroupNorm (never BatchNorm), no in-place activations.

The norm and activation are chosen at construction (MONAI's own ``norm``/``act`` arguments), not patched
afterwards, so the network that trains privately is exactly the one that was configured.
"""

from __future__ import annotations

import math

from monai.networks.layers.factories import Norm
from torch import nn

from pipeline.config import ModelConfig

# LeakyReLU/ReLU have no parameters, so Opacus never needs a per-sample gradient for them; PReLU
# (MONAI's UNet default) would force the slow functorch fallback.
_ACT = ("LEAKYRELU", {"negative_slope": 0.1, "inplace": False})


def group_norm(num_groups: int, num_channels: int, affine: bool = True, eps: float = 1e-5) -> nn.GroupNorm:
    """A plain ``nn.GroupNorm`` whose group count divides the layer's channels (2-class heads included).

    It returns the exact torch class, so Opacus uses its own GroupNorm per-sample gradient code.
    """
    return nn.GroupNorm(math.gcd(num_groups, num_channels), num_channels, eps=eps, affine=affine)


if "FEDPATH_GROUP" not in Norm.names:
    Norm.add_factory_callable("FEDPATH_GROUP", lambda dim=None: group_norm)


def _norm(groups: int) -> tuple[str, dict[str, int | bool]]:
    return ("FEDPATH_GROUP", {"num_groups": groups, "affine": True})


def build_model(cfg: ModelConfig) -> nn.Module:
    """A 2-D MONAI network from the config (logits, ``out_channels`` classes)."""
    from monai.networks import nets

    if cfg.name == "unet":
        return nets.UNet(
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
        )
    raise ValueError(f"model {cfg.name!r} is not supported yet")
