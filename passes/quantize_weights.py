"""``quantize-weights`` and ``dynamic-quant``: int4/int8 weights run by graphopt's own CPU kernels.

``quantize-weights`` (weight-only, the form language models run in on CPUs): the weight of every Linear (and, as
options, 1x1 convs and the output layers such as an LM head) becomes unsigned int4/int8 codes with a float scale
per output row and group of ``group_size`` inputs (``group_size=none``: per output channel), symmetric (zero point
2^(bits-1)) or with zero points. ``method=rtn`` rounds to the nearest grid point; ``method=gptq`` needs
``calib_data`` and runs GPTQ layer by layer on the sequential engine (graphopt/calibration/gptq.py), each layer on
the inputs the already-quantized layers before it produce; ``act_order`` visits inputs by decreasing Hessian
diagonal. The result already runs ``graphopt::quant_linear`` (kernels/quant_ops.py): with ``compute=int8`` (the
default, as onnxruntime's MatMulNBits at accuracy level 4) activations are quantized to int8 per block at run time
and the products are integer; ``compute=float`` multiplies in float with the dequantized weight.

``dynamic-quant``: int8 weights per output channel and int8 activations per token (one scale per input row), the
form onnxruntime's ``quantize_dynamic`` produces; the same kernel with one activation block per row.

Lowering rule (as lower-sparse): a layer whose kernel is predicted slower than dense ``F.linear`` for the rows it
sees on the example inputs (kernels/quant_cost.py; tiny layers, where the call overhead dominates) keeps a float
weight holding exactly the dequantized values, so the model's numbers are the same either way; ``min_speedup=0``
lowers every layer. Layers whose weight is also read elsewhere (a tied embedding / LM head) stay float.
``embeddings=true`` also packs embedding tables (round-to-nearest; ``graphopt::quant_embedding`` dequantizes the
rows a lookup reads), for memory rather than speed.
A sparsified weight (the sparsify pass's masks) keeps its zeros: they are the zero point, exactly 0.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

import graphopt.kernels  # noqa: F401  (registers torch.ops.graphopt.quant_linear)
from graphopt.analysis.sparsity import weight_masks
from graphopt.calibration.quantize_weights import METHODS, QuantTarget, quantize_layers
from graphopt.errors import GraphoptWarning, PipelineError
from graphopt.graph.inputs import check_batches
from graphopt.graph.layers import is_shared, output_layers
from graphopt.graph.nodes import (
    free_attr_name, is_op, owner_and_leaf, remove_dead_nodes, remove_unused_attrs, resolve,
)
from graphopt.graph.patterns import first_match, matches_any, unmatched
from graphopt.kernels.quant_cost import predict
from graphopt.kernels.quant_format import BITS, act_group_for, pack_quantized
from graphopt.pipeline.pass_base import Context, Pass, PassResult
from graphopt.pipeline.registry import register_pass
from graphopt.passes.lower_sparse import bake_parametrizations, is_pointwise_conv, rows_per_call
from graphopt.passes.sparsify import find_layers, weight_slot

aten = torch.ops.aten


def _group(value) -> int | None:
    """``group_size`` as given (int, or none/channel/0/-1 for per-channel) -> int or None."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "channel")) or value in (0, -1):
        return None
    return value


def _check_grid(bits, group_size, where: str) -> None:
    if bits not in BITS:
        raise PipelineError(f"{where}: bits must be 4 or 8 (int4 / int8 weights), got {bits!r}")
    g = _group(group_size)
    if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g <= 0 or g % 32):
        raise PipelineError(f"{where}: group_size must be a positive multiple of 32 (32, 64, 128, ...) or none for "
                            f"one group per output channel, got {group_size!r}")


@register_pass
@dataclass(frozen=True)
class QuantizeWeights(Pass):
    """Quantize Linear weights to int4/int8 (RTN or GPTQ) and run them with graphopt's weight-only kernels."""

    name: ClassVar[str] = "quantize-weights"
    after: ClassVar[tuple[str, ...]] = ("prune-channels", "sparsify", "low-rank")
    before: ClassVar[tuple[str, ...]] = ("lower-sparse", "fake-quant")

    bits: int = 4
    group_size: int | str | None = 128  # inputs per scale; none = per output channel
    symmetric: bool = True
    method: str = "rtn"  # rtn | gptq (needs calib_data)
    act_order: bool = False  # gptq: visit inputs by decreasing Hessian diagonal
    damp: float = 0.01  # gptq: Hessian damping, as a share of its mean diagonal
    block_size: int = 128  # gptq: columns per lazy update
    compute: str = "int8"  # int8: activations quantized per block at run time; float: dequantized weight
    layers: tuple = ()  # name patterns of the layers to quantize (default: all)
    ignore: tuple = ()  # name patterns left in float
    bits_for: tuple = ()  # ((name pattern, bits), ...): per-layer bits, first match wins
    group_size_for: tuple = ()  # ((name pattern, group size), ...)
    output_layers: bool = False  # also the layers producing the outputs (an LM head, a classifier)
    convs: bool = False  # also 1x1 convs (stride 1, no padding, one group)
    embeddings: bool = False  # also embedding tables (memory: a lookup dequantizes the rows it reads)
    min_speedup: float = 1.0  # lower a layer to the kernel only when predicted this much faster than dense
    keep_float: int = 0  # keep the k layers whose own quantization hurts the outputs most in float
    sensitivity_batches: int = 4
    threads: int = 1
    act_group: int | None = None  # activation block (None: from the group; internal to dynamic-quant)

    def __post_init__(self):
        where = self.name
        _check_grid(self.bits, self.group_size, where)
        for option in ("bits_for", "group_size_for"):
            if not all(isinstance(e, (tuple, list)) and len(e) == 2 for e in getattr(self, option)):
                raise PipelineError(f"{where}: {option} takes (name pattern, value) pairs, e.g. "
                                    f"{option}=(('lm_head', 8),)")
        if self.method not in METHODS:
            raise PipelineError(f"{where}: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.compute not in ("int8", "float"):
            raise PipelineError(f"{where}: compute must be 'int8' (integer kernels) or 'float', got {self.compute!r}")
        if self.act_order and self.method != "gptq":
            raise PipelineError(f"{where}: act_order applies to method=gptq only")

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        unknown = unmatched(self.layers + self.ignore + tuple(p for p, _ in self.bits_for + self.group_size_for),
                            [n for n, _ in gm.named_modules()] + [n for n, _ in gm.named_parameters()])
        if unknown:
            raise PipelineError(f"{self.name}: name pattern(s) {unknown} match no layer of the model")
        batches = []
        if self.method == "gptq":
            batches = check_batches(ctx.calib_data, ctx.inputs, needed_by=f"{self.name} method=gptq",
                                    pipeline=f"{self.name}:method=gptq")
        targets, skipped = self._targets(gm)
        ranking = self._keep_most_sensitive(gm, ctx, batches, targets, skipped)
        tables = self._embedding_targets(gm, skipped) if self.embeddings else {}
        if not targets and not tables:
            reasons = sorted({why for why in skipped.values()})
            warnings.warn(f"{self.name}: no layer was quantized ({len(skipped)} weighted layers, all left in float: "
                          f"{'; '.join(reasons) or 'the model has no Linear layers'}); see the options layers=, "
                          "output_layers=true, convs=true", GraphoptWarning, stacklevel=2)
        table_codes, _ = quantize_layers(gm, tables, "rtn")  # first: GPTQ then calibrates on the quantized tables
        codes, notes = quantize_layers(gm, targets, self.method, batches, act_order=self.act_order, damp=self.damp,
                                       block_size=self.block_size)
        baked = bake_parametrizations(gm)
        decisions, stats = self._lower(gm, targets, codes, notes)
        for node, target in tables.items():
            layer = target.name.rpartition(".")[0] or target.name
            q = table_codes[target.name]
            packed = pack_quantized(q.codes, q.scales, None if target.symmetric else q.zeros, target.bits,
                                    target.group_size, layer=layer)
            _replace_embedding(gm, node, layer, packed)
            stats["weight_bytes_before"] += 4 * packed.in_features * packed.out_features
            stats["weight_bytes_after"] += packed.nbytes()
            decisions[layer] = f"{_grid(target)} rtn; packed table (rows dequantized as looked up)"
        if stats["lowered"] or tables:
            remove_dead_nodes(gm)
            remove_unused_attrs(gm)
        decisions.update({k: v for k, v in skipped.items() if k not in decisions})
        stats.update(method=self.method, baked_parametrizations=baked, embeddings=len(tables),
                     sensitivity=[(name, round(db, 2)) for name, db in ranking])
        return PassResult(gm, modified=bool(targets or tables), stats=stats, decisions=decisions)

    def _keep_most_sensitive(self, gm: fx.GraphModule, ctx: Context, batches: list, targets: dict,
                             skipped: dict) -> list[tuple[str, float]]:
        """With ``keep_float=k``: rank the targets by sensitivity, drop the k most sensitive from ``targets`` (into
        ``skipped``); the ranking."""
        if not self.keep_float or not targets:
            return []
        data = batches or (ctx.calib_data and check_batches(ctx.calib_data, ctx.inputs, needed_by=self.name))
        ranking = _sensitivity(gm, targets, data or [ctx.inputs], self.sensitivity_batches)
        for name, db in ranking[:self.keep_float]:
            del targets[next(n for n, t in targets.items() if t.name == name)]
            skipped[name.rpartition(".")[0] or name] = f"float: keep_float (most sensitive, SQNR {db:.1f} dB)"
        return ranking

    def _lower(self, gm: fx.GraphModule, targets: dict, codes: dict, notes: dict) -> tuple[dict, dict]:
        """Pack every quantized layer and swap in the kernel where it is predicted faster; (decisions, stats)."""
        decisions, kernel_bytes, float_bytes, lowered = {}, 0, 0, 0
        for node, target in targets.items():
            layer = target.name.rpartition(".")[0] or target.name
            q = codes[target.name]
            packed = pack_quantized(q.codes, q.scales, None if target.symmetric else q.zeros, target.bits,
                                    target.group_size, layer=layer)
            float_bytes += 4 * packed.in_features * packed.out_features
            x = node.args[1] if is_op(node, aten.addmm) else node.args[0]
            cost = predict(packed.out_features, packed.in_features, rows_per_call(x, is_op(node, aten.conv2d), 1),
                           target.bits, packed.group_size)
            if self.min_speedup and cost.speedup < self.min_speedup:
                decisions[layer] = (f"{_grid(target)} {notes[target.name]}; float weight (kernel predicted "
                                    f"{cost.speedup:.2f}x of dense)")
                kernel_bytes += 4 * packed.in_features * packed.out_features
                continue
            self._replace(gm, node, layer, packed)
            kernel_bytes += packed.nbytes()
            lowered += 1
            decisions[layer] = f"{_grid(target)} {notes[target.name]}; kernel"
        stats = {"quantized": len(targets), "lowered": lowered, "kept_float": len(targets) - lowered,
                 "weight_bytes_before": float_bytes, "weight_bytes_after": kernel_bytes}
        return decisions, stats

    def _embedding_targets(self, gm: fx.GraphModule, skipped: dict) -> dict[fx.Node, QuantTarget]:
        """``aten.embedding`` tables read by nothing else (a table tied to an LM head stays float)."""
        tables = {}
        for node in gm.graph.find_nodes(op="call_function", target=aten.embedding.default):
            attr = node.args[0]
            if not (isinstance(attr, fx.Node) and attr.op == "get_attr"):
                continue
            layer = attr.target.rpartition(".")[0] or attr.target
            if is_shared(attr):
                skipped[layer] = "float: embedding table also read by other ops (tied to a head)"
            elif (self.layers and not matches_any(layer, self.layers)) or matches_any(layer, self.ignore):
                skipped[layer] = "float: ignored or not matched by layers"
            else:
                bits = first_match(layer, self.bits_for, self.bits)
                group = _group(first_match(layer, self.group_size_for, self.group_size))
                _check_grid(bits, group, f"{self.name}: layer {layer!r}")
                tables[node] = QuantTarget(attr.target, False, bits, group, self.symmetric)
        return tables

    def _targets(self, gm: fx.GraphModule) -> tuple[dict[fx.Node, QuantTarget], dict[str, str]]:
        """The layer nodes to quantize with their grids, and {layer: why not} for the others."""
        names, skipped_weights = find_layers(gm)
        masks = weight_masks(gm)
        weight_of = {n: n.args[weight_slot(n)[0]] for n in gm.graph.nodes if weight_slot(n) is not None}
        outputs = output_layers(gm, weight_of)
        targets, skipped = {}, {w.rpartition(".")[0] or w: f"float: {why}" for w, why in skipped_weights.items()}
        for node, attr in weight_of.items():
            name = attr.target
            layer = name.rpartition(".")[0] or name
            why = self._excluded(gm, node, layer, name in names, node in outputs)
            if why:
                skipped.setdefault(layer, f"float: {why}")
                continue
            bits = first_match(layer, self.bits_for, self.bits)
            group = _group(first_match(layer, self.group_size_for, self.group_size))
            _check_grid(bits, group, f"{self.name}: layer {layer!r}")
            mask = masks.get(name)
            keep = None if mask is None else _keep_matrix(mask.mask, weight_slot(node)[1])
            targets[node] = QuantTarget(name, weight_slot(node)[1], bits, group, self.symmetric, keep)
        return targets, skipped

    def _excluded(self, gm, node, layer: str, candidate: bool, is_output: bool) -> str | None:
        """Why a layer stays float (None: quantize it)."""
        if not candidate:
            return "its weight is also read by other ops or shared"
        if self.layers and not matches_any(layer, self.layers):
            return "not matched by layers"
        if matches_any(layer, self.ignore):
            return "ignored"
        if is_output and not self.output_layers:
            return "output layer (output_layers=true quantizes it)"
        if is_op(node, aten.conv1d, aten.conv2d, aten.conv3d):
            weight = resolve(gm, node.args[1].target)
            if not (is_op(node, aten.conv2d) and is_pointwise_conv(node, weight)):
                return "a spatial conv (the weight-only kernels run linear layers and 1x1 convs)"
            if not self.convs:
                return "1x1 conv (convs=true quantizes it)"
        return None

    def _replace(self, gm: fx.GraphModule, node: fx.Node, layer: str, packed) -> None:
        """Swap the layer's op for graphopt::quant_linear on the packed buffers (registered next to its weight)."""
        names = _register_packed(gm, layer, packed)
        conv = is_op(node, aten.conv2d)
        if is_op(node, aten.addmm):
            bias, x = node.args[0], node.args[1]
        elif is_op(node, aten.mm):
            bias, x = None, node.args[0]
        else:
            x, bias = node.args[0], (node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"))
        act = self.act_group if self.act_group is not None else (
            0 if self.compute == "float" else act_group_for(packed.group_size))
        if act == -1:  # per token: one block per row
            act = packed.group_size
        graph = gm.graph
        with graph.inserting_before(node):
            attrs = [graph.get_attr(n) for n in names]
            if conv:  # NCHW -> NHWC rows, the same kernel, and back
                x = graph.call_function(aten.permute.default, (x, [0, 2, 3, 1]))
            y = graph.call_function(torch.ops.graphopt.quant_linear.default,
                                    (x, *attrs, bias, packed.bits, packed.group_size, act, packed.in_features,
                                     packed.out_features, self.threads))
            if conv:
                y = graph.call_function(aten.permute.default, (y, [0, 3, 1, 2]))
        y.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        node.replace_all_uses_with(y)
        graph.erase_node(node)


@register_pass
@dataclass(frozen=True)
class DynamicQuant(QuantizeWeights):
    """int8 weights per output channel and int8 activations per token, computed at run time."""

    name: ClassVar[str] = "dynamic-quant"
    bits: int = 8
    group_size: int | str | None = None
    method: str = "rtn"
    act_group: int | None = -1  # one activation block per input row

    def __post_init__(self):
        if self.bits != 8 or _group(self.group_size) is not None or self.compute != "int8":
            raise PipelineError("dynamic-quant: weights are int8 per output channel with int8 activations per "
                                "token; for other grids use quantize-weights:bits=...,group_size=...")
        super().__post_init__()


def _sensitivity(gm: fx.GraphModule, targets: dict, batches: list, limit: int) -> list[tuple[str, float]]:
    """[(weight name, output SQNR in dB with only that layer round-to-nearest quantized)], lowest first."""
    from graphopt.calibration.gptq import rtn
    from graphopt.calibration.layer_io import write_dense_weight
    from graphopt.quant.sensitivity import run_outputs, sqnr_db

    batches = list(batches)[:max(1, limit)]
    reference = run_outputs(gm, batches)
    ranking = []
    with torch.no_grad():
        for target in targets.values():
            stored = resolve(gm, target.name)
            original = stored.detach().clone()
            matrix = original.t() if target.transposed else original.reshape(original.shape[0], -1)
            value = rtn(matrix, target.bits, target.group_size, target.symmetric, target.keep).dequantize()
            write_dense_weight(gm, target.name, value.t() if target.transposed else value.reshape(original.shape))
            ranking.append((target.name, sqnr_db(reference, run_outputs(gm, batches))))
            write_dense_weight(gm, target.name, original)
    return sorted(ranking, key=lambda item: item[1])


def _grid(target: QuantTarget) -> str:
    return f"int{target.bits} " + ("per-channel" if target.group_size is None else f"g{target.group_size}")


def _replace_embedding(gm: fx.GraphModule, node: fx.Node, layer: str, packed) -> None:
    """Swap ``aten.embedding(table, indices)`` for graphopt::quant_embedding on packed buffers."""
    names = _register_packed(gm, layer, packed)
    graph = gm.graph
    with graph.inserting_before(node):
        attrs = [graph.get_attr(n) for n in names]
        y = graph.call_function(torch.ops.graphopt.quant_embedding.default,
                                (node.args[1], *attrs, packed.bits, packed.group_size, packed.out_features,
                                 packed.in_features))
    y.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    node.replace_all_uses_with(y)
    graph.erase_node(node)


def _register_packed(gm: fx.GraphModule, layer: str, packed) -> list[str]:
    """Register qweight/scales/zeros as buffers next to the layer's weight; their qualified names."""
    names = []
    for part, tensor in (("qweight", packed.qweight), ("scales", packed.scales), ("zeros", packed.zeros)):
        qualified = free_attr_name(gm, f"{layer}.quant_{part}")
        try:
            owner, leaf = owner_and_leaf(gm, qualified)
        except AttributeError:
            owner, leaf = gm, None
        if owner is gm:
            qualified = leaf = qualified.replace(".", "_")
        owner.register_buffer(leaf, tensor)
        names.append(qualified)
    return names


def _keep_matrix(mask: torch.Tensor, transposed: bool) -> torch.Tensor:
    return mask.t() if transposed else mask.reshape(mask.shape[0], -1)
