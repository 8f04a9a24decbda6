"""Small, shared operations on canonical graphs: matching ops, reading and writing parameters, cleaning up."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn


def is_op(node: fx.Node, *ops) -> bool:
    """True if ``node`` calls one of ``ops`` (ATen overloads such as ``aten.conv2d.default`` or whole packets)."""
    if node.op != "call_function":
        return False
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return any(target is op or packet is op for op in ops)


def attr_value(gm: fx.GraphModule, node: fx.Node | None) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads (None for a None argument)."""
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise TypeError(f"expected a get_attr node, got {node}")
    return resolve(gm, node.target)


def owner_and_leaf(root: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    """The module holding attribute ``qualified`` ("layer1.0.conv.weight") and the attribute's own name."""
    owner, _, leaf = qualified.rpartition(".")
    return (root.get_submodule(owner) if owner else root), leaf


def resolve(root: nn.Module, qualified: str):
    """The attribute (parameter, buffer, constant, module) at a qualified name."""
    return getattr(*owner_and_leaf(root, qualified))


def set_parameter(gm: fx.GraphModule, qualified: str, value: torch.Tensor) -> None:
    """Store ``value`` as a parameter named ``qualified``, creating owner modules as needed.

    It stays trainable like the parameter it replaces (a new one is trainable): values computed under no_grad
    (folded weights) must not come back frozen, or fine-tuning after the pass would silently train nothing."""
    owner_name, _, leaf = qualified.rpartition(".")
    owner = _ensure_module(gm, owner_name)
    old = owner._parameters.get(leaf)
    if leaf in owner._buffers:
        del owner._buffers[leaf]
    trainable = old.requires_grad if old is not None else True
    owner.register_parameter(leaf, nn.Parameter(value.detach().clone(), requires_grad=trainable))


def _ensure_module(root: nn.Module, qualified: str) -> nn.Module:
    mod = root
    for part in filter(None, qualified.split(".")):
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    return mod


def free_attr_name(gm: fx.GraphModule, wanted: str) -> str:
    """``wanted`` if no attribute of that qualified name exists, else ``wanted_1``, ``wanted_2``..."""
    name, k = wanted, 0
    while _exists(gm, name):
        k += 1
        name = f"{wanted}_{k}"
    return name


def _exists(gm: fx.GraphModule, qualified: str) -> bool:
    try:
        return resolve(gm, qualified) is not None  # nn.Conv2d(bias=False) keeps a free `bias = None` slot
    except AttributeError:
        return False


def remove_dead_nodes(gm: fx.GraphModule) -> int:
    """Erase pure nodes whose results nobody uses (input guards and asserts stay); returns how many."""
    before = len(gm.graph.nodes)
    # torch's own pass; call_module nodes stay: opaque modules (guards, user leaves) may have side effects
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op == "call_module" or n.is_impure())
    return before - len(gm.graph.nodes)


def remove_unused_attrs(gm: fx.GraphModule) -> list[str]:
    """Delete parameters and buffers no ``get_attr`` node reads (opaque call_module owners are kept)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    opaque = tuple(f"{n.target}." for n in gm.graph.nodes if n.op == "call_module")
    removed = []
    for name in [n for n, _ in gm.named_parameters(remove_duplicate=False)] + [n for n, _ in gm.named_buffers()]:
        if name in used or name.startswith(opaque) or any(u.startswith(name + ".") for u in used):
            continue
        owner, leaf = owner_and_leaf(gm, name)
        owner._parameters.pop(leaf, None)
        owner._buffers.pop(leaf, None)
        removed.append(name)
    return removed


def replace_with(node: fx.Node, value: fx.Node) -> None:
    """Point every user of ``node`` at ``value`` and erase ``node``."""
    node.replace_all_uses_with(value)
    node.graph.erase_node(node)


def arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """Argument ``name`` of an ATen call by its schema (positional or keyword, default filled in), else ``default``."""
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is None:
        return node.kwargs.get(name, default)
    for i, a in enumerate(schema.arguments):
        if a.name != name:
            continue
        if i < len(node.args):
            return node.args[i]
        if name in node.kwargs:
            return node.kwargs[name]
        return a.default_value if a.has_default_value() else default
    return default


def sink_get_attrs(graph: fx.Graph) -> None:
    """Move every ``get_attr`` node to just before its first user (``hoist_get_attrs`` undoes it).

    torch.export puts all of them at the top, and the generated code keeps a value alive from its node to its
    last use: for a parametrized weight (a mask, a fake-quant), whose read computes a new tensor, that held a
    materialized copy of every such weight for the whole forward (+1x the model at the peak). Next to its user,
    each lives only as long as the op that reads it."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in [n for n in graph.nodes if n.op == "get_attr" and n.users]:
        first = min(node.users, key=order.__getitem__)
        if node.next is not first:
            first.prepend(node)


def hoist_get_attrs(graph: fx.Graph) -> bool:
    """Move every ``get_attr`` node, in order, to the top of the graph: the canonical form passes are written
    against (a pass may insert a new reader of a weight anywhere, even before the weight's first reader).
    Returns whether any node moved."""
    nodes = list(graph.nodes)
    attrs = [n for n in nodes if n.op == "get_attr"]
    if nodes[:len(attrs)] == attrs:
        return False
    anchor = next(n for n in nodes if n.op != "get_attr")
    for node in attrs:
        anchor.prepend(node)
    return True
