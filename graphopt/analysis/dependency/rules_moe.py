"""Rules for the ops mixture-of-experts layers route with: grouped matrix products over fused expert weights
(``aten._grouped_mm``, transformers' ``grouped_mm_fallback``) and the top-k / sort of router scores.

A grouped product multiplies the rows of each expert's tokens by that expert's slice of a ``[experts, in, out]``
weight: the contraction couples the token features with the weight's ``in`` dim, the output features are its
``out`` dim, and the expert dim is fixed here (whole experts are removed by the prune-experts pass, which edits the
router as well). With the hidden size coupled through the experts, it prunes like a dense decoder's.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.analysis.dependency.rules_shape import freeze_through
from graphopt.analysis.dependency.walk import Walk, register_rule
from graphopt.graph.nodes import arg

aten = torch.ops.aten


@register_rule(aten._grouped_mm, "transformers::grouped_mm_fallback")
def grouped_mm(w: Walk, node: fx.Node):
    """``grouped_mm(x [tokens, in], weight [experts, in, out], offsets)`` -> ``[tokens, out]``."""
    x, weight = w.keys(node.args[0]), w.keys(node.args[1])
    if x is None or weight is None or len(x.dims) != 2 or len(weight.dims) != 3:
        return freeze_through(w, node)  # the 3-D x 3-D and 2-D x 2-D forms are not routed experts
    w.freeze_keys(w.dk(weight, 0), f"{node.name}: the expert dim (prune-experts removes whole experts)")
    for offsets in node.args[2:3]:
        w.freeze_value(w.keys(offsets), f"{node.name}: tokens per expert")
    w.unify(w.dk(x, 1), w.dk(weight, 1), f"{node.name} (contraction)")
    w.freeze_keys(w.dk(x, 0), f"{node.name}: tokens sorted by expert")
    return w.tensor([w.dk(x, 0), w.dk(weight, 2)], node.name)


@register_rule(aten.topk, aten.sort)
def topk(w: Walk, node: fx.Node):
    """Values and indices of the k largest (or all, sorted) along ``dim``: that dim is fixed (its order is data),
    the other dims pass through."""
    x = w.keys(node.args[0])
    if x is None:
        return freeze_through(w, node)
    dim = int(arg(node, "dim", -1)) % len(x.dims)
    w.freeze_keys(w.dk(x, dim), f"{node.name}: ranked along this dim")
    k = int(node.meta["tensor_meta"][0].shape[dim])
    picked = w.fresh(k, f"{node.name}[{dim}]", frozen=f"{node.name}: ranked along this dim")
    out = w.tensor([picked if d == dim else w.dk(x, d) for d in range(len(x.dims))], node.name)
    return out, out
