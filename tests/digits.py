"""A small real task for tests that need a *trained* model: scikit-learn's bundled 8x8 digits.

The zoo in ``models.py`` has seeded random weights, which is enough to check that a pass preserves outputs; it
says nothing about whether a transformed model still *works*. Tests of accuracy (pruning then fine-tuning,
quantization, ...) take their data, model, training loop and metric from here instead::

    model, (x_train, y_train, x_test, y_test) = trained_digits_cnn()   # cached: one training run per process
    acc = accuracy(model, x_test, y_test)                              # ~0.99

``sklearn.datasets.load_digits`` ships inside the scikit-learn package (no download): 1797 grayscale 8x8 images of
the digits 0-9. Everything here is seeded and runs on CPU; training ``DigitsCNN`` takes a few seconds on one thread.

``train`` and ``accuracy`` work on a plain ``nn.Module`` and on the ``fx.GraphModule`` graphopt returns. Such a
GraphModule was captured in eval mode and ``train`` leaves it there (it could switch: ``.train()`` works on it, as
``graphopt.finetune`` does): training it as it is uses BatchNorm running statistics and no dropout, which is what
a short fine-tune wants.
Those statistics are the ones of the unpruned model, so after channel pruning they no longer fit the shrunken
layers and only the BN affine parameters can adapt: recovery takes ~20 epochs at lr 5e-3 rather than a handful.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import graphopt.examples.digits as graphopt_digits
from graphopt.examples.models import ResidualBlock

__all__ = ["DigitsCNN", "load_digits_tensors", "train", "accuracy", "trained_digits_cnn", "torch_threads",
           "ResidualDigitsCNN", "trained_residual_digits_cnn"]


def load_digits_tensors(seed: int = 0, test_fraction: float = 0.25):
    """(x_train, y_train, x_test, y_test): digits as float (N, 1, 8, 8) in [0, 1] and int64 labels.

    The split is stratified per class and seeded, so the same ``seed`` always gives the same ~75/25 split (the
    demo's loader, at the images' own 8x8 size)."""
    return graphopt_digits.load_digits_tensors(8, seed=seed, test_fraction=test_fraction)


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits with the graph shapes pruning cares about: conv-BN-ReLU, a residual add, a
    strided conv, global average pooling and a linear head (38k parameters at the default width 32)."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        r = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(r)))  # residual block: the add couples stem and conv2 channels
        x = self.down(x)
        return self.head(x.mean(dim=(2, 3)))


def _set_mode(model: nn.Module, training: bool) -> None:
    """Switch train/eval on ordinary modules; leave graphopt's GraphModules in the eval mode they were captured in."""
    if not isinstance(model, fx.GraphModule):
        model.train(training)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 1e-2,
          batch_size: int = 64, seed: int = 0) -> nn.Module:
    """Train ``model`` in place with Adam and cross entropy over shuffled mini-batches; returns it.

    The learning rate decays from ``lr`` to 0 on a cosine over all steps, so the final weights do not depend on
    where the last noisy step of a high constant rate happened to land.

    Deterministic for a given ``seed`` (and thread count). An ``nn.Module`` is trained in train mode and left in
    eval mode; a graphopt GraphModule is trained as captured (see the module docstring).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    steps = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    _set_mode(model, True)
    try:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                idx = order[i:i + batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        _set_mode(model, False)
    return model


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on (x, y), in [0, 1]; eval mode for ordinary modules, no grad."""
    _set_mode(model, False)
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


class torch_threads:
    """Context manager: run the block with ``torch.set_num_threads(n)`` and restore the previous count after."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.previous)
        return False


@functools.lru_cache(maxsize=None)
def _trained(seed: int, epochs: int):
    x_train, y_train, x_test, y_test = load_digits_tensors(seed)
    torch.manual_seed(seed)
    model = DigitsCNN()
    with torch_threads(1):
        train(model, x_train, y_train, epochs=epochs, lr=1e-2, seed=seed)
    return model, (x_train, y_train, x_test, y_test)


def trained_digits_cnn(seed: int = 0, epochs: int = 12):
    """(model, (x_train, y_train, x_test, y_test)): a DigitsCNN trained on the digits split of ``seed``.

    About 99% test accuracy after 12 epochs (a few seconds). Trained on one thread, so the weights are the same
    whatever the core count (reductions split across threads round differently) and a shared machine is not
    oversubscribed. The training run is cached per process, so tests that share it pay for it once; each call
    returns a fresh deep copy of the model (in eval mode), so a test may train or modify it freely. The tensors
    are shared: do not modify them in place.
    """
    model, data = _trained(seed, epochs)
    return copy.deepcopy(model), data


class ResidualDigitsCNN(nn.Module):
    """A deeper digits CNN for depth pruning: stem, ``depth`` identity residual blocks (``blocks.0`` ...), a strided
    conv and a linear head. Each block is conv-BN-ReLU-conv-BN added to its input, then ReLU (a ResNet basic block
    without projection), so any of them can be removed and the network still runs."""

    def __init__(self, width: int = 16, depth: int = 3, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(depth))
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.down(x).mean(dim=(2, 3)))


@functools.lru_cache(maxsize=None)
def _trained_residual(seed: int, epochs: int, depth: int):
    x_train, y_train, x_test, y_test = load_digits_tensors(seed)
    torch.manual_seed(seed)
    model = ResidualDigitsCNN(depth=depth)
    with torch_threads(1):
        train(model, x_train, y_train, epochs=epochs, lr=1e-2, seed=seed)
    return model, (x_train, y_train, x_test, y_test)


def trained_residual_digits_cnn(seed: int = 0, epochs: int = 12, depth: int = 3):
    """(model, data) like ``trained_digits_cnn`` for a ``ResidualDigitsCNN`` with ``depth`` residual blocks
    (cached per process, a fresh deep copy per call, trained on one thread)."""
    model, data = _trained_residual(seed, epochs, depth)
    return copy.deepcopy(model), data
