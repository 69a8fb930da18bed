"""One definition of a nucleus pixel: validation, tile scoring, slide masks and whole-image scoring agree.

A 3-class (background, inside, boundary) map's nucleus is every class but background, so a pixel at
0.4 background / 0.3 inside / 0.3 boundary is a nucleus pixel, although its argmax is background; the
validation Dice that early stopping and FedMIC's teacher selection read once took the argmax, and the
slide masks took the probability of class 1 (inside) alone."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.instances import foreground
from pipeline.models import foreground_from_logits
from pipeline.train import evaluate_dataset


class Constant(nn.Module):
    """Every pixel gets the same class probabilities."""

    def __init__(self, probs: list[float]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.log(torch.tensor(probs)), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        return self.logits.view(1, -1, 1, 1).expand(n, -1, h, w)


def _nuclei(n: int = 3, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    y = torch.ones(1, size, size, dtype=torch.int64)  # every pixel inside a nucleus
    y[0, :, :2] = 2  # a boundary strip
    return [(torch.rand(3, size, size), y) for _ in range(n)]


def test_split_nucleus_probability_is_foreground_everywhere() -> None:
    tiles = _nuclei()
    split = evaluate_dataset(Constant([0.4, 0.3, 0.3]), tiles)
    assert split["dice"] == 1.0  # argmax (background) would score 0
    assert evaluate_dataset(Constant([0.6, 0.2, 0.2]), tiles)["dice"] == 0.0
    from pipeline.infer import foreground_probability

    batch = np.zeros((2, 8, 8, 3), np.uint8)
    prob = foreground_probability(Constant([0.4, 0.3, 0.3]), batch)
    np.testing.assert_allclose(prob, 0.6, atol=1e-6)  # slide masks: inside + boundary, not inside alone


def test_tile_and_whole_image_foreground_agree() -> None:
    g = torch.Generator().manual_seed(0)
    for c in (1, 2, 3):
        logits = torch.randn(2, c, 9, 9, generator=g) * 3
        fg_t = foreground_from_logits(logits).numpy()
        if c == 1:
            fg = torch.sigmoid(logits[:, 0]).numpy()
        else:  # the whole-image path: softmax probabilities, then every class but background
            fg = np.stack([foreground(torch.softmax(logits[i], 0).numpy()) for i in range(2)])
        np.testing.assert_allclose(fg_t, fg, atol=1e-6)
        if c == 2:  # a 2-class model: the same pixels as its argmax
            assert ((fg_t > 0.5) == (logits.argmax(1) == 1).numpy()).all()
