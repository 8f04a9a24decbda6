"""Rules for advanced indexing and index-driven ops: ``x[idx]`` lookups (relative-position bias tables, gathered
positions), indexed assignment, ``gather``, ``roll``/``flip``.

A dim that an index tensor reads or writes is fixed (its positions are data, not channels); the other dims pass
through, so a per-head bias table indexed by position still prunes with its heads.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.analysis.dependency.keys import TensorKeys
from graphopt.analysis.dependency.rules_shape import freeze_through
from graphopt.analysis.dependency.walk import Walk, register_rule
from graphopt.graph.nodes import owner_and_leaf, resolve

aten = torch.ops.aten


def _advanced_index_layout(w: Walk, node: fx.Node, x, indices) -> list:
    """Keys of ``x[indices]`` (advanced indexing): indexed dims of ``x`` are fixed and replaced by the broadcast
    dims of the index tensors, at the first indexed position when the indexed dims are adjacent, else in front;
    dims indexed by None pass through."""
    indices = list(indices) + [None] * (len(x.dims) - len(indices))
    picked = [d for d, i in enumerate(indices) if i is not None]
    for d in picked:
        w.freeze_keys(w.dk(x, d), f"{node.name}: indexed by a tensor")
    tensors = [w.keys(indices[d]) for d in picked]
    for tk in tensors:
        w.freeze_value(tk, f"{node.name}: index tensor")
    rank = max(len(tk.sizes) for tk in tensors)
    bshape = [max([tk.sizes[k - rank + len(tk.sizes)] for tk in tensors if k - rank + len(tk.sizes) >= 0] or [1])
              for k in range(rank)]
    if len(tensors) == 1:
        middle = [w.dk(tensors[0], k) for k in range(rank)]
    else:
        middle = [w.fresh(n, f"{node.name}/index[{k}]", frozen=f"{node.name}: index tensor") for k, n in
                  enumerate(bshape)]
    rest = [w.dk(x, d) for d in range(len(x.dims)) if indices[d] is None]
    adjacent = picked == list(range(picked[0], picked[-1] + 1))
    at = picked[0] if adjacent else 0
    return rest[:at] + middle + rest[at:]


def _index_args(w: Walk, node: fx.Node):
    x, indices = w.keys(node.args[0]), node.args[1]
    if x is None or not any(i is not None for i in indices):
        return None, None
    if any(i is not None and not isinstance(w.keys(i), TensorKeys) for i in indices):
        return None, None
    if any(i is not None and getattr(i.meta.get("tensor_meta"), "dtype", None) in (torch.bool, torch.uint8)
           for i in indices):
        return None, None  # a mask index consumes as many dims as it has: frozen through, not modelled
    return x, indices


_COPIES = (aten.lift_fresh_copy.default, aten.clone.default, aten.detach.default)


def _constant_pick(gm: fx.GraphModule, node: fx.Node, sizes: tuple) -> tuple[int, fx.Node, list[int]] | None:
    """(dim, index node, positions) where ``x[..., idx, ...]`` picks distinct positions of one dim with a constant
    1-D integer tensor that only this op reads (Falcon's ``qkv[..., [-2], :]``: the key head of a fused
    multi-query projection), else None."""
    picked = [(d, i) for d, i in enumerate(node.args[1]) if i is not None]
    if len(picked) != 1 or not isinstance(picked[0][1], fx.Node):
        return None
    dim, idx = picked[0]
    while idx.op == "call_function" and idx.target in _COPIES and len(idx.users) == 1:
        idx = idx.args[0]  # torch.export lifts a literal ``[-2]`` as a constant read through lift_fresh_copy
    if idx.op != "get_attr" or len(idx.users) != 1:
        return None
    value = resolve(gm, idx.target)
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.dtype not in (torch.int64, torch.int32):
        return None
    positions = [int(v) % sizes[dim] for v in value.tolist()]
    return (dim, idx, positions) if len(set(positions)) == len(positions) else None


def _index_rewrite(node: fx.Node, resized) -> None:
    """A constant pick's positions, renumbered to the kept indices (negative ones stay counted from the end)."""
    x = node.args[0]
    gm = node.graph.owning_module
    found = _constant_pick(gm, node, tuple(int(s) for s in x.meta["tensor_meta"].shape))
    kept = resized.kept_rows(x, found[0]) if found else None
    if kept is None or bool(kept.all()):
        return
    dim, idx, positions = found
    old = resolve(gm, idx.target)
    new = [int(kept[:p].sum()) for p in positions if kept[p]]
    new = [q - int(kept.sum()) if int(v) < 0 else q for q, v in zip(new, [v for v, p in zip(old.tolist(), positions)
                                                                        if kept[p]])]
    owner, leaf = owner_and_leaf(gm, idx.target)
    value = torch.tensor(new, dtype=old.dtype)
    if leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        setattr(owner, leaf, value)


@register_rule(aten.index, aten._unsafe_index, rewrite=_index_rewrite)
def index(w: Walk, node: fx.Node):
    """x[..., idx, ...] with index tensors and None for whole dims (a table lookup such as relative position bias,
    a gather of positions): indexed dims are fixed, the other dims pass through (see _advanced_index_layout). A
    constant pick of distinct positions on one dim keeps the picked keys instead (see _constant_pick)."""
    x, indices = _index_args(w, node)
    if x is None:
        return freeze_through(w, node)
    pick = _constant_pick(w.gm, node, x.sizes)
    if pick is not None:
        dim, _, positions = pick
        w.freeze_value(w.keys(indices[dim]), f"{node.name}: index tensor")
        keys = w.dk(x, dim)
        return w.tensor([[keys[p] for p in positions] if d == dim else w.dk(x, d) for d in range(len(x.dims))],
                        node.name)
    return w.tensor(_advanced_index_layout(w, node, x, indices), node.name)


@register_rule(aten.index_put, aten.index_put_, aten._unsafe_index_put)
def index_put(w: Walk, node: fx.Node):
    """x[indices] = values: the output is ``x``; indexed dims are fixed, and ``values`` (broadcast to the shape of
    ``x[indices]``, aligned from the right) shares the pass-through dims it lines up with."""
    x, indices = _index_args(w, node)
    values = w.keys(node.args[2])
    if x is None or not isinstance(values, TensorKeys):
        return freeze_through(w, node)
    layout = _advanced_index_layout(w, node, x, indices)
    for k in range(1, len(values.dims) + 1):
        target = layout[-k] if k <= len(layout) else None
        if target is not None and values.sizes[-k] == len(target):
            w.unify(w.dk(values, -k), target, f"{node.name} (index_put values)")
        else:
            w.freeze_keys(w.dk(values, -k), f"{node.name}: broadcast into an indexed assignment")
    return x


@register_rule(aten.roll, aten.flip)
def roll(w: Walk, node: fx.Node):
    """Moves indices along the given dims: those dims are fixed, the others pass through."""
    x = w.keys(node.args[0])
    dims_arg = node.args[2] if node.target.overloadpacket is aten.roll else node.args[1]
    for d in (dims_arg if isinstance(dims_arg, (list, tuple)) else [dims_arg]):
        w.freeze_keys(w.dk(x, int(d)), f"{node.name}: indices move along this dim")
    return x


@register_rule(aten.gather)
def gather(w: Walk, node: fx.Node):
    """gather(x, dim, index): the output has index's shape; x's other dims line up with index's where sizes match."""
    x, index = w.keys(node.args[0]), w.keys(node.args[2])
    dim = int(node.args[1]) % len(x.dims)
    w.freeze_keys(w.dk(x, dim), f"{node.name}: gathered by index")
    for d in range(len(x.dims)):
        if d != dim and x.sizes[d] == index.sizes[d]:
            w.unify(w.dk(x, d), w.dk(index, d), f"{node.name} (gather)")
    return index
