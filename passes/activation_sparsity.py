"""``activation-sparsity``: batch-1 Linear layers whose inputs are mostly zero skip the weights of zero inputs.

After ReLU-like activations many inputs of the next Linear are exactly zero, and at batch 1 the weight rows they
would multiply need not be read at all. The pass measures, on calibration data (``ctx.calib_data``, else the
example inputs), the fraction of zero inputs of every ``aten.linear`` with a stored weight, and where that fraction
makes ``graphopt::act_sparse_linear`` faster by the cost model (bytes read ∝ nonzero inputs, plus the op's call
overhead) it stores Wᵀ and calls that op. Inputs of other batch sizes run F.linear inside the op, so the graph
stays correct for every batch. Outputs are unchanged up to float summation order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

import graphopt.kernels  # noqa: F401  (registers torch.ops.graphopt.act_sparse_linear)
from graphopt.util import distributed
from graphopt.graph.nodes import arg, free_attr_name, is_op, owner_and_leaf, remove_dead_nodes, remove_unused_attrs
from graphopt.graph.inputs import ExampleInputs
from graphopt.graph.layers import layer_name
from graphopt.pipeline.pass_base import Context, Pass, PassResult
from graphopt.pipeline.registry import register_pass
from graphopt.graph.shapes import flat_graph_inputs

aten = torch.ops.aten
# cost model, one core: dense F.linear streams the weight; the op reads only rows of nonzero inputs (seconds)
_DENSE_BW, _ACT_BW, _DENSE_CALL_S, _ACT_CALL_S = 13e9, 13e9, 4e-6, 16e-6


def zero_fractions(gm: fx.GraphModule, nodes: list[fx.Node], batches: list[ExampleInputs]) -> dict:
    """node -> (fraction of exactly-zero entries in its first argument over ``batches``, rows per call), over
    the batches of every rank in a torch.distributed job."""
    zeros = {n: [0, 0, 0] for n in nodes}  # zero count, element count, largest rows per call
    for inputs in batches:
        interp = fx.Interpreter(gm, garbage_collect_values=False)
        with torch.no_grad():
            interp.run(*flat_graph_inputs(gm, inputs))
        for n in nodes:
            x = interp.env[n.args[0]]
            zeros[n][0] += int((x == 0).sum())
            zeros[n][1] += x.numel()
            zeros[n][2] = max(zeros[n][2], x.numel() // max(x.shape[-1], 1))
    counts = distributed.sum_numbers([v for z, total, _ in zeros.values() for v in (z, total)])
    rows = distributed.max_numbers([r for _, _, r in zeros.values()])
    return {n: (counts[2 * i] / max(counts[2 * i + 1], 1), int(rows[i])) for i, n in enumerate(zeros)}


@register_pass
@dataclass(frozen=True)
class ActivationSparsity(Pass):
    """Run batch-1 Linear layers with mostly-zero inputs through the zero-skipping kernel."""

    name: ClassVar[str] = "activation-sparsity"
    preserves_semantics: ClassVar[bool] = True

    min_zero_fraction: float = 0.5  # measured share of zero inputs below which a layer is left alone
    min_speedup: float = 1.2        # predicted speedup over dense F.linear required
    threads: int = 1

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        candidates = [n for n in gm.graph.nodes if is_op(n, aten.linear) and isinstance(n.args[0], fx.Node)
                      and isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr"]
        if not candidates:
            return PassResult(gm, modified=False, stats={"lowered": 0, "layers": {}})
        batches = [ExampleInputs.of(b) for b in ctx.calib_data] if ctx.calib_data is not None else [ctx.inputs]
        measured = zero_fractions(gm, candidates, batches)
        decisions, lowered = {}, 0
        for node in candidates:
            layer = layer_name(node)
            weight = getattr(*owner_and_leaf(gm, node.args[1].target)).detach()
            zero, rows = measured[node]
            reason = self._why_not(weight, zero, rows)
            decisions[layer] = reason or f"act-sparse ({zero:.0%} zero inputs)"
            if reason is None:
                self._replace(gm, node, weight, layer)
                lowered += 1
        if lowered:
            remove_dead_nodes(gm)
            remove_unused_attrs(gm)
        return PassResult(gm, modified=bool(lowered), stats={"lowered": lowered, "layers": decisions},
                          decisions=decisions)

    def _why_not(self, weight: torch.Tensor, zero: float, rows: int) -> str | None:
        if weight.dtype != torch.float32:
            return f"dense: weight is {weight.dtype}, the kernel is fp32"
        if rows != 1:
            return f"dense: {rows} rows per call, the kernel is batch-1"
        if zero < self.min_zero_fraction:
            return f"dense: {zero:.0%} zero inputs < min_zero_fraction {self.min_zero_fraction:.0%}"
        nbytes = weight.numel() * 4
        dense = _DENSE_CALL_S + nbytes / _DENSE_BW
        sparse = _ACT_CALL_S + (1 - zero) * nbytes / _ACT_BW
        if dense < self.min_speedup * sparse:
            return f"dense: predicted {dense / sparse:.2f}x < min_speedup {self.min_speedup}"
        return None

    def _replace(self, gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor, layer: str) -> None:
        qualified = free_attr_name(gm, f"{node.args[1].target}_t")
        owner, leaf = owner_and_leaf(gm, qualified)
        owner.register_buffer(leaf, weight.t().contiguous())
        bias = arg(node, "bias")
        with gm.graph.inserting_before(node):
            wt = gm.graph.get_attr(qualified)
            y = gm.graph.call_function(torch.ops.graphopt.act_sparse_linear.default,
                                       (node.args[0], wt, bias, self.threads))
        node.replace_all_uses_with(y)
        gm.graph.erase_node(node)
