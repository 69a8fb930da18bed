"""Fixtures for the attack tests: a tiny segmentation network and real MoNuSeg tiles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from federation.attack.tiles import TileSet, load_monuseg_tiles


class TinySegNet(nn.Module):
    """A two-layer segmentation network: a fully connected layer over the tile, then per-pixel logits.

    Small enough that a test-sized inversion converges in seconds; its first layer makes the image
    identifiable from the gradient, so a failure to recover it is the optimiser's fault.
    """

    def __init__(self, size: int = 16, hidden: int = 96, classes: int = 2) -> None:
        super().__init__()
        self.size, self.classes = size, classes
        self.fc1 = nn.Linear(3 * size * size, hidden)
        self.act = nn.LeakyReLU(0.1)
        self.fc2 = nn.Linear(hidden, classes * size * size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x.flatten(1)))
        return self.fc2(h).view(x.shape[0], self.classes, self.size, self.size)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return TinySegNet().eval()


@pytest.fixture(scope="session")
def tiles16(data_root: Path) -> TileSet:
    """Real MoNuSeg tiles, 16x16 at 0.5 µm/px (2 per image from 6 images)."""
    return load_monuseg_tiles(data_root, 16, 0.5, per_image=2, max_images=6, seed=0)
