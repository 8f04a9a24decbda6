"""The mean square of every input channel of chosen layers on calibration data: what the activation-aware channel
importance weighs each column of a layer's weight by (removing input channel c costs about
||W[:, c]||² · E[x_c²] of the layer's output energy, the structured form of Wanda's |W|·||x||).

One run of the graph as it is (nothing is changed while it runs), each chosen layer's input reduced to one number
per channel as it passes; sums are combined across torch.distributed ranks, so every rank ranks the same way.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx

from graphopt.calibration.engine import NodeInputs, run_sequentially
from graphopt.graph.inputs import ExampleInputs
from graphopt.graph.nodes import arg, is_op
from graphopt.util import distributed

__all__ = ["input_energy"]

aten = torch.ops.aten


def input_energy(gm: fx.GraphModule, batches: Sequence[ExampleInputs], weights: set[str]) -> dict[str, torch.Tensor]:
    """{weight name: E[x_c²] per input channel c} for every linear and ungrouped conv of ``gm`` whose weight is in ``weights``
    (channels: a linear's last dim, a conv's dim 1; means over every other position of every batch)."""
    chosen = {}
    for node in gm.graph.nodes:
        # a grouped conv's input channels are not its weight's dim 1: they are scored through its output rows
        if is_op(node, aten.linear) or (is_op(node, aten.conv1d, aten.conv2d, aten.conv3d)
                                        and int(arg(node, "groups", 1)) == 1):
            weight = arg(node, "weight")
            if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target in weights:
                chosen[node] = weight.target
    sums: dict[str, list[torch.Tensor]] = {}

    def visit(inputs: NodeInputs) -> None:
        linear = is_op(inputs.node, aten.linear)
        total, count = None, 0
        for x in inputs.arg(0):
            x = x.detach().to(torch.float64)
            rows = x.reshape(-1, x.shape[-1]) if linear else x.transpose(0, 1).reshape(x.shape[1], -1).T
            part = rows.square().sum(0)
            total, count = part if total is None else total + part, count + rows.shape[0]
        previous = sums.get(chosen[inputs.node])  # a weight read by two layers sums both inputs
        if previous is not None:
            total, count = total + previous[0], count + int(previous[1])
        sums[chosen[inputs.node]] = [total, torch.tensor([float(count)], dtype=torch.float64)]

    run_sequentially(gm, batches, visit, lambda node: node in chosen, desc="input statistics")
    names = sorted(sums)
    flat = distributed.sum_tensors([t for n in names for t in sums[n]])
    return {n: flat[2 * i] / flat[2 * i + 1].clamp_min(1) for i, n in enumerate(names)}
