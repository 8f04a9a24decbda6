"""Structured-pruning repair on the sequential engine: each layer whose input channels are about to be removed is
re-solved on calibration data so that its output changes as little as possible (least squares over the kept
inputs, damped towards the old weights), and the removed channels' mean contribution is folded into an intercept
(FLAP's bias compensation).

It runs *before* the channels are physically removed: the layer's removed columns are set to zero and its kept ones
to the refit, which is exactly what the smaller layer will compute, so every layer after it is refit on the inputs
the already-repaired model produces (the same order SparseGPT uses). The intercept goes into the layer's bias when
it has one, into the running mean of an eval-mode BatchNorm that reads the layer directly when it has none (a
BatchNorm subtracts its running mean: lowering it by b adds b), and is dropped otherwise (the refit is then the best
one through the origin). Grouped convs, 3-D convs, ``x @ W`` layers and weights read by several layers are left as
they are, and their note says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx

from graphopt.calibration.engine import NodeInputs, run_sequentially
from graphopt.calibration.layer_io import input_rows, write_dense_weight
from graphopt.calibration.refit import refit_least_squares
from graphopt.calibration.statistics import InputStatistics
from graphopt.graph.batch_norm import running_mean_after
from graphopt.graph.inputs import ExampleInputs
from graphopt.graph.nodes import arg, is_op, resolve

__all__ = ["RefitTarget", "refit_before_removal", "refit_targets"]

aten = torch.ops.aten


@dataclass(frozen=True)
class RefitTarget:
    """One layer to repair: its weight (out, in, *kernel), the input channels that go, where its intercept goes."""

    weight: str
    removed: tuple[int, ...]
    bias: str | None
    running_mean: str | None  # of the BatchNorm that reads the layer directly, when the layer has no bias


def refit_targets(gm: fx.GraphModule, removed_inputs: dict[str, Sequence[int]],
                  shared: set[str]) -> tuple[dict[fx.Node, RefitTarget], dict[str, str]]:
    """The layers of ``gm`` this module can repair, for ``removed_inputs`` {weight name: input channels that go};
    returns (targets by node, {weight name: why it is left as it is} for the others)."""
    targets, skipped = {}, {}
    for node in gm.graph.nodes:
        weight = arg(node, "weight") if is_op(node, aten.linear, aten.conv1d, aten.conv2d, aten.conv3d) else None
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr") or weight.target not in removed_inputs:
            continue
        name = weight.target
        why = ("a 3-D conv" if is_op(node, aten.conv3d) else "a grouped conv" if int(arg(node, "groups", 1)) != 1
               else "its weight is read by several layers" if name in shared else None)
        if why is not None:
            skipped[name] = f"not refit: {why}"
            continue
        bias = arg(node, "bias")
        bias_name = bias.target if isinstance(bias, fx.Node) and bias.op == "get_attr" else None
        targets[node] = RefitTarget(name, tuple(sorted(int(i) for i in removed_inputs[name])), bias_name,
                                    None if bias_name else running_mean_after(node))
    for name in removed_inputs:  # removed inputs of an op this module does not handle (embedding, addmm)
        if name not in skipped and all(t.weight != name for t in targets.values()):
            skipped[name] = "not refit: not a linear or conv input"
    return targets, skipped


def refit_before_removal(gm: fx.GraphModule, batches: Sequence[ExampleInputs], targets: dict[fx.Node, RefitTarget],
                         *, damp: float = 0.01) -> dict[str, str]:
    """Repair every target layer of ``gm`` in place, in graph order; returns {weight name: what was done}."""
    notes: dict[str, str] = {}

    def visit(inputs: NodeInputs) -> None:
        target = targets[inputs.node]
        stored = resolve(gm, target.weight).detach()
        matrix = stored.reshape(stored.shape[0], -1)
        per_channel = matrix.shape[1] // stored.shape[1]  # unfolded columns per input channel (the kernel size)
        (_, rows), = input_rows(inputs, stored.shape)
        stats = InputStatistics.of_rows(rows, matrix.shape[1], layer=target.weight)
        gone = torch.zeros(stored.shape[1], dtype=torch.bool)
        gone[list(target.removed)] = True
        kept = (~gone).repeat_interleave(per_channel)
        intercept = target.bias is not None or target.running_mean is not None
        bias = resolve(gm, target.bias).detach() if target.bias else None
        new, new_bias = refit_least_squares(matrix, stats.xtx, kept, bias=bias,
                                            mean=stats.mean if intercept else None,
                                            count=stats.count if intercept else None, damp=damp, layer=target.weight)
        full = torch.zeros_like(matrix)
        full[:, kept] = new
        write_dense_weight(gm, target.weight, full.reshape(stored.shape))
        if target.bias:
            resolve(gm, target.bias).copy_(new_bias)
            where = "bias"
        elif target.running_mean:
            resolve(gm, target.running_mean).sub_(new_bias.to(resolve(gm, target.running_mean).dtype))
            where = "the next BatchNorm's running mean"
        else:
            where = None
        notes[target.weight] = (f"refit on {stats.count} input rows ({len(target.removed)} of {stored.shape[1]} "
                                f"inputs removed)" + (f", removed inputs' mean folded into {where}" if where else ""))

    run_sequentially(gm, batches, visit, lambda node: node in targets, desc="prune-channels (reconstruct)")
    return notes
