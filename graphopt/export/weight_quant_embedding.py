"""Packed int4/int8 embedding tables (``graphopt::quant_embedding`` nodes, ``QuantEmbedding`` modules) as
onnxruntime's com.microsoft ``GatherBlockQuantized``: the table half of the weight-quant format (weight_quant.py).

As for linears, the prepared copy looks rows up in a float table holding the dequantized values (quant_embedding
nodes become ``aten.embedding`` on a new buffer; QuantEmbedding modules call ``F.embedding`` on one), each table
recorded under the bytes of those values; the exporters write a Gather on that initializer, and ``rewrite_gathers``
replaces every Gather (axis 0) on a recorded table by GatherBlockQuantized on the codes, scales and zero points.
The float table leaves the file. A lookup is exact: onnxruntime computes (q - z) * s in float32, as
graphopt::quant_embedding does, so the rows agree bit for bit.

GatherBlockQuantized facts this relies on (onnxruntime's contrib_ops/cpu/quantization/gather_block_quantized.cc,
checked on onnxruntime 1.32): ``block_size`` a power of two >= 16 along ``quantize_axis``; scales of data's rank
with ceil(K / block_size) blocks on that axis; output float32 when the scales are. Two data layouts:

* ``uint8`` data with a ``bits`` attribute (4 or 8; the MatMulNBits convention, and the only one onnxruntime's
  CUDA kernel takes): gather_axis 0, quantize_axis last; (N, K) codes for 8 bits, (N, K / 2) for 4 bits, two
  codes a byte, low nibble first (the output's last dim is twice the stored one, so K must be even); zero points
  uint8 (N, blocks) for 8 bits, (N, ceil(blocks / 2)) two a byte for 4 bits; omitted zero points mean
  2^(bits-1), which is graphopt's symmetric zero.
* ``uint4`` data (TensorProto.UINT4, logical shape (N, K), two codes a byte over the flat tensor): used for 4-bit
  tables of odd K, which uint8 data cannot hold; zero points uint4 (N, blocks), always written (omitted means 0).

Blocks lie inside one group (the largest power of two dividing it, its scale repeated per block; one block per row
for a per-channel table). Whether the installed onnxruntime takes a layout (older ones lack bits=8, say) is
checked once per layout on a small table against s · (q - z); a table it cannot take stays a float Gather, with
a GraphoptWarning naming it and why, and is listed in ``ExportReport.float_tables``, never a silently wrong file.
So is a table looked up at constant indices only (a position or token-type table of a fixed-length export), whose
lookup the exporter folds into a float constant of the rows it reads: correct, but nothing is left to pack. Any
other float table still in the file is an ExportError.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.errors import GraphoptWarning
from graphopt.export.dequantized_copy import packed_of_node, replace_by_float_op, swap_to_dequantized
from graphopt.graph.nodes import is_op
from graphopt.kernels.quant_embedding import QuantEmbedding
from graphopt.kernels.quant_format import QuantizedWeight, dequantize, unpack_codes

__all__ = ["GATHER", "TablePlan", "convert_table_modules", "convert_tables_in_graph", "holds_quantized_tables",
           "rewrite_gathers", "table_problems"]

GATHER = "GatherBlockQuantized"
MS_DOMAIN = "com.microsoft"


def is_table_node(node: fx.Node) -> bool:
    return is_op(node, torch.ops.graphopt.quant_embedding)


def holds_quantized_tables(module: nn.Module) -> bool:
    """True for a module with ``graphopt::quant_embedding`` nodes (a GraphModule) or ``QuantEmbedding`` submodules."""
    if isinstance(module, fx.GraphModule) and any(is_table_node(n) for n in module.graph.nodes):
        return True
    return any(isinstance(m, QuantEmbedding) for m in module.modules())


@dataclass
class _Table:
    """One recorded table: its packed codes and the float values (num_embeddings, embedding_dim) the export holds."""

    name: str
    weight: QuantizedWeight  # rows = embeddings (out_features), embedding_dim = in_features
    values: np.ndarray
    modules: list = field(default_factory=list)  # QuantEmbedding copies (none: a graph node, which always runs)

    def ran(self) -> bool:
        return not self.modules or any(m.ran for m in self.modules)


class TablePlan:
    """The recorded tables of one prepared copy, keyed by their dequantized values (same values: one table)."""

    def __init__(self):
        self.tables: dict[tuple, _Table] = {}
        self.shapes: set[tuple] = set()

    def add(self, name: str, qw: QuantizedWeight, values: np.ndarray, module=None) -> None:
        key = _key(values)
        table = self.tables.get(key)
        if table is None:  # a second table of equal values: either's codes give the same rows, exactly
            table = self.tables[key] = _Table(name, qw, values)
            self.shapes.add(values.shape)
        if module is not None:
            table.modules.append(module)

    def find(self, values: np.ndarray) -> _Table | None:
        if values.shape not in self.shapes:
            return None
        table = self.tables.get(_key(values))
        return table if table is not None and np.array_equal(table.values, values) else None


def _key(values: np.ndarray) -> tuple:
    return values.shape, hashlib.blake2b(np.ascontiguousarray(values).tobytes(), digest_size=16).digest()


def _float32(w: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(w.detach().to(torch.float32).cpu().numpy())


# ---- the prepared copy ----------------------------------------------------------------------------------------

class _DequantizedEmbedding(QuantEmbedding):
    """An export copy's QuantEmbedding: ``F.embedding`` on its dequantized table, which the exporters write as a
    Gather for ``rewrite_gathers`` to find."""

    ran = False

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """The rows ``indices`` of the dequantized table."""
        if not self.ran:  # set by the eager call before export; no attribute changes while tracing
            self.ran = True
        return F.embedding(indices, self.dequantized)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}, "
                "dequantized for export")


def convert_table_modules(root: nn.Module, plan: TablePlan) -> None:
    """Every QuantEmbedding of ``root`` (a prepared copy) looks rows up in its dequantized table, recorded."""
    for name, module in root.named_modules():
        if not isinstance(module, QuantEmbedding):
            continue
        qw = module.quantized()
        table = dequantize(qw)
        plan.add(name or type(module).__name__, qw, _float32(table), module)
        swap_to_dequantized(module, _DequantizedEmbedding, table)


def convert_tables_in_graph(gm: fx.GraphModule, plan: TablePlan) -> None:
    """Every live graphopt::quant_embedding node of ``gm`` becomes aten.embedding on a dequantized buffer, recorded.
    The packed tensors' get_attr nodes are left for the caller's clean-up (weight_quant._convert_graph)."""
    graph = gm.graph
    for node in [n for n in graph.nodes if is_table_node(n)]:
        a, layer, qw = packed_of_node(gm, node, "table", "embedding_dim", "num_embeddings")
        table = dequantize(qw)
        if replace_by_float_op(gm, node, table, torch.ops.aten.embedding.default, lambda t: (t, a["indices"])):
            plan.add(layer, qw, _float32(table))


# ---- the ONNX side --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    """How one table is written: ``data`` "uint8" (with ``bits``) or "uint4", blocks of ``block``, zero points."""

    data: str
    bits: int
    block: int
    zero_points: bool

    def __str__(self) -> str:
        zp = "with zero points" if self.zero_points else "symmetric"
        return f"{self.data} data, bits={self.bits}, block_size={self.block}, {zp}"


def _layout(qw: QuantizedWeight) -> _Layout:
    k = qw.in_features
    if qw.groups == 1:  # one scale a row: a single block of the next power of two covers it
        block = max(16, 1 << (k - 1).bit_length())
    else:
        block = qw.group_size & -qw.group_size  # the largest power of two dividing the group (>= 32)
    if qw.bits == 4 and k % 2:
        return _Layout("uint4", 4, block, True)
    return _Layout("uint8", qw.bits, block, not qw.symmetric)


def _tensors(name: str, layout: _Layout, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
             group: int) -> list:
    """data, scales and (when the layout has them) zero_points initializers for codes (N, K), per-group scales
    and zeros (N, G) in groups of ``group``."""
    from onnx import TensorProto, helper, numpy_helper

    n, k = codes.shape
    block = layout.block
    blocks = -(-k // block)
    per_group = max(group // block, 1)
    block_scales = np.repeat(scales, per_group, axis=1)[:, :blocks].astype(np.float32)
    block_zeros = np.repeat(zeros, per_group, axis=1)[:, :blocks].astype(np.uint8)
    out = []
    if layout.data == "uint4":
        def uint4(tensor_name, values):
            flat = values.reshape(-1)
            padded = np.zeros(-(-flat.size // 2) * 2, np.uint8)
            padded[:flat.size] = flat
            raw = (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8).tobytes()
            return helper.make_tensor(tensor_name, TensorProto.UINT4, values.shape, raw, raw=True)

        out.append(uint4(f"{name}.data", codes))
        out.append(numpy_helper.from_array(block_scales, f"{name}.scales"))
        out.append(uint4(f"{name}.zero_points", block_zeros))
        return out
    if layout.bits == 8:
        data = codes
    else:
        data = codes[:, 0::2] | (codes[:, 1::2] << 4)
    out.append(numpy_helper.from_array(np.ascontiguousarray(data.astype(np.uint8)), f"{name}.data"))
    out.append(numpy_helper.from_array(block_scales, f"{name}.scales"))
    if layout.zero_points:
        if layout.bits == 4:
            padded = np.zeros((n, -(-blocks // 2) * 2), np.uint8)
            padded[:, :blocks] = block_zeros
            block_zeros = padded[:, 0::2] | (padded[:, 1::2] << 4)
        out.append(numpy_helper.from_array(np.ascontiguousarray(block_zeros), f"{name}.zero_points"))
    return out


def _node(name: str, layout: _Layout, tensors: list, indices: str, out: str):
    from onnx import helper

    attrs = dict(gather_axis=0, quantize_axis=1, block_size=layout.block)
    if layout.data == "uint8":
        attrs["bits"] = layout.bits
    return helper.make_node(GATHER, [tensors[0].name, indices, *(t.name for t in tensors[1:])], [out],
                            name=f"{name}/{GATHER}", domain=MS_DOMAIN, **attrs)


_SUPPORT: dict[_Layout, str | None] = {}  # layout -> why the installed onnxruntime cannot take it (None: it can)


def unsupported(layout: _Layout) -> str | None:
    """Why onnxruntime cannot look rows up in ``layout`` (None when it can): checked once per layout on a small
    table against s · (q - z); without onnxruntime installed the documented contract is trusted."""
    if layout not in _SUPPORT:
        _SUPPORT[layout] = _probe(layout)
    return _SUPPORT[layout]


def _probe(layout: _Layout) -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    from onnx import TensorProto, helper

    n, k = 5, layout.block + (1 if layout.data == "uint4" else 2)  # two blocks, the last one ragged
    blocks = 2
    top = 2 ** layout.bits
    codes = (np.arange(n * k).reshape(n, k) * 7 % top).astype(np.uint8)
    scales = (0.25 + np.arange(n * blocks).reshape(n, blocks) / 8).astype(np.float32)
    zeros = ((np.arange(n * blocks).reshape(n, blocks) * 5 + 1) % top).astype(np.uint8) if layout.zero_points \
        else np.full((n, blocks), top // 2, np.uint8)
    tensors = _tensors("t", layout, codes, scales, zeros, layout.block)
    node = _node("t", layout, tensors, "ids", "rows")
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                              [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [3, k])], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 10
    ids = np.array([4, 0, 2], np.int64)
    s = np.repeat(scales, layout.block, axis=1)[:, :k]
    z = np.repeat(zeros, layout.block, axis=1)[:, :k].astype(np.float32)
    want = (s * (codes.astype(np.float32) - z))[ids]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        got = session.run(None, {"ids": ids})[0]
    except Exception as e:  # onnxruntime's own Fail/NotImplemented types
        return f"onnxruntime {ort.__version__} refuses {GATHER} with {layout}: {str(e).splitlines()[0][:200]}"
    if got.shape != want.shape or not np.array_equal(got, want):
        return f"onnxruntime {ort.__version__} computes other rows than s * (q - z) for {layout}"
    return None


def rewrite_gathers(graph, consts, plan: TablePlan, names: set[str]) -> tuple[int, set[str], dict[str, str]]:
    """Replace every Gather (axis 0) on a recorded table by GatherBlockQuantized, in place (``consts``: the file's
    constants, weight_quant._Constants; ``names``: value names in use, extended). Returns (gathers written, tables
    written, {table kept float: why}); warns once for each table kept float."""
    if not plan.tables:
        return 0, set(), {}
    built: dict[str, list] = {}
    kept: dict[str, str] = {}
    nodes, done = [], 0
    for node in graph.node:
        table = _match(node, consts, plan)
        if table is None:
            nodes.append(node)
            continue
        layout = _layout(table.weight)
        why = kept.get(table.name) or unsupported(layout)
        if why is not None:
            if table.name not in kept:
                kept[table.name] = why
                warnings.warn(f"graphopt.export_onnx: embedding table {table.name!r} stays a float Gather in the file "
                              f"({why}); upgrade onnxruntime to store it packed", GraphoptWarning, stacklevel=4)
            nodes.append(node)
            continue
        tensors = built.get(table.name)
        if tensors is None:
            codes, scales, zeros = (t.numpy() for t in unpack_codes(table.weight))
            prefix = _free(table.name, names)
            tensors = built[table.name] = _tensors(prefix, layout, codes, scales, zeros, table.weight.group_size)
            names.update(t.name for t in tensors)
            graph.initializer.extend(tensors)
        nodes.append(_node(table.name, layout, tensors, node.input[1], node.output[0]))
        done += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return done, set(built), kept


def _free(name: str, names: set[str]) -> str:
    prefix, i = name, 1
    while any(f"{prefix}.{part}" in names for part in ("data", "scales", "zero_points")):
        prefix, i = f"{name}_{i}", i + 1
    return prefix


def _match(node, consts, plan: TablePlan) -> _Table | None:
    if node.op_type != "Gather" or len(node.input) != 2:
        return None
    if next((a.i for a in node.attribute if a.name == "axis"), 0) != 0 or node.input[0] in consts.transposed:
        return None
    values = consts.matrix(node.input[0], plan.shapes)
    return None if values is None else plan.find(np.ascontiguousarray(values))


def table_problems(plan: TablePlan, written: set[str], kept: dict[str, str], graph, consts) -> dict[str, str]:
    """{table: why} for a table whose float values are still in the (rewritten) file, other than one ``kept`` float
    on purpose. A table that ran but has neither a lookup nor its values in the file was looked up at constant
    indices, which the exporter folded into a float constant of the rows read (a position or token-type table):
    correct, only not packed; it is added to ``kept`` with a GraphoptWarning."""
    left = {}
    for name in consts.protos:
        values = consts.matrix(name, plan.shapes)
        table = None if values is None else plan.find(np.ascontiguousarray(values))
        if table is not None and table.name not in kept:
            readers = sorted({n.op_type for n in graph.node if name in n.input})
            left[table.name] = f"its float table is still read by {', '.join(readers) or 'nothing'}"
    for table in plan.tables.values():
        if table.ran() and table.name not in written and table.name not in kept and table.name not in left:
            kept[table.name] = "looked up at constant indices: the exporter folded the lookup into float rows"
            warnings.warn(f"graphopt.export_onnx: embedding table {table.name!r} is looked up at constant indices; the "
                          "exporter folded the lookup into a float constant holding the rows it reads, so the file "
                          "holds those rows rather than the packed table", GraphoptWarning, stacklevel=5)
    return left
