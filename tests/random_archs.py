"""Random but valid image architectures for property-based tests, built from a small printable recipe.

A recipe is a tree of frozen dataclasses (``Arch`` at the root) whose ``repr`` is valid Python, so a failing example
that hypothesis prints can be pasted back into a test::

    model, x = build(Arch(in_ch=3, seed=0, blocks=(Conv(out=8), Shuffle(groups=2)), head=Head("gap")))

``archs()`` is the hypothesis strategy. Every model works on a batch of images ``(B, in_ch, 8, 8)`` (B dynamic,
reshapes use ``x.shape``), keeps at most 16 channels anywhere, ends in a 5-way classifier, is in ``eval()`` mode,
has seeded weights and BatchNorms with random statistics and affine parameters (never an identity), and runs a
batch-2 forward in a few milliseconds.

Building blocks (C: channels coming in):

- ``Conv``: 3x3 or 1x1 conv (optional bias) + optional BatchNorm + optional activation (relu/gelu/silu/hardswish);
- ``Depthwise``: depthwise 3x3 conv (``groups=C``) + optional BN/activation;
- ``GroupedConv``: conv with ``groups=2`` (C and the output even);
- ``Shuffle``: channel shuffle ``view(B, g, C//g, H, W).transpose(1, 2).reshape(B, C, H, W)``;
- ``SE``: squeeze-excitation ``x * sigmoid(conv1x1(avgpool(x)))`` (optionally with a hidden 1x1 conv + ReLU);
- ``ViewRoundTrip``: reshapes that come back to ``(B, C, H, W)`` (``view`` to ``(B, C, H*W)``, flatten/unflatten,
  ``(B, C*H*W)``, token layout ``(B, H*W, C)``, channels-last permute);
- ``TokenMLP``: channels-last ``LayerNorm`` + ``Linear`` -> GELU -> ``Linear`` (ConvNeXt style), optional residual;
- ``Attention``: multi-head self-attention over the ``H*W`` tokens, written by hand: fused or separate q/k/v
  ``Linear``, reshape to heads, ``F.scaled_dot_product_attention`` or ``softmax(q @ k^T) @ v``, ``proj`` Linear,
  residual, back to ``(B, C, H, W)``;
- ``Residual``: ``x + f(x)`` where ``f`` is a chain of blocks that ends with C channels;
- ``Concat``: two branches (chains, an empty chain is the identity) concatenated along channels;
- ``Split``: ``torch.chunk`` or ``torch.split`` (uneven sizes) along channels, each piece through its own chain,
  then concatenated back (in order or swapped) or gated (``a * sigmoid(b)``, GLU style).

The breadth blocks of random_archs_breadth.py (``Mha``, ``PatchFold``, ``Im2col``, ``Pad``, ``SeqPool``,
``TLinear``, ``RelPos``) join them: nn.MultiheadAttention, channels folded into the batch, im2col/col2im, padding,
sequence pooling, ``x @ weight.T`` and relative-position attention (``repeat`` + ``gather``).

Heads: global average pool + ``Linear(C, 5)`` (``mean`` or ``adaptive_avg_pool2d``), the same with a hidden layer,
or ``flatten`` to ``(B, C*H*W)`` + ``Linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

from random_archs_breadth import (  # noqa: F401 (recipe names, so a printed recipe evaluates here)
    BREADTH_KINDS, Im2col, Mha, Pad, PatchFold, RelPos, SeqPool, TLinear, breadth_block, breadth_module, breadth_out,
)

BATCH = 2
SIZE = 8  # spatial H = W
MAX_C = 16
MIN_C = 2
NUM_CLASSES = 5
ACTS = ("relu", "gelu", "silu", "hardswish")


# ---------------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conv:
    out: int
    k: int = 3
    bias: bool = False
    bn: bool = True
    act: str | None = "relu"


@dataclass(frozen=True)
class Depthwise:
    bias: bool = False
    bn: bool = True
    act: str | None = "relu"


@dataclass(frozen=True)
class GroupedConv:
    out: int
    k: int = 3
    bias: bool = False
    bn: bool = True
    act: str | None = "relu"


@dataclass(frozen=True)
class Shuffle:
    groups: int = 2


@dataclass(frozen=True)
class SE:
    hidden: int | None = None  # None: a single 1x1 conv C -> C


@dataclass(frozen=True)
class ViewRoundTrip:
    mode: str = "view3"  # view3 | flatten_unflatten | flat | tokens | channels_last
    act: str | None = None  # applied in the reshaped layout


@dataclass(frozen=True)
class TokenMLP:
    hidden: int
    residual: bool = True


@dataclass(frozen=True)
class Attention:
    heads: int = 2
    head_dim: int = 4
    qkv: str = "fused"  # fused (qkv[0], qkv[1], qkv[2]) | unbind | separate (three Linears)
    sdpa: bool = True
    prenorm: bool = True
    qkv_bias: bool = True


@dataclass(frozen=True)
class Residual:
    body: tuple


@dataclass(frozen=True)
class Concat:
    a: tuple  # () is the identity
    b: tuple


@dataclass(frozen=True)
class Split:
    sizes: tuple  # sizes of the two pieces along channels
    how: str = "split"  # chunk (even halves) | split (list of sizes) | split_int (x.split(sizes[0], 1))
    a: tuple = ()
    b: tuple = ()
    combine: str = "cat"  # cat | cat_swapped | glu (a * sigmoid(b); both pieces end with the same width)


@dataclass(frozen=True)
class Head:
    kind: str = "gap"  # gap | pool | gap_mlp | flatten
    hidden: int = 8


Block = Union[Conv, Depthwise, GroupedConv, Shuffle, SE, ViewRoundTrip, TokenMLP, Attention, Residual, Concat, Split]


@dataclass(frozen=True)
class Arch:
    in_ch: int
    seed: int
    blocks: tuple
    head: Head = Head()

    def kinds(self) -> set[str]:
        """Names of every block type used anywhere in the recipe (nested ones included)."""
        found: set[str] = set()

        def walk(blocks):
            for b in blocks:
                found.add(type(b).__name__)
                if isinstance(b, Residual):
                    walk(b.body)
                elif isinstance(b, (Concat, Split)):
                    walk(b.a)
                    walk(b.b)

        walk(self.blocks)
        return found


def out_channels(blocks: tuple, c: int) -> int:
    """Channels after running ``blocks`` on ``c`` channels."""
    for b in blocks:
        c = _out_one(b, c)
    return c


def _out_one(b, c: int) -> int:
    if isinstance(b, (Conv, GroupedConv)):
        return b.out
    if isinstance(b, Concat):
        return out_channels(b.a, c) + out_channels(b.b, c)
    if isinstance(b, Split):
        oa, ob = out_channels(b.a, b.sizes[0]), out_channels(b.b, b.sizes[1])
        return oa if b.combine == "glu" else oa + ob
    out = breadth_out(b, c)
    return c if out is None else out


# ---------------------------------------------------------------------------------------------------------------------
# The modules that interpret a recipe
# ---------------------------------------------------------------------------------------------------------------------


def _act(name: str | None) -> nn.Module:
    return {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish, None: nn.Identity}[name]()


def _conv_bn_act(c_in, c_out, k, bias, bn, act, groups=1) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=bias, groups=groups)]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    if act is not None:
        layers.append(_act(act))
    return nn.Sequential(*layers)


class ShuffleM(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        b, c, h, w = x.shape
        return x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class SEM(nn.Module):
    def __init__(self, c: int, hidden: int | None):
        super().__init__()
        if hidden is None:
            self.fc = nn.Conv2d(c, c, 1)
        else:
            self.fc = nn.Sequential(nn.Conv2d(c, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, c, 1))

    def forward(self, x):
        return x * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(x, 1)))


class ViewRoundTripM(nn.Module):
    def __init__(self, mode: str, act: str | None):
        super().__init__()
        self.mode, self.act = mode, _act(act)

    def forward(self, x):
        b, c, h, w = x.shape
        if self.mode == "view3":
            return self.act(x.view(b, c, h * w)).view(b, c, h, w)
        if self.mode == "flatten_unflatten":
            return self.act(x.flatten(2)).unflatten(2, (h, w))
        if self.mode == "flat":
            return self.act(x.reshape(b, c * h * w)).reshape(b, c, h, w)
        if self.mode == "tokens":
            t = self.act(x.flatten(2).transpose(1, 2))  # (B, HW, C)
            return t.transpose(1, 2).reshape(b, c, h, w)
        if self.mode == "channels_last":
            return self.act(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
        raise ValueError(self.mode)


class TokenMLPM(nn.Module):
    def __init__(self, c: int, hidden: int, residual: bool):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(c), nn.Linear(c, hidden), nn.Linear(hidden, c)
        self.residual = residual

    def forward(self, x):
        y = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + y if self.residual else y


class AttentionM(nn.Module):
    def __init__(self, c: int, spec: Attention):
        super().__init__()
        self.heads, self.head_dim, self.spec = spec.heads, spec.head_dim, spec
        inner = spec.heads * spec.head_dim
        self.norm = nn.LayerNorm(c) if spec.prenorm else nn.Identity()
        if spec.qkv == "separate":
            self.q = nn.Linear(c, inner, bias=spec.qkv_bias)
            self.k = nn.Linear(c, inner, bias=spec.qkv_bias)
            self.v = nn.Linear(c, inner, bias=spec.qkv_bias)
        else:
            self.qkv = nn.Linear(c, 3 * inner, bias=spec.qkv_bias)
        self.proj = nn.Linear(inner, c)

    def forward(self, x):
        b, c, h, w = x.shape
        n, heads, hd = h * w, self.heads, self.head_dim
        t = x.flatten(2).transpose(1, 2)  # (B, N, C)
        y = self.norm(t)
        if self.spec.qkv == "separate":
            q, k, v = (m(y).view(b, n, heads, hd).transpose(1, 2) for m in (self.q, self.k, self.v))
        else:
            qkv = self.qkv(y).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, hd)
            q, k, v = qkv.unbind(0) if self.spec.qkv == "unbind" else (qkv[0], qkv[1], qkv[2])
        if self.spec.sdpa:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = torch.softmax((q @ k.transpose(-2, -1)) * hd ** -0.5, dim=-1) @ v
        o = o.transpose(1, 2).reshape(b, n, heads * hd)
        t = t + self.proj(o)
        return t.transpose(1, 2).reshape(b, c, h, w)


class ResidualM(nn.Module):
    def __init__(self, c: int, spec: Residual):
        super().__init__()
        self.body = _chain(spec.body, c)

    def forward(self, x):
        return x + self.body(x)


class ConcatM(nn.Module):
    def __init__(self, c: int, spec: Concat):
        super().__init__()
        self.a, self.b = _chain(spec.a, c), _chain(spec.b, c)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class SplitM(nn.Module):
    def __init__(self, c: int, spec: Split):
        super().__init__()
        assert sum(spec.sizes) == c
        self.spec = spec
        self.a, self.b = _chain(spec.a, spec.sizes[0]), _chain(spec.b, spec.sizes[1])

    def forward(self, x):
        s = self.spec
        if s.how == "chunk":
            xa, xb = torch.chunk(x, 2, dim=1)
        elif s.how == "split_int":
            xa, xb = x.split(s.sizes[0], dim=1)
        else:
            xa, xb = torch.split(x, list(s.sizes), dim=1)
        a, b = self.a(xa), self.b(xb)
        if s.combine == "glu":
            return a * torch.sigmoid(b)
        return torch.cat([b, a] if s.combine == "cat_swapped" else [a, b], dim=1)


class HeadM(nn.Module):
    def __init__(self, c: int, spec: Head):
        super().__init__()
        self.kind = spec.kind
        if spec.kind == "flatten":
            self.fc = nn.Linear(c * SIZE * SIZE, NUM_CLASSES)
        elif spec.kind == "gap_mlp":
            self.fc = nn.Sequential(nn.Linear(c, spec.hidden), nn.ReLU(), nn.Linear(spec.hidden, NUM_CLASSES))
        else:
            self.fc = nn.Linear(c, NUM_CLASSES)

    def forward(self, x):
        if self.kind == "flatten":
            x = x.flatten(1)
        elif self.kind == "pool":
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        else:
            x = x.mean(dim=(2, 3))
        return self.fc(x)


def _block(b, c: int) -> nn.Module:
    if isinstance(b, Conv):
        return _conv_bn_act(c, b.out, b.k, b.bias, b.bn, b.act)
    if isinstance(b, Depthwise):
        return _conv_bn_act(c, c, 3, b.bias, b.bn, b.act, groups=c)
    if isinstance(b, GroupedConv):
        return _conv_bn_act(c, b.out, b.k, b.bias, b.bn, b.act, groups=2)
    if isinstance(b, Shuffle):
        return ShuffleM(b.groups)
    if isinstance(b, SE):
        return SEM(c, b.hidden)
    if isinstance(b, ViewRoundTrip):
        return ViewRoundTripM(b.mode, b.act)
    if isinstance(b, TokenMLP):
        return TokenMLPM(c, b.hidden, b.residual)
    if isinstance(b, Attention):
        return AttentionM(c, b)
    if isinstance(b, Residual):
        return ResidualM(c, b)
    if isinstance(b, Concat):
        return ConcatM(c, b)
    if isinstance(b, Split):
        return SplitM(c, b)
    module = breadth_module(b, c)
    if module is None:
        raise TypeError(b)
    return module


def _chain(blocks: tuple, c: int) -> nn.Sequential:
    layers = []
    for b in blocks:
        layers.append(_block(b, c))
        c = _out_one(b, c)
    return nn.Sequential(*layers)  # empty: the identity


class RecipeNet(nn.Module):
    """The model a recipe describes: ``blocks`` in order, then the head."""

    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        self.blocks = _chain(arch.blocks, arch.in_ch)
        self.head = HeadM(out_channels(arch.blocks, arch.in_ch), arch.head)

    def forward(self, x):
        return self.head(self.blocks(x))


@torch.no_grad()
def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Random running statistics and affine parameters for every BatchNorm, so none is an identity."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n) * 0.1)
            m.running_var.copy_(torch.empty(n).uniform_(0.5, 1.5))
            m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5))
            m.bias.copy_(torch.randn(n) * 0.1)
    return model


def build(arch: Arch) -> tuple[nn.Module, torch.Tensor]:
    """The eval-mode model of ``arch`` with seeded weights, and an example input of batch 2."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(arch.seed)
        model = randomize_batchnorm(RecipeNet(arch)).eval()
        x = torch.randn(BATCH, arch.in_ch, SIZE, SIZE)
    finally:
        torch.random.set_rng_state(gen_state)
    return model, x


def example_input(arch: Arch, batch: int, seed: int = 1) -> torch.Tensor:
    """A fresh input for ``arch`` with another batch size."""
    return torch.randn(batch, arch.in_ch, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# The strategy
# ---------------------------------------------------------------------------------------------------------------------

LEAF_KINDS = ("conv", "depthwise", "grouped", "shuffle", "se", "view", "token_mlp", "attention") + BREADTH_KINDS
NESTED_KINDS = ("residual", "concat", "split")
ALL_KINDS = LEAF_KINDS + NESTED_KINDS

_acts = st.sampled_from(ACTS + (None,))
_widths = st.integers(MIN_C, MAX_C)


@st.composite
def _conv(draw, out: int | None = None) -> Conv:
    return Conv(out=draw(_widths) if out is None else out, k=draw(st.sampled_from([1, 3])), bias=draw(st.booleans()),
                bn=draw(st.booleans()), act=draw(_acts))


def _applicable(kind: str, c: int, depth: int) -> bool:
    if kind in ("grouped", "shuffle"):
        return c % 2 == 0
    if kind in NESTED_KINDS:
        return depth > 0 and (kind != "split" or c >= 4)
    return True


@st.composite
def block(draw, c: int, depth: int, kinds: tuple = ALL_KINDS):
    """One block taking ``c`` channels (nested blocks hold chains up to ``depth`` levels deep)."""
    kind = draw(st.sampled_from([k for k in kinds if _applicable(k, c, depth)]))
    if kind in BREADTH_KINDS:
        return draw(breadth_block(kind, c))
    if kind == "conv":
        return draw(_conv())
    if kind == "depthwise":
        return Depthwise(bias=draw(st.booleans()), bn=draw(st.booleans()), act=draw(_acts))
    if kind == "grouped":
        return GroupedConv(out=2 * draw(st.integers(1, MAX_C // 2)), k=draw(st.sampled_from([1, 3])),
                           bias=draw(st.booleans()), bn=draw(st.booleans()), act=draw(_acts))
    if kind == "shuffle":
        return Shuffle(groups=draw(st.sampled_from([g for g in (2, 4) if c % g == 0 and c // g >= 1])))
    if kind == "se":
        return SE(hidden=draw(st.none() | st.integers(2, 8)))
    if kind == "view":
        return ViewRoundTrip(mode=draw(st.sampled_from(["view3", "flatten_unflatten", "flat", "tokens",
                                                        "channels_last"])), act=draw(_acts))
    if kind == "token_mlp":
        return TokenMLP(hidden=draw(st.integers(2, 2 * MAX_C)), residual=draw(st.booleans()))
    if kind == "attention":
        heads = draw(st.integers(1, 4))
        return Attention(heads=heads, head_dim=draw(st.integers(1, max(1, MAX_C // heads))),
                         qkv=draw(st.sampled_from(["fused", "unbind", "separate"])), sdpa=draw(st.booleans()),
                         prenorm=draw(st.booleans()), qkv_bias=draw(st.booleans()))
    if kind == "residual":
        return Residual(body=draw(chain(c, c, depth - 1, nonempty=True)))
    if kind == "concat":
        oa = draw(st.integers(MIN_C, MAX_C - MIN_C))
        ob = draw(st.integers(MIN_C, MAX_C - oa))
        return Concat(a=draw(chain(c, oa, depth - 1)), b=draw(chain(c, ob, depth - 1)))
    # split
    how = draw(st.sampled_from(["chunk", "split", "split_int"] if c % 2 == 0 else ["split", "split_int"]))
    if how == "chunk":
        sizes = (c // 2, c // 2)
    elif how == "split_int":  # x.split(s, 1) with 2 pieces: s >= c - s
        s = draw(st.integers((c + 1) // 2, c - MIN_C))
        sizes = (s, c - s)
    else:
        s = draw(st.integers(MIN_C, c - MIN_C))
        sizes = (s, c - s)
    combine = draw(st.sampled_from(["cat", "cat_swapped", "glu"]))
    if combine == "glu":  # both pieces end with the same width
        oa = ob = draw(st.sampled_from(sorted({sizes[0], sizes[1]})) | _widths)
    else:  # keep a piece's width, or change it, within MAX_C in all
        oa = draw(st.just(sizes[0]) | st.integers(MIN_C, MAX_C - MIN_C))
        keep_b = st.just(sizes[1]) if sizes[1] <= MAX_C - oa else st.nothing()
        ob = draw(keep_b | st.integers(MIN_C, MAX_C - oa))
    return Split(sizes=sizes, how=how, a=draw(chain(sizes[0], oa, depth - 1)),
                 b=draw(chain(sizes[1], ob, depth - 1)), combine=combine)


@st.composite
def chain(draw, c_in: int, c_out: int, depth: int, nonempty: bool = False, max_len: int = 2):
    """Blocks taking ``c_in`` channels to ``c_out`` (a 1x1/3x3 conv is appended when the widths differ)."""
    blocks, c = [], c_in
    for _ in range(draw(st.integers(1 if nonempty else 0, max_len))):
        b = draw(block(c, depth))
        blocks.append(b)
        c = _out_one(b, c)
    if c != c_out or (nonempty and not blocks):
        blocks.append(draw(_conv(out=c_out)))
    return tuple(blocks)


@st.composite
def archs(draw, max_blocks: int = 4, depth: int = 2, kinds: tuple = ALL_KINDS) -> Arch:
    """A random recipe: a stem conv, 0..max_blocks blocks (nesting up to ``depth``), a head.

    ``kinds`` restricts the top-level block kinds (nested chains draw from every kind)."""
    in_ch = draw(st.integers(3, 6))
    blocks = [draw(_conv(out=draw(st.integers(4, MAX_C))))]
    c = blocks[0].out
    for _ in range(draw(st.integers(0, max_blocks))):
        b = draw(block(c, depth, kinds))
        blocks.append(b)
        c = _out_one(b, c)
    head = Head(kind=draw(st.sampled_from(["gap", "pool", "gap_mlp", "flatten"])), hidden=draw(st.integers(2, 16)))
    return Arch(in_ch=in_ch, seed=draw(st.integers(0, 2 ** 16)), blocks=tuple(blocks), head=head)
