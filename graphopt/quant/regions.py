"""Mixed precision regions: take chosen layers out of int8 again, optionally running them in bf16/fp16.

A layer kept in float reads its float inputs and weight directly (its quantizers are bypassed, and removed from
the graph when no other layer reads them). With a half dtype its inputs, weight and bias are cast to that dtype and
its output back to float32, which exports as ONNX Cast nodes around the layer.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.quant.placement import Site
from graphopt.quant.quantizer import FakeQuantize

HALF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _is_quantizer(gm: fx.GraphModule, node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and isinstance(
        gm.get_submodule(node.target), FakeQuantize)


def dequantize_layer(gm: fx.GraphModule, site: Site) -> None:
    """Make ``site``'s layer read its float inputs and weight again."""
    for arg in list(site.node.all_input_nodes):
        if _is_quantizer(gm, arg):
            site.node.replace_input_with(arg, arg.args[0])


def cast_layer(gm: fx.GraphModule, site: Site, dtype: torch.dtype) -> None:
    """Run ``site``'s layer in ``dtype``: cast its tensor inputs in, its output back to float32."""
    g = gm.graph
    for arg in list(site.node.all_input_nodes):
        with g.inserting_before(site.node):
            cast = g.call_function(torch.ops.aten.to.dtype, (arg, dtype))
        site.node.replace_input_with(arg, cast)
    with g.inserting_after(site.node):
        back = g.call_function(torch.ops.aten.to.dtype, (site.node, torch.float32))
    site.node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)


def remove_unused_quantizers(gm: fx.GraphModule) -> list[str]:
    """Erase quantizer nodes nobody reads and delete their modules; returns their names."""
    removed = []
    for node in reversed(list(gm.graph.nodes)):
        if _is_quantizer(gm, node) and not node.users:
            gm.graph.erase_node(node)
            owner, _, leaf = node.target.rpartition(".")
            delattr(gm.get_submodule(owner), leaf)
            removed.append(node.target)
    return removed
