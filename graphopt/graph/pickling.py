"""Pickling a GraphoptModule: ``torch.save(module)`` / ``torch.load(weights_only=False)``, ``pickle``, ``deepcopy``.

``fx.GraphModule`` pickles its generated Python code and symbolically re-traces it on load; torch.export's
module does not survive that (its guard function and hooks are local closures, ATen OpOverloads do not pickle).
Here the graph is stored as data: one record per node (op, target, arguments with node references replaced by a
marker and listed by name, shape metadata), the pytree input/output specs, and the module's own containers
(parameters, buffers, submodules, plain attributes) pickled as they are.

A pickle written here names two graphopt objects, ``graphopt.graph.pickling.rebuild`` and the GraphoptModule
class (both kept stable, with a format number in the state), besides torch objects and what the graph itself calls or holds: submodule classes (the
model's opaque leaves, fake-quant modules), module-level functions, the model's output types. ATen and custom
operators are stored by name (``aten.conv2d.default``) and looked up on load. torch.export's ``_guards_fn``
(input-shape checks compiled from sympy, a closure) is not stored, as in graphopt.save.

``graphopt.save`` is the other way to keep a model: data only, loadable with ``weights_only=True``, checked on load.
"""

from __future__ import annotations

import functools
import io
import pickle
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.fx.immutable_collections import immutable_list
from torch.fx.passes.shape_prop import TensorMetadata

from graphopt.errors import LoadError, SaveError
from graphopt.graph.inputs import ExampleInputs

FORMAT = 1
_GUARD = "_guards_fn"
# Markers inside stored arguments (a class never appears as an argument): a node reference, and a memory format
# (which does not pickle with torch.save's protocol 2); their names follow in the node's "refs" list, in order.
_NODE, _FORMAT = fx.Node, torch.memory_format
_NOT_STATE = ("_graph", "_in_spec", "_out_spec", "training", "meta")


def state_of(gm: fx.GraphModule, cls: type[fx.GraphModule]) -> dict:
    """Everything ``rebuild`` needs to make a ``cls`` (GraphoptModule, which passes itself: this module does not
    import it), as picklable data; SaveError naming the part that cannot be pickled."""
    nodes = [_encode_node(n) for n in gm.graph.nodes if not (n.op == "call_module" and n.target == _GUARD)]
    state = {
        "format": FORMAT, "class": cls, "class_name": type(gm).__name__, "training": gm.training,
        "modules": {k: m for k, m in gm._modules.items() if k != _GUARD},
        "parameters": dict(gm._parameters), "buffers": dict(gm._buffers),
        "non_persistent": sorted(gm._non_persistent_buffers_set),
        "attrs": {k: v for k, v in gm.__dict__.items() if k not in _base_keys(cls) and k not in _NOT_STATE},
        "graph": {"nodes": nodes, "codegen": _encode_codegen(gm.graph)},
        "meta": _encode_meta(gm.meta),
    }
    _check_picklable(state)
    return state


def rebuild(state: dict) -> fx.GraphModule:
    """The GraphoptModule ``state_of`` described (the function pickles call on load: its name stays stable)."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise LoadError(f"a pickled graphopt module of format {found!r}, not {FORMAT}: it was written by another "
                        "graphopt version; load it with that version and keep it with graphopt.save instead")
    gm = state["class"]({}, fx.Graph(), class_name=state["class_name"])
    gm._modules.update(state["modules"])
    gm._parameters.update(state["parameters"])
    gm._buffers.update(state["buffers"])
    gm._non_persistent_buffers_set = set(state["non_persistent"])
    gm.__dict__.update(state["attrs"])
    gm.graph = _decode_graph(state["graph"])
    gm.meta.update(_decode_meta(state["meta"]))
    gm.training = state["training"]  # the graph's nodes were stored in this mode; submodules keep their own
    return gm


@functools.cache
def _base_keys(cls: type[fx.GraphModule]) -> frozenset[str]:
    """Attributes every ``cls`` has (containers, hooks, generated code): not stored as extra attributes."""
    return frozenset(cls({}, fx.Graph()).__dict__)


def _check_picklable(state: dict) -> None:
    """Pickle everything but tensor data now, so a failure names the module, not a pickle frame deep inside."""
    class Probe(pickle.Pickler):
        def persistent_id(self, obj):
            return id(obj) if isinstance(obj, torch.Tensor) else None

    try:
        Probe(io.BytesIO()).dump(state)
    except Exception as e:
        raise SaveError(
            f"cannot pickle this {state['class_name']}: {type(e).__name__}: {e}. Something the graph calls or holds "
            "(a lambda, a local function or class) cannot be found by name; define it at module level, or keep the "
            "model with graphopt.save(result, path), which stores the graph as data") from e


# ---------------------------------------------------------------------------------------------- nodes


def _encode_node(node: fx.Node) -> dict:
    refs: list[str] = []
    args, kwargs = _encode_arg(tuple(node.args), refs), _encode_arg(dict(node.kwargs), refs)
    meta = {k: node.meta[k] for k in ("tensor_meta", "device") if k in node.meta}
    if "tensor_meta" in meta:
        meta["tensor_meta"] = _map_tensor_meta(meta["tensor_meta"], lambda f: f and str(f).removeprefix("torch."))
    return {"name": node.name, "op": node.op, "target": _encode_target(node), "args": args, "kwargs": kwargs,
            "refs": refs, "meta": meta}


def _encode_arg(x: Any, refs: list[str]) -> Any:
    """Plain containers with node references replaced by the marker, their names appended to ``refs`` in order."""
    if isinstance(x, fx.Node):
        refs.append(x.name)
        return _NODE
    if isinstance(x, torch.memory_format):
        refs.append(str(x).removeprefix("torch."))
        return _FORMAT
    if type(x) in (list, tuple, immutable_list):
        items = [_encode_arg(v, refs) for v in x]
        return tuple(items) if type(x) is tuple else items
    if isinstance(x, dict):
        return {k: _encode_arg(v, refs) for k, v in x.items()}
    if isinstance(x, slice):
        return slice(*(_encode_arg(v, refs) for v in (x.start, x.stop, x.step)))
    return x


def _decode_arg(x: Any, refs, nodes: dict[str, fx.Node]) -> Any:
    if x is _NODE:
        return nodes[next(refs)]
    if x is _FORMAT:
        return _memory_format(next(refs))
    if type(x) in (list, tuple):
        items = [_decode_arg(v, refs, nodes) for v in x]
        return tuple(items) if type(x) is tuple else items
    if type(x) is dict:
        return {k: _decode_arg(v, refs, nodes) for k, v in x.items()}
    if isinstance(x, slice):
        return slice(*(_decode_arg(v, refs, nodes) for v in (x.start, x.stop, x.step)))
    return x


def _encode_target(node: fx.Node) -> Any:
    """Operators by name (OpOverloads do not pickle); other callables and string targets as they are."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return ("torch.ops", f"{t.namespace}.{t._opname}.{t._overloadname}")
    if isinstance(t, torch._ops.OpOverloadPacket):
        return ("torch.ops", t._qualified_op_name.replace("::", "."))
    if isinstance(t, torch._ops.HigherOrderOperator) and getattr(torch.ops.higher_order, t.__name__, None) is t:
        return ("torch.ops", f"higher_order.{t.__name__}")
    return ("object", t)


def _decode_target(encoded: tuple) -> Any:
    kind, value = encoded
    if kind == "object":
        return value
    for attempt in range(2):
        try:
            return functools.reduce(getattr, value.split("."), torch.ops)
        except (AttributeError, RuntimeError) as e:
            if attempt:
                raise LoadError(f"the pickled graph calls torch.ops.{value}, which is not registered in this torch; "
                                "import the library that defines it before loading") from e
            import graphopt.kernels  # noqa: F401  (registers graphopt's own custom ops)


def _decode_graph(data: dict) -> fx.Graph:
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for item in data["nodes"]:
        refs = iter(item["refs"])
        args, kwargs = _decode_arg(item["args"], refs, nodes), _decode_arg(item["kwargs"], refs, nodes)
        node = graph.create_node(item["op"], _decode_target(item["target"]), args, kwargs, name=item["name"])
        node.meta.update(item["meta"])
        if "tensor_meta" in node.meta:
            node.meta["tensor_meta"] = _map_tensor_meta(node.meta["tensor_meta"], _memory_format)
        nodes[item["name"]] = node
    codegen = data["codegen"]
    if codegen is not None:
        graph._codegen = _decode_codegen(codegen)
    return graph


def _memory_format(name: str | None) -> torch.memory_format | None:
    value = getattr(torch, name, None) if name else None
    if name and not isinstance(value, torch.memory_format):
        raise LoadError(f"the pickled graph names an unknown memory format '{name}'")
    return value


def _map_tensor_meta(meta: Any, fn) -> Any:
    """``meta`` (a TensorMetadata, or tuples/lists of them) with ``fn`` applied to each memory_format field."""
    if isinstance(meta, TensorMetadata):
        return meta._replace(memory_format=fn(meta.memory_format))
    if type(meta) in (list, tuple):
        return type(meta)(_map_tensor_meta(m, fn) for m in meta)
    return meta


def _encode_codegen(graph: fx.Graph) -> tuple | None:
    """The pytree codegen (a subclass too, e.g. HF input defaults) as its class, its other attributes and its
    specs; another codegen as it is."""
    codegen = graph._codegen
    if isinstance(codegen, _PyTreeCodeGen):
        info = codegen.pytree_info
        rest = {k: v for k, v in codegen.__dict__.items() if k != "pytree_info"}
        return ("pytree", type(codegen), rest, list(info.orig_args), _encode_spec(info.in_spec),
                _encode_spec(info.out_spec))
    return None if type(codegen) is fx.graph.CodeGen else ("object", codegen)


def _decode_codegen(data: tuple) -> fx.graph.CodeGen:
    if data[0] != "pytree":
        return data[1]
    kind, rest, orig_args, in_spec, out_spec = data[1:]
    codegen = kind.__new__(kind)
    codegen.__dict__.update(rest)
    codegen.pytree_info = _PyTreeInfo(orig_args, _decode_spec(in_spec), _decode_spec(out_spec))
    return codegen


def _encode_spec(spec: pytree.TreeSpec | None) -> Any:
    """A TreeSpec as (node type, context, children), leaves as "leaf": pickling TreeSpec itself names its
    deprecated LeafSpec class, and its layout is torch's to change."""
    if spec is None:
        return None
    if spec.is_leaf():
        return "leaf"
    return (spec.type, spec.context, [_encode_spec(c) for c in spec.children()])


def _decode_spec(data: Any) -> pytree.TreeSpec | None:
    if data is None:
        return None
    if data == "leaf":
        return pytree.treespec_leaf()
    node_type, context, children = data
    return pytree.TreeSpec(node_type, context, [_decode_spec(c) for c in children])


# ---------------------------------------------------------------------------------------------- module meta


def _encode_meta(meta: dict) -> dict:
    """graphopt's own entries: plain values as they are, example inputs as their args and kwargs. Others (torch's
    symbolic constraints) describe the capture, not the module, and are left out."""
    kept = {}
    for key, value in meta.items():
        if isinstance(value, ExampleInputs):
            kept[key] = ("example_inputs", tuple(value.args), dict(value.kwargs))
        elif isinstance(value, (str, int, float, bool, type(None))):
            kept[key] = ("plain", value)
    return kept


def _decode_meta(meta: dict) -> dict:
    return {k: ExampleInputs(v[1], v[2]) if v[0] == "example_inputs" else v[1] for k, v in meta.items()}
