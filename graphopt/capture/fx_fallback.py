"""Fallback capture: ``torch.fx.symbolic_trace``, normalized into the canonical ATen form.

Used when ``torch.export`` cannot capture a model (typically code it cannot trace that the user marks as a leaf
module). Each traced node that calls a torch op or a standard ``torch.nn`` module is re-traced on its own with
``make_fx(pre_dispatch=True)``, the tracer ``torch.export`` itself builds on, and its ATen nodes are inlined in
place; module parameters become ``get_attr`` nodes under their original qualified names. User leaf modules and
Python-level shape arithmetic stay as they are (opaque to passes). Shapes are specialized to the example inputs.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx

from graphopt.graph.inputs import ExampleInputs


class _LeafTracer(fx.Tracer):
    """symbolic_trace's tracer, plus user-named leaf module types kept opaque."""

    def __init__(self, leaf_types: tuple[type, ...]):
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)


def symbolic_capture(model: nn.Module, inputs: ExampleInputs, leaf_modules: Sequence[type] = ()) -> fx.GraphModule:
    """symbolic_trace ``model`` and normalize every torch-level node into ATen ``call_function`` nodes."""
    leaf_types = tuple(leaf_modules)
    tracer = _LeafTracer(leaf_types)
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    values = _example_values(gm, inputs)
    for node in list(gm.graph.nodes):
        if not node._erased and _convertible(gm, node, values, leaf_types):  # getitems of tuples go with them
            _inline_aten(gm, node, values)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def _example_values(gm: fx.GraphModule, inputs: ExampleInputs) -> dict[fx.Node, Any]:
    """Run the traced graph once, keeping every node's value (needed to re-trace single nodes)."""
    from graphopt.graph.shapes import flat_graph_inputs

    values: dict[fx.Node, Any] = {}

    class Keep(fx.Interpreter):
        def run_node(self, n):
            values[n] = super().run_node(n)
            return values[n]

    with torch.no_grad():
        Keep(gm, garbage_collect_values=False).run(*flat_graph_inputs(gm, inputs))
    return values


def _convertible(gm: fx.GraphModule, node: fx.Node, values: dict, leaf_types: tuple[type, ...]) -> bool:
    if not isinstance(values.get(node), (torch.Tensor, tuple, list)):
        return False  # shape arithmetic and other Python values stay as Python ops
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return not isinstance(mod, leaf_types) and type(mod).__module__.startswith("torch.nn")
    if node.op == "call_function":
        return node.target is not getattr and not _is_aten(node.target)
    return node.op == "call_method"


def _is_aten(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload)


def _state_names(gm: fx.GraphModule, node: fx.Node) -> list[str]:
    """Local names of the parameters and buffers a module node reads (none for function/method nodes)."""
    if node.op != "call_module":
        return []
    mod = gm.get_submodule(node.target)
    return [n for n, _ in list(mod.named_parameters()) + list(mod.named_buffers())]


def _call(gm: fx.GraphModule, node: fx.Node, args, kwargs, state: Sequence[torch.Tensor]):
    """Compute ``node`` from concrete arguments (and, for modules, their parameters given as inputs)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return functional_call(mod, dict(zip(_state_names(gm, node), state)), tuple(args), kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _inline_aten(gm: fx.GraphModule, node: fx.Node, values: dict) -> None:
    """Replace ``node`` by the ATen graph make_fx records for it on its example values."""
    flat, spec = torch.utils._pytree.tree_flatten((node.args, node.kwargs))
    # tensor-valued inputs stay graph inputs; other node values (ints from x.size()) are specialized
    slots = [i for i, a in enumerate(flat) if isinstance(a, fx.Node) and isinstance(values.get(a), torch.Tensor)]
    concrete = [values[a] if isinstance(a, fx.Node) else a for a in flat]
    qualified = [f"{node.target}.{n}" for n in _state_names(gm, node)]
    state = [gm.get_parameter(n) if _is_param(gm, n) else gm.get_buffer(n) for n in qualified]

    def call(*tensors):
        leaves = list(concrete)
        for slot, t in zip(slots, tensors):
            leaves[slot] = t
        args, kwargs = torch.utils._pytree.tree_unflatten(leaves, spec)
        return _call(gm, node, args, kwargs, tensors[len(slots):])

    with torch.no_grad():
        small = make_fx(call, pre_dispatch=True)(*[concrete[i] for i in slots], *state)
    graph = gm.graph
    with graph.inserting_before(node):
        inputs = [flat[i] for i in slots] + [graph.get_attr(n) for n in qualified]
        val_map = dict(zip(_placeholders(small.graph), inputs))
        val_map.update(_copy_constants(gm, small))
        out = graph.graph_copy(small.graph, val_map)
    _record_values(values, node, out)
    _replace_uses(node, out)
    graph.erase_node(node)


def _record_values(values: dict, node: fx.Node, out: Any) -> None:
    """Later nodes are re-traced from the values of their inputs, which now come from the inlined nodes."""
    if isinstance(out, fx.Node):
        values[out] = values[node]
    else:
        for o, v in zip(out, values[node]):
            if isinstance(o, fx.Node):
                values[o] = v


def _copy_constants(gm: fx.GraphModule, small: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """Tensor constants make_fx lifted (``torch.tensor`` literals) move into ``gm`` as buffers."""
    mapping = {}
    for n in small.graph.nodes:
        if n.op == "get_attr":
            name = f"_const_{len(list(gm.buffers()))}_{n.target}".replace(".", "_")
            gm.register_buffer(name, getattr(small, n.target))
            mapping[n] = gm.graph.get_attr(name)
    return mapping


def _is_param(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_parameter(name)
        return True
    except AttributeError:
        return False


def _placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "placeholder"]


def _replace_uses(node: fx.Node, out: Any) -> None:
    """Point the users of ``node`` at the inlined result; tuple results feed ``getitem`` users directly."""
    import operator

    if isinstance(out, fx.Node):
        node.replace_all_uses_with(out)
        return
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
            user.replace_all_uses_with(out[user.args[1]])
            user.graph.erase_node(user)
        else:  # a user of the whole tuple: rebuild it as a Python tuple of the nodes
            with node.graph.inserting_before(user):
                packed = node.graph.call_function(tuple, (list(out),))
            user.replace_input_with(node, packed)
