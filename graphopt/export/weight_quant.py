"""The weight-quantized export format: packed int4/int8 layers as onnxruntime integer ops (``export_onnx`` uses it
for any module holding ``graphopt::quant_linear`` nodes or ``QuantLinear`` submodules; graphopt/export/formats.py).

No ONNX exporter knows ``graphopt::quant_linear``, and the packed layout is the C kernel's, not onnxruntime's. So
``prepare`` returns a copy in which every such layer is a float linear on its dequantized weight (quant_linear
nodes become ``aten.linear`` on a new buffer; QuantLinear modules compute ``F.linear`` on one) and records each
layer's packed weight under the bytes of that dequantized weight. The float export and onnxsim then run as for any
model (both exporters), and ``rewrite`` finds every MatMul or Gemm whose weight, in either orientation and
possibly behind a Transpose, holds a recorded layer's values, and replaces it by the integer op built from the
codes, scales and zero points (weight_quant_onnx.py); the float weight leaves the file. Matching by values rather
than names survives the renaming, transposing and constant folding the exporters and onnxsim do. A layer that ran
but was not found, or whose float weight is still in the file, is an ExportError: never a silently float file.

Packed embedding tables (``graphopt::quant_embedding`` nodes, ``QuantEmbedding`` modules) go the same way as
com.microsoft ``GatherBlockQuantized`` (weight_quant_embedding.py): float lookups in the copy, each Gather on a
recorded table replaced; a table the installed onnxruntime cannot take stays a float Gather, with a warning.

onnxruntime is checked against the caller's module (which computes the quant op, int8 arithmetic included), not
the float copy, and judged by SQNR like the QDQ format.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.errors import GraphoptWarning, InputError
from graphopt.export.dequantized_copy import packed_of_node, replace_by_float_op, swap_to_dequantized
from graphopt.export.formats import ExportError, ExportFormat, register_format
from graphopt.export.weight_quant_embedding import (
    TablePlan, convert_table_modules, convert_tables_in_graph, holds_quantized_tables, rewrite_gathers, table_problems,
)
from graphopt.export.weight_quant_onnx import MS_DOMAIN, LayerOp, LayerTensors, choose_op, dequantized_numpy
from graphopt.graph.nodes import is_op, remove_unused_attrs
from graphopt.kernels.modules import QuantLinear
from graphopt.kernels.quant_format import QuantizedWeight, dequantize

__all__ = ["WEIGHT_QUANT", "holds_quantized_weights"]


def _is_quant_node(node: fx.Node) -> bool:
    return is_op(node, torch.ops.graphopt.quant_linear)


def holds_quantized_weights(module: nn.Module) -> bool:
    """True for a module with ``graphopt::quant_linear`` / ``graphopt::quant_embedding`` nodes (a GraphModule) or
    ``QuantLinear`` / ``QuantEmbedding`` submodules."""
    if isinstance(module, fx.GraphModule) and any(_is_quant_node(n) for n in module.graph.nodes):
        return True
    return any(isinstance(m, QuantLinear) for m in module.modules()) or holds_quantized_tables(module)


@dataclass
class _Layer:
    """One recorded layer: its packed weight, arithmetic, ONNX op and the float values the export holds."""

    name: str
    weight: QuantizedWeight
    act_group: int
    op: LayerOp
    values: np.ndarray  # the dequantized (N, K) float32 weight
    modules: list = field(default_factory=list)  # QuantLinear copies (None: a graph node, which always runs)

    def ran(self) -> bool:
        """Whether the export computes this layer: a live graph node, or a module the reference call ran."""
        return not self.modules or any(m.ran for m in self.modules)


def _key(values: np.ndarray) -> tuple:
    return values.shape, hashlib.blake2b(np.ascontiguousarray(values).tobytes(), digest_size=16).digest()


class _Plan:
    """The recorded layers of one prepared copy, keyed by their dequantized values."""

    def __init__(self):
        self.layers: dict[tuple, _Layer] = {}
        self.shapes: set[tuple] = set()  # (N, K) of every layer: a cheap test before hashing a candidate
        self.tables = TablePlan()  # the packed embedding tables (weight_quant_embedding.py)

    def add(self, name: str, qw: QuantizedWeight, act_group: int, values: np.ndarray, module=None) -> None:
        op = choose_op(name, qw, act_group)
        if qw.bits == 8 and op.op != "DynamicQuantizeMatMul" and op.accuracy_level == 0:
            warnings.warn(f"graphopt.export_onnx: layer {name!r} holds int8 weights with float compute (act_group=0); "
                          "onnxruntime has no such MatMulNBits kernel and dequantizes the whole weight on every call "
                          "(~18x slower than float). Quantize it with act_group>0 for int8 compute",
                          GraphoptWarning, stacklevel=5)
        key = _key(values)
        layer = self.layers.get(key)
        if layer is None:
            layer = self.layers[key] = _Layer(name, qw, act_group, op, values)
            self.shapes.add(values.shape)
        elif (layer.weight.bits, layer.act_group, layer.op) != (qw.bits, act_group, op):
            raise InputError(f"layers {layer.name!r} and {name!r} hold the same dequantized weight with different "
                             "quantization settings, which the exported file cannot tell apart; quantize them alike")
        if module is not None:
            layer.modules.append(module)

    def find(self, values: np.ndarray) -> _Layer | None:
        """The layer whose dequantized weight equals ``values`` (N, K), if any."""
        if values.shape not in self.shapes:
            return None
        layer = self.layers.get(_key(values))
        return layer if layer is not None and np.array_equal(layer.values, values) else None


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # prepared copy -> its _Plan


class _Dequantized(QuantLinear):
    """An export copy's QuantLinear: ``F.linear`` on its dequantized weight, which the exporters write as a MatMul
    or Gemm for ``rewrite`` to find. Subclasses (QuantPointwiseConv) get a class with this one after them, so their
    own forward still runs and reaches this one through ``super()``."""

    ran = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x Wᵀ + b with W the dequantized weight."""
        if not self.ran:  # set by the eager call before export; no attribute changes while tracing
            self.ran = True
        return F.linear(x, self.dequantized, self.bias)

    def extra_repr(self) -> str:
        """in/out features and the arithmetic the export copy stands for (its packed tensors are gone)."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, act_group={self.act_group}, dequantized for export")


def _convert_modules(root: nn.Module, plan: _Plan) -> None:
    for name, module in root.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        qw = module.quantized()
        weight = dequantize(qw)
        plan.add(name or type(module).__name__, qw, module.act_group, dequantized_numpy(weight), module)
        swap_to_dequantized(module, _Dequantized, weight)


def _convert_graph(gm: fx.GraphModule, plan: _Plan) -> None:
    graph = gm.graph
    for node in [n for n in graph.nodes if _is_quant_node(n)]:
        a, layer, qw = packed_of_node(gm, node, "weight", "in_features", "out_features")
        weight = dequantize(qw)
        if replace_by_float_op(gm, node, weight, torch.ops.aten.linear.default,
                               lambda w: (a["x"], w, a.get("bias"))):
            plan.add(layer, qw, a["act_group"], dequantized_numpy(weight))
    for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:  # the packed tensors' reads
        graph.erase_node(node)
    remove_unused_attrs(gm)
    gm.recompile()


def _prepare(module: nn.Module) -> nn.Module:
    """A copy computing float linears on the dequantized weights, its plan recorded for ``_rewrite``."""
    plan = _Plan()
    prepared = copy.deepcopy(module)
    if isinstance(prepared, fx.GraphModule):
        convert_tables_in_graph(prepared, plan.tables)  # before _convert_graph, which drops the packed get_attrs
        _convert_graph(prepared, plan)
    _convert_modules(prepared, plan)
    convert_table_modules(prepared, plan.tables)
    _PLANS[prepared] = plan
    return prepared


def _rewrite(proto, prepared: nn.Module) -> dict:
    """Replace every MatMul/Gemm on a recorded layer's float weight by the layer's integer op, and every Gather on a
    recorded table by GatherBlockQuantized (see the module docstring); returns ``{"quantized_matmuls": n,
    "quantized_gathers": m, "float_tables": (tables written float, ...)}``. ExportError when a layer that ran is
    missing, or a recorded float weight or table is still in the file (bar the tables kept float, warned)."""
    plan = _PLANS.get(prepared)
    if plan is None:
        return {}
    graph = proto.graph
    consts = _Constants(graph)
    built: dict[str, LayerTensors] = {}
    nodes, done = [], 0
    for node in graph.node:
        hit = _match(node, consts, plan)
        if hit is None:
            nodes.append(node)
            continue
        layer, a, bias, add = hit
        tensors = built.get(layer.name)
        if tensors is None:
            tensors = built[layer.name] = LayerTensors(layer.name, layer.weight, layer.op)
            graph.initializer.extend(tensors.initializers)
        out = node.output[0] if add is None else f"{node.output[0]}/before_bias"
        nodes.append(tensors.node(a, out, bias))
        if add is not None:  # a Gemm bias onnxruntime's bias input cannot take (not a constant of shape (N,))
            from onnx import helper
            nodes.append(helper.make_node("Add", [out, add], [node.output[0]], name=f"{layer.name}/bias"))
        done += 1
    del graph.node[:]
    graph.node.extend(nodes)
    names = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    gathers, tables, kept = rewrite_gathers(graph, consts, plan.tables, names)
    _drop_dead_constants(graph)
    _check_complete(plan, set(built), graph, tables, kept)
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.add(domain=MS_DOMAIN, version=1)
    from onnx import TensorProto

    if any(i.data_type == TensorProto.UINT4 for i in graph.initializer):
        proto.ir_version = max(proto.ir_version, 10)  # 4-bit tensor types need IR version 10
    return {"quantized_matmuls": done, "quantized_gathers": gathers, "float_tables": tuple(sorted(kept))}


class _Constants:
    """The file's constant tensors by value name: initializers and Constant nodes, and Transposes of either."""

    def __init__(self, graph):
        self.protos = {i.name: i for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.protos[node.output[0]] = node.attribute[0].t
        self.transposed = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Transpose"
                           and n.input[0] in self.protos and _ints(n, "perm") in (None, [1, 0])}

    def dims(self, name: str) -> list[int] | None:
        """Dims of constant ``name`` (None when it is not a constant)."""
        proto = self.protos.get(name)
        return list(proto.dims) if proto is not None else None

    def matrix(self, name: str, shapes: set[tuple]) -> np.ndarray | None:
        """Constant ``name`` as a 2-D float32 array, a Transpose of a constant resolved; None when it is none, or
        when neither it nor its transpose has one of ``shapes`` (nothing read before that cheap test)."""
        from onnx import TensorProto, numpy_helper

        flip = name in self.transposed
        proto = self.protos.get(self.transposed.get(name, name))
        if proto is None or len(proto.dims) != 2 or proto.data_type != TensorProto.FLOAT:
            return None
        dims = tuple(proto.dims)
        if dims not in shapes and dims[::-1] not in shapes:
            return None
        values = numpy_helper.to_array(proto)
        return values.T if flip else values


def _ints(node, name: str):
    return next((list(a.ints) for a in node.attribute if a.name == name), None)


def _attr(node, name: str, default):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _match(node, consts: _Constants, plan: _Plan):
    """(layer, activation input, bias input or None, bias to Add after or None) when ``node`` multiplies by a
    recorded weight: MatMul(x, Wᵀ), or Gemm(x, W or Wᵀ, c) with alpha = beta = 1 and no transposed x."""
    if node.op_type == "MatMul" and len(node.input) == 2:
        b = consts.matrix(node.input[1], plan.shapes)
        layer = None if b is None else plan.find(np.ascontiguousarray(b.T))
        return None if layer is None else (layer, node.input[0], None, None)
    if node.op_type != "Gemm" or _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0:
        return None
    b = consts.matrix(node.input[1], plan.shapes)
    if b is None:
        return None
    layer = plan.find(np.ascontiguousarray(b if _attr(node, "transB", 0) else b.T))
    if layer is None:
        return None
    c = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if c is None:
        return layer, node.input[0], None, None
    if _attr(node, "beta", 1.0) != 1.0:
        return None
    if consts.dims(c) == [layer.weight.out_features]:
        return layer, node.input[0], c, None
    return layer, node.input[0], None, c


def _drop_dead_constants(graph) -> None:
    """Remove the Transpose/Constant nodes and initializers nothing reads any more (the replaced float weights)."""
    inits = {i.name for i in graph.initializer}
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not set(n.output) & used
                and (n.op_type == "Constant" or (n.op_type == "Transpose" and n.input[0] in inits))]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    produced = used | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    for info in [v for v in graph.value_info if v.name not in produced]:
        graph.value_info.remove(info)


def _check_complete(plan: _Plan, written: set[str], graph, tables: set[str], kept: dict[str, str]) -> None:
    """ExportError for a layer that ran but was not written as an integer op, or whose float weight stayed, and for
    a float table still in the file; ``kept``: tables kept float on purpose (extended by folded lookups)."""
    left = {}
    consts = _Constants(graph)
    left.update(table_problems(plan.tables, tables, kept, graph, consts))
    for name in consts.protos:
        m = consts.matrix(name, plan.shapes)
        for values in () if m is None else (m, m.T):
            layer = plan.find(np.ascontiguousarray(values))
            if layer is not None:
                readers = sorted({n.op_type for n in graph.node if name in n.input})
                left[layer.name] = f"its float weight is still read by {', '.join(readers) or 'nothing'}"
    for layer in plan.layers.values():
        if layer.ran() and layer.name not in written:
            left.setdefault(layer.name, "no MatMul/Gemm on its weight was found")
    if left:
        what = "; ".join(f"{name}: {why}" for name, why in sorted(left.items()))
        raise ExportError(
            f"export_onnx could not write {len(left)} weight-quantized layer(s) as onnxruntime integer ops ({what}). "
            "The exported graph does not multiply by their weights the way a linear does (or look rows up in a "
            "table with a Gather); retry with simplify=False, or exporter='legacy', or keep the layer as a float "
            "nn.Linear (nn.Embedding)")


WEIGHT_QUANT = register_format(ExportFormat(
    "weight-quant", applies=holds_quantized_weights, prepare=_prepare, rewrite=_rewrite, check="sqnr",
    verify_against="original"))  # MatMulNBits / DynamicQuantizeMatMul, checked against the caller's quant ops
