"""Breadth zoo: architectures built from the patterns that used to defeat the dependency analyzer.

Each model is a small architecture of its own, written here in plain ``torch.nn`` (not copied from
torchvision, timm or transformers), so the patterns are exercised without those packages:

- ``mha_vit``: ``nn.MultiheadAttention`` (batch-first and sequence-first), which folds the head count into
  the batch dim (``view(L, batch * heads, head_dim)``);
- ``patch_fold``: MobileViT-style patch regrouping of conv features (channels folded together with the batch
  and the patch rows into dim 0) plus ``F.unfold`` / ``F.fold`` (im2col: channels x kernel positions);
- ``bias_table_attn``: LeViT-style attention with a learned per-head bias table indexed by relative offsets,
  linear+BatchNorm1d projections, and conv-BN stems with hardswish;
- ``seq_pool``: Funnel-style sequence pooling between encoder stages (the query is pooled, keys and values
  are not), with the pooling written as ``avg_pool2d`` over ``[B, 1, L, D]``;
- ``falcon_style``: multi-query attention with a parallel attention/MLP block, the linear layers written as
  ``x @ weight.T``;
- ``dynamic_conv``: ConvBERT-style dynamic convolution heads (kernels predicted per token, applied to an
  ``F.unfold`` of the values);
- ``tf_same_conv``: mobile convs with TensorFlow "SAME" padding (an explicit, input-size dependent ``F.pad``);
- ``rel_pos_attn``: DeBERTa-style disentangled attention: one relative-position table shared by all layers,
  projected by each layer's query/key and tiled over the batch with ``repeat`` (heads folded into dim 0), read
  with ``gather`` by relative offset (content-to-position and position-to-content terms), and a scale computed
  at run time from ``torch.tensor(head_dim)``.

They join the shared zoo through ``models.build`` (see ``BREADTH_REGISTRY``) but are listed apart
(``BREADTH_NAMES``) so the per-model suites over ``models.NAMES`` do not grow with them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BREADTH_REGISTRY", "BREADTH_NAMES"]

NUM_CLASSES = 10


def _images() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 32, 32),)


def _tokens() -> tuple[torch.Tensor]:
    return (torch.randint(0, 100, (2, 16)),)


class _Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU):
        super().__init__(nn.Linear(dim, hidden), act(), nn.Linear(hidden, dim))


# --- mha_vit ---------------------------------------------------------------------------------


class MhaBlock(nn.Module):
    """Pre-norm encoder block on ``nn.MultiheadAttention``; ``batch_first=False`` blocks transpose around it."""

    def __init__(self, dim: int, heads: int, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.mlp = _Mlp(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.attn(h, h, h, need_weights=False)[0]
        if not self.batch_first:
            h = h.transpose(0, 1)
        x = x + h
        return x + self.mlp(self.norm2(x))


class MhaViT(nn.Module):
    """A ViT whose attention is torch's own ``nn.MultiheadAttention``."""

    def __init__(self, dim: int = 64, heads: int = 4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 65, dim) * 0.02)
        self.blocks = nn.Sequential(MhaBlock(dim, heads, True), MhaBlock(dim, heads, False))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


# --- patch_fold ------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Plain multi-head self-attention over ``[B, N, dim]`` with a fused qkv linear."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class PatchTransformerBlock(nn.Module):
    """Local conv, unfold into ``patch x patch`` pixel groups, attention across patches, fold back, fuse."""

    def __init__(self, channels: int, dim: int, patch: int = 2):
        super().__init__()
        self.patch = patch
        self.local = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.SiLU())
        self.to_dim = nn.Conv2d(channels, dim, 1, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, 2)
        self.from_dim = nn.Conv2d(dim, channels, 1)
        self.fuse = nn.Conv2d(2 * channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.patch
        y = self.to_dim(self.local(x))
        d = y.shape[1]
        # [B*d*nh, p, nw, p] -> [B, d, nh*nw, p*p] -> [B*p*p, nh*nw, d], channels folded with batch and rows
        y = y.reshape(b * d * (h // p), p, w // p, p).transpose(1, 2)
        y = y.reshape(b, d, (h // p) * (w // p), p * p).transpose(1, 3).reshape(b * p * p, -1, d)
        y = y + self.attn(self.norm(y))
        y = y.reshape(b, p * p, -1, d).transpose(1, 3).reshape(b * d * (h // p), w // p, p, p)
        y = y.transpose(1, 2).reshape(b, d, h, w)
        return self.fuse(torch.cat([x, self.from_dim(y)], dim=1))


class PatchFoldNet(nn.Module):
    """Conv stem, a MobileViT-style patch block, then an im2col (``F.unfold``) token mixer and ``F.fold``."""

    def __init__(self, channels: int = 16, dim: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.BatchNorm2d(channels), nn.SiLU())
        self.block = PatchTransformerBlock(channels, dim)
        self.mix = nn.Linear(channels * 9, dim)  # reads each channel's 3x3 neighbourhood
        self.unmix = nn.Linear(dim, channels * 4)  # writes 2x2 pixels per channel, folded back
        self.head = nn.Linear(channels, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))  # [B, C, 16, 16]
        cols = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2)  # [B, 64, C*9]
        t = F.gelu(self.mix(cols))
        y = F.fold(self.unmix(t).transpose(1, 2), (16, 16), 2, stride=2)  # [B, C, 16, 16]
        return self.head((x + y).mean((2, 3)))


# --- bias_table_attn -------------------------------------------------------------------------


class LinearBn(nn.Sequential):
    """Linear followed by BatchNorm1d over the flattened tokens."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[1](self[0](x).flatten(0, 1)).reshape(x.shape[0], x.shape[1], -1)


class BiasTableAttention(nn.Module):
    """Attention with key dim != value dim per head and a learned bias per head and relative offset."""

    def __init__(self, dim: int, key_dim: int, heads: int, value_ratio: int, resolution: int):
        super().__init__()
        self.heads, self.key_dim, self.value_dim = heads, key_dim, value_ratio * key_dim
        self.scale = key_dim**-0.5
        self.qkv = LinearBn(dim, heads * (2 * key_dim + self.value_dim))
        self.proj = nn.Sequential(nn.Hardswish(), LinearBn(heads * self.value_dim, dim))
        points = [(i, j) for i in range(resolution) for j in range(resolution)]
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(torch.randn(heads, len(offsets)) * 0.1)
        self.register_buffer("bias_idxs", torch.tensor(idxs).view(len(points), len(points)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, -1).split([self.key_dim, self.key_dim, self.value_dim], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attn = q @ k.transpose(-2, -1) * self.scale + self.attention_biases[:, self.bias_idxs]
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(out)


class BiasTableNet(nn.Module):
    """LeViT-style: conv-BN-hardswish stem to 8x8 tokens, two bias-table attention + MLP residual blocks."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.Hardswish(),
            nn.Conv2d(16, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim),
        )  # fmt: skip
        self.attn = nn.ModuleList(BiasTableAttention(dim, 8, 4, 2, 8) for _ in range(2))
        self.mlp = nn.ModuleList(nn.Sequential(LinearBn(dim, 2 * dim), nn.Hardswish(), LinearBn(2 * dim, dim)) for _ in range(2))
        self.head = nn.Sequential(nn.BatchNorm1d(dim), nn.Linear(dim, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)  # [B, 64, dim]
        for attn, mlp in zip(self.attn, self.mlp):
            x = x + attn(x)
            x = x + mlp(x)
        return self.head(x.mean(1))


# --- seq_pool --------------------------------------------------------------------------------


class PooledAttention(nn.Module):
    """Self-attention whose queries (and residual) may be mean-pooled 2x along the sequence first."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pool: bool) -> torch.Tensor:
        query = F.avg_pool2d(x[:, None], (2, 1), stride=(2, 1), ceil_mode=True)[:, 0] if pool else x
        b, lq, d = query.shape
        q = self.q(query).view(b, lq, self.heads, -1).transpose(1, 2)
        k = self.k(x).view(b, x.shape[1], self.heads, -1).transpose(1, 2)
        v = self.v(x).view(b, x.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, lq, d)
        return self.norm(query + self.o(out))


class SeqPoolEncoder(nn.Module):
    """Funnel-style encoder: two stages of two blocks; each later stage starts by pooling the sequence."""

    def __init__(self, vocab: int = 100, dim: int = 32, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.ModuleList(PooledAttention(dim, heads) for _ in range(4))
        self.ffn = nn.ModuleList(_Mlp(dim, 2 * dim) for _ in range(4))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for i, (attn, ffn, norm) in enumerate(zip(self.attn, self.ffn, self.norms)):
            x = attn(x, pool=i == 2)
            x = norm(x + ffn(x))
        return self.head(x)  # [B, 8, classes]


# --- falcon_style ----------------------------------------------------------------------------


class TLinear(nn.Linear):
    """A linear layer written ``x @ weight.T + bias``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


class ParallelMqaBlock(nn.Module):
    """One layer norm feeding multi-query attention (one key/value head) and the MLP in parallel. The fused
    projection's head count is read off the tensor (``-1``), as HF Falcon's is off its config: a written
    ``self.heads + 2`` is a size write-back cannot update (tests/test_prune_breadth.py checks the error)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = TLinear(dim, dim + 2 * self.head_dim, bias=False)
        self.dense = TLinear(dim, dim, bias=False)
        self.up, self.down = TLinear(dim, 4 * dim, bias=False), TLinear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.norm(x)
        qkv = self.qkv(h).view(b, n, -1, self.head_dim)
        q, k, v = qkv[:, :, :-2], qkv[:, :, [-2]], qkv[:, :, [-1]]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k.expand_as(q), v.expand_as(q), is_causal=True)
        attn = self.dense(attn.transpose(1, 2).reshape(b, n, -1))
        return x + attn + self.down(F.gelu(self.up(h)))


class FalconStyle(nn.Module):
    """Decoder of parallel MQA blocks with a head tied to the embedding."""

    def __init__(self, vocab: int = 100, dim: int = 64, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(*(ParallelMqaBlock(dim, heads) for _ in range(2)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(ids))) @ self.embed.weight.T


# --- dynamic_conv ----------------------------------------------------------------------------


class DynamicConvAttention(nn.Module):
    """ConvBERT-style span-based dynamic convolution next to self-attention (half the heads each)."""

    def __init__(self, dim: int, heads: int, kernel: int = 3):
        super().__init__()
        self.heads, self.head_dim, self.kernel = heads, dim // (2 * heads), kernel
        inner = heads * self.head_dim
        self.q, self.k, self.v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.key_conv = nn.Sequential(nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim), nn.Conv1d(dim, inner, 1))
        self.kernel_layer = nn.Linear(inner, heads * kernel)
        self.conv_out = nn.Linear(dim, inner)
        self.out = nn.Linear(2 * inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        key = self.key_conv(x.transpose(1, 2)).transpose(1, 2)
        kernels = self.kernel_layer(key * self.q(x)).view(-1, self.kernel, 1).softmax(1)
        vals = self.conv_out(x).transpose(1, 2).unsqueeze(-1)  # [B, inner, n, 1]
        cols = F.unfold(vals, (self.kernel, 1), padding=(self.kernel // 2, 0))  # [B, inner*kernel, n]
        cols = cols.transpose(1, 2).reshape(b, n, -1, self.kernel).reshape(-1, self.head_dim, self.kernel)
        conv = torch.matmul(cols, kernels).reshape(b, n, -1)
        return self.out(torch.cat([attn, conv], dim=-1))


class DynamicConvEncoder(nn.Module):
    """Two post-norm encoder layers on dynamic-convolution attention, a pooled classifier."""

    def __init__(self, vocab: int = 100, dim: int = 32, heads: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(DynamicConvAttention(dim, heads) for _ in range(2))
        self.ffn = nn.ModuleList(_Mlp(dim, 2 * dim) for _ in range(2))
        self.norm1 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.norm2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer, ffn, n1, n2 in zip(self.layers, self.ffn, self.norm1, self.norm2):
            x = n1(x + layer(x))
            x = n2(x + ffn(x))
        return self.head(x.mean(1))


# --- tf_same_conv ----------------------------------------------------------------------------


class Conv2dSame(nn.Conv2d):
    """A conv that pads like TensorFlow's "SAME": the padding depends on the input size and may be uneven."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        pads = []
        for size, k, s, d in zip((iw, ih), self.kernel_size[::-1], self.stride[::-1], self.dilation[::-1]):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SameMBConv(nn.Module):
    """Inverted residual with "SAME"-padded depthwise conv, squeeze-excitation and SiLU."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        mid = cin * expand
        self.residual = stride == 1 and cin == cout
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU())
        self.dw = nn.Sequential(Conv2dSame(mid, mid, 3, stride, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.SiLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(mid, cin // 2, 1), nn.SiLU(), nn.Conv2d(cin // 2, mid, 1), nn.Sigmoid())
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(self.expand(x))
        out = self.project(h * self.se(h))
        return x + out if self.residual else out


class TfSameNet(nn.Module):
    """EfficientNet-like: a "SAME" stride-2 stem and four MBConv blocks."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(Conv2dSame(3, 16, 3, 2, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.blocks = nn.Sequential(SameMBConv(16, 16, 1), SameMBConv(16, 24, 2), SameMBConv(24, 24, 1), SameMBConv(24, 32, 2))
        self.head = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class DisentangledAttention(nn.Module):
    """Content-content, content-position and position-content attention scores (DeBERTa-style)."""

    def __init__(self, dim: int, heads: int, span: int):
        super().__init__()
        self.heads, self.span = heads, span
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm = nn.LayerNorm(dim)

    def _fold(self, t: torch.Tensor) -> torch.Tensor:  # [B, N, H*d] -> [B*H, N, d]
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).permute(0, 2, 1, 3).reshape(b * self.heads, n, -1)

    def forward(self, x: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self._fold(self.q(x)), self._fold(self.k(x)), self._fold(self.v(x))
        tiles = q.size(0) // self.heads  # the batch, read back off the folded queries
        pos_k = self.k(rel).view(2 * self.span, self.heads, -1).transpose(0, 1).repeat(tiles, 1, 1)
        pos_q = self.q(rel).view(2 * self.span, self.heads, -1).transpose(0, 1).repeat(tiles, 1, 1)
        offsets = torch.arange(n)[:, None] - torch.arange(n)[None, :]
        index = (offsets + self.span).clamp(0, 2 * self.span - 1).expand(q.size(0), n, n)
        c2p = torch.gather(q @ pos_k.transpose(1, 2), -1, index)
        p2c = torch.gather(k @ pos_q.transpose(1, 2), -1, index).transpose(1, 2)
        scale = torch.sqrt(torch.tensor(q.size(-1), dtype=torch.float) * 3)
        attn = ((q @ k.transpose(1, 2) + c2p + p2c) / scale).softmax(-1)
        out = (attn @ v).view(b, self.heads, n, -1).permute(0, 2, 1, 3).reshape(b, n, d)
        return self.norm(x + self.o(out))


class RelPosEncoder(nn.Module):
    """Token embedding, a shared normalized relative-position table and two disentangled-attention layers."""

    def __init__(self, vocab: int = 100, dim: int = 32, heads: int = 4, span: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rel = nn.Embedding(2 * span, dim)
        self.rel_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(DisentangledAttention(dim, heads, span) for _ in range(2))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                  for _ in range(2))
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x, rel = self.embed(ids), self.rel_norm(self.rel.weight)
        for attn, mlp in zip(self.layers, self.mlps):
            x = attn(x, rel)
            x = x + mlp(x)
        return self.head(x.mean(1))


_CNN, _CNN_BN = frozenset({"cnn"}), frozenset({"cnn", "bn"})
_TRANSFORMER, _TRANSFORMER_BN = frozenset({"transformer"}), frozenset({"transformer", "bn"})

BREADTH_REGISTRY = {
    "mha_vit": (MhaViT, _images, _TRANSFORMER),
    "patch_fold": (PatchFoldNet, _images, _TRANSFORMER_BN),
    "bias_table_attn": (BiasTableNet, _images, _TRANSFORMER_BN),
    "seq_pool": (SeqPoolEncoder, _tokens, _TRANSFORMER),
    "falcon_style": (FalconStyle, _tokens, _TRANSFORMER),
    "dynamic_conv": (DynamicConvEncoder, _tokens, _TRANSFORMER),
    "tf_same_conv": (TfSameNet, _images, _CNN_BN),
    "rel_pos_attn": (RelPosEncoder, _tokens, _TRANSFORMER),
}
"""name -> (model factory, example-input factory, tags), in the format of ``models._REGISTRY``."""
BREADTH_NAMES: tuple[str, ...] = tuple(BREADTH_REGISTRY)
"""The breadth models, in a stable order."""
