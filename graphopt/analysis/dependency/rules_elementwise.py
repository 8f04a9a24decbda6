"""Rules for elementwise ops (with broadcasting), reductions, and values that carry no channels."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from graphopt.analysis.dependency.keys import TensorKeys
from graphopt.analysis.dependency.walk import Walk, register_rule, shape, value_keys

aten = torch.ops.aten

# every op here computes out[..., i, ...] from inputs at the same (broadcast) index
ELEMENTWISE = (
    aten.relu, aten.gelu, aten.silu, aten.sigmoid, aten.tanh, aten.hardswish, aten.hardsigmoid, aten.hardtanh,
    aten.relu6, aten.leaky_relu, aten.elu, aten.selu, aten.celu, aten.softplus, aten.mish, aten.prelu,
    aten.neg, aten.abs, aten.exp, aten.log, aten.sqrt, aten.rsqrt, aten.reciprocal, aten.erf, aten.sin, aten.cos,
    aten.pow, aten.clamp, aten.clamp_min, aten.clamp_max, aten.sign, aten.floor, aten.ceil, aten.round,
    aten.logical_not, aten.bitwise_not, aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.clone,
    aten.contiguous, aten.alias, aten.detach, aten.to, aten._to_copy, aten.lift_fresh_copy, aten.type_as,
    aten.add, aten.sub, aten.rsub, aten.mul, aten.div, aten.where, aten.maximum, aten.minimum, aten.fmod,
    aten.remainder, aten.floor_divide, aten.eq, aten.ne, aten.gt, aten.ge, aten.lt, aten.le, aten.__and__,
    aten.__or__, aten.bitwise_and, aten.bitwise_or, aten.logical_and, aten.logical_or, aten.masked_fill,
    aten.lerp, aten.addcmul, aten.addcdiv, aten.atan2, aten.copysign, aten.isnan, aten.isinf, aten.nan_to_num,
    aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.zeros_like, aten.ones_like,
    aten.full_like, aten.empty_like,
    aten.copy,  # copy(dst, src): src broadcast into dst, index for index (copy_ joins with the in-place forms)
)


# in-place variants (relu_, add_, ...) return their mutated first input: the same rule holds
ELEMENTWISE = ELEMENTWISE + tuple(getattr(aten, op.__name__.split(".")[-1] + "_") for op in ELEMENTWISE
                                  if hasattr(aten, op.__name__.split(".")[-1] + "_"))


def _tensor_args(w: Walk, node: fx.Node) -> list[TensorKeys]:
    args = list(node.args) + list(node.kwargs.values())
    return [k for k in (w.keys(a) for a in args) if isinstance(k, TensorKeys)]


@register_rule(*ELEMENTWISE)
def elementwise(w: Walk, node: fx.Node):
    """Inputs broadcast against each other (aligned from the right): dims of equal size are the same dim."""
    out = shape(node)
    inputs = _tensor_args(w, node)
    if len(inputs) == 1 and inputs[0].sizes == out:
        return inputs[0]  # unary, or tensor-with-scalar: keys pass through untouched
    dims = []
    for d, n in enumerate(out):
        same = [(tk, d - (len(out) - len(tk.dims))) for tk in inputs]
        same = [(tk, k) for tk, k in same if k >= 0 and tk.sizes[k] == n]
        if not same:
            dims.append(w.fresh(n, f"{node.name}[{d}]", frozen="broadcast from nothing"))
            continue
        first = w.dk(*same[0])
        for tk, k in same[1:]:
            w.bind(tk, k, first, f"{node.name} (elementwise)")
        dims.append(first)
    return w.tensor(dims, node.name)


REDUCTIONS = (aten.mean, aten.sum, aten.amax, aten.amin, aten.var, aten.std, aten.logsumexp, aten.prod,
              aten.any, aten.all, aten.norm, aten.argmax, aten.argmin, aten.max, aten.min)


@register_rule(*REDUCTIONS)
def reduction(w: Walk, node: fx.Node):
    """Reduced dims vanish (or become frozen singletons with keepdim); the others pass through."""
    x = w.keys(node.args[0])
    out_meta = node.meta.get("tensor_meta")
    if x is None or out_meta is None:
        return value_keys(w, node, node.name, frozen="reduction")
    ndim = len(x.dims)
    dims_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims_arg is None or (isinstance(dims_arg, (list, tuple)) and len(dims_arg) == 0):
        reduced = set(range(ndim))
    else:
        reduced = {int(d) % ndim for d in (dims_arg if isinstance(dims_arg, (list, tuple)) else [dims_arg])}
    keepdim = bool(node.args[2] if len(node.args) > 2 and isinstance(node.args[2], bool)
                   else node.kwargs.get("keepdim", False))
    dims = []
    for d in range(ndim):
        if d not in reduced:
            dims.append(w.dk(x, d))
        elif keepdim:
            dims.append(w.fresh(1, f"{node.name}[{d}]", frozen="reduced dim"))
    result = w.tensor(dims, node.name)
    if hasattr(out_meta, "shape"):
        return result
    return tuple(result for _ in out_meta)  # max.dim / min.dim: (values, indices) share keys


@register_rule(operator.getitem)
def getitem(w: Walk, node: fx.Node):
    """An element of a multi-output op's result."""
    value = w.keys(node.args[0])
    if isinstance(value, (tuple, list)) and isinstance(node.args[1], int):
        return value[node.args[1]]
    return None


NO_CHANNELS = (aten.sym_size, aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size,
               operator.mul, operator.add, operator.sub, operator.floordiv, operator.truediv, operator.mod)


@register_rule(*NO_CHANNELS)
def no_channels(w: Walk, node: fx.Node):
    """Sizes, asserts and Python arithmetic: no tensor value."""
    return None


CREATION = (aten.arange, aten.zeros, aten.ones, aten.full, aten.empty, aten.new_ones, aten.new_zeros,
            aten.new_full, aten.new_empty, aten.scalar_tensor, aten.rand, aten.randn, aten.eye, aten.linspace)


@register_rule(*CREATION)
def creation(w: Walk, node: fx.Node):
    """Tensors made from sizes, not from channels: every dim is fixed."""
    return value_keys(w, node, node.name, frozen=f"created by {node.target}")
