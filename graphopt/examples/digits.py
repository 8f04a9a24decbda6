"""The demo's task: scikit-learn's bundled 8x8 digits (no download) and a small residual CNN trained on them.

``load_digits`` ships inside scikit-learn (a dev extra of graphopt): 1797 grayscale images of the digits 0-9.
``size`` upsamples the images (bilinear) where a model needs larger inputs; the demo uses them as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.errors import InputError
from graphopt.examples.models import ResidualBlock


def load_digits_tensors(size: int = 8, seed: int = 0, test_fraction: float = 0.25):
    """(x_train, y_train, x_test, y_test): float images (N, 1, size, size) in [0, 1], int64 labels; a seeded,
    per-class stratified split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise InputError("the demo needs scikit-learn for its bundled digits data; hint: "
                         "pip install scikit-learn (or pip install 'graphopt[dev]')") from e
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = round(len(idx) * test_fraction)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx, test_idx = torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


class DigitsNet(nn.Module):
    """Stem, two residual blocks, a strided conv, two more residual blocks, global pooling, a linear head."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = nn.Sequential(ResidualBlock(width), ResidualBlock(width))
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.stage2 = nn.Sequential(ResidualBlock(2 * width), ResidualBlock(2 * width))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Top-1 accuracy in [0, 1], computed without gradients."""
    with torch.no_grad():
        hits = sum(int((model(x[i:i + batch]).argmax(dim=1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return hits / len(x)
