"""Test-time augmentation (``inference.tta``): each view's logits are turned back before averaging, so the
averaged predictor is exactly equivariant under the views it averages, whatever the network; and it
reaches the whole-image scoring and the slide path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.infer import foreground_probability
from pipeline.instances import predict_probabilities
from pipeline.models import TTA_VIEWS, tta_logits


def _lopsided() -> nn.Module:
    """A network with no symmetry at all: an asymmetric kernel and a position-dependent bias."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 5, padding=2)

    class Net(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, w = x.shape[-2:]
            ramp = torch.linspace(0, 2, w).view(1, 1, 1, w) + torch.linspace(0, 1, h).view(1, 1, h, 1) ** 2
            return conv(x) + ramp

    return Net().eval()


def _turn(t: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    t = torch.flip(t, (-1,)) if flip else t
    return torch.rot90(t, k, (-2, -1))


@pytest.mark.parametrize("mode", ["flips", "dihedral"])
@torch.no_grad()
def test_tta_is_equivariant_under_its_views(mode: str) -> None:
    net = _lopsided()
    x = torch.rand(2, 3, 24, 24)
    base = tta_logits(net, x, mode)
    for k, flip in TTA_VIEWS[mode]:
        # predicting the turned tile gives the turned prediction, to float precision
        torch.testing.assert_close(tta_logits(net, _turn(x, k, flip), mode), _turn(base, k, flip), atol=1e-5, rtol=0)
    # the plain network is not: the test would pass trivially on a symmetric one
    assert (net(torch.flip(x, (-1,))) - torch.flip(net(x), (-1,))).abs().max() > 0.1
    # "none" is the plain pass
    torch.testing.assert_close(tta_logits(net, x, "none"), net(x))


@torch.no_grad()
def test_tta_reaches_image_scoring_and_slide_windows() -> None:
    net = _lopsided()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    plain = predict_probabilities(net, image, 32, overlap=0.5)
    flipped = predict_probabilities(net, image[:, ::-1], 32, overlap=0.5, tta="flips")
    averaged = predict_probabilities(net, image, 32, overlap=0.5, tta="flips")
    assert np.abs(plain - averaged).max() > 1e-3  # the option changes the prediction
    np.testing.assert_allclose(flipped[:, :, ::-1], averaged, atol=1e-5)  # and makes it flip-equivariant
    batch = rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    f = foreground_probability(net, batch, tta="dihedral")
    f_turned = foreground_probability(net, np.ascontiguousarray(np.rot90(batch, 1, (1, 2))), tta="dihedral")
    np.testing.assert_allclose(np.rot90(f, 1, (1, 2)), f_turned, atol=1e-5)
