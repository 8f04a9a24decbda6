"""``low-rank``: factorize Linear and conv layers by truncated SVD into two smaller layers, where MACs drop.

    linear(x, W, b)            W (out, in) = U S V^T   ->  linear(linear(x, S_r^1/2 V_r^T), U_r S_r^1/2, b)
    conv(x, W, b, stride, pad) W (O, C*k*k) = U S V^T  ->  conv1x1(conv(x, r filters of S_r^1/2 V_r^T, stride, pad),
                                                                   U_r S_r^1/2, b)

``addmm(b, x, W)`` (GPT-2's Conv1D, or ``addmm(b, x, t(W))``) becomes the same pair of linears. The rank of each
layer is the smallest that keeps ``energy`` of its squared singular values (``energy=1.0``: the numerical rank,
so outputs are reproduced up to rounding), or ``ceil(rank_ratio * full rank)``. A layer is factorized only if its
MACs drop (``r * (in + out) < in * out``; ``require_savings=False`` factorizes anyway, e.g. to check exactness).
Skipped: grouped/depthwise and transposed convs, weights read by more than one layer (tied embeddings) or computed
in the graph, layers matching ``ignore``, and the factors of an earlier run (so a second run changes nothing).
The SVD runs in float64; factors are stored in the weight's dtype as ``<layer>.low_rank.{0,1}.weight``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from graphopt.errors import PipelineError
from graphopt.graph.nodes import arg, is_op, remove_dead_nodes, remove_unused_attrs, resolve, set_parameter
from graphopt.graph.layers import CONVS, shared_weights
from graphopt.pipeline.pass_base import Context, Pass, PassResult
from graphopt.graph.patterns import matches_any
from graphopt.pipeline.registry import register_pass
from graphopt.graph.shapes import propagate, shape_of

aten = torch.ops.aten
_TAG = ".low_rank."


@dataclass(frozen=True)
class _Layer:
    """A factorizable layer: its node, input, weight as an (out, in) matrix, bias, and (for convs) conv args."""

    node: fx.Node
    x: fx.Node
    weight_name: str
    matrix: torch.Tensor  # (out, fan_in)
    bias: fx.Node | None
    conv: tuple | None  # (weight shape, stride, padding, dilation) for convs

    @property
    def name(self) -> str:
        return self.weight_name.rpartition(".")[0] or self.weight_name


def _param(node) -> str | None:
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _as_layer(gm: fx.GraphModule, node: fx.Node) -> _Layer | None:
    """The layer behind ``node`` if it is a plain linear, addmm or ungrouped conv with a stored weight."""
    if is_op(node, aten.linear) and _param(node.args[1]):
        bias = arg(node, "bias")
        w = resolve(gm, node.args[1].target)
        return _Layer(node, node.args[0], node.args[1].target, w, bias, None) if w.dim() == 2 else None
    if is_op(node, aten.addmm) and not node.kwargs and len(node.args) == 3:
        bias, x, mat = node.args
        if _param(mat):  # addmm(b, x, W) with W (in, out), as GPT-2's Conv1D stores it
            return _Layer(node, x, mat.target, resolve(gm, mat.target).t(), bias, None)
        if isinstance(mat, fx.Node) and is_op(mat, aten.t) and _param(mat.args[0]) and len(mat.users) == 1:
            return _Layer(node, x, mat.args[0].target, resolve(gm, mat.args[0].target), bias, None)
        return None
    if is_op(node, *CONVS) and _param(node.args[1]):
        args = list(node.args) + [None] * (7 - len(node.args))
        _, w_node, bias, stride, padding, dilation, groups = args
        if (groups or 1) != 1:
            return None
        w = resolve(gm, w_node.target)
        nd = w.dim() - 2
        conv = (tuple(w.shape), stride or [1] * nd, padding if padding is not None else [0] * nd,
                dilation or [1] * nd)
        return _Layer(node, node.args[0], w_node.target, w.reshape(w.shape[0], -1), bias, conv)
    return None


def choose_rank(s: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype, energy: float, rank_ratio: float) -> int:
    """Rank keeping ``energy`` of sum(s^2) (numerical rank at 1.0), or ``ceil(rank_ratio * full rank)``."""
    full = len(s)
    if rank_ratio:
        return max(1, min(full, math.ceil(rank_ratio * full)))
    tol = float(s[0]) * max(shape) * torch.finfo(dtype).eps
    numerical = max(1, int((s > tol).sum()))
    if energy >= 1.0:
        return numerical
    kept = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
    return min(numerical, int((kept < energy - 1e-12).sum()) + 1)


def _macs(layer: _Layer, rank: int | None) -> int:
    """MACs per output position: out * fan_in before, rank * (fan_in + out) after."""
    out, fan_in = layer.matrix.shape
    return out * fan_in if rank is None else rank * (fan_in + out)


def _positions(layer: _Layer) -> int:
    shape = shape_of(layer.node)
    if shape is None:
        return 1
    if layer.conv is None:
        return math.prod(shape[:-1])
    return shape[0] * math.prod(shape[2:])


@register_pass
@dataclass(frozen=True)
class LowRank(Pass):
    """Truncated-SVD factorization of Linear/conv layers into two smaller layers, where it reduces MACs."""

    name: ClassVar[str] = "low-rank"
    energy: float = 0.99  # keep this fraction of the squared singular values (used when rank_ratio is 0)
    rank_ratio: float = 0.0  # rank = ceil(rank_ratio * full rank) instead of energy
    ignore: tuple = ()  # name patterns (graphopt/graph/patterns.py: ``head``, ``*.mlp.*``) left alone
    convs: bool = True  # factorize convs too (kxk conv with r filters, then a 1x1 conv)
    require_savings: bool = True  # only where MACs drop; False factorizes every layer (exactness checks)
    round_to: int = 1  # ranks are rounded up to a multiple of this (SIMD-friendly widths)

    def __post_init__(self):
        if not 0 < self.energy <= 1:
            raise PipelineError(f"low-rank: energy must be in (0, 1], got {self.energy}")
        if not 0 <= self.rank_ratio <= 1:
            raise PipelineError(f"low-rank: rank_ratio must be in [0, 1] (0: use energy), got {self.rank_ratio}")
        if self.round_to < 1:
            raise PipelineError(f"low-rank: round_to must be >= 1, got {self.round_to}")

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        if any(shape_of(n) is None for n in gm.graph.nodes if is_op(n, aten.linear, aten.addmm, *CONVS)):
            propagate(gm, ctx.inputs, fake=True)  # MACs per layer need output shapes
        shared = shared_weights(gm)
        layers, skipped = [], {}
        for node in list(gm.graph.nodes):
            layer = _as_layer(gm, node)
            if layer is None or (layer.conv is not None and not self.convs) or _TAG in f".{layer.weight_name}":
                continue
            if matches_any(layer.name, self.ignore):
                skipped[layer.name] = "ignored"
            elif layer.weight_name in shared:
                skipped[layer.name] = "weight shared with another layer"
            else:
                result = self._factorize(gm, layer)
                (layers.append(result) if isinstance(result, dict) else skipped.__setitem__(layer.name, result))
        if layers:
            remove_dead_nodes(gm)
            remove_unused_attrs(gm)
        before = sum(x["macs_before"] for x in layers)
        after = sum(x["macs_after"] for x in layers)
        return PassResult(gm, modified=bool(layers), stats={
            "factorized": len(layers), "skipped": len(skipped),
            "layer_macs": f"{before} -> {after}" if layers else "unchanged",
            "layers": layers, "skipped_layers": skipped},
            decisions={**{x["layer"]: f"rank {x['rank']}, MACs {x['macs_before']} -> {x['macs_after']}"
                          for x in layers}, **skipped})

    def _factorize(self, gm: fx.GraphModule, layer: _Layer) -> dict | str:
        w = layer.matrix.detach()
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        rank = choose_rank(s, tuple(w.shape), w.dtype, self.energy, self.rank_ratio)
        rank = min(len(s), math.ceil(rank / self.round_to) * self.round_to)
        if self.require_savings and _macs(layer, rank) >= _macs(layer, None):
            return f"rank {rank} of {len(s)} saves no MACs"
        root = s[:rank].sqrt()
        first = (root[:, None] * vh[:rank]).to(w.dtype)  # (rank, fan_in)
        second = (u[:, :rank] * root[None, :]).to(w.dtype)  # (out, rank)
        _replace(gm, layer, first, second)
        positions = _positions(layer)
        return {"layer": layer.name, "rank": rank, "full_rank": len(s),
                "energy_kept": float((s[:rank] ** 2).sum() / (s ** 2).sum()),
                "macs_before": _macs(layer, None) * positions, "macs_after": _macs(layer, rank) * positions}


def _replace(gm: fx.GraphModule, layer: _Layer, first: torch.Tensor, second: torch.Tensor) -> None:
    """Insert the two factor layers in place of ``layer.node``; the old weight dies with it."""
    base = layer.name + ".low_rank"
    if layer.conv is not None:
        shape, stride, padding, dilation = layer.conv
        nd = len(shape) - 2
        first = first.reshape(first.shape[0], *shape[1:])
        second = second.reshape(*second.shape, *([1] * nd))
    set_parameter(gm, f"{base}.0.weight", first)
    set_parameter(gm, f"{base}.1.weight", second)
    g = gm.graph
    with g.inserting_before(layer.node):
        a, b = g.get_attr(f"{base}.0.weight"), g.get_attr(f"{base}.1.weight")
        if layer.conv is None:
            h = g.call_function(aten.linear.default, (layer.x, a))
            y = g.call_function(aten.linear.default, (h, b, layer.bias))
        else:
            op = layer.node.target
            h = g.call_function(op, (layer.x, a, None, stride, padding, dilation, 1))
            pointwise = op.overloadpacket.default  # the list-padding overload, whatever the first conv uses
            y = g.call_function(pointwise, (h, b, layer.bias, [1] * nd, [0] * nd, [1] * nd, 1))
    for new in (h, y):
        new.meta.update({k: v for k, v in layer.node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    layer.node.replace_all_uses_with(y)
    g.erase_node(layer.node)
