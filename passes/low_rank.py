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

``whiten=true`` (needs ``calib_data``) factorizes against the layer's inputs instead: the rank-r weight whose
outputs on the calibration data are closest to the layer's (graphopt/calibration/whitened_svd.py; SVD-LLM's
truncation), and ``energy`` then counts the layer's output energy on that data, not its weights'. Layers are
visited in graph order on the inputs the already-factorized layers before them produce (the sequential engine),
so each one also absorbs what the earlier ones changed. ``damp`` is the ridge (relative to the mean input energy)
that keeps the factorization defined for inputs that never vary; 3-D convs fall back to plain SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from graphopt.calibration.engine import NodeInputs, run_sequentially
from graphopt.calibration.layer_io import input_rows, write_dense_weight
from graphopt.calibration.statistics import InputStatistics
from graphopt.calibration.whitened_svd import WhitenedSVD, whitened_svd
from graphopt.errors import PipelineError
from graphopt.graph.inputs import check_batches
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
    transposed: bool = False  # the weight is stored (in, out): addmm(b, x, W)

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
            return _Layer(node, x, mat.target, resolve(gm, mat.target).t(), bias, None, transposed=True)
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
    whiten: bool = False  # factorize against the inputs on calib_data (best rank-r outputs, not weights)
    damp: float = 0.01  # whiten's ridge, relative to the mean input energy

    def __post_init__(self):
        if not 0 < self.energy <= 1:
            raise PipelineError(f"low-rank: energy must be in (0, 1], got {self.energy}")
        if not 0 <= self.rank_ratio <= 1:
            raise PipelineError(f"low-rank: rank_ratio must be in [0, 1] (0: use energy), got {self.rank_ratio}")
        if self.round_to < 1:
            raise PipelineError(f"low-rank: round_to must be >= 1, got {self.round_to}")
        if not self.damp >= 0:
            raise PipelineError(f"low-rank: damp must be >= 0, got {self.damp}")

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        if any(shape_of(n) is None for n in gm.graph.nodes if is_op(n, aten.linear, aten.addmm, *CONVS)):
            propagate(gm, ctx.inputs, fake=True)  # MACs per layer need output shapes
        batches = check_batches(ctx.calib_data, ctx.inputs, needed_by="low-rank", why=" for whiten=true",
                                pipeline="low-rank:whiten=true") if self.whiten else None
        shared = shared_weights(gm)
        candidates, skipped = [], {}
        for node in list(gm.graph.nodes):
            layer = _as_layer(gm, node)
            if layer is None or (layer.conv is not None and not self.convs) or _TAG in f".{layer.weight_name}":
                continue
            if matches_any(layer.name, self.ignore):
                skipped[layer.name] = "ignored"
            elif layer.weight_name in shared:
                skipped[layer.name] = "weight shared with another layer"
            else:
                candidates.append(layer)
        plans = self._plan_whitened(gm, candidates, batches) if batches is not None else {
            layer.node: self._plan(layer, _Factored(layer.matrix)) for layer in candidates}
        layers = []
        for layer in candidates:
            plan = plans[layer.node]
            if isinstance(plan, str):
                skipped[layer.name] = plan
                continue
            first, second, info = plan
            _replace(gm, layer, first, second)
            layers.append(info)
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
                          + (f", whitened: {x['energy_kept']}" if self.whiten else "") for x in layers}, **skipped})

    def _plan(self, layer: _Layer, svd: _Factored | WhitenedSVD) -> tuple | str:
        """(first, second, report row) for ``layer`` from its factorization, or why it stays."""
        w = layer.matrix.detach()
        rank = choose_rank(svd.s, tuple(w.shape), w.dtype, self.energy, self.rank_ratio)
        rank = min(len(svd.s), math.ceil(rank / self.round_to) * self.round_to)
        if self.require_savings and _macs(layer, rank) >= _macs(layer, None):
            return f"rank {rank} of {len(svd.s)} saves no MACs"
        first, second = svd.factors(rank, w.dtype)
        positions = _positions(layer)
        return first, second, {"layer": layer.name, "rank": rank, "full_rank": len(svd.s),
                               "energy_kept": float((svd.s[:rank] ** 2).sum() / (svd.s ** 2).sum()),
                               "macs_before": _macs(layer, None) * positions,
                               "macs_after": _macs(layer, rank) * positions}

    def _plan_whitened(self, gm: fx.GraphModule, candidates: list[_Layer], batches) -> dict:
        """Plans from whitened SVDs, layer by layer in graph order. Each factorized layer's weight is replaced by
        its rank-r product while the engine runs, so the layers after it are factorized on the inputs the
        factorized model gives them; the graph itself changes only afterwards."""
        by_node = {layer.node: layer for layer in candidates}
        plans: dict = {}

        def visit(inputs: NodeInputs) -> None:
            layer = by_node[inputs.node]
            stored = resolve(gm, layer.weight_name)
            parts = input_rows(inputs, stored.shape)
            if parts is None:  # a 3-D conv: its inputs are not unfolded here
                plans[layer.node] = self._plan(layer, _Factored(layer.matrix))
                return
            (_, rows), = parts
            stats = InputStatistics.of_rows(rows, layer.matrix.shape[1], layer=layer.weight_name)
            plan = self._plan(layer, whitened_svd(layer.matrix, stats.xtx, damp=self.damp, layer=layer.weight_name))
            if not isinstance(plan, str):
                product = plan[1] @ plan[0]
                write_dense_weight(gm, layer.weight_name, product.t() if layer.transposed else product.reshape(stored.shape))
                plan[2]["energy_kept"] = f"{plan[2]['energy_kept']:.4f} of the output energy on {stats.count} rows"
            plans[layer.node] = plan

        run_sequentially(gm, batches, visit, lambda node: node in by_node, desc="low-rank (whiten)")
        return plans


class _Factored:
    """Plain truncated SVD W = U S V^T, with the same ``s`` / ``factors`` interface as ``WhitenedSVD``."""

    def __init__(self, w: torch.Tensor):
        self.u, self.s, self.vh = torch.linalg.svd(w.detach().double(), full_matrices=False)

    def factors(self, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        root = self.s[:rank].sqrt()
        return (root[:, None] * self.vh[:rank]).to(dtype), (self.u[:, :rank] * root[None, :]).to(dtype)


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
