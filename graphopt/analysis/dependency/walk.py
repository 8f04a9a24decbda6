"""The walk over a graph that gives every tensor dim its keys, and the registry of per-op rules it applies.

A rule is a function ``rule(w: Walk, node) -> keys of the node's value`` (a TensorKeys, a tuple of them for ops
returning several tensors, or None for non-tensor values). It reads its inputs' keys with ``w.keys(arg)`` and
couples dims with ``w.unify``/``w.bind``. Users add rules for their own ops with ``register_rule``. An op without a
rule freezes every dim it touches, with the reason recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from graphopt.analysis.dependency.elements import ElementSpace
from graphopt.analysis.dependency.keys import DimKeys, TensorKeys, fresh
from graphopt.graph.nodes import resolve

RuleFn = Callable[["Walk", fx.Node], Any]
RewriteFn = Callable[[fx.Node, Callable[[fx.Node], tuple]], None]


@dataclass(frozen=True)
class Rule:
    """How an op couples dims (``propagate``) and, if it bakes sizes into its arguments, how to update them."""

    propagate: RuleFn
    rewrite: RewriteFn | None = None


RULES: dict[Any, Rule] = {}


def register_rule(*ops, rewrite: RewriteFn | None = None):
    """Decorator: use the function as the propagation rule of ``ops`` (ATen packets/overloads or callables, or a
    custom op's qualified name such as ``"transformers::grouped_mm_fallback"``, for ops that a library registers
    only once it is imported)."""
    def deco(fn: RuleFn) -> RuleFn:
        for op in ops:
            RULES[op] = Rule(fn, rewrite)
        return fn
    return deco


def rule_for(node: fx.Node) -> Rule | None:
    """The registered rule of a call_function node, by overload first, then by packet, then by qualified name."""
    target = node.target
    return (RULES.get(target) or RULES.get(getattr(target, "overloadpacket", None))
            or RULES.get(getattr(getattr(target, "_schema", None), "name", None)))


def shape(node: fx.Node) -> tuple[int, ...]:
    """The recorded (concrete) shape of a single-tensor node."""
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise KeyError(f"no recorded shape for {node.name}")
    return tuple(int(s) for s in meta.shape)


class Walk:
    """State of one analysis: the element space and the keys of every node's value."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.space = ElementSpace()
        self.values: dict[fx.Node, Any] = {}
        self.tags: list[tuple[DimKeys, str]] = []  # (keys, kind): attention heads / head_dim, for pruning options

    # -- reading and creating keys ---------------------------------------------------------------------------------
    def keys(self, arg: Any) -> Any:
        """Keys of an argument: a node's keys, or None for constants and non-tensor values."""
        return self.values.get(arg) if isinstance(arg, fx.Node) else None

    def dk(self, tk: TensorKeys, d: int) -> DimKeys:
        """Keys of dim ``d`` (negative counts from the end); an unbound parameter dim gets a new atom."""
        d = d % len(tk.dims)
        if tk.dims[d] is None:
            tk.dims[d] = fresh(self.space, tk.sizes[d], f"{tk.label}[{d}]")
        return tk.dims[d]

    def fresh(self, size: int, label: str, frozen: str | None = None) -> DimKeys:
        """Keys of a new atom."""
        return fresh(self.space, size, label, frozen)

    def tensor(self, dims: list, label: str) -> TensorKeys:
        """A TensorKeys value for an op's output."""
        return TensorKeys(list(dims), label, tuple(len(d) for d in dims))

    # -- coupling --------------------------------------------------------------------------------------------------
    def unify(self, a: DimKeys, b: DimKeys, why: str) -> None:
        """Index i of ``a`` is index i of ``b``."""
        if len(a) != len(b):
            self.freeze_keys(a + b, f"{why}: sizes {len(a)} and {len(b)} differ")
            return
        self.space.unify_many(a, b, why)

    def bind(self, tk: TensorKeys, d: int, keys: DimKeys, why: str) -> None:
        """Give dim ``d`` of a (parameter) value these keys: set if unbound, else unify."""
        d = d % len(tk.dims)
        if tk.dims[d] is None and tk.sizes[d] == len(keys):
            tk.dims[d] = keys
        else:
            self.unify(self.dk(tk, d), keys, why)

    def tag(self, keys: DimKeys, kind: str) -> None:
        """Mark these keys as attention ``heads`` or ``head_dim`` (so users can choose what to prune), or as the
        ``channels`` axis of a split whose other axis is a position (col2im): a prunable outer axis."""
        self.tags.append((keys, kind))

    def freeze_keys(self, keys: DimKeys, reason: str) -> None:
        """Never prune any index of these keys."""
        for k in keys:
            self.space.freeze(k, reason)

    def freeze_value(self, value: Any, reason: str) -> None:
        """Freeze every dim of a value (a TensorKeys or a tuple of them)."""
        if isinstance(value, TensorKeys):
            for d in range(len(value.dims)):
                self.freeze_keys(self.dk(value, d), reason)
        elif isinstance(value, (tuple, list)):
            for v in value:
                self.freeze_value(v, reason)


def value_keys(w: Walk, node: fx.Node, label: str, frozen: str | None = None) -> Any:
    """Fresh keys shaped like ``node``'s recorded value (tensor, tuple of tensors, or None)."""
    meta = node.meta.get("tensor_meta")

    def one(m):
        if m is None or not hasattr(m, "shape"):
            return None
        return w.tensor([w.fresh(int(n), f"{label}[{d}]", frozen) for d, n in enumerate(m.shape)], label)

    if meta is None:
        return None
    return one(meta) if hasattr(meta, "shape") else tuple(one(m) for m in meta)


def param_keys(gm: fx.GraphModule, node: fx.Node) -> TensorKeys | None:
    """Unbound keys for a ``get_attr`` tensor: each dim gets keys when a rule first binds it."""
    value = resolve(gm, node.target)
    if not isinstance(value, torch.Tensor):
        return None
    return TensorKeys([None] * value.dim(), node.target, tuple(value.shape))
