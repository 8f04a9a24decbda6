"""Input energy of the routed experts' down projections on calibration data: the ``activation`` importance of
expert widths (graphopt/analysis/moe_width.py).

For every expert ``e`` of a layer and every intermediate channel ``c``: ``energy[e, c]``, the mean of ``x_c²`` over
the tokens routed to ``e``, where ``x`` is the input of ``e``'s down projection, as prune-channels' ``activation``
weighs a linear layer's input channels. The experts' inputs are captured while the graph runs over the batches
(graphopt.calibration.expert_scores.each_layer_inputs); the part of the experts' sub-graph that computes the down
projection's input then runs once per expert on the tokens routed to it, every slot of theirs sent to that expert
(each token appears top-k times: the mean is unchanged). A layer whose sub-graph cannot be cut there (the down
tensor read by no matmul-like op, other token-sized inputs) gets None.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx

from graphopt.analysis.moe import MoeLayer
from graphopt.calibration.expert_scores import each_layer_inputs
from graphopt.graph.inputs import ExampleInputs

__all__ = ["expert_input_energy"]


def expert_input_energy(gm: fx.GraphModule, layers: Sequence[tuple[MoeLayer, str, int]],
                        batches: Sequence[ExampleInputs]) -> dict[str, torch.Tensor | None]:
    """{experts module: ``[num_experts, width]`` energies, or None} for ``layers``: (MoE layer, the name of its
    fused down tensor, its width)."""
    cuts = {layer.name: _DownInput(gm, layer, down, width) for layer, down, width in layers}
    energy: dict[str, torch.Tensor | None] = {layer.experts: None for layer, _, _ in layers}

    def measure(layer: MoeLayer, per_batch: list[list]) -> None:
        cut = cuts[layer.name]
        if cut.module is not None:
            energy[layer.experts] = cut.energy(per_batch)

    each_layer_inputs(gm, [layer for layer, _, _ in layers], batches, measure, desc="measuring expert inputs")
    return energy


class _DownInput:
    """The experts' sub-graph from the scope's inputs to the down projection's input (``module``: None when the
    layout cannot be followed)."""

    def __init__(self, gm: fx.GraphModule, layer: MoeLayer, down: str, width: int):
        self.layer, self.width, self.module = layer, width, None
        target = _down_input(layer, down)
        val = target.meta.get("val") if target is not None else None
        if not isinstance(val, torch.Tensor) or width not in val.shape:
            return
        self.dim = max(d for d, n in enumerate(val.shape) if n == width)
        needed = _ancestors(target, set(layer.nodes))
        read = {a for n in needed for a in n.all_input_nodes}
        self.inputs = [a for a in layer.inputs if a in read]
        if any(not isinstance(a.meta.get("val"), torch.Tensor) for a in self.inputs):
            return  # a symbolic size from outside: it would not follow the routed tokens
        graph = fx.Graph()
        env = {a: graph.placeholder(f"input_{i}") for i, a in enumerate(self.inputs)}
        def arg(a: fx.Node) -> fx.Node:
            if a not in env:  # a parameter read inside the scope
                env[a] = graph.get_attr(a.target)
            return env[a]

        for n in layer.nodes:
            if n in needed:
                env[n] = graph.node_copy(n, arg)
        graph.output(env[target])
        self.module = fx.GraphModule(gm, graph)

    @torch.no_grad()
    def energy(self, per_batch: list[list]) -> torch.Tensor:
        experts = self.layer.num_experts
        total = torch.zeros(experts, self.width, dtype=torch.float64)
        rows = torch.zeros(experts, dtype=torch.float64)
        at = {a: i for i, a in enumerate(self.layer.inputs)}
        for values in per_batch:
            index = values[at[self.layer.index]]
            tokens = index.shape[0]
            for e in range(experts):
                routed = (index == e).any(-1)
                if not routed.any():
                    continue
                x = self.module(*[self._value(a, values[at[a]], routed, e, tokens) for a in self.inputs])
                x = x.movedim(self.dim, -1).reshape(-1, self.width).double()
                total[e] += x.pow(2).sum(0)
                rows[e] += x.shape[0]
        return total / rows.clamp(min=1)[:, None]

    def _value(self, node: fx.Node, value: torch.Tensor, routed: torch.Tensor, e: int, tokens: int) -> torch.Tensor:
        """An input restricted to the tokens routed to ``e``, all their slots sent to ``e`` with weight 1 in the
        first."""
        n = int(routed.sum())
        if node is self.layer.index:
            return torch.full((n, value.shape[-1]), e, dtype=value.dtype, device=value.device)
        if node is self.layer.weights:
            one = torch.zeros(n, value.shape[-1], dtype=value.dtype, device=value.device)
            one[:, 0] = 1
            return one
        return value[routed] if value.dim() and value.shape[0] == tokens else value


def _down_input(layer: MoeLayer, down: str) -> fx.Node | None:
    """The input of the op that multiplies by the down tensor: the first floating input, not derived from the
    tensor, of the first node that reads a value derived from it with one."""
    derived: set[fx.Node] = set()
    for n in layer.nodes:
        reads = n.all_input_nodes
        if not any((a.op == "get_attr" and a.target == down) or a in derived for a in reads):
            continue
        others = [a for a in reads if a not in derived and not (a.op == "get_attr" and a.target == down)
                  and isinstance(v := a.meta.get("val"), torch.Tensor) and v.is_floating_point()]
        if others:
            return others[0]
        derived.add(n)  # a view, transpose or gather of the tensor
    return None


def _ancestors(node: fx.Node, scope: set[fx.Node]) -> set[fx.Node]:
    """``node`` and the nodes of ``scope`` it is computed from."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or n not in scope:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen
