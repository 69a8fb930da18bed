"""Small model files and slides for the inference tests (imported by name: tests have no packages)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint import ModelMeta, save_model
from pipeline.config import ModelConfig
from pipeline.models import build_model

TINY = ModelConfig(channels=[4, 8], strides=[2], num_res_units=0, groups=2)


def write_model(path: Path, tile: int = 64, mpp: float = 2.0, cfg: ModelConfig = TINY, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = build_model(cfg)
    return save_model(path, net.state_dict(), ModelMeta(model=cfg, tile_size=tile, target_mpp=mpp))


def write_constant_model(path: Path, p1: float, tile: int = 64, mpp: float = 1.0) -> Path:
    """A model whose softmax is (1 - p1, p1) at every pixel: all weights zero, the head's bias set."""
    net = build_model(TINY)
    with torch.no_grad():
        for prm in net.parameters():
            prm.zero_()
        head = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)
                and m.out_channels == TINY.out_channels][-1]  # fmt: skip
        assert head.bias is not None
        head.bias.copy_(torch.tensor([0.0, math.log(p1 / (1 - p1))]))
        out = torch.softmax(net(torch.rand(1, 3, tile, tile)), 1)[0, 1]
    assert torch.allclose(out, torch.tensor(p1), atol=1e-6), "the head bias does not reach the output"
    return save_model(path, net.state_dict(), ModelMeta(model=TINY, tile_size=tile, target_mpp=mpp))


def write_tissue_tiff(path: Path, w: int, h: int, mpp: float, seed: int = 0) -> Path:
    """A flat RGB TIFF of pink 'tissue' with darker blobs, with resolution tags giving ``mpp``."""
    import tifffile

    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (230, 160, 200)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(40):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(5, 20)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (90, 40, 140)
    tifffile.imwrite(
        path, img, photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER"
    )
    return path
