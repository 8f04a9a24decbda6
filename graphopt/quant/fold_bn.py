"""Conv+BatchNorm folding for quantization: a real fold for PTQ, a simulated fold for QAT, and the final fold.

PTQ quantizes the weights the deployed model will have, so BatchNorm is folded into the conv first (the ``fuse``
pass does it). QAT must keep BatchNorm alive, because its statistics keep changing while training, yet quantize
the folded weight. The simulated fold rewrites ``bn(conv(x, q(W)))`` into

    f = gamma / sqrt(running_var + eps)
    y = conv(x, q(W * f)) / f + b          # the quantized *folded* weight, its scale undone
    z = batch_norm(y, ...)                  # batch statistics in train mode (running stats updated), running in eval

In eval mode this equals the folded conv exactly; in train mode BatchNorm normalizes with batch statistics as in
float training, and the running statistics are updated from an output that is not distorted by the folding.
``fold_simulated`` turns it into the plain folded conv with the final running statistics (before export).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.graph.nodes import arg, attr_value, is_op, remove_dead_nodes, remove_unused_attrs, set_parameter
from graphopt.graph.layers import CONVS
from graphopt.graph.batch_norm import fuse_batch_norms
from graphopt.quant.quantizer import FakeQuantize

aten = torch.ops.aten


def fold_batch_norms(gm: fx.GraphModule, ctx) -> list[str]:
    """Fold every eval-mode BatchNorm into its conv/linear (the ``fuse`` pass); returns the folded layers."""
    folded, _ = fuse_batch_norms(gm)
    for p in gm.parameters():  # fuse stores folded weights with requires_grad=False; QAT trains them
        if p.is_floating_point():
            p.requires_grad_(True)
    return folded


def bn_factor(gamma: torch.Tensor | None, running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """gamma / sqrt(running_var + eps): the per-channel scale a fold multiplies the weight by."""
    if gamma is None:
        return torch.rsqrt(running_var + eps)
    return torch.ops.graphopt.bn_fold_factor(gamma, running_var, eps)


# One opaque op, not rsqrt and mul: torch.compile's partitioner may recompute cheap pointwise ops in the backward
# from their inputs, and here the input (running_var) is updated in place by the BatchNorm of the same forward,
# so the backward saw the new statistics (QAT gradients off by ~5%, torch 2.13). A custom op is never recomputed:
# its output, taken before the update, is what the backward reads.
@torch.library.custom_op("graphopt::bn_fold_factor", mutates_args=())
def _bn_fold_factor(gamma: torch.Tensor, running_var: torch.Tensor, eps: float) -> torch.Tensor:
    return gamma * torch.rsqrt(running_var + eps)


@_bn_fold_factor.register_fake
def _(gamma, running_var, eps):
    return torch.empty_like(gamma * running_var)


def _bn_fold_factor_setup(ctx, inputs, output):
    _gamma, running_var, eps = inputs
    ctx.save_for_backward(torch.rsqrt(running_var + eps))


def _bn_fold_factor_backward(ctx, grad):
    (inv,) = ctx.saved_tensors
    return grad * inv, None, None


_bn_fold_factor.register_autograd(_bn_fold_factor_backward, setup_context=_bn_fold_factor_setup)


def scale_weight(w: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Weight times the fold factor along output channels."""
    return w * factor.reshape(-1, *([1] * (w.dim() - 1)))


def unscale_output(y: torch.Tensor, factor: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Undo the fold factor on the conv output (channels on dim 1) and add the conv's own bias."""
    shape = (1, -1, *([1] * (y.dim() - 2)))
    y = y / factor.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


class QatBatchNorm(nn.Module):
    """BatchNorm whose mode follows ``module.train()``/``.eval()``: the captured graph fixes it to eval."""

    def __init__(self, momentum: float | None, eps: float):
        super().__init__()
        self.momentum, self.eps = momentum, eps

    def forward(self, x, weight, bias, running_mean, running_var):
        return F.batch_norm(x, running_mean, running_var, weight, bias, self.training, self.momentum or 0.1,
                            self.eps)


def _bn_args(node: fx.Node):
    x, w, b, mean, var, training, momentum, eps = node.args[:8]
    return x, w, b, mean, var, bool(training), momentum, float(eps)


def make_batch_norms_trainable(gm: fx.GraphModule) -> int:
    """Replace eval-mode ``aten.batch_norm`` nodes by QatBatchNorm modules; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if not is_op(node, aten.batch_norm):
            continue
        x, w, b, mean, var, _training, momentum, eps = _bn_args(node)
        name = f"qat_bn_{count}"
        gm.add_module(name, QatBatchNorm(momentum, eps).train(gm.training))  # new modules start in train mode
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (x, w, b, mean, var))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    return count


def simulate_folding(gm: fx.GraphModule) -> list[str]:
    """Rewrite ``batch_norm(conv(x, q(W)))`` into the simulated fold (module docstring); returns the layers."""
    folded = []
    for bn in [n for n in gm.graph.nodes if is_op(n, aten.batch_norm)]:
        conv = bn.args[0]
        if not (isinstance(conv, fx.Node) and is_op(conv, *CONVS) and len(conv.users) == 1):
            continue
        wq = conv.args[1]
        if not (wq.op == "call_module" and isinstance(gm.get_submodule(wq.target), FakeQuantize)):
            continue
        _x, gamma, _beta, _mean, var, training, _m, eps = _bn_args(bn)
        if training:
            continue
        bias = arg(conv, "bias")
        g = gm.graph
        with g.inserting_before(wq):
            factor = g.call_function(bn_factor, (gamma, var, eps))
            scaled = g.call_function(scale_weight, (wq.args[0], factor))
        wq.args = (scaled,)
        with g.inserting_after(conv):
            unscaled = g.call_function(unscale_output, (conv, factor, bias))
        conv.replace_all_uses_with(unscaled, delete_user_cb=lambda user: user is not unscaled)
        if bias is not None:
            conv.args = (*conv.args[:2], None, *conv.args[3:])
        unscaled.meta = dict(conv.meta)
        folded.append(gm.get_submodule(wq.target).layer)
    return folded


def fold_simulated(gm: fx.GraphModule) -> int:
    """Turn every simulated fold into a plain conv with folded weight and bias (running statistics as they are
    now); the weight quantizer then reads the folded weight directly. Returns how many were folded."""
    count = 0
    for unscaled in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is unscale_output]:
        conv, factor_node, old_bias = unscaled.args
        bn = next(iter(unscaled.users))
        if bn.op == "call_module":  # a QatBatchNorm
            _x, gamma, beta, mean, var = bn.args
            eps = gm.get_submodule(bn.target).eps
        else:
            _x, gamma, beta, mean, var, _t, _m, eps = _bn_args(bn)
        scaled = conv.args[1].args[0]
        w_node = scaled.args[0]
        f = bn_factor(attr_value(gm, gamma), attr_value(gm, var), eps).detach()
        w = attr_value(gm, w_node).detach()
        b0 = attr_value(gm, old_bias).detach() if old_bias is not None else torch.zeros_like(f)
        b = (b0 - attr_value(gm, mean)) * f + (attr_value(gm, beta) if beta is not None else 0)
        set_parameter(gm, w_node.target, scale_weight(w, f))
        bias_name = f"{w_node.target.rpartition('.')[0]}.qat_folded_bias".lstrip(".")
        set_parameter(gm, bias_name, b.detach())
        conv.args[1].args = (w_node,)
        with gm.graph.inserting_before(conv):
            bias_node = gm.graph.get_attr(bias_name)
        conv.args = (*conv.args[:2], bias_node, *conv.args[3:])
        bn.replace_all_uses_with(conv)
        count += 1
    remove_dead_nodes(gm)
    _drop_dead_modules(gm)
    remove_unused_attrs(gm)
    return count


def _drop_dead_modules(gm: fx.GraphModule) -> None:
    """Remove QatBatchNorm call_module nodes nobody reads (remove_dead_nodes keeps call_module nodes)."""
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "call_module" and not node.users and isinstance(gm.get_submodule(node.target), QatBatchNorm):
            gm.graph.erase_node(node)
            delattr(gm, node.target)
    remove_dead_nodes(gm)
