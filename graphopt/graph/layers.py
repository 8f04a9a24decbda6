"""The one view of "a layer" every pass reads: weighted ops, their names, weights, flags; the op sets they belong to.

A layer is a call of a weighted ATen op (conv, transposed conv, linear, addmm, embedding) whose weight comes from a
stored tensor. Its **name** is the module path of that tensor (``blocks.0.conv1`` for ``blocks.0.conv1.weight``;
through parametrizations, fake-quant modules and casts, so a masked or quantized layer keeps its name); for a
weight two layers read (tied embedding and head) and for a computed weight, the innermost module of the node's
``nn_module_stack``; else the node's own name. Names are what users select layers
with (graphopt/graph/patterns.py) and what every pass's per-layer report is keyed by.

Flags: ``shared`` (the weight tensor is read by another layer too: tied embeddings, a reused conv), and
``feeds_output`` (the layer's result reaches a model output through non-layer ops only: the classifier head).
Arguments are read by name from the op's schema (``arg(node, "groups")``), not by position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx

from graphopt.graph.nodes import arg

__all__ = ["CONVS", "CONV_TRANSPOSES", "LINEARS", "Layer", "arg", "is_shared", "layer_name", "layers",
           "output_layers", "shared_weights", "weight_source"]

aten = torch.ops.aten
CONVS = (aten.conv1d, aten.conv2d, aten.conv3d)
CONV_TRANSPOSES = (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
LINEARS = (aten.linear,)
# op -> (kind, weight argument, bias argument)
_WEIGHTED = {
    **{op: ("conv", "weight", "bias") for op in CONVS},
    **{op: ("conv_transpose", "weight", "bias") for op in CONV_TRANSPOSES},
    aten.linear: ("linear", "weight", "bias"),
    aten.addmm: ("addmm", "mat2", "self"),  # x @ W + b with W stored (in, out): HF GPT-2's Conv1D
    aten.embedding: ("embedding", "weight", None),
}


@dataclass(frozen=True)
class Layer:
    """One weighted layer of a graph (see the module docstring for what each field means)."""

    node: fx.Node
    name: str
    kind: str
    weight: fx.Node | None  # the get_attr node of the stored weight, when the weight is one
    bias: fx.Node | None
    shared: bool
    feeds_output: bool


def _packet(node: fx.Node):
    target = node.target
    return getattr(target, "overloadpacket", target) if node.op == "call_function" else None


def weight_source(value: Any) -> fx.Node | None:
    """The get_attr node a weight argument comes from, following the ops that produce it (parametrizations,
    fake-quant modules, casts, transposes; first argument first), or None when it is computed from inputs."""
    if not isinstance(value, fx.Node):
        return None
    queue, seen = [value], set()
    while queue:
        n = queue.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            return n
        if n.op == "placeholder":
            continue
        queue.extend(a for a in n.all_input_nodes)
    return None


def layer_name(node: fx.Node, weight: Any = "weight") -> str:
    """The name of the layer ``node`` calls: the module path of its stored weight, else its innermost module,
    else the node name. ``weight``: the weight's schema argument name, position, or the weight node itself."""
    if isinstance(weight, fx.Node) or weight is None:
        value = weight
    elif isinstance(weight, int):
        value = node.args[weight] if weight < len(node.args) else None
    else:
        value = arg(node, weight)
    source = weight_source(value)
    stack = node.meta.get("nn_module_stack")
    if source is not None and stack and len(source.users) > 1:  # a tied weight: name the module calling it
        return list(stack.values())[-1][0] or node.name
    if source is not None:
        target = f".{source.target}"
        if ".parametrizations." in target:
            return target.split(".parametrizations.")[0][1:] or source.target
        return source.target.rpartition(".")[0] or source.target
    if stack:
        return list(stack.values())[-1][0] or node.name
    return node.name


def shared_weights(gm: fx.GraphModule) -> set[str]:
    """Names of the stored tensors read by more than one op (counting every name a tied tensor has)."""
    uses: dict[int, int] = {}
    names: dict[int, list[str]] = {}
    for name, t in _named_tensors(gm):
        names.setdefault(id(t), []).append(name)
    by_name = {n: key for key, ns in names.items() for n in ns}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            key = by_name.get(node.target, node.target)
            uses[key] = uses.get(key, 0) + len(node.users)
    return {n for key, count in uses.items() if count > 1 for n in names.get(key, [key])}


def is_shared(attr: fx.Node) -> bool:
    """True if the tensor behind a get_attr node is read anywhere else in the graph (under any of its names)."""
    return attr.target in shared_weights(attr.graph.owning_module)


def _named_tensors(gm: torch.nn.Module):
    yield from gm.named_parameters(remove_duplicate=False)
    yield from gm.named_buffers(remove_duplicate=False)


def output_layers(gm: fx.GraphModule, candidates: Iterable[fx.Node]) -> set[fx.Node]:
    """Those of ``candidates`` whose result reaches a model output through ops that are not candidates."""
    is_candidate = set(candidates)
    found, seen = set(), set()
    stack = list(next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in is_candidate:
            found.add(node)
            continue
        stack.extend(node.all_input_nodes)
    return found


def layers(gm: fx.GraphModule) -> list[Layer]:
    """Every weighted layer of ``gm`` in graph order."""
    nodes = [n for n in gm.graph.nodes if _packet(n) in _WEIGHTED]
    heads, shared = output_layers(gm, nodes), shared_weights(gm)
    out = []
    for node in nodes:
        kind, w_arg, b_arg = _WEIGHTED[_packet(node)]
        weight = weight_source(arg(node, w_arg))
        bias = weight_source(arg(node, b_arg)) if b_arg else None
        out.append(Layer(node, layer_name(node, w_arg), kind, weight, bias,
                         weight is not None and weight.target in shared, node in heads))
    return out
