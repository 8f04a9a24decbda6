"""Put FakeQuantize modules into the graph where the placement plan says, as ``call_module`` nodes.

Weights get one quantizer per layer (int8 symmetric, per output channel by default); each activation tensor gets
one quantizer shared by all its quantized readers. Quantizer modules live under ``gm.quant`` with names derived
from the layer (``quant.layer1_0_conv1__weight``), so reports and the sensitivity ranking read naturally.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.errors import InputError
from graphopt.quant.placement import Placement, Site
from graphopt.quant.quantizer import FakeQuantize, QuantSpec

SUPPORTED_DTYPES = (torch.float32,)


@dataclass(frozen=True)
class Scheme:
    """The quantization scheme of a run: one spec for weights, one for activations."""

    weight: QuantSpec
    activation: QuantSpec
    per_channel: bool = True


def check_dtypes(placement: Placement) -> None:
    """Raise InputError naming the first layer whose input or weight is not float32 (nothing changed yet)."""
    for site in placement.sites:
        for node in [*site.activations, *([site.weight] if site.weight is not None else [])]:
            dtype = getattr(node.meta.get("tensor_meta"), "dtype", None)
            if dtype is not None and dtype not in SUPPORTED_DTYPES:
                raise InputError(
                    f"fake-quant supports float32 models, but layer `{site.layer}` reads `{node.name}` of dtype "
                    f"{str(dtype).removeprefix('torch.')}; convert the model with model.float() before optimizing "
                    "(keep regions in bf16/fp16 with the pass's float_dtype option instead)"
                )


def _module_name(text: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", text)


def _add_quantizer(gm: fx.GraphModule, name: str, module: FakeQuantize) -> str:
    if not hasattr(gm, "quant"):
        gm.add_module("quant", nn.Module())
    base, k = _module_name(name), 0
    leaf = base
    while hasattr(gm.quant, leaf):
        k += 1
        leaf = f"{base}_{k}"
    gm.quant.add_module(leaf, module)
    return f"quant.{leaf}"


def insert_quantizers(gm: fx.GraphModule, placement: Placement, scheme: Scheme) -> dict[str, list[str]]:
    """Insert every quantizer of the plan; returns {layer: [its quantizer module names]}."""
    act_nodes: dict[fx.Node, fx.Node] = {}  # float tensor -> its quantized copy
    owners: dict[str, list[str]] = {}
    for site in placement.sites:
        names = owners.setdefault(site.layer, [])
        if site.weight is not None:
            names.append(_quantize_weight(gm, site, scheme))
        for act in site.activations:
            if act not in act_nodes:
                act_nodes[act] = _quantize_activation(gm, act, site, scheme)
            site.node.replace_input_with(act, act_nodes[act])
            names.append(act_nodes[act].target)
    for site in placement.sites:
        target = _output_to_quantize(gm, site.node) if site.rule.output else None
        if target is not None:
            q = _quantize_activation(gm, target, site, scheme)
            target.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
            owners[site.layer].append(q.target)
    return owners


# ops a quantizer may sit after: ReLUs fold into onnxruntime's Q, eval BatchNorm (QAT keeps it) folds into the conv
_RELU_LIKE = (torch.ops.aten.relu, torch.ops.aten.relu_, torch.ops.aten.hardtanh, torch.ops.aten.hardtanh_,
              torch.ops.aten.batch_norm)


def _output_to_quantize(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """Where a layer's result should be quantized: the end of its single-user chain of ReLUs and BatchNorms;
    None when that chain already reaches a quantizer or a model output."""
    from graphopt.graph.nodes import is_op

    current = node
    while True:
        users = list(current.users)
        if any(u.op == "output" for u in users):
            return None
        if any(u.op == "call_module" and isinstance(gm.get_submodule(u.target), FakeQuantize) for u in users):
            return None
        if len(users) == 1 and is_op(users[0], *_RELU_LIKE):
            current = users[0]
            continue
        return current


def _quantize_weight(gm: fx.GraphModule, site: Site, scheme: Scheme) -> str:
    axis = site.rule.weight_axis if scheme.per_channel else None
    spec = dataclasses.replace(scheme.weight, axis=axis)
    target = _add_quantizer(gm, f"{site.layer}__weight", FakeQuantize(spec, "weight", site.layer))
    with gm.graph.inserting_before(site.node):
        q = gm.graph.call_module(target, (site.weight,))
    q.meta = {k: v for k, v in site.weight.meta.items() if k in ("tensor_meta", "val")}
    site.node.replace_input_with(site.weight, q)
    return target


def _quantize_activation(gm: fx.GraphModule, act: fx.Node, site: Site, scheme: Scheme) -> fx.Node:
    target = _add_quantizer(gm, f"{act.name}__act", FakeQuantize(scheme.activation, "activation", site.layer))
    where = act
    if act.op == "placeholder":  # keep placeholders first: the graph's input-flattening code expects it
        where = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(where):
        q = gm.graph.call_module(target, (act,))
    q.meta = {k: v for k, v in act.meta.items() if k in ("tensor_meta", "val")}
    return q
