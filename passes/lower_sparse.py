"""``lower-sparse``: run sparse Linear / 1x1-conv weights with graphopt's packed sparse kernels.

For every ``aten.linear`` and 1x1 ``aten.conv2d`` (stride 1, no padding, one group) whose stored weight has enough
zeros, the pass picks the packed format that fits the zeros (8x1 / 16x1 / 1x4 / csr, see kernels/choose.py) for
the number of rows the layer sees on the example inputs, and replaces the op with ``graphopt::sparse_linear`` on
packed buffers. A layer stays dense when no format is predicted (or, with ``benchmark=True``, measured) to beat
dense ``F.linear`` by ``min_speedup``: lowering never makes a layer slower by its own estimate.

GPU: weights on a CUDA device (or any weight with ``target="gpu"``) take the GPU formats instead: a weight whose
zeros are exactly 2:4 becomes a torch semi-structured sparse tensor (kernels/semi_structured.py; Ampere or newer),
and one whose nonzeros fill at most ``gpu_max_tile_density`` of its 32x32 (or 16x16) tiles runs the Triton
block-sparse kernel ``graphopt::bsr_linear`` (kernels/triton_bsr.py; the torch reference where Triton cannot run).
Other layers stay dense. That threshold is a rule of thumb, not yet measured on a GPU (bench/sparse_gpu.py).

Weights held through ``torch.nn.utils.parametrize`` (as the ``sparsify`` pass leaves them: W = original * mask) are
baked first, so the packed weight is exactly the masked one and the output equals the masked dense model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
import torch.nn.utils.parametrize as parametrize

from graphopt.graph.nodes import (
    arg, attr_value, free_attr_name, is_op, owner_and_leaf, remove_dead_nodes, remove_unused_attrs,
)
import graphopt.kernels  # noqa: F401  (registers torch.ops.graphopt.sparse_linear)
from graphopt.kernels.choose import choose_format
from graphopt.kernels.formats import FORMATS, SparseFormatError, pack, validate
from graphopt.kernels import semi_structured, triton_bsr
from graphopt.graph.layers import layer_name
from graphopt.pipeline.pass_base import Context, Pass, PassResult
from graphopt.pipeline.registry import register_pass
from graphopt.graph.shapes import shape_of

aten = torch.ops.aten


def bake_parametrizations(root: torch.nn.Module) -> list[str]:
    """Replace every parametrized tensor under ``root`` by its current value (W = original * mask); the names."""
    baked = []
    for mod_name, mod in list(root.named_modules()):
        if parametrize.is_parametrized(mod):
            # parametrize keeps the tensor as a property on the module's class, which copy.deepcopy shares between
            # copies: give this module a class of its own so removing it here leaves other copies masked
            cls = type(mod)
            mod.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            for tensor_name in list(mod.parametrizations.keys()):
                parametrize.remove_parametrizations(mod, tensor_name, leave_parametrized=True)
                baked.append(f"{mod_name}.{tensor_name}" if mod_name else tensor_name)
    return baked


def constant_weight(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The value of a weight argument computed from stored tensors only (a get_attr, or ops such as
    ``mul(original, mask)`` that tracing a parametrized module leaves); None if it depends on the inputs."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        value = attr_value(gm, node)
        return value if isinstance(value, torch.Tensor) else None
    if node.op != "call_function" or node.is_impure():
        return None
    args = []
    for a in node.args:
        if isinstance(a, fx.Node):
            a = constant_weight(gm, a)
            if a is None:
                return None
        args.append(a)
    with torch.no_grad():
        value = node.target(*args, **node.kwargs)
    return value if isinstance(value, torch.Tensor) else None


def is_pointwise_conv(node: fx.Node, weight: torch.Tensor) -> bool:
    """A conv2d that is a per-pixel linear map: 1x1 kernel, stride 1, no padding, dilation 1, one group."""
    args = list(node.args) + [None] * (7 - len(node.args))
    stride, padding, dilation, groups = (node.kwargs.get(k, a) for k, a in
                                         zip(("stride", "padding", "dilation", "groups"), args[3:7]))
    ones = lambda v, d: v is None or all(int(s) == d for s in (v if isinstance(v, (list, tuple)) else [v]))  # noqa
    return (weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1) and ones(stride, 1) and ones(padding, 0)
            and ones(dilation, 1) and (groups is None or int(groups) == 1))


def _as_layer(gm: fx.GraphModule, node: fx.Node):
    """(input, 2-D weight as out x in, bias node, is_conv) for a linear, a 1x1 conv2d, or ``addmm(b, x, W)`` /
    ``mm(x, W)`` with a stored W (HF GPT-2's Conv1D); None for anything else."""
    if is_op(node, aten.linear, aten.conv2d):
        weight = constant_weight(gm, node.args[1])
        if weight is None or (is_op(node, aten.conv2d) and not is_pointwise_conv(node, weight)):
            return None
        bias = arg(node, "bias")
        return node.args[0], weight.detach().reshape(weight.shape[0], -1), bias, is_op(node, aten.conv2d)
    if (is_op(node, aten.addmm) and len(node.args) == 3 or is_op(node, aten.mm)) and not node.kwargs:
        bias, x, w = node.args if is_op(node, aten.addmm) else (None, *node.args)
        weight = constant_weight(gm, w)
        bias_value = constant_weight(gm, bias)
        if weight is None or weight.dim() != 2 or (bias is not None and (bias_value is None or bias_value.dim() != 1)):
            return None
        return x, weight.detach().t(), bias, False
    return None


def rows_per_call(x: fx.Node, conv: bool, default: int) -> int:
    shape = shape_of(x) if isinstance(x, fx.Node) else None
    if shape is None:
        return default
    dims = [shape[0], *shape[2:]] if conv else list(shape[:-1])
    rows = 1
    for d in dims:
        rows *= int(d)
    return max(rows, 1)


def _has_owner(gm: fx.GraphModule, qualified: str) -> bool:
    try:
        owner_and_leaf(gm, qualified)
        return True
    except AttributeError:
        return False


@register_pass
@dataclass(frozen=True)
class LowerSparse(Pass):
    """Replace sparse-enough Linear / 1x1-conv weights by packed sparse kernels where they are faster than dense."""

    name: ClassVar[str] = "lower-sparse"
    after: ClassVar[tuple[str, ...]] = ("sparsify",)
    preserves_semantics: ClassVar[bool] = True

    min_sparsity: float = 0.5       # fraction of zeros below which a layer is not even considered
    formats: tuple = FORMATS        # candidate formats
    benchmark: bool = False         # time the candidates on this machine instead of using the cost model
    min_speedup: float = 1.2        # a format must beat dense by this factor (predicted or measured)
    threads: int = 1                # threads per kernel call (1: small kernels lose to thread start-up)
    rows: int = 0                   # input rows per call to plan for; 0 = as on the example inputs
    target: str = "auto"            # "auto": GPU formats for CUDA weights, CPU formats otherwise; "cpu" / "gpu"
    gpu_max_tile_density: float = 0.5  # block-sparse on GPU only when at most this share of tiles is stored

    def __post_init__(self):
        if self.target not in ("auto", "cpu", "gpu"):
            raise SparseFormatError(f"lower-sparse: unknown target '{self.target}'; choose auto, cpu or gpu")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad:
            raise SparseFormatError(f"lower-sparse: unknown format(s) {bad}; choose from {', '.join(FORMATS)}")

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        baked = bake_parametrizations(gm)
        decisions, lowered = {}, 0
        for node in list(gm.graph.nodes):
            layer_op = _as_layer(gm, node)
            if layer_op is None:
                continue
            x, w2, bias, is_conv = layer_op
            layer = layer_name(node, 2 if is_op(node, aten.addmm) else 1)
            if self.target == "gpu" or (self.target == "auto" and w2.is_cuda):
                decision = self._decide_gpu(w2, layer)
                decisions[layer] = decision if isinstance(decision, str) else decision[0]
                if not isinstance(decision, str):
                    self._replace_gpu(gm, node, x, bias, decision, layer, is_conv)
                    lowered += 1
                continue
            decision = self._decide(w2, rows_per_call(x, is_conv, self.rows or 1))
            decisions[layer] = decision if isinstance(decision, str) else decision.fmt
            if not isinstance(decision, str):
                packed = pack(w2, decision.fmt, what=f"weight of {layer}")
                self._replace(gm, node, x, bias, packed, layer, is_conv)
                lowered += 1
        if lowered:
            remove_dead_nodes(gm)
            remove_unused_attrs(gm)
        stats = {"lowered": lowered, "kept_dense": len(decisions) - lowered, "layers": decisions,
                 "baked_parametrizations": baked}
        return PassResult(gm, modified=bool(lowered or baked), stats=stats, decisions=dict(decisions))

    def _too_dense(self, w2: torch.Tensor) -> str | None:
        """Why a weight stays dense before any format is considered (None: it is a candidate)."""
        if not w2.is_floating_point() or w2.numel() == 0:
            return "dense: not a floating-point weight"
        sparsity = float((w2 == 0).sum()) / w2.numel()
        if sparsity < self.min_sparsity:
            return f"dense: sparsity {sparsity:.0%} < min_sparsity {self.min_sparsity:.0%}"
        return None

    def _decide(self, w2: torch.Tensor, rows: int):
        """A Choice with a format, or a string saying why the layer stays dense."""
        too_dense = self._too_dense(w2)
        if too_dense:
            return too_dense
        rows = self.rows or rows
        choice = choose_format(w2, rows, formats=self.formats, benchmark=self.benchmark,
                               min_speedup=self.min_speedup, threads=self.threads)
        if choice.fmt is None:
            return f"dense: no format beats dense by {self.min_speedup}x at {rows} rows ({choice.how})"
        return choice

    def _decide_gpu(self, w2: torch.Tensor, layer: str):
        """("2:4", semi-structured weight) or ("bsr AxB", packed weight), or a string saying why it stays dense."""
        too_dense = self._too_dense(w2)
        if too_dense:
            return too_dense
        why = []
        if w2.shape[1] % 4 == 0 and semi_structured.violations_2to4(w2) == 0:
            try:
                return "2:4", semi_structured.to_semi_structured(w2.contiguous(), what=f"weight of {layer}")
            except SparseFormatError as e:  # no CUDA, older GPU, unsupported dtype or shape: try block-sparse
                why.append(f"2:4 unavailable ({str(e).split(': ', 1)[-1].split(';')[0]})")
        if w2.dtype in (torch.float32, torch.float16, torch.bfloat16):
            packed = min((triton_bsr.pack_bsr(w2, (b, b), what=f"weight of {layer}") for b in (32, 16)),
                         key=lambda p: p.cols.numel() * p.block_n * p.block_k)  # fewest stored values; 32 on ties
            if packed.density <= self.gpu_max_tile_density:
                return f"bsr {packed.block_n}x{packed.block_k}", packed
            why.append(f"{packed.density:.0%} of {packed.block_n}x{packed.block_k} tiles nonzero > "
                       f"gpu_max_tile_density {self.gpu_max_tile_density:.0%}")
        return "dense: " + ("; ".join(why) or f"no GPU format for {w2.dtype}")

    def _replace_gpu(self, gm: fx.GraphModule, node: fx.Node, x, bias, decision, layer: str, is_conv: bool) -> None:
        """Swap one layer for the 2:4 weight (aten.linear on a semi-structured tensor) or graphopt::bsr_linear."""
        kind, payload = decision
        graph = gm.graph
        if kind == "2:4":
            names = self._register(gm, node, layer, [("weight", payload)])
        else:
            triton_bsr.validate_bsr(payload, f"block-sparse weight of {layer}")
            names = self._register(gm, node, layer, list(zip(("values", "cols", "ptr"), payload.tensors())))
        with graph.inserting_before(node):
            attrs = [graph.get_attr(n) for n in names]
            if is_conv:  # NCHW -> NHWC rows (contiguous: the 2:4 kernels need it), the same linear, and back
                x = graph.call_function(aten.permute.default, (x, [0, 2, 3, 1]))
                x = graph.call_function(aten.contiguous.default, (x,))
            if kind == "2:4":
                y = graph.call_function(aten.linear.default, (x, attrs[0], bias))
            else:
                y = graph.call_function(torch.ops.graphopt.bsr_linear.default,
                                        (x, *attrs, bias, payload.in_features, payload.out_features))
            if is_conv:
                y = graph.call_function(aten.permute.default, (y, [0, 3, 1, 2]))
        node.replace_all_uses_with(y)
        graph.erase_node(node)

    def _register(self, gm: fx.GraphModule, node: fx.Node, layer: str, parts) -> list[str]:
        """Register (part, tensor) pairs as buffers next to the layer's weight; their qualified names."""
        names = []
        for part, tensor in parts:
            qualified = free_attr_name(gm, f"{layer}.sparse_{part}" if layer != node.name else f"{layer}_{part}")
            owner, leaf = owner_and_leaf(gm, qualified) if _has_owner(gm, qualified) else (gm, qualified)
            if owner is gm:
                qualified = leaf = qualified.replace(".", "_")
            owner.register_buffer(leaf, tensor)
            names.append(qualified)
        return names

    def _replace(self, gm: fx.GraphModule, node: fx.Node, x, bias, packed, layer: str, is_conv: bool) -> None:
        validate(packed, f"packed weight of {layer}")
        names = []
        for part, tensor in zip(("values", "cols", "ptr"), packed.tensors()):
            qualified = free_attr_name(gm, f"{layer}.sparse_{part}" if layer != node.name else f"{layer}_{part}")
            owner, leaf = owner_and_leaf(gm, qualified) if _has_owner(gm, qualified) else (gm, qualified)
            if owner is gm:
                qualified = leaf = qualified.replace(".", "_")
            owner.register_buffer(leaf, tensor)
            names.append(qualified)
        graph = gm.graph
        with graph.inserting_before(node):
            attrs = [graph.get_attr(n) for n in names]
            if is_conv:  # NCHW -> NHWC rows, the same kernel, and back (a strided view, no copy)
                x = graph.call_function(aten.permute.default, (x, [0, 2, 3, 1]))
            y = graph.call_function(torch.ops.graphopt.sparse_linear.default,
                                    (x, *attrs, bias, packed.fmt, packed.in_features, packed.out_features,
                                     self.threads))
            if is_conv:
                y = graph.call_function(aten.permute.default, (y, [0, 3, 1, 2]))
        node.replace_all_uses_with(y)
        graph.erase_node(node)
