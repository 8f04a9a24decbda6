"""``nn.MultiheadAttention`` with pruned heads written back into the user's model.

torch's ``nn.MultiheadAttention`` ties its attention width to its embedding width: ``in_proj_weight`` must be
``[3 * embed_dim, embed_dim]`` and ``out_proj`` ``[embed_dim, embed_dim]``. Pruning heads (or head dims) makes the
attention narrower than the residual stream it reads and writes, which that class cannot hold. The write-back turns
such a module into a ``PrunedMultiheadAttention``: a subclass (``isinstance(m, nn.MultiheadAttention)`` still holds,
the state-dict keys are the same) whose forward computes the same attention with ``num_heads * head_dim`` inner
channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.errors import WritebackError

__all__ = ["PrunedMultiheadAttention", "narrow_multihead_attention"]


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """A multi-head attention whose inner width (``num_heads * head_dim``) may differ from ``embed_dim``.

    Takes the arguments of ``nn.MultiheadAttention.forward``: ``key_padding_mask``, ``need_weights``,
    ``attn_mask`` (bool or float, 2-D or 3-D), ``average_attn_weights`` and ``is_causal``; dropout applies in
    training mode. ``add_bias_kv`` / ``add_zero_attn`` modules are never converted (see
    ``narrow_multihead_attention``)."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1 - self.batch_first), key.unsqueeze(1 - self.batch_first), \
                value.unsqueeze(1 - self.batch_first)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._project(query, key, value)  # each [B, H, L, D]
        mask = self._mask(attn_mask, key_padding_mask, is_causal, q)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(-1)
        out = F.dropout(weights, self.dropout, self.training) @ v
        b, h, lq, d = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, h * d))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1 - self.batch_first)
            weights = weights.squeeze(0)
        if not need_weights:
            return out, None
        return out, weights.mean(-3) if average_attn_weights else weights

    def _project(self, query, key, value):
        inner = self.num_heads * self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.split(inner)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split(inner)
        heads = lambda t: t.view(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        return heads(F.linear(query, w_q, b_q)), heads(F.linear(key, w_k, b_k)), heads(F.linear(value, w_v, b_v))

    @staticmethod
    def _mask(attn_mask, key_padding_mask, is_causal, q):
        """One additive float mask broadcastable to [B, H, Lq, Lk] (None if there is nothing to mask)."""
        lq = q.shape[-2]
        masks = []
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(lq, lq, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            m = attn_mask if attn_mask.dim() == 2 else attn_mask.view(q.shape[0], q.shape[1], lq, -1)
            masks.append(_additive(m, q.dtype))
        if key_padding_mask is not None:
            masks.append(_additive(key_padding_mask, q.dtype)[:, None, None, :])
        if not masks:
            return None
        return masks[0] if len(masks) == 1 else masks[0] + masks[1]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def narrow_multihead_attention(model: nn.Module, tensors: dict[str, torch.Tensor], new_value) -> None:
    """Convert every ``nn.MultiheadAttention`` of ``model`` whose graph tensors (``tensors``: graph name -> tensor)
    have a narrower attention than embedding into a ``PrunedMultiheadAttention`` with the new head count.
    ``new_value(path, old)`` gives the value a constant of that module's ops became (or None): the head count or
    head dim the pruned graph uses."""
    for path, m in model.named_modules():
        if not isinstance(m, nn.MultiheadAttention):
            continue
        prefix = f"{path}." if path else ""
        packed = tensors.get(f"{prefix}in_proj_weight")
        q_weight = packed if packed is not None else tensors.get(f"{prefix}q_proj_weight")
        out_weight = tensors.get(f"{prefix}out_proj.weight")
        if q_weight is None or out_weight is None:
            continue
        inner = out_weight.shape[1]
        if inner == out_weight.shape[0] and inner == m.embed_dim:
            continue
        if m.bias_k is not None or m.add_zero_attn:
            raise WritebackError(f"to_model(): `{path}` (nn.MultiheadAttention with add_bias_kv/add_zero_attn) had "
                                 "heads pruned, which the write-back does not support; use result.module, or "
                                 "prune with attention pruning off for it (ignore=...)")
        head_dim = new_value(path, m.head_dim) or m.head_dim
        if inner % head_dim:
            head_dim = inner // (new_value(path, m.num_heads) or m.num_heads)
        m.__class__ = PrunedMultiheadAttention
        m.num_heads, m.head_dim = inner // head_dim, head_dim

