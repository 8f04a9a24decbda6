"""How the one-shot solvers read a layer's inputs and write its weights back, shared by every data-aware pass.

``input_rows`` turns the argument values the sequential engine hands a visitor into the rows a layer's (out, in)
weight matrix multiplies (a linear's last dim, a conv's unfolded patches, one part per conv group);
``write_dense_weight`` stores a re-solved weight where the graph reads it, under its sparsity mask when it has one.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.utils.parametrize as parametrize

from graphopt.calibration.engine import NodeInputs
from graphopt.calibration.statistics import conv_input_rows
from graphopt.graph.nodes import arg, is_op, owner_and_leaf

__all__ = ["input_rows", "write_dense_weight"]

aten = torch.ops.aten


def input_rows(inputs: NodeInputs, weight_shape: torch.Size) -> list[tuple[slice, list[torch.Tensor]]] | None:
    """Per part of the weight matrix (a slice of its rows), the input rows of every batch it multiplies; None for
    layers whose inputs are not unfolded here (3-D convs)."""
    node, everything = inputs.node, slice(None)
    if is_op(node, aten.linear):
        return [(everything, [x.reshape(-1, x.shape[-1]) for x in inputs.arg(0)])]
    if is_op(node, aten.addmm):
        return [(everything, inputs.arg(1))]
    if is_op(node, aten.mm):
        return [(everything, inputs.arg(0))]
    if not is_op(node, aten.conv1d, aten.conv2d):
        return None
    groups = int(arg(node, "groups", 1))
    options = dict(stride=arg(node, "stride", 1), padding=arg(node, "padding", 0), dilation=arg(node, "dilation", 1))
    rows = [conv_input_rows(x, weight_shape, groups=groups, **options) for x in inputs.arg(0)]
    if groups == 1:
        return [(everything, rows)]
    per = weight_shape[0] // groups
    return [(slice(g * per, (g + 1) * per), [r[g] for r in rows]) for g in range(groups)]


def write_dense_weight(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    """Store ``value`` as the dense weight ``name`` (the ``original`` under its mask, when it has one)."""
    owner, leaf = owner_and_leaf(gm, name)
    if parametrize.is_parametrized(owner, leaf):
        owner.parametrizations[leaf].original.copy_(value)
    else:
        getattr(owner, leaf).copy_(value)
