"""More building blocks for random_archs.py: the patterns of the breadth zoo (tests/models_breadth.py), each as a
recipe leaf that takes ``(B, C, 8, 8)`` and returns ``(B, out, 8, 8)``.

- ``Mha``: ``nn.MultiheadAttention`` over the 64 tokens (batch-first or sequence-first), residual;
- ``PatchFold``: MobileViT-style regrouping, channels folded with the batch and the patch rows into dim 0
  (``reshape(B*C*4, 2, 4, 2)``), a token ``Linear(C, out)`` across patches, and back;
- ``Im2col``: ``F.unfold`` to (channel x kernel position) columns, a ``Linear(C*k*k, out)``, optionally folded back
  with ``F.fold`` from 2x2 blocks (``Linear(C*4, out*4)`` then col2im);
- ``Pad``: TF-"SAME" uneven padding before a stride-1 2x2 conv, or zero channels padded on (option-A shortcut);
- ``SeqPool``: the 64 tokens mean-pooled 2x with ``avg_pool2d`` over ``(B, 1, N, C)``, a Linear, repeated back up,
  residual;
- ``TLinear``: a channels-last linear written ``x @ weight.T``;
- ``RelPos``: DeBERTa-style attention over the 64 tokens, heads folded into the batch dim, plus a content-to-position
  term: a learned relative-position table projected by the key layer, tiled over the batch with ``repeat`` and read
  with ``gather`` by offset; the values are the block's input, residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

MAX_C, MIN_C = 16, 2
BREADTH_KINDS = ("mha", "patch_fold", "im2col", "pad", "seq_pool", "t_linear", "rel_pos")


@dataclass(frozen=True)
class Mha:
    heads: int = 2
    batch_first: bool = True


@dataclass(frozen=True)
class PatchFold:
    out: int


@dataclass(frozen=True)
class Im2col:
    out: int
    k: int = 3  # unfold kernel (padding k // 2, stride 1); ignored with fold
    fold: bool = False


@dataclass(frozen=True)
class Pad:
    mode: str = "same"  # same | channels
    extra: int = 1  # channels mode: zero channels added on each side


@dataclass(frozen=True)
class SeqPool:
    pass


@dataclass(frozen=True)
class TLinear:
    out: int


@dataclass(frozen=True)
class RelPos:
    heads: int = 2


def breadth_out(b, c: int) -> int | None:
    """Channels after block ``b`` on ``c`` channels (None: not a breadth block)."""
    if isinstance(b, (PatchFold, Im2col, TLinear)):
        return b.out
    if isinstance(b, Pad):
        return c + 2 * b.extra if b.mode == "channels" else c
    if isinstance(b, (Mha, SeqPool, RelPos)):
        return c
    return None


class MhaM(nn.Module):
    def __init__(self, c: int, spec: Mha):
        super().__init__()
        self.batch_first = spec.batch_first
        self.attn = nn.MultiheadAttention(c, spec.heads, batch_first=spec.batch_first)

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, N, C)
        s = t if self.batch_first else t.transpose(0, 1)
        y = self.attn(s, s, s, need_weights=False)[0]
        t = t + (y if self.batch_first else y.transpose(0, 1))
        return t.transpose(1, 2).reshape(b, c, h, w)


class PatchFoldM(nn.Module):
    def __init__(self, c: int, out: int):
        super().__init__()
        self.fc = nn.Linear(c, out)

    def forward(self, x):
        b, c, h, w = x.shape
        y = x.reshape(b * c * (h // 2), 2, w // 2, 2).transpose(1, 2).reshape(b, c, -1, 4)
        y = y.transpose(1, 3).reshape(b * 4, -1, c)  # (B*4, N/4, C)
        y = F.gelu(self.fc(y))
        d = y.shape[-1]
        y = y.reshape(b, 4, -1, d).transpose(1, 3).reshape(b * d * (h // 2), w // 2, 2, 2)
        return y.transpose(1, 2).reshape(b, d, h, w)


class Im2colM(nn.Module):
    def __init__(self, c: int, spec: Im2col):
        super().__init__()
        self.spec = spec
        self.fc = nn.Linear(c * 4, spec.out * 4) if spec.fold else nn.Linear(c * spec.k ** 2, spec.out)

    def forward(self, x):
        b, c, h, w = x.shape
        if self.spec.fold:
            cols = F.unfold(x, 2, stride=2).transpose(1, 2)  # (B, 16, C*4)
            return F.fold(self.fc(cols).transpose(1, 2), (h, w), 2, stride=2)
        cols = F.unfold(x, self.spec.k, padding=self.spec.k // 2).transpose(1, 2)  # (B, 64, C*k*k)
        return self.fc(cols).transpose(1, 2).reshape(b, -1, h, w)


class PadM(nn.Module):
    def __init__(self, c: int, spec: Pad):
        super().__init__()
        self.spec = spec
        self.conv = nn.Conv2d(c, c, 2) if spec.mode == "same" else nn.Identity()

    def forward(self, x):
        if self.spec.mode == "same":
            return self.conv(F.pad(x, [0, 1, 0, 1]))
        return F.pad(x, (0, 0, 0, 0, self.spec.extra, self.spec.extra))


class SeqPoolM(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, N, C)
        pooled = F.avg_pool2d(t[:, None], (2, 1), stride=(2, 1))[:, 0]  # (B, N/2, C)
        t = t + self.fc(pooled).repeat_interleave(2, dim=1)
        return t.transpose(1, 2).reshape(b, c, h, w)


class TLinearM(nn.Module):
    def __init__(self, c: int, out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out, c) / c ** 0.5)
        self.bias = nn.Parameter(torch.randn(out) * 0.1)

    def forward(self, x):
        return (x.permute(0, 2, 3, 1) @ self.weight.T + self.bias).permute(0, 3, 1, 2)


class RelPosM(nn.Module):
    SPAN = 4

    def __init__(self, c: int, spec: RelPos):
        super().__init__()
        self.heads = spec.heads
        self.q, self.k = nn.Linear(c, c), nn.Linear(c, c)
        self.rel = nn.Parameter(torch.randn(2 * self.SPAN, c))

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, N, C)
        n = t.shape[1]

        def fold(y):  # (B, N, C) -> (B*heads, N, C/heads)
            return y.view(b, n, self.heads, -1).transpose(1, 2).reshape(b * self.heads, n, -1)

        q, k, v = fold(self.q(t)), fold(self.k(t)), fold(t)
        pos = self.k(self.rel).view(2 * self.SPAN, self.heads, -1).transpose(0, 1).repeat(b, 1, 1)
        offsets = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).clamp(-self.SPAN, self.SPAN - 1)
        c2p = torch.gather(q @ pos.transpose(1, 2), -1, (offsets + self.SPAN).expand(b * self.heads, n, n))
        attn = ((q @ k.transpose(1, 2) + c2p) / q.shape[-1] ** 0.5).softmax(-1)
        out = (attn @ v).view(b, self.heads, n, -1).transpose(1, 2).reshape(b, n, c)
        return (t + out).transpose(1, 2).reshape(b, c, h, w)


def breadth_module(b, c: int) -> nn.Module | None:
    """The module of breadth block ``b`` on ``c`` channels (None: not a breadth block)."""
    if isinstance(b, Mha):
        return MhaM(c, b)
    if isinstance(b, PatchFold):
        return PatchFoldM(c, b.out)
    if isinstance(b, Im2col):
        return Im2colM(c, b)
    if isinstance(b, Pad):
        return PadM(c, b)
    if isinstance(b, SeqPool):
        return SeqPoolM(c)
    if isinstance(b, TLinear):
        return TLinearM(c, b.out)
    if isinstance(b, RelPos):
        return RelPosM(c, b)
    return None


@st.composite
def breadth_block(draw, kind: str, c: int):
    """A random breadth block of ``kind`` taking ``c`` channels."""
    widths = st.integers(MIN_C, MAX_C)
    if kind == "mha":
        return Mha(heads=draw(st.sampled_from([h for h in (1, 2, 4) if c % h == 0])), batch_first=draw(st.booleans()))
    if kind == "patch_fold":
        return PatchFold(out=draw(widths))
    if kind == "im2col":
        fold = draw(st.booleans())
        return Im2col(out=draw(widths), k=draw(st.sampled_from([1, 3])), fold=fold)
    if kind == "pad":
        if c + 2 <= MAX_C and draw(st.booleans()):
            return Pad(mode="channels", extra=draw(st.integers(1, (MAX_C - c) // 2)))
        return Pad(mode="same")
    if kind == "seq_pool":
        return SeqPool()
    if kind == "rel_pos":
        return RelPos(heads=draw(st.sampled_from([h for h in (1, 2, 4) if c % h == 0])))
    return TLinear(out=draw(widths))
