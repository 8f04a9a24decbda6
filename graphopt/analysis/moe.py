"""Mixture-of-experts layers of a captured graph, found from what every transformers-5 MoE block computes.

An MoE block holds a router (a linear layer with one output row per expert, softmax or sigmoid, top-k) and an
experts module whose weights are fused 3-D tensors ``[num_experts, out, in]`` (and 2-D biases ``[num_experts,
out]``). The experts module is called as ``experts(hidden_states, top_k_index, top_k_weights)``; in the graph its
scope (``nn_module_stack``) is the set of nodes it produced and its inputs are the values from outside that scope
it reads: the hidden states, the integer expert indices ``[tokens, k]`` and their routing weights ``[tokens, k]``.
Nothing here depends on how the experts are dispatched (``grouped_mm``, ``batched_mm``): the experts' outputs
are computed by running the experts' own sub-graph (``ExpertRunner``). Shared experts are plain linear layers
(2-D weights) and are never part of an ``MoeLayer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from graphopt.analysis.blocks import scope_of
from graphopt.graph.nodes import is_op, resolve

aten = torch.ops.aten
__all__ = ["MoeLayer", "ExpertRunner", "find_moe_layers"]


@dataclass
class MoeLayer:
    """One MoE block: ``name`` (the block, e.g. ``model.layers.0.mlp``), its ``router`` and ``experts`` module
    paths, the expert count and top-k, and the tensors (graph attribute names) whose dim 0 indexes experts."""

    name: str
    router: str
    experts: str
    num_experts: int
    top_k: int
    router_tensors: list[str]
    expert_tensors: list[str]
    nodes: list[fx.Node] = field(repr=False)  # the experts scope, graph order
    inputs: list[fx.Node] = field(repr=False)  # values from outside the scope it reads (not get_attr)
    index: fx.Node = field(repr=False)
    weights: fx.Node = field(repr=False)
    output: fx.Node = field(repr=False)
    router_nodes: list[fx.Node] = field(default_factory=list, repr=False)  # routing ops (group views, top-k)


def _within(path: str, scope: str) -> bool:
    return path == scope or path.startswith(scope + ".")


def _meta(node) -> torch.Tensor | None:
    meta = node.meta.get("val") if isinstance(node, fx.Node) else None
    return meta if isinstance(meta, torch.Tensor) else None


def find_moe_layers(gm: fx.GraphModule) -> list[MoeLayer]:
    """Every MoE block of ``gm`` in graph order (see the module docstring); [] when there is none."""
    fused: dict[str, int] = {}  # owner path -> expert count, from its 3-D tensors
    for node in gm.graph.nodes:
        if node.op == "get_attr" and isinstance(t := resolve(gm, node.target), torch.Tensor) and t.dim() == 3:
            fused.setdefault(node.target.rpartition(".")[0], t.shape[0])
    layers = []
    for experts, count in fused.items():
        layer = _layer(gm, experts, count)
        if layer is not None:
            layers.append(layer)
    return layers


def _layer(gm: fx.GraphModule, experts: str, count: int) -> MoeLayer | None:
    nodes = [n for n in gm.graph.nodes if n.op != "get_attr" and _within(scope_of(n), experts)]
    inside = set(nodes)
    inputs = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "get_attr" and a not in inputs:
                inputs.append(a)
    integer = [a for a in inputs if (v := _meta(a)) is not None and not v.dtype.is_floating_point and v.dim() == 2]
    if len(integer) != 1:
        return None
    index = integer[0]
    same = [a for a in inputs if (v := _meta(a)) is not None and v.dtype.is_floating_point
            and v.dim() == 2 and v.shape[-1] == _meta(index).shape[-1] and a is not index]
    outputs = [n for n in nodes if _meta(n) is not None and any(u not in inside for u in n.users)]  # not sym sizes
    router = _router_weight(gm, index, count)
    if len(same) != 1 or len(outputs) != 1 or router is None:
        return None
    router_path = router.target.rpartition(".")[0]
    expert_tensors = sorted({n.target for n in gm.graph.nodes if n.op == "get_attr" and _within(n.target, experts)
                             and _expert_dim(resolve(gm, n.target), count)})
    router_tensors = sorted({n.target for n in gm.graph.nodes if n.op == "get_attr"
                             and n.target.rpartition(".")[0] == router_path
                             and _expert_dim(resolve(gm, n.target), count)})
    name = _common_parent(router_path, experts)
    router_nodes = [n for n in gm.graph.nodes if n.op != "get_attr"  # the router's and the block's own ops
                    and (_within(scope_of(n), router_path) or scope_of(n) == name)]
    return MoeLayer(name, router_path, experts, count, int(_meta(index).shape[-1]), router_tensors, expert_tensors,
                    nodes, inputs, index, same[0], outputs[0], router_nodes)


def _expert_dim(t, count: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == count


def _router_weight(gm: fx.GraphModule, index: fx.Node, count: int) -> fx.Node | None:
    """The get_attr of the linear weight ``[count, hidden]`` that the expert indices are computed from."""
    seen, todo = set(), [index]
    while todo:  # breadth first: the nearest such linear
        node = todo.pop(0)
        if node in seen or len(seen) > 200:
            continue
        seen.add(node)
        w = _through_casts(node.args[1]) if is_op(node, aten.linear) else None
        if isinstance(w, fx.Node) and w.op == "get_attr":
            t = resolve(gm, w.target)
            if t.dim() == 2 and t.shape[0] == count:
                return w
        todo.extend(a for a in node.all_input_nodes if a.op != "get_attr")
    return None


def _through_casts(node):
    """The tensor a chain of dtype casts starts from (DeepSeek's router reads ``self.weight.float()``)."""
    while isinstance(node, fx.Node) and is_op(node, aten.to, aten._to_copy, aten.type_as) and node.args:
        node = node.args[0]
    return node


def _common_parent(a: str, b: str) -> str:
    parts = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        parts.append(x)
    return ".".join(parts)


class ExpertRunner:
    """The experts scope of one MoE layer as a callable sub-graph: ``expert_output(values, e)`` is expert ``e``'s
    output (before its routing weight) for every token, given the scope's input values of one batch."""

    def __init__(self, gm: fx.GraphModule, layer: MoeLayer):
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {a: graph.placeholder(f"input_{i}") for i, a in enumerate(layer.inputs)}

        def arg(a: fx.Node) -> fx.Node:
            if a not in env:  # a parameter read inside the scope
                env[a] = graph.get_attr(a.target)
            return env[a]

        for n in layer.nodes:
            env[n] = graph.node_copy(n, arg)
        graph.output(env[layer.output])
        self.module = fx.GraphModule(gm, graph)
        self.layer = layer
        self._index = layer.inputs.index(layer.index)
        self._weights = layer.inputs.index(layer.weights)

    @torch.no_grad()
    def expert_output(self, values: list, expert: int) -> torch.Tensor:
        """``[tokens, hidden]``: every token sent to ``expert`` in its first slot with weight 1 (the others 0)."""
        values = list(values)
        index, weights = values[self._index], values[self._weights]
        values[self._index] = torch.full_like(index, expert)
        one = torch.zeros_like(weights)
        one[:, 0] = 1
        values[self._weights] = one
        return self.module(*values)
