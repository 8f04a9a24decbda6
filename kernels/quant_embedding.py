"""``graphopt::quant_embedding`` and ``QuantEmbedding``: an embedding table held as packed int4/int8 codes.

The table (num_embeddings x embedding_dim) is packed exactly like a weight-only linear weight
(quant_format.pack_quantized: rows = embeddings, groups along the embedding dim), so one format, one checkpoint
layout and one export path serve both. A lookup gathers the codes of the asked rows out of their 16-row tiles and
dequantizes only those rows: s · (q - z). It is memory, not speed: a lookup reads one row per token either way,
but the table shrinks 4-8x (an LLM's vocabulary table is often a fifth of its weights).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from graphopt.kernels.ops import _LIB
from graphopt.kernels.quant_format import TILE, QuantizedWeight

__all__ = ["QuantEmbedding", "quant_embedding"]

_LIB.define("quant_embedding(Tensor indices, Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size, "
            "int num_embeddings, int embedding_dim) -> Tensor")


def quant_embedding(indices: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    bits: int, group_size: int, num_embeddings: int, embedding_dim: int) -> torch.Tensor:
    """The float32 rows ``indices`` (any shape) of the packed table: (..., embedding_dim)."""
    flat = indices.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_embeddings):
        raise IndexError(f"graphopt::quant_embedding: index out of range for a table of {num_embeddings} rows")
    tile, lane = flat // TILE, flat % TILE
    rows = torch.arange(flat.numel())
    chunks = qweight[tile]  # (B, Kp / per-chunk, 64): the chunks of each row's tile
    per_lane = chunks.view(flat.numel(), chunks.shape[1], TILE, 4)[rows, :, lane]  # (B, units, 4) bytes
    if bits == 8:
        codes = per_lane.reshape(flat.numel(), -1)
    else:  # low nibbles hold inputs 8u..8u+3, high nibbles 8u+4..8u+7
        codes = torch.stack((per_lane & 0xF, per_lane >> 4), dim=2).reshape(flat.numel(), -1)
    codes = codes[:, :embedding_dim].float()
    s = scales[tile, :, lane].repeat_interleave(group_size, dim=1)[:, :embedding_dim]
    if zeros.numel():
        z = zeros[tile, :, lane].float().repeat_interleave(group_size, dim=1)[:, :embedding_dim]
    else:
        z = torch.full_like(s, 2 ** (bits - 1))
    return (s * (codes - z)).view(*indices.shape, embedding_dim)


@torch.library.register_fake("graphopt::quant_embedding")
def _(indices, qweight, scales, zeros, bits, group_size, num_embeddings, embedding_dim):
    return scales.new_empty(*indices.shape, embedding_dim)


_LIB.impl("quant_embedding", quant_embedding, "CPU")


class QuantEmbedding(nn.Module):
    """An ``nn.Embedding`` whose table is packed int4/int8 codes (see the module docstring)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                 num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)

    def quantized(self) -> QuantizedWeight:
        """The packed table (rows = embeddings)."""
        return QuantizedWeight(self.bits, self.group_size, self.embedding_dim, self.num_embeddings, self.qweight,
                               self.scales, self.zeros)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """The rows ``indices`` of the table."""
        return torch.ops.graphopt.quant_embedding(indices, self.qweight, self.scales, self.zeros, self.bits,
                                                  self.group_size, self.num_embeddings, self.embedding_dim)

    def extra_repr(self) -> str:
        """Table size and grid."""
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}, "
                f"symmetric={self.zeros.numel() == 0}")
