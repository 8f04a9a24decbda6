"""Per-expert statistics of MoE layers on calibration data: routing frequency and REAP saliency.

For every expert ``e`` of a layer: ``count[e]``, how often ``e`` is among a token's top-k (summed over slots), and
``reap[e]``, the mean over the tokens routed to ``e`` of ``gate_weight * ||expert_output||`` (REAP, Lasby et al.
2025: the router-weighted activation norm). An expert no token is routed to scores 0 on both. The graph runs once
over all batches (graphopt.calibration.engine.run_sequentially); at each MoE layer the experts' inputs are kept just
long enough to run the experts' own sub-graph once per expert (graphopt.analysis.moe.ExpertRunner), so REAP costs
``num_experts / top_k`` times the MoE compute of a forward pass; ``count`` needs no extra compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from graphopt.analysis.moe import ExpertRunner, MoeLayer
from graphopt.calibration.engine import NodeInputs, run_sequentially
from graphopt.graph.inputs import ExampleInputs

__all__ = ["ExpertStats", "expert_stats", "each_layer_inputs"]


@dataclass
class ExpertStats:
    """``count[e]``: top-k hits; ``reap[e]``: mean gate-weighted output norm over the tokens routed to ``e``."""

    count: torch.Tensor
    reap: torch.Tensor | None


def expert_stats(gm: fx.GraphModule, layers: Sequence[MoeLayer], batches: Sequence[ExampleInputs], *,
                 outputs: bool = True) -> dict[str, ExpertStats]:
    """{layer name: ExpertStats} over ``batches``; ``outputs=False`` skips the expert runs (``reap`` is None)."""
    stats: dict[str, ExpertStats] = {}

    def layer_stats(layer: MoeLayer, per_batch: list[list]) -> None:
        stats[layer.name] = _layer_stats(gm, layer, per_batch, outputs)

    each_layer_inputs(gm, layers, batches, layer_stats, desc="scoring experts")
    return stats


def each_layer_inputs(gm: fx.GraphModule, layers: Sequence[MoeLayer], batches: Sequence[ExampleInputs],
                      fn: Callable[[MoeLayer, list[list]], None], *, desc: str) -> None:
    """Run ``gm`` over ``batches``; at each MoE layer call ``fn(layer, per_batch)`` with the values of
    ``layer.inputs`` for every batch (``per_batch[b][i]``), kept only until ``fn`` returns."""
    consumers: dict[fx.Node, MoeLayer] = {}
    last: dict[str, fx.Node] = {}
    for layer in layers:
        wanted = set(layer.inputs)
        for node in layer.nodes:
            if wanted & set(node.all_input_nodes):
                consumers[node] = layer
                last[layer.name] = node
    seen: dict[str, dict[fx.Node, list]] = {layer.name: {} for layer in layers}

    def visit(inputs: NodeInputs) -> None:
        layer = consumers[inputs.node]
        store = seen[layer.name]
        for b in range(len(batches)):
            for node, value in _pairs((inputs.node.args, inputs.node.kwargs), (inputs.args[b], inputs.kwargs[b])):
                if node in layer.inputs:
                    store.setdefault(node, [None] * len(batches))[b] = value
        if inputs.node is last[layer.name]:
            fn(layer, [[store[a][b] for a in layer.inputs] for b in range(len(batches))])
            store.clear()

    run_sequentially(gm, batches, visit, lambda n: n in consumers, desc=desc)


def _pairs(nodes: Any, values: Any):
    """(fx node, its value) for every node inside an argument structure and the same structure of values."""
    if isinstance(nodes, fx.Node):
        yield nodes, values
    elif isinstance(nodes, (tuple, list)):
        for n, v in zip(nodes, values):
            yield from _pairs(n, v)
    elif isinstance(nodes, dict):
        for key, n in nodes.items():
            yield from _pairs(n, values[key])


@torch.no_grad()
def _layer_stats(gm: fx.GraphModule, layer: MoeLayer, per_batch: list[list], outputs: bool) -> ExpertStats:
    experts = layer.num_experts
    count = torch.zeros(experts, dtype=torch.float64)
    saliency = torch.zeros(experts, dtype=torch.float64)
    runner = ExpertRunner(gm, layer) if outputs else None
    at_index, at_weights = layer.inputs.index(layer.index), layer.inputs.index(layer.weights)
    for values in per_batch:
        index, weights = values[at_index], values[at_weights].double()
        count += torch.bincount(index.flatten(), minlength=experts)[:experts].double()
        if runner is None:
            continue
        for e in range(experts):
            routed = index == e
            if not routed.any():
                continue
            norms = runner.expert_output(values, e).double().flatten(1).norm(dim=-1)  # [tokens]
            saliency[e] += (weights * routed * norms[:, None]).sum()
    return ExpertStats(count, saliency / count.clamp(min=1) if outputs else None)
