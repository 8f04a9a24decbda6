"""``recalibrate-bn``: re-estimate every BatchNorm's running statistics from calibration data.

After pruning, layer removal or factorization the activations a BatchNorm sees change, but its running mean and
variance still describe the old model: re-estimating them is the cheapest repair there is (no gradients, no weight
changes). The graph runs over ``calib_data`` node by node in eval mode (graphopt/calibration/engine.py): each
BatchNorm gets the mean and the unbiased variance over every value of each channel in all calibration batches (the
statistics of the data, not a momentum average), computed from the inputs the already re-estimated BatchNorms before
it produce, so every BatchNorm in the result describes the model as it now is. Statistics are summed over
torch.distributed ranks, so every rank ends with the same buffers. Weights and biases are untouched; BatchNorms
matched by ``ignore`` keep their statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from graphopt.calibration.engine import NodeInputs, run_sequentially
from graphopt.graph.inputs import check_batches
from graphopt.graph.layers import layer_name
from graphopt.graph.nodes import arg, is_op, resolve
from graphopt.graph.patterns import matches_any, unmatched
from graphopt.errors import PipelineError
from graphopt.pipeline.pass_base import Context, Pass, PassResult
from graphopt.pipeline.registry import register_pass
from graphopt.util import distributed

aten = torch.ops.aten
BATCH_NORMS = (aten.batch_norm, aten._native_batch_norm_legit_no_training)


@register_pass
@dataclass(frozen=True)
class RecalibrateBN(Pass):
    """Set every BatchNorm's running mean and variance to the statistics of its inputs on ``calib_data``."""

    name: ClassVar[str] = "recalibrate-bn"
    ignore: tuple = ()  # name patterns (graphopt/graph/patterns.py) of BatchNorms that keep their statistics

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        batches = check_batches(ctx.calib_data, ctx.inputs, needed_by="recalibrate-bn")
        norms = {n: layer_name(n, "running_mean") for n in gm.graph.nodes if _running_buffers(n) is not None}
        missing = unmatched(self.ignore, list(norms.values()))
        if missing:
            raise PipelineError(f"recalibrate-bn: ignore pattern {missing[0]!r} matches no BatchNorm; the graph's "
                                f"BatchNorms are {sorted(norms.values())[:8]}")
        chosen = {n: name for n, name in norms.items() if not matches_any(name, self.ignore)}
        counts: dict[str, int] = {}

        def visit(inputs: NodeInputs) -> None:
            counts[chosen[inputs.node]] = _reestimate(gm, inputs)

        run_sequentially(gm, batches, visit, lambda n: n in chosen, desc="recalibrate-bn")
        decisions = {name: f"running statistics from {counts[name]} values per channel" for name in counts}
        decisions.update({name: "ignored" for name in norms.values() if name not in counts})
        return PassResult(gm, modified=bool(counts), stats={"recalibrated": len(counts), "batches": len(batches)},
                          decisions=decisions)


def _running_buffers(node: fx.Node) -> tuple[str, str] | None:
    """The targets of a BatchNorm node's running mean and variance, when both are stored buffers."""
    if not is_op(node, *BATCH_NORMS):
        return None
    mean, var = arg(node, "running_mean"), arg(node, "running_var")
    if not all(isinstance(b, fx.Node) and b.op == "get_attr" for b in (mean, var)):
        return None
    return mean.target, var.target


def _reestimate(gm: fx.GraphModule, inputs: NodeInputs) -> int:
    """Write the exact per-channel mean and unbiased variance of the node's inputs into its buffers; returns the
    number of values per channel (over all batches and ranks)."""
    sums = None
    for x in inputs.arg(0):
        x64 = x.detach().to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
        part = torch.stack([x64.sum(1), (x64 * x64).sum(1), torch.full_like(x64[:, 0], x64.shape[1])])
        sums = part if sums is None else sums + part
    sums = distributed.sum_tensors([sums])[0]
    total, count = sums[0], sums[2]
    mean = total / count
    # sum of squares about the mean, from the raw moments in float64 (values are activations, not huge)
    var = (sums[1] - count * mean * mean).clamp_min(0) / (count - 1).clamp_min(1)
    mean_target, var_target = _running_buffers(inputs.node)
    for target, value in ((mean_target, mean), (var_target, var)):
        stored = resolve(gm, target)
        stored.copy_(value.to(stored.dtype))
    return int(count[0])
