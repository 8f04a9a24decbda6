"""Realistic-size models for timing, in plain ``torch.nn`` (torchvision is not a dependency).

``resnet50()`` and ``mobilenet_v2()`` reproduce torchvision's architectures layer for layer (ResNet-50 v1.5:
stride in the 3x3 conv of each bottleneck, 25,557,032 parameters; MobileNetV2 width 1.0: 3,504,872
parameters), so channel counts, MACs and latency match the models people deploy. Weights are seeded random
(no download), every BatchNorm gets random running statistics and affine parameters so that it is not the
identity, and the models are returned in ``eval()`` mode. ``build(name)`` also returns a 1x3x224x224 input.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

SEED = 0
IMAGE_SHAPE = (1, 3, 224, 224)
NUM_CLASSES = 1000


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
             act: Callable[[], nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """Conv2d (no bias, "same" padding) -> BatchNorm2d -> optional activation."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(out_ch)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck: 1x1 reduce, 3x3 (carries the stride), 1x1 expand x4, residual add, ReLU."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = _conv_bn(in_ch, planes, 1)
        self.conv2 = _conv_bn(planes, planes, 3, stride)
        self.conv3 = _conv_bn(planes, out_ch, 1, act=None)
        self.downsample = (_conv_bn(in_ch, out_ch, 1, stride, act=None)
                           if stride != 1 or in_ch != out_ch else None)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class ResNet50(nn.Module):
    """ResNet-50: 7x7/2 stem, 3x3/2 max pool, bottleneck stages [3, 4, 6, 3], global average pool, fc."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = _conv_bn(3, 64, 7, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, in_ch = [], 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stage = [Bottleneck(in_ch, planes, 1 if i == 0 else 2)]
            in_ch = planes * Bottleneck.expansion
            stage += [Bottleneck(in_ch, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.layers(self.maxpool(self.stem(x))))
        return self.fc(torch.flatten(x, 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6) -> 3x3 depthwise (ReLU6) -> 1x1 linear projection (+ residual)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_ch * expand_ratio
        layers: list[nn.Module] = [] if expand_ratio == 1 else [_conv_bn(in_ch, hidden, 1, act=nn.ReLU6)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   _conv_bn(hidden, out_ch, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0): torchvision's inverted-residual settings, 1280-channel head, dropout + fc."""

    # (expand t, out channels c, repeats n, first stride s)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2, act=nn.ReLU6)]
        in_ch = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t))
                in_ch = c
        layers.append(_conv_bn(in_ch, 1280, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@torch.no_grad()
def _init(model: nn.Module) -> nn.Module:
    """torchvision-style init (kaiming fan_out convs, small-normal fc) plus random BN statistics; eval mode."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n) * 0.1)
            m.running_var.copy_(torch.empty(n).uniform_(0.5, 1.5))
            m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5))
            m.bias.copy_(torch.randn(n) * 0.1)
    return model.eval()


def resnet50() -> nn.Module:
    """ResNet-50 (torchvision architecture, 25.6M parameters), seeded random weights, eval mode."""
    torch.manual_seed(SEED)
    return _init(ResNet50())


def mobilenet_v2() -> nn.Module:
    """MobileNetV2 width 1.0 (torchvision architecture, 3.5M parameters), seeded random weights, eval mode."""
    torch.manual_seed(SEED)
    return _init(MobileNetV2())


BUILDERS: dict[str, Callable[[], nn.Module]] = {"resnet50": resnet50, "mobilenet_v2": mobilenet_v2}
"""Model name -> builder."""


def build(name: str) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Model ``name`` from BUILDERS and a seeded 1x3x224x224 example input."""
    model = BUILDERS[name]()
    torch.manual_seed(SEED)
    return model, (torch.randn(*IMAGE_SHAPE),)
