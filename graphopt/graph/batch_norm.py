"""BatchNorm folding on the canonical graph: eval-mode BatchNorm merged into the conv or linear that feeds it.

    batch_norm(conv(x, W, b)) == conv(x, W * s, (b - mean) * s + beta)   with  s = gamma / sqrt(var + eps)

The fold is computed in float64 and stored in the layer's dtype. A pair is skipped (and reported) when the layer's
output has other users, the BatchNorm runs in training mode, or the weights are not plain parameters. The ``fuse``
pass and the fake-quant pass's BatchNorm folding both call ``fuse_batch_norms``; it lives here, below both.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from graphopt.graph.layers import CONV_TRANSPOSES, CONVS, is_shared, layer_name
from graphopt.graph.nodes import (
    arg, attr_value, free_attr_name, is_op, remove_dead_nodes, remove_unused_attrs, set_parameter,
)
from graphopt.graph.shapes import shape_of

aten = torch.ops.aten


@dataclass(frozen=True)
class _BatchNorm:
    """The parts of one batch-norm node, whichever ATen form it has."""

    node: fx.Node  # the node whose value is the normalized tensor
    source: fx.Node
    weight: fx.Node | None
    bias: fx.Node | None
    mean: fx.Node
    var: fx.Node
    eps: float
    training: bool


def _as_batch_norm(node: fx.Node) -> _BatchNorm | None:
    if is_op(node, aten.batch_norm):
        x, w, b, mean, var, training, _momentum, eps = node.args[:8]
        return _BatchNorm(node, x, w, b, mean, var, float(eps), bool(training))
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        inner = node.args[0]
        if isinstance(inner, fx.Node) and is_op(inner, aten._native_batch_norm_legit_no_training):
            x, w, b, mean, var, _momentum, eps = inner.args[:7]
            return _BatchNorm(node, x, w, b, mean, var, float(eps), False)
    return None


def _out_channel_scale(weight: torch.Tensor, scale: torch.Tensor, layer: fx.Node) -> torch.Tensor:
    """Multiply ``weight`` by ``scale`` along its output channels (dim 1 per group for transposed convs)."""
    if is_op(layer, *CONV_TRANSPOSES):
        groups = int(arg(layer, "groups", 1))
        w = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
        s = scale.reshape(groups, 1, -1, *([1] * (weight.dim() - 2)))
        return (w * s).reshape(weight.shape)
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))


def fuse_batch_norms(gm: fx.GraphModule) -> tuple[list[str], dict[str, str]]:
    """Fold, in place, every eval-mode BatchNorm into the conv/linear before it (what the ``fuse`` pass does; the
    fake-quant pass calls it too). Returns the fused layers and ``{layer: why not}`` for those left alone."""
    fused, skipped = [], {}
    for node in list(gm.graph.nodes):
        bn = _as_batch_norm(node)
        if bn is None or not isinstance(bn.source, fx.Node):
            continue
        layer = bn.source
        if not is_op(layer, *CONVS, *CONV_TRANSPOSES, aten.linear):
            continue
        reason = _why_not(layer, bn)
        if reason:
            skipped[layer_name(layer)] = reason
            continue
        fused.append(layer_name(layer))
        _fold(gm, layer, bn)
    if fused:
        remove_dead_nodes(gm)
        remove_unused_attrs(gm)
    return fused, skipped


def _why_not(layer: fx.Node, bn: _BatchNorm) -> str | None:
    if bn.training:
        return "batch_norm runs in training mode"
    if len(layer.users) != 1:
        return f"output has {len(layer.users)} users, folding would change the others"
    params = [layer.args[1], arg(layer, "bias"), bn.weight, bn.bias, bn.mean, bn.var]
    if any(p is not None and (not isinstance(p, fx.Node) or p.op != "get_attr") for p in params):
        return "weights are computed in the graph, not stored parameters"
    if any(is_shared(p) for p in params[:2] if p is not None):
        return "weights are shared with another layer"
    shape = shape_of(layer)
    if is_op(layer, aten.linear) and (shape is None or len(shape) != 2):
        return "BatchNorm1d after a Linear normalizes the Linear's features only for 2-D outputs"
    return None

def _fold(gm: fx.GraphModule, layer: fx.Node, bn: _BatchNorm) -> None:
    # not torch.nn.utils.fusion.fuse_conv_bn_weights: it folds in the weights' dtype (here: float64, then cast)
    # and its transpose=True scale is wrong for grouped transposed convs (weight (in, out/groups, ...))
    w_node = layer.args[1]
    w = attr_value(gm, w_node)
    b = attr_value(gm, arg(layer, "bias"))
    f64 = lambda t: None if t is None else t.detach().to(torch.float64)  # noqa: E731
    mean, var = f64(attr_value(gm, bn.mean)), f64(attr_value(gm, bn.var))
    gamma = f64(attr_value(gm, bn.weight)) if bn.weight is not None else torch.ones_like(mean)
    beta = f64(attr_value(gm, bn.bias)) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    new_w = _out_channel_scale(f64(w), scale, layer).to(w.dtype)
    new_b = (((f64(b) if b is not None else torch.zeros_like(mean)) - mean) * scale + beta).to(w.dtype)
    set_parameter(gm, w_node.target, new_w)
    if b is not None:
        set_parameter(gm, arg(layer, "bias").target, new_b)
    else:  # the layer had no bias: add one next to its weight
        owner = w_node.target.rpartition(".")[0]
        bias_name = free_attr_name(gm, f"{owner}.bias" if owner else "bias")
        set_parameter(gm, bias_name, new_b)
        with gm.graph.inserting_before(layer):
            bias_node = gm.graph.get_attr(bias_name)
        layer.args = (*layer.args[:2], bias_node, *layer.args[3:])
    bn.node.replace_all_uses_with(layer)


def running_mean_after(layer: fx.Node) -> str | None:
    """The running-mean buffer of the eval-mode BatchNorm that is the only reader of ``layer``'s output, if any:
    where a constant added to the layer's output can be folded (subtracted from the running mean)."""
    users = list(layer.users)
    if len(users) != 1:
        return None
    user = users[0]
    bn = _as_batch_norm(next(iter(user.users))) if is_op(user, aten._native_batch_norm_legit_no_training) \
        and len(user.users) == 1 else _as_batch_norm(user)
    if bn is None or bn.training or bn.source is not layer or not (isinstance(bn.mean, fx.Node) and bn.mean.op == "get_attr"):
        return None
    return bn.mean.target
