"""An fx graph as plain JSON, and back, resolving call targets ONLY from an allowlist (no pickled code).

What a node may call (anything else is refused when saving, and again when loading):

- ``torch.ops.<namespace>.<op>.<overload>`` OpOverloads: ATen and registered custom ops (graphopt's own included);
- ``operator.<name>`` builtin functions (``getitem``, ``add``, ...), ``math.<name>`` and ``torch.sym_*`` functions
  (symbolic sizes), ``builtins.getattr`` with a public attribute name;
- a few plain functions of graphopt's own passes (QAT's BatchNorm fold), and those ``allow_function`` adds;
- ``call_method`` of a public ``torch.Tensor`` method;
- ``call_module`` of a submodule the caller supplies at load time (an opaque leaf of the fx fallback).

A lowered graph (graphopt.export.streamline) calls direct torch bindings; they are mapped back to their ATen overloads, so
what is saved is always the canonical ATen graph. Arguments are encoded with tags for what JSON lacks: node
references, tuples, dtypes, devices, layouts, memory formats, slices, non-finite floats.
"""

from __future__ import annotations

import builtins
import math
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from graphopt.errors import GraphoptError, LoadError, SaveError  # noqa: F401  (the errors are re-exported here)
from graphopt.export.streamline import DIRECT


# direct torch binding -> its ATen overload (undoes graphopt.export.streamline); bindings shared by two overloads are left out
_TO_ATEN: dict[Any, Any] = {}
for _aten, _fn in DIRECT.items():
    _TO_ATEN[_fn] = None if _fn in _TO_ATEN else _aten
_TO_ATEN = {fn: op for fn, op in _TO_ATEN.items() if op is not None}

_SIMPLE = (type(None), bool, int, str)


# ---------------------------------------------------------------------------------------------- targets


def target_name(node: fx.Node) -> str:
    """The qualified name a node's target is saved under; SaveError if it is not on the allowlist."""
    t = node.target
    if node.op in ("placeholder", "get_attr", "output", "call_module"):
        return t
    if node.op == "call_method":
        _check_method(t, SaveError)
        return t
    t = _TO_ATEN.get(t, t) if _hashable(t) else t
    if isinstance(t, torch._ops.OpOverload):
        return f"torch.ops.{t.namespace}.{t._opname}.{t._overloadname}"
    for prefix, space in (("operator", operator), ("math", math)):
        if getattr(space, getattr(t, "__name__", ""), None) is t:
            return f"{prefix}.{t.__name__}"
    if t is builtins.getattr:
        return "builtins.getattr"
    qualname = f"{getattr(t, '__module__', '')}.{getattr(t, '__qualname__', '')}"
    if qualname in _FUNCTIONS:
        return qualname
    if getattr(t, "__name__", "").startswith("sym_") and getattr(torch, t.__name__, None) is t:
        return f"torch.{t.__name__}"
    raise SaveError(
        f"node '{node.name}' calls {getattr(t, '__module__', '?')}.{getattr(t, '__qualname__', t)}, which graphopt "
        "cannot save without pickling code; only torch.ops.* operators, operator.*, math.* and torch.sym_* "
        "functions are saved. Register the function as a custom op (torch.library.custom_op) to save it.")


def resolve_target(op: str, name: str) -> Any:
    """The callable a saved target name stands for, looked up only in the allowlist; LoadError otherwise."""
    if op in ("placeholder", "get_attr", "output", "call_module"):
        return name
    if op == "call_method":
        _check_method(name, LoadError)
        return name
    parts = name.split(".")
    if parts[:2] == ["torch", "ops"] and len(parts) == 5:
        import graphopt.kernels  # noqa: F401  (registers graphopt's own custom ops before they are looked up)

        try:
            found = getattr(getattr(getattr(torch.ops, parts[2]), parts[3]), parts[4])
        except (AttributeError, RuntimeError) as e:
            raise LoadError(f"the saved graph calls {name}, which is not registered in this torch; import the "
                            "library that defines it before graphopt.load") from e
        if isinstance(found, torch._ops.OpOverload):
            return found
    elif name in _FUNCTIONS:
        return _function(name)
    elif len(parts) == 2:
        space = {"operator": operator, "math": math}.get(parts[0])
        found = getattr(space, parts[1], None) if space is not None and not parts[1].startswith("_") else None
        if callable(found) and type(found).__name__ == "builtin_function_or_method":
            return found
        if name == "builtins.getattr":
            return builtins.getattr
        if parts[0] == "torch" and parts[1].startswith("sym_") and callable(getattr(torch, parts[1], None)):
            return getattr(torch, parts[1])
    raise LoadError(f"the saved graph calls '{name}', which is not on graphopt's allowlist of loadable operators; "
                    "the file was not written by graphopt.save or was edited")


# Plain Python functions graphopt's own passes put into graphs (QAT's simulated BatchNorm fold), by qualified name;
# allow_function adds more. Only these exact names are imported and looked up on load.
_FUNCTIONS: set[str] = {
    "graphopt.quant.fold_bn.bn_factor", "graphopt.quant.fold_bn.scale_weight", "graphopt.quant.fold_bn.unscale_output",
}


def allow_function(fn: Callable) -> Callable:
    """Allow saved graphs to call the module-level function ``fn`` (usable as a decorator). The function is then
    found on load by importing its module and looking up its name: register it in code that runs before load."""
    qualname = f"{fn.__module__}.{fn.__qualname__}"
    if "<" in qualname or _function(qualname, fn.__module__) is not fn:
        raise SaveError(f"allow_function: {qualname} is not a module-level function that can be found by name")
    _FUNCTIONS.add(qualname)
    return fn


def _function(qualname: str, module_name: str | None = None) -> Any:
    import importlib

    module_name = module_name or qualname.rpartition(".")[0]
    try:
        found = getattr(importlib.import_module(module_name), qualname[len(module_name) + 1:], None)
    except ImportError as e:
        raise LoadError(f"the saved graph calls {qualname}, whose module cannot be imported: {e}") from e
    if not callable(found):
        raise LoadError(f"the saved graph calls {qualname}, which this graphopt does not define")
    return found


def _check_method(name: Any, error: type[GraphoptError]) -> None:
    if not (isinstance(name, str) and not name.startswith("_") and callable(getattr(torch.Tensor, name, None))):
        raise error(f"call_method '{name}' is not a public torch.Tensor method; graphopt saves only those")


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- arguments


def encode_arg(x: Any, where: str) -> Any:
    """A JSON value for a node argument (tags for node refs, tuples, dtypes, ...); SaveError for anything else."""
    if isinstance(x, fx.Node):
        return {"$node": x.name}
    if isinstance(x, float):
        return x if math.isfinite(x) else {"$float": repr(x)}
    if isinstance(x, _SIMPLE):
        return x
    if isinstance(x, list):
        return [encode_arg(v, where) for v in x]
    if isinstance(x, tuple):  # torch.Size included
        return {"$tuple": [encode_arg(v, where) for v in x]}
    if isinstance(x, dict):
        if not all(isinstance(k, str) for k in x):
            raise SaveError(f"{where}: a dict argument with non-string keys cannot be saved")
        return {"$dict": {k: encode_arg(v, where) for k, v in x.items()}}
    if isinstance(x, slice):
        return {"$slice": [encode_arg(v, where) for v in (x.start, x.stop, x.step)]}
    if x is Ellipsis:
        return {"$ellipsis": True}
    for tag, kind in _TORCH_ENUMS.items():
        if isinstance(x, kind):
            return {tag: str(x).removeprefix("torch.")}
    if isinstance(x, torch.device):
        return {"$device": str(x)}
    raise SaveError(f"{where}: argument of type {type(x).__name__} cannot be saved as data "
                    "(tensors must be attributes of the module, read with get_attr)")


_TORCH_ENUMS = {"$dtype": torch.dtype, "$layout": torch.layout, "$memory_format": torch.memory_format}


def decode_arg(x: Any, nodes: dict[str, fx.Node]) -> Any:
    """The argument value a JSON value stands for (inverse of encode_arg)."""
    if isinstance(x, list):
        return [decode_arg(v, nodes) for v in x]
    if not isinstance(x, dict):
        return x
    if len(x) != 1:
        raise LoadError(f"malformed argument in the saved graph: {str(x)[:80]}")
    (tag, v), = x.items()
    if tag == "$node":
        if v not in nodes:
            raise LoadError(f"the saved graph uses node '{v}' before defining it")
        return nodes[v]
    decoders: dict[str, Callable[[Any], Any]] = {
        "$float": float, "$tuple": lambda v: tuple(decode_arg(i, nodes) for i in v),
        "$dict": lambda v: {k: decode_arg(i, nodes) for k, i in v.items()},
        "$slice": lambda v: slice(*(decode_arg(i, nodes) for i in v)), "$ellipsis": lambda v: Ellipsis,
        "$device": torch.device,
        **{t: (lambda kind: lambda v: _torch_enum(v, kind))(kind) for t, kind in _TORCH_ENUMS.items()},
    }
    if tag not in decoders:
        raise LoadError(f"unknown argument tag '{tag}' in the saved graph")
    return decoders[tag](v)


def _torch_enum(name: str, kind: type) -> Any:
    value = getattr(torch, name, None) if isinstance(name, str) and not name.startswith("_") else None
    if not isinstance(value, kind):
        raise LoadError(f"the saved graph names an unknown {kind.__name__} '{name}'")
    return value


# ---------------------------------------------------------------------------------------------- graphs


def graph_to_json(gm: fx.GraphModule) -> dict:
    """The nodes of ``gm``'s graph and its input/output structure as JSON-ready data.

    The ``_guards_fn`` call of torch.export (a Python closure checking input shapes) is not saved: it holds code.
    """
    nodes = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == "_guards_fn":
            continue
        where = f"node '{node.name}'"
        nodes.append({"name": node.name, "op": node.op, "target": target_name(node),
                      "args": encode_arg(tuple(node.args), where), "kwargs": encode_arg(dict(node.kwargs), where)})
    return {"nodes": nodes, "codegen": _codegen_to_json(gm.graph)}


def _codegen_to_json(graph: fx.Graph) -> dict | None:
    info = getattr(graph._codegen, "pytree_info", None) if isinstance(graph._codegen, _PyTreeCodeGen) else None
    if info is None:
        return None
    try:
        specs = {k: pytree.treespec_dumps(s) if s is not None else None
                 for k, s in (("in_spec", info.in_spec), ("out_spec", info.out_spec))}
    except Exception as e:  # a custom container type without a serialized name
        raise SaveError(f"the model's input/output structure cannot be saved: {e}") from e
    return {"orig_args": list(info.orig_args), **specs}


def graph_from_json(data: dict) -> fx.Graph:
    """Rebuild an fx.Graph from ``graph_to_json`` data; every target is resolved through the allowlist."""
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for item in data["nodes"]:
        op, name = item["op"], item["name"]
        if op not in ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output"):
            raise LoadError(f"node '{name}' of the saved graph has unknown kind '{op}'")
        args, kwargs = decode_arg(item["args"], nodes), decode_arg(item["kwargs"], nodes)
        target = resolve_target(op, item["target"])
        if op == "output":
            graph.output(args[0])
            continue
        node = graph.create_node(op, target, tuple(args), dict(kwargs), name=name)
        nodes[name] = node
    codegen = data.get("codegen")
    if codegen is not None:
        specs = {k: pytree.treespec_loads(codegen[k]) if codegen[k] is not None else None
                 for k in ("in_spec", "out_spec")}
        graph._codegen = _PyTreeCodeGen(_PyTreeInfo(codegen["orig_args"], specs["in_spec"], specs["out_spec"]))
    return graph
