"""Shared test zoo: small, fast, deterministic models covering common architecture patterns.

Every graphopt test that needs "a real model" should take it from here, so that each pass
is exercised against the same set of graph shapes (conv-BN chains, residual adds, concats,
depthwise convs, channel shuffles, attention, GQA, Hugging Face modules, ...).

Usage::

    case = build("resnet_basic")
    out = case.model(*case.example_inputs)          # tuple inputs
    out = case.model(**case.example_inputs)         # dict inputs (Hugging Face models)

All models are written in plain ``torch.nn`` (no torchvision / timm), are small enough to run
a batch-2 forward in a few milliseconds on one CPU core, and are in ``eval()`` mode with
seeded random weights. BatchNorm statistics and affine parameters are randomized (see
``randomize_batchnorm``) so that conv-BN folding is not a no-op that would hide bugs.

Every model is written so that ``torch.export`` can capture it with a dynamic batch
dimension: reshapes use ``x.shape[0]`` or ``-1`` rather than a hard-coded batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models_breadth import BREADTH_NAMES, BREADTH_REGISTRY

__all__ = [
    "ZooCase",
    "build",
    "conv_bn_act",
    "randomize_batchnorm",
    "NAMES",
    "CNN_NAMES",
    "TRANSFORMER_NAMES",
    "HF_NAMES",
    "BREADTH_NAMES",
]

BATCH = 2
IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
SEED = 0


@dataclass
class ZooCase:
    """One zoo model with inputs to call it with."""

    name: str
    model: nn.Module  # already in eval() mode, deterministic (seeded) random weights
    example_inputs: tuple | dict  # positional args tuple, or dict of keyword args (HF models)
    tags: frozenset[str]  # e.g. {"cnn", "bn"}, {"transformer"}, {"hf"}


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def conv_bn_act(
    in_ch: int,
    out_ch: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: Callable[[], nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Conv2d (no bias) -> BatchNorm2d -> optional activation, "same" padding.

    Mirrors torchvision's ``Conv2dNormActivation`` layout (indices 0/1/2 in a Sequential),
    which is the pattern conv-BN folding passes look for.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


@torch.no_grad()
def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (in place).

    Freshly constructed BN layers are the identity in eval mode (mean 0, var 1, weight 1,
    bias 0), so a broken conv-BN folding would still produce the right output. Uses the
    global torch RNG, so it is deterministic once ``torch.manual_seed`` was called.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n) * 0.1)
            m.running_var.copy_(torch.empty(n).uniform_(0.5, 1.5))
            if m.affine:
                m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5))
                m.bias.copy_(torch.randn(n) * 0.1)
    return model


def _images(batch: int = BATCH) -> tuple[torch.Tensor]:
    return (torch.randn(batch, *IMAGE_SHAPE),)


def _token_ids(vocab_size: int, batch: int = BATCH, seq_len: int = 8) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq_len), dtype=torch.int64)


class Mlp(nn.Sequential):
    """Transformer feed-forward: Linear -> GELU -> Linear (shared by ViT, Swin, Mixer)."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim or dim))


# ---------------------------------------------------------------------------------------------
# mlp
# ---------------------------------------------------------------------------------------------


def make_mlp() -> nn.Module:
    """Plain MLP with a Linear -> BatchNorm1d pair (foldable), a Dropout and an Identity."""
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(128, 64),
        nn.BatchNorm1d(64),  # Linear+BN1d: the 1-d analogue of conv-BN folding
        nn.ReLU(),
        nn.Identity(),  # no-op module that passes should drop or ignore
        nn.Linear(64, NUM_CLASSES),
    )


# ---------------------------------------------------------------------------------------------
# vgg
# ---------------------------------------------------------------------------------------------


class VGG(nn.Module):
    """VGG-style: conv-BN-ReLU stacks with max pooling, then an MLP classifier."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_act(3, 16),
            conv_bn_act(16, 16),
            nn.MaxPool2d(2),  # 16x16
            conv_bn_act(16, 32),
            conv_bn_act(32, 32),
            nn.MaxPool2d(2),  # 8x8
            conv_bn_act(32, 64),
            nn.MaxPool2d(2),  # 4x4
            conv_bn_act(64, 64),
            nn.MaxPool2d(2),  # 2x2
        )
        # Flatten a real 64x2x2 spatial map (not a 1x1 one), so pruning/reshape passes have
        # to map output channels of the last conv onto groups of 4 Linear input features.
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, 128),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(128, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# ---------------------------------------------------------------------------------------------
# resnet_basic / resnet_bottleneck
# ---------------------------------------------------------------------------------------------


def _downsample(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    """1x1 conv + BN projection shortcut, only when the block changes shape."""
    if stride == 1 and in_ch == out_ch:
        return None
    return conv_bn_act(in_ch, out_ch, kernel_size=1, stride=stride, act=None)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, residual add, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn_act(in_ch, out_ch, 3, stride)
        self.conv2 = conv_bn_act(out_ch, out_ch, 3, act=None)
        self.downsample = _downsample(in_ch, out_ch, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + identity)


class Bottleneck(nn.Module):
    """ResNet bottleneck block: 1x1 reduce, 3x3 (strided), 1x1 expand x4, residual add."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = conv_bn_act(in_ch, planes, 1)
        self.conv2 = conv_bn_act(planes, planes, 3, stride)
        self.conv3 = conv_bn_act(planes, out_ch, 1, act=None)
        self.downsample = _downsample(in_ch, out_ch, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class ResNet(nn.Module):
    """Small ResNet: 3x3 stem, a list of residual blocks, global average pool, fc."""

    def __init__(self, blocks: list[nn.Module], out_ch: int):
        super().__init__()
        self.stem = conv_bn_act(3, 16)
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(out_ch, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def make_resnet_basic() -> nn.Module:
    """ResNet with BasicBlocks; includes identity blocks and strided projection blocks."""
    return ResNet(
        [
            BasicBlock(16, 16),
            BasicBlock(16, 32, stride=2),  # downsample: 1x1 conv + BN shortcut
            BasicBlock(32, 32),
            BasicBlock(32, 64, stride=2),
        ],
        out_ch=64,
    )


def make_resnet_bottleneck() -> nn.Module:
    """ResNet with Bottleneck blocks (expansion 4)."""
    return ResNet(
        [
            Bottleneck(16, 8),  # 16 -> 32 channels: projection shortcut at stride 1
            Bottleneck(32, 8),  # identity shortcut
            Bottleneck(32, 16, stride=2),  # 32 -> 64 channels, strided projection shortcut
            Bottleneck(64, 16),
        ],
        out_ch=64,
    )


# ---------------------------------------------------------------------------------------------
# mobilenetv2
# ---------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6) -> 3x3 depthwise (ReLU6) -> 1x1 linear project."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_ch * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_act(in_ch, hidden, 1, act=nn.ReLU6))
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),  # depthwise
            conv_bn_act(hidden, out_ch, 1, act=None),  # linear bottleneck: no activation
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res else out


class MobileNetV2(nn.Module):
    """Small MobileNetV2 with residual and strided inverted-residual blocks."""

    # (in_ch, out_ch, stride, expand_ratio)
    CFG = [(16, 8, 1, 1), (8, 12, 2, 6), (12, 12, 1, 6), (12, 16, 2, 6), (16, 16, 1, 6)]

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_act(3, 16, act=nn.ReLU6),
            *[InvertedResidual(*cfg) for cfg in self.CFG],
            conv_bn_act(16, 64, 1, act=nn.ReLU6),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# ---------------------------------------------------------------------------------------------
# mobilenetv3
# ---------------------------------------------------------------------------------------------


class SqueezeExcitation(nn.Module):
    """SE: global pool -> 1x1 conv -> ReLU -> 1x1 conv -> hardsigmoid, rescale the input."""

    def __init__(self, ch: int, squeeze_ch: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(ch, squeeze_ch, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze_ch, ch, 1)
        self.scale_act = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_act(self.fc2(self.relu(self.fc1(self.avgpool(x)))))
        return x * scale  # (B,C,1,1) broadcast over H,W: a per-channel, input-dependent gate


class MobileNetV3Block(nn.Module):
    """MobileNetV3 block: expand (hardswish) -> depthwise (hardswish) -> SE -> project."""

    def __init__(self, in_ch: int, hidden: int, out_ch: int, kernel: int, stride: int, se: bool):
        super().__init__()
        layers: list[nn.Module] = []
        if hidden != in_ch:
            layers.append(conv_bn_act(in_ch, hidden, 1, act=nn.Hardswish))
        layers.append(conv_bn_act(hidden, hidden, kernel, stride, groups=hidden, act=nn.Hardswish))
        if se:
            layers.append(SqueezeExcitation(hidden, max(8, hidden // 4)))
        layers.append(conv_bn_act(hidden, out_ch, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_res else out


class MobileNetV3(nn.Module):
    """Small MobileNetV3 with SE blocks, hardswish and 3x3/5x5 depthwise convs."""

    # (in_ch, hidden, out_ch, kernel, stride, se)
    CFG = [
        (16, 16, 16, 3, 2, True),
        (16, 48, 24, 3, 2, False),
        (24, 72, 24, 3, 1, False),
        (24, 72, 40, 5, 2, True),
        (40, 120, 40, 5, 1, True),
    ]

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_act(3, 16, act=nn.Hardswish),
            *[MobileNetV3Block(*cfg) for cfg in self.CFG],
            conv_bn_act(40, 96, 1, act=nn.Hardswish),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(96, 128), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(128, NUM_CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# ---------------------------------------------------------------------------------------------
# densenet
# ---------------------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """Pre-activation BN-ReLU-conv1x1-BN-ReLU-conv3x3, output concatenated onto the input."""

    def __init__(self, in_ch: int, growth: int, bn_size: int = 4):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_ch, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))
        # Channel concat: the input channels are consumed by every later layer of the block,
        # which is what makes channel pruning of DenseNets hard.
        return torch.cat([x, new], dim=1)


class Transition(nn.Sequential):
    """DenseNet transition: BN-ReLU-conv1x1 (halve channels)-avgpool 2x2."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(
            nn.BatchNorm2d(in_ch),
            nn.ReLU(),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
            nn.AvgPool2d(2),
        )


class DenseNet(nn.Module):
    """Small DenseNet: stem conv, two dense blocks with a transition layer in between."""

    def __init__(self, growth: int = 8, layers_per_block: int = 3):
        super().__init__()
        ch = 16
        blocks: list[nn.Module] = [nn.Conv2d(3, ch, 3, padding=1, bias=False)]
        for i in range(2):
            for _ in range(layers_per_block):
                blocks.append(DenseLayer(ch, growth))
                ch += growth
            if i == 0:
                blocks.append(Transition(ch, ch // 2))
                ch //= 2
        blocks += [nn.BatchNorm2d(ch), nn.ReLU()]
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(ch, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# ---------------------------------------------------------------------------------------------
# inception
# ---------------------------------------------------------------------------------------------


class InceptionBlock(nn.Module):
    """Four parallel branches concatenated on channels: 1x1 | 1x1-3x3 | 1x1-5x5 (or
    1x1-3x3-3x3) | maxpool-1x1."""

    def __init__(self, in_ch: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int,
                 double_3x3: bool):
        super().__init__()
        self.branch1 = conv_bn_act(in_ch, c1, 1)
        self.branch3 = nn.Sequential(conv_bn_act(in_ch, c3r, 1), conv_bn_act(c3r, c3, 3))
        if double_3x3:  # Inception-v3 style factorization of the 5x5
            self.branch5 = nn.Sequential(
                conv_bn_act(in_ch, c5r, 1), conv_bn_act(c5r, c5, 3), conv_bn_act(c5, c5, 3)
            )
        else:
            self.branch5 = nn.Sequential(conv_bn_act(in_ch, c5r, 1), conv_bn_act(c5r, c5, 5))
        self.branch_pool = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1), conv_bn_act(in_ch, cp, 1)
        )
        self.out_ch = c1 + c3 + c5 + cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)]
        return torch.cat(branches, dim=1)


class Inception(nn.Module):
    """Stem conv, one 5x5 Inception block, max pool, one double-3x3 Inception block, head."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn_act(3, 32)
        self.block_a = InceptionBlock(32, 16, 16, 24, 8, 12, 12, double_3x3=False)  # -> 64
        self.pool = nn.MaxPool2d(2)
        self.block_b = InceptionBlock(64, 24, 24, 32, 12, 16, 16, double_3x3=True)  # -> 88
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.block_b.out_ch, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_b(self.pool(self.block_a(self.stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------------------------------------
# shufflenet
# ---------------------------------------------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle: (B, g*c, H, W) -> view (B,g,c,H,W) -> swap g,c -> flatten."""
    b, ch, h, w = x.shape
    x = x.view(b, groups, ch // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.reshape(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit. stride 1: split channels, transform one half. stride 2: both
    halves come from the full input (each branch downsamples). Then concat + shuffle."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride = stride
        branch_ch = out_ch // 2
        if stride == 1:
            assert in_ch == out_ch
            self.branch1 = None
        else:
            self.branch1 = nn.Sequential(
                conv_bn_act(in_ch, in_ch, 3, stride, groups=in_ch, act=None),  # depthwise
                conv_bn_act(in_ch, branch_ch, 1),
            )
        b2_in = in_ch if stride > 1 else branch_ch
        self.branch2 = nn.Sequential(
            conv_bn_act(b2_in, branch_ch, 1),
            conv_bn_act(branch_ch, branch_ch, 3, stride, groups=branch_ch, act=None),
            conv_bn_act(branch_ch, branch_ch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch1 is None:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch2(x2)], dim=1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """Small ShuffleNetV2: stem, two stages each starting with a stride-2 unit, 1x1 conv, head."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn_act(3, 24)
        self.stages = nn.Sequential(
            ShuffleUnit(24, 48, 2),
            ShuffleUnit(48, 48, 1),
            ShuffleUnit(48, 48, 1),
            ShuffleUnit(48, 96, 2),
            ShuffleUnit(96, 96, 1),
        )
        self.conv5 = conv_bn_act(96, 128, 1)
        self.fc = nn.Linear(128, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stages(self.stem(x)))
        return self.fc(x.mean([2, 3]))  # global pool as a mean op, as torchvision does


# ---------------------------------------------------------------------------------------------
# convnext
# ---------------------------------------------------------------------------------------------


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dim of an NCHW tensor, written out by hand (ConvNeXt's
    "channels_first" LayerNorm)."""

    def __init__(self, ch: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ch))
        self.bias = nn.Parameter(torch.zeros(ch))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    """dwconv 7x7 -> channels-last -> LayerNorm -> Linear 4x -> GELU -> Linear -> gamma * x
    -> channels-first -> residual add."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # Real ConvNeXt initializes layer scale to 1e-6, which makes the branch vanish and
        # hides bugs in it; use O(1) random per-channel values instead.
        self.gamma = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (B,C,H,W) -> (B,H,W,C): Linear acts on channels
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + x


class ConvNeXt(nn.Module):
    """Small ConvNeXt: patchify stem, two stages separated by a LayerNorm2d + 2x2 conv downsample."""

    def __init__(self, dims: tuple[int, int] = (32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0]))
        self.stage1 = nn.Sequential(ConvNeXtBlock(dims[0]), ConvNeXtBlock(dims[0]))
        self.downsample = nn.Sequential(LayerNorm2d(dims[0]), nn.Conv2d(dims[0], dims[1], 2, 2))
        self.stage2 = nn.Sequential(ConvNeXtBlock(dims[1]), ConvNeXtBlock(dims[1]))
        self.norm = nn.LayerNorm(dims[1], eps=1e-6)
        self.head = nn.Linear(dims[1], NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.downsample(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean([-2, -1])))


# ---------------------------------------------------------------------------------------------
# vit
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv Linear.

    ``use_sdpa=False`` writes the attention out (softmax(q @ k^T * scale) @ v) so passes see
    the matmul/softmax pattern; ``use_sdpa=True`` uses F.scaled_dot_product_attention.
    """

    def __init__(self, dim: int, num_heads: int, use_sdpa: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.use_sdpa = use_sdpa
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        if self.use_sdpa:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            x = attn.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class ViTBlock(nn.Module):
    """Pre-norm transformer encoder block: x + attn(LN(x)); x + mlp(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4, use_sdpa: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, use_sdpa)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Small ViT: 4x4 patch conv embedding, class token, learned position embedding,
    two hand-written attention blocks and one SDPA block, head on the class token."""

    def __init__(self, dim: int = 64, patch: int = 4, depth: int = 3, num_heads: int = 4):
        super().__init__()
        num_patches = (IMAGE_SHAPE[1] // patch) * (IMAGE_SHAPE[2] // patch)
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.pos_drop = nn.Dropout(0.1)
        # Last block uses SDPA so both attention spellings appear in one graph.
        self.blocks = nn.Sequential(
            *[ViTBlock(dim, num_heads, use_sdpa=(i == depth - 1)) for i in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # batch from the input, not hardcoded
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(self.pos_drop(x)))
        return self.head(x[:, 0])


# ---------------------------------------------------------------------------------------------
# unet
# ---------------------------------------------------------------------------------------------


def double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU, the U-Net building block."""
    return nn.Sequential(conv_bn_act(in_ch, out_ch), conv_bn_act(out_ch, out_ch))


class UNet(nn.Module):
    """Two-level U-Net: max-pool encoder, ConvTranspose2d decoder with skip concats.
    Output is a 2-channel map at the input resolution."""

    def __init__(self, out_ch: int = 2):
        super().__init__()
        self.enc1 = double_conv(3, 16)
        self.enc2 = double_conv(16, 32)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = double_conv(32, 64)
        self.up2 = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.dec2 = double_conv(64, 32)  # 32 upsampled + 32 skip
        self.up1 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec1 = double_conv(32, 16)  # 16 upsampled + 16 skip
        self.out = nn.Conv2d(16, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)  # 32x32
        e2 = self.enc2(self.pool(e1))  # 16x16
        b = self.bottleneck(self.pool(e2))  # 8x8
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


# ---------------------------------------------------------------------------------------------
# swin
# ---------------------------------------------------------------------------------------------


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * num_windows, ws, ws, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """(B * num_windows, ws, ws, C) -> (B, H, W, C).

    The reference implementation recovers B as int(windows.shape[0] / (H*W/ws/ws)), a float
    division of a (possibly symbolic) size; a -1 in the view is equivalent and export-friendly.
    """
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, h, w, c)


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a learned relative position bias."""

    def __init__(self, dim: int, ws: int, num_heads: int):
        super().__init__()
        self.ws = ws
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        # One bias per (relative offset, head); real Swin uses trunc_normal(std=.02).
        self.relative_position_bias_table = nn.Parameter(
            torch.randn((2 * ws - 1) * (2 * ws - 1), num_heads) * 0.02
        )
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))
        coords = coords.flatten(1)  # (2, ws*ws)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += ws - 1  # shift offsets to start from 0
        rel[:, :, 1] += ws - 1
        rel[:, :, 0] *= 2 * ws - 1
        self.register_buffer("relative_position_index", rel.sum(-1))  # (ws*ws, ws*ws) int64
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b_, n, c = x.shape  # b_ = batch * num_windows
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).contiguous()  # (heads, N, N)
        attn = attn + bias.unsqueeze(0)
        if mask is not None:  # (nW, N, N); -100 where tokens came from different regions
            nw = mask.shape[0]
            attn = attn.view(-1, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b_, n, c)
        return self.proj(x)


class SwinBlock(nn.Module):
    """Swin block: LN -> (cyclic shift) -> window attention -> (reverse shift) -> residual,
    then LN -> MLP -> residual. Tokens are (B, H*W, C) at a fixed resolution."""

    def __init__(self, dim: int, resolution: int, num_heads: int, ws: int, shift: int):
        super().__init__()
        self.resolution = resolution
        self.ws = ws
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, ws, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.register_buffer("attn_mask", self._shift_mask() if shift else None)

    def _shift_mask(self) -> torch.Tensor:
        """Mask stopping attention between regions that the roll made adjacent."""
        r, ws, s = self.resolution, self.ws, self.shift
        img_mask = torch.zeros(1, r, r, 1)
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                img_mask[:, hs, wsl, :] = cnt
                cnt += 1
        mw = window_partition(img_mask, ws).view(-1, ws * ws)
        mask = mw.unsqueeze(1) - mw.unsqueeze(2)
        return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, ws = self.resolution, self.ws
        b, _, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, r, r, c)
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = window_partition(x, ws).view(-1, ws * ws, c)
        windows = self.attn(windows, self.attn_mask).view(-1, ws, ws, c)
        x = window_reverse(windows, ws, r, r)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + x.view(b, r * r, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """Concat the 4 pixels of each 2x2 neighbourhood (strided slices), LN, Linear 4C -> 2C."""

    def __init__(self, dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, self.resolution, self.resolution, c)
        x0 = x[:, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, :]
        x3 = x[:, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3], -1).view(b, -1, 4 * c)
        return self.reduction(self.norm(x))


class Swin(nn.Module):
    """Small Swin: 2x2 patch embed (16x16 tokens), stage 1 (regular + shifted windows),
    patch merging (8x8 tokens), stage 2 (regular + shifted), mean-pool head."""

    def __init__(self, dim: int = 32, ws: int = 4):
        super().__init__()
        res = IMAGE_SHAPE[1] // 2
        self.patch_embed = nn.Conv2d(3, dim, 2, stride=2)
        self.embed_norm = nn.LayerNorm(dim)
        self.stage1 = nn.Sequential(
            SwinBlock(dim, res, 2, ws, shift=0), SwinBlock(dim, res, 2, ws, shift=ws // 2)
        )
        self.merge = PatchMerging(dim, res)
        self.stage2 = nn.Sequential(
            SwinBlock(2 * dim, res // 2, 4, ws, shift=0),
            SwinBlock(2 * dim, res // 2, 4, ws, shift=ws // 2),
        )
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_norm(self.patch_embed(x).flatten(2).transpose(1, 2))
        x = self.stage2(self.merge(self.stage1(x)))
        return self.head(self.norm(x).mean(1))


# ---------------------------------------------------------------------------------------------
# mlp_mixer
# ---------------------------------------------------------------------------------------------


class MixerBlock(nn.Module):
    """Token mixing (Linear over the token dim, via transpose) then channel mixing."""

    def __init__(self, num_tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = Mlp(num_tokens, token_hidden)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = Mlp(dim, channel_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, tokens, dim)
        # Linear layers here act on the token dim, not on channels: a pass that assumes
        # "Linear in_features == channel dim" must notice the transpose.
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MlpMixer(nn.Module):
    """Small MLP-Mixer: 4x4 patch conv embedding (64 tokens), two mixer blocks, mean-pool head."""

    def __init__(self, dim: int = 64, patch: int = 4, depth: int = 2):
        super().__init__()
        num_tokens = (IMAGE_SHAPE[1] // patch) * (IMAGE_SHAPE[2] // patch)
        self.stem = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.Sequential(
            *[MixerBlock(num_tokens, dim, token_hidden=32, channel_hidden=4 * dim)
              for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(1))


# ---------------------------------------------------------------------------------------------
# poolformer
# ---------------------------------------------------------------------------------------------


class PoolFormerBlock(nn.Module):
    """x = x + ls1 * (pool(norm(x)) - norm(x)); x = x + ls2 * mlp(norm(x)), all NCHW."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)  # GroupNorm after a conv: must NOT be BN-folded
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, 4 * dim, 1), nn.GELU(), nn.Conv2d(4 * dim, dim, 1))
        # Per-channel layer scales; O(1) random values so the branches matter (see ConvNeXt).
        self.layer_scale_1 = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))
        self.layer_scale_2 = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.layer_scale_1.view(-1, 1, 1) * (self.pool(y) - y)
        return x + self.layer_scale_2.view(-1, 1, 1) * self.mlp(self.norm2(x))


class NFBlock(nn.Module):
    """NFNet-style residual: x + alpha * branch(x) with a Python-float constant alpha."""

    def __init__(self, dim: int, alpha: float = 0.2):
        super().__init__()
        self.alpha = alpha
        self.branch = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1), nn.GELU(), nn.Conv2d(dim, dim, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * self.branch(x)


class PoolFormer(nn.Module):
    """Patchify conv stem (no BN), PoolFormer blocks, an NF block, GroupNorm, mean-pool head."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)  # 8x8
        self.blocks = nn.Sequential(PoolFormerBlock(dim), NFBlock(dim), PoolFormerBlock(dim))
        self.norm = nn.GroupNorm(1, dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.blocks(self.stem(x)))
        return self.head(x.mean([-2, -1]))


# ---------------------------------------------------------------------------------------------
# masked_conv
# ---------------------------------------------------------------------------------------------


class MaskedConvNet(nn.Module):
    """CNN with a broadcast spatial-attention mask and Linear layers over spatial dims.

    - ``x * sigmoid(conv(x))`` with a (B,1,H,W) mask broadcast over channels;
    - a Linear over W (already last in NCHW, so no permute: Linear not over channels);
    - a Linear over H, reached by permuting H to the last position and back.
    Passes that assume "last dim of a Linear input == channels" or that a multiply is
    per-channel must handle these.
    """

    def __init__(self):
        super().__init__()
        self.stem = conv_bn_act(3, 16)
        self.down = conv_bn_act(16, 32, stride=2)  # 16x16
        self.mask_conv = nn.Conv2d(32, 1, 3, padding=1)
        self.width_mix = nn.Linear(16, 16)
        self.height_mix = nn.Linear(16, 16)
        self.head_conv = conv_bn_act(32, 64, stride=2)  # 8x8
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.stem(x))
        mask = torch.sigmoid(self.mask_conv(x))  # (B, 1, H, W)
        x = x * mask
        x = x + self.width_mix(x)  # Linear over W
        x = x + self.height_mix(x.permute(0, 1, 3, 2)).permute(0, 1, 3, 2)  # Linear over H
        x = self.head_conv(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------
# phi3_style
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm written out: x * rsqrt(mean(x^2) + eps) * weight (as in Llama/Phi-3)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        # Random around 1 (real init is ones) so folding the weight into the next Linear
        # is observable.
        self.weight = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE helper: (x1, x2) -> (-x2, x1) on the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Phi3Attention(nn.Module):
    """Causal GQA attention with one fused qkv Linear and rotary position embeddings."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, max_len: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.q_size = num_heads * self.head_dim
        self.kv_size = num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(dim, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, dim, bias=False)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        freqs = torch.outer(torch.arange(max_len).float(), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # (max_len, head_dim)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        causal = torch.full((max_len, max_len), float("-inf")).triu(1)
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.cos[:t], self.sin[:t]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # GQA: each kv head serves num_heads // num_kv_heads query heads.
        n_rep = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim) + self.causal_mask[:t, :t]
        out = scores.softmax(dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.q_size))


class Phi3MLP(nn.Module):
    """SwiGLU MLP with a fused gate_up Linear: chunk into gate/up, silu(gate) * up, down."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Phi3DecoderLayer(nn.Module):
    """Pre-RMSNorm decoder layer: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, hidden: int, max_len: int):
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.self_attn = Phi3Attention(dim, num_heads, num_kv_heads, max_len)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = Phi3MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Phi3Style(nn.Module):
    """Tiny Phi-3-like causal LM over token ids: embedding, 2 decoder layers, RMSNorm, lm_head."""

    VOCAB = 100

    def __init__(self, dim: int = 64, num_heads: int = 4, num_kv_heads: int = 2,
                 hidden: int = 128, depth: int = 2, max_len: int = 32):
        super().__init__()
        self.embed_tokens = nn.Embedding(self.VOCAB, dim)
        self.layers = nn.Sequential(
            *[Phi3DecoderLayer(dim, num_heads, num_kv_heads, hidden, max_len) for _ in range(depth)]
        )
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, self.VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.layers(self.embed_tokens(input_ids))))


# ---------------------------------------------------------------------------------------------
# Hugging Face models (random weights from small configs; no downloads)
# ---------------------------------------------------------------------------------------------

HF_VOCAB = 100
# Special token ids inside the small vocab, so generation/config validation does not warn.
_HF_SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Shared decoder-only config (Llama/Mistral/Qwen2 accept the same fields); GQA: 4 q heads,
# 2 kv heads.
_HF_DECODER = dict(
    vocab_size=HF_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    **_HF_SPECIAL,
)


def _hf_inputs(causal_lm: bool) -> dict:
    inputs = {
        "input_ids": _token_ids(HF_VOCAB),
        "attention_mask": torch.ones(BATCH, 8, dtype=torch.int64),
    }
    if causal_lm:
        inputs["use_cache"] = False  # no KV-cache objects in the outputs / exported graph
    return inputs


def make_hf_bert() -> nn.Module:
    """transformers BertModel, 2 layers, hidden 64."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=HF_VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        **_HF_SPECIAL,
    )
    return BertModel(config)


def make_hf_gpt2() -> nn.Module:
    """transformers GPT2LMHeadModel, 2 layers, hidden 64."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=HF_VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        **_HF_SPECIAL)
    return GPT2LMHeadModel(config)


def make_hf_llama() -> nn.Module:
    """transformers LlamaForCausalLM with GQA (4 heads, 2 kv heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_HF_DECODER))


def make_hf_mistral() -> nn.Module:
    """transformers MistralForCausalLM with GQA (4 heads, 2 kv heads)."""
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_HF_DECODER))


def make_hf_qwen2() -> nn.Module:
    """transformers Qwen2ForCausalLM with GQA (4 heads, 2 kv heads)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_HF_DECODER))


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

_IMAGES = _images
_MLP_INPUT = lambda: (torch.randn(BATCH, 64),)  # noqa: E731
_PHI3_INPUT = lambda: (_token_ids(Phi3Style.VOCAB),)  # noqa: E731

_CNN, _CNN_BN = frozenset({"cnn"}), frozenset({"cnn", "bn"})
_TRANSFORMER, _HF = frozenset({"transformer"}), frozenset({"transformer", "hf"})

# name -> (model factory, example-input factory, tags)
_REGISTRY: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple | dict], frozenset]] = {
    "mlp": (make_mlp, _MLP_INPUT, frozenset({"mlp", "bn"})),
    "vgg": (VGG, _IMAGES, _CNN_BN),
    "resnet_basic": (make_resnet_basic, _IMAGES, _CNN_BN),
    "resnet_bottleneck": (make_resnet_bottleneck, _IMAGES, _CNN_BN),
    "mobilenetv2": (MobileNetV2, _IMAGES, _CNN_BN),
    "mobilenetv3": (MobileNetV3, _IMAGES, _CNN_BN),
    "densenet": (DenseNet, _IMAGES, _CNN_BN),
    "inception": (Inception, _IMAGES, _CNN_BN),
    "shufflenet": (ShuffleNetV2, _IMAGES, _CNN_BN),
    "convnext": (ConvNeXt, _IMAGES, _CNN),
    "vit": (ViT, _IMAGES, _TRANSFORMER),
    "unet": (UNet, _IMAGES, _CNN_BN),
    "swin": (Swin, _IMAGES, _TRANSFORMER),
    "mlp_mixer": (MlpMixer, _IMAGES, _TRANSFORMER),
    "poolformer": (PoolFormer, _IMAGES, _CNN),
    "masked_conv": (MaskedConvNet, _IMAGES, _CNN_BN),
    "phi3_style": (Phi3Style, _PHI3_INPUT, _TRANSFORMER),
    "hf_bert": (make_hf_bert, lambda: _hf_inputs(causal_lm=False), _HF),
    "hf_gpt2": (make_hf_gpt2, lambda: _hf_inputs(causal_lm=True), _HF),
    "hf_llama": (make_hf_llama, lambda: _hf_inputs(causal_lm=True), _HF),
    "hf_mistral": (make_hf_mistral, lambda: _hf_inputs(causal_lm=True), _HF),
    "hf_qwen2": (make_hf_qwen2, lambda: _hf_inputs(causal_lm=True), _HF),
}

NAMES: tuple[str, ...] = tuple(_REGISTRY)
"""Every zoo model name, in a stable order."""
CNN_NAMES: tuple[str, ...] = tuple(n for n in NAMES if "cnn" in _REGISTRY[n][2])
"""Convolutional models (tag "cnn")."""
TRANSFORMER_NAMES: tuple[str, ...] = tuple(n for n in NAMES if "transformer" in _REGISTRY[n][2])
"""Attention/token-mixing models, hand-written and Hugging Face (tag "transformer")."""
HF_NAMES: tuple[str, ...] = tuple(n for n in NAMES if "hf" in _REGISTRY[n][2])
"""Hugging Face transformers models (tag "hf")."""


def build(name: str) -> ZooCase:
    """Build zoo model ``name`` with seeded random weights, in eval mode, plus example inputs.

    Seeds torch with ``torch.manual_seed(0)`` first, so two calls give identical weights and
    inputs. Every BatchNorm gets randomized statistics (``randomize_batchnorm``).
    """
    registry = {**_REGISTRY, **BREADTH_REGISTRY}
    if name not in registry:
        raise KeyError(f"unknown zoo model {name!r}; expected one of {NAMES + BREADTH_NAMES}")
    make_model, make_inputs, tags = registry[name]
    torch.manual_seed(SEED)
    model = make_model()
    randomize_batchnorm(model)
    model.eval()
    example_inputs = make_inputs()
    return ZooCase(name=name, model=model, example_inputs=example_inputs, tags=tags)
