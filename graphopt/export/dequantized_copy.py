"""Turning a packed module of an export copy (QuantLinear, QuantEmbedding and their subclasses) into one that
computes on its dequantized tensor, which the ONNX exporters can write as a float op for the weight-quant format
to find and replace."""

from __future__ import annotations

import re

import torch
import torch.nn as nn

__all__ = ["packed_of_node", "replace_by_float_op", "swap_to_dequantized"]

_CLASSES: dict[tuple[type, type], type] = {}


def _dequantized_class(cls: type, export_base: type) -> type:
    """``export_base`` itself for its packed parent class; for a subclass (QuantPointwiseConv), a class with
    ``export_base`` after it, so the subclass's own forward still runs and reaches it through ``super()``."""
    if export_base.__mro__[1] is cls:
        return export_base
    key = (cls, export_base)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"Dequantized{cls.__name__}", (cls, export_base),
                             {"__doc__": f"{cls.__name__} computing on its dequantized tensor (export)"})
    return _CLASSES[key]


def swap_to_dequantized(module: nn.Module, export_base: type, value: torch.Tensor) -> None:
    """In place: ``module``'s class becomes its export form, its packed buffers go (the caller's plan holds them)
    and ``value`` (the dequantized weight or table) becomes its buffer ``dequantized``."""
    module.__class__ = _dequantized_class(type(module), export_base)
    for packed in ("qweight", "scales", "zeros"):
        module._buffers.pop(packed, None)
    module.register_buffer("dequantized", value)


def packed_of_node(gm, node, what: str, in_key: str, out_key: str):
    """(the op's arguments by name, the layer name, its QuantizedWeight) of a quant_linear / quant_embedding node.
    ``what`` names the packed tensor in the error ("weight", "table"); ``in_key``/``out_key`` are the schema's
    argument names of its in/out sizes. InputError when the packed tensors are computed in the graph."""
    from graphopt.errors import InputError
    from graphopt.graph.nodes import attr_value
    from graphopt.kernels.quant_format import QuantizedWeight

    names = [a.name for a in node.target._schema.arguments]
    args = {**dict(zip(names, node.args)), **node.kwargs}
    target = getattr(args["qweight"], "target", None)
    layer = re.sub(r"[._](quant_)?qweight$", "", target) if isinstance(target, str) else node.name
    try:
        packed = [attr_value(gm, args[k]) for k in ("qweight", "scales", "zeros")]
    except TypeError as e:
        raise InputError(f"node {node.name!r} ({'layer' if what == 'weight' else what} {layer!r}): "
                         f"{node.target.name().split('.')[0]} reads a packed {what} computed in the graph; export needs it stored "
                         "as a buffer (a get_attr)") from e
    return args, layer, QuantizedWeight(args["bits"], args["group_size"], args[in_key], args[out_key], *packed)


def replace_by_float_op(gm, node, value: torch.Tensor, op, make_args) -> bool:
    """Register ``value`` as a buffer next to the node's packed weight and put ``op(*make_args(read_of_value))`` in
    the node's place; whether the node was live (a dead node computes nothing the file needs)."""
    from graphopt.graph.nodes import free_attr_name, owner_and_leaf, replace_with

    target = getattr(node.args[1], "target", None)
    name = free_attr_name(gm, f"{target}_dequantized" if target else f"{node.name}_dequantized")
    owner, leaf = owner_and_leaf(gm, name)
    owner.register_buffer(leaf, value)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(op, make_args(gm.graph.get_attr(name)))
    new.meta = dict(node.meta)
    live = bool(node.users)
    replace_with(node, new)
    return live
