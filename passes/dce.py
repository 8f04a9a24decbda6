"""``dce``: remove dead nodes and the parameters and buffers nothing reads any more."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from graphopt.graph.nodes import remove_dead_nodes, remove_unused_attrs
from graphopt.pipeline.pass_base import Context, Pass, PassResult
from graphopt.pipeline.registry import register_pass


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Erase nodes whose results are unused (guards and asserts stay) and delete unread parameters/buffers."""

    name: ClassVar[str] = "dce"
    preserves_semantics: ClassVar[bool] = True

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        nodes = remove_dead_nodes(gm)
        attrs = remove_unused_attrs(gm)
        return PassResult(gm, modified=bool(nodes or attrs),
                          stats={"nodes_removed": nodes, "attrs_removed": len(attrs), "removed_attrs": attrs})
