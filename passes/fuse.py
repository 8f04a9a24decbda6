"""``fuse``: fold eval-mode BatchNorm into the conv or linear layer that feeds it (graphopt/graph/batch_norm.py).

A pair is skipped (and reported) when the layer's output has other users, the BatchNorm runs in training mode, or
the weights are not plain parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from graphopt.graph.batch_norm import fuse_batch_norms
from graphopt.pipeline.pass_base import Context, Pass, PassResult
from graphopt.pipeline.registry import register_pass


@register_pass
@dataclass(frozen=True)
class Fuse(Pass):
    """Fold eval-mode BatchNorm into the preceding Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear."""

    name: ClassVar[str] = "fuse"
    preserves_semantics: ClassVar[bool] = True

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        fused, skipped = fuse_batch_norms(gm)
        decisions = {**{layer: "BatchNorm folded in" for layer in fused}, **skipped}
        return PassResult(gm, modified=bool(fused), stats={"fused": len(fused), "skipped": len(skipped),
                                                             "fused_layers": fused, "skipped_layers": skipped},
                          decisions=decisions)
