"""Rules for ops that move, merge, split, slice or join dims; their rewriters update the sizes baked into args."""

from __future__ import annotations

import math
import operator
import sys

import torch
import torch.fx as fx

from graphopt.analysis.dependency.keys import product, split
from graphopt.analysis.dependency.walk import Walk, register_rule, shape, value_keys
from graphopt.graph.nodes import arg

aten = torch.ops.aten


def match_groups(a: tuple, b: tuple) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Pair runs of dims of shape ``a`` with runs of shape ``b`` that hold the same number of elements."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        if i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
            groups.append(((i, i + 1), (j, j)))
            i += 1
        elif j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
            groups.append(((i, i), (j, j + 1)))
            j += 1
        else:
            i0, j0, pa, pb = i, j, a[i], b[j]
            i, j = i + 1, j + 1
            while pa != pb:
                if pa < pb:
                    pa, i = pa * a[i], i + 1
                else:
                    pb, j = pb * b[j], j + 1
            groups.append(((i0, i), (j0, j)))
    return groups


def _sizes_rewrite(index: int):
    """Rewrite the size list at ``node.args[index]`` to the node's new output shape. -1 stays; a size computed at
    run time (``batch * channels * rows``: a count folded into the batch dim) is scaled by new/old size."""
    def rewrite(node: fx.Node, resized) -> None:
        new, old = resized.new_shape(node), resized.dep.walk.values[node].sizes
        sizes = list(node.args[index])
        offset = len(new) - len(sizes)
        for d, s in enumerate(sizes):
            if isinstance(s, int) and s != -1:
                sizes[d] = new[d + offset]
            elif isinstance(s, fx.Node) and new[d + offset] != old[d + offset]:
                sizes[d] = _scaled_size(node, s, new[d + offset], old[d + offset])
        node.args = (*node.args[:index], sizes, *node.args[index + 1:])
    return rewrite


def _scaled_size(user: fx.Node, size: fx.Node, new: int, old: int) -> fx.Node:
    """A graph node computing ``size * new // old`` (exact: the pruned factor divides ``size``), before ``user``."""
    g = math.gcd(new, old)
    with user.graph.inserting_before(user):
        scaled = user.graph.call_function(operator.mul, (size, new // g))
        return user.graph.call_function(operator.floordiv, (scaled, old // g)) if old // g != 1 else scaled


def reshaped(w: Walk, x, out: tuple, name: str):
    """Keys after a reshape of ``x`` to ``out``: runs of dims merge (products) and split (factoring)."""
    dims = []
    for (i0, i1), (o0, o1) in match_groups(x.sizes, out):
        entries = [w.dk(x, d) for d in range(i0, i1)]
        if i1 - i0 == 1 and o1 - o0 == 1:
            dims.append(entries[0])
        elif o1 == o0:
            continue  # a dropped singleton
        elif i1 == i0:
            dims.append(w.fresh(1, f"{name}[{o0}]", frozen="singleton"))
        else:
            refined = _refine(w, entries, x.sizes[i0:i1], out[o0:o1], name)
            if refined is not None:
                dims.extend(refined)
                continue
            flat = entries[0] if len(entries) == 1 else product(w.space, entries, name)
            dims.extend(split(w.space, flat, list(out[o0:o1]), name))
    return w.tensor(dims, name)


def _refine(w: Walk, entries: list, sizes_in: tuple, sizes_out: tuple, name: str) -> list | None:
    """Keys of a run of dims reshaped into another where every dim boundary of either side divides the next
    (``[L, N, E] -> [L, N*H, D]``: E splits into H x D, then N and H merge): each input dim splits at the
    other side's boundaries and the pieces merge into the output dims, so a count folded into a neighbouring dim
    (heads into the batch, channels with patch rows) keeps its own keys. None where the boundaries do not nest."""
    if len(sizes_in) == 1 or 1 in sizes_in or 1 in sizes_out:
        return None
    cum_in, cum_out = [math.prod(sizes_in[:k + 1]) for k in range(len(sizes_in))], \
        [math.prod(sizes_out[:k + 1]) for k in range(len(sizes_out))]
    bounds = sorted(set(cum_in) | set(cum_out))
    if any(b % a for a, b in zip(bounds, bounds[1:])):
        return None
    pieces, lo = [], 1
    for keys, hi in zip(entries, cum_in):
        inner = [b // a for a, b in zip([lo] + bounds, bounds) if lo < b <= hi]
        pieces.extend(split(w.space, keys, inner, name) if len(inner) > 1 else [keys])
        lo = hi
    dims, at, lo = [], 0, 1
    for hi in cum_out:
        n = sum(1 for b in bounds if lo < b <= hi)
        dims.append(pieces[at] if n == 1 else product(w.space, pieces[at:at + n], name))
        at, lo = at + n, hi
    return dims


@register_rule(aten.flatten, aten.unsqueeze, aten.squeeze)  # reshapes that bake no sizes
def view(w: Walk, node: fx.Node):
    """view/reshape/flatten/unflatten/(un)squeeze: a reshape of the input to the recorded output shape."""
    return reshaped(w, w.keys(node.args[0]), shape(node), node.name)


register_rule(aten.view, aten.reshape, aten._unsafe_view, rewrite=_sizes_rewrite(1))(view)


def _unflatten_rewrite(node: fx.Node, resized) -> None:
    dim, k = int(node.args[1]) % len(resized.new_shape(node.args[0])), len(node.args[2])
    node.args = (node.args[0], node.args[1], list(resized.new_shape(node)[dim: dim + k]), *node.args[3:])


register_rule(aten.unflatten, rewrite=_unflatten_rewrite)(view)


@register_rule(aten.permute)
def permute(w: Walk, node: fx.Node):
    """Dims move, keys with them."""
    x = w.keys(node.args[0])
    return w.tensor([w.dk(x, int(d)) for d in node.args[1]], node.name)


@register_rule(aten.numpy_T)
def numpy_t(w: Walk, node: fx.Node):
    """``Tensor.T``: every dim in reverse order (``x @ weight.T`` linear layers)."""
    x = w.keys(node.args[0])
    return w.tensor([w.dk(x, d) for d in reversed(range(len(x.dims)))], node.name)


@register_rule(aten.transpose, aten.t, aten.swapaxes)
def transpose(w: Walk, node: fx.Node):
    """Two dims swap (t: the two dims of a matrix)."""
    x = w.keys(node.args[0])
    order = list(range(len(x.dims)))
    a, b = (int(node.args[1]) % len(order), int(node.args[2]) % len(order)) if len(node.args) > 2 else (0, 1)
    order[a], order[b] = order[b], order[a]
    return w.tensor([w.dk(x, d) for d in order], node.name)


@register_rule(aten.expand, rewrite=_sizes_rewrite(1))
def expand(w: Walk, node: fx.Node):
    """Existing dims keep their keys; broadcast-expanded dims get a new atom of their own."""
    x, out = w.keys(node.args[0]), shape(node)
    lead = len(out) - len(x.dims)
    dims = []
    for d, n in enumerate(out):
        k = d - lead
        dims.append(w.dk(x, k) if k >= 0 and x.sizes[k] == n else w.fresh(n, f"{node.name}[{d}]"))
    return w.tensor(dims, node.name)


@register_rule(aten.expand_as)
def expand_as(w: Walk, node: fx.Node):
    """``x.expand_as(other)``: the output has ``other``'s dims (its sizes are read at run time, so a pruned
    ``other`` carries the expansion along); dims of ``x`` that are not broadcast must keep matching ``other``'s."""
    x, other = w.keys(node.args[0]), w.keys(node.args[1])
    lead = len(other.dims) - len(x.dims)
    for d in range(len(x.dims)):
        if x.sizes[d] == other.sizes[d + lead] and x.sizes[d] != 1:
            w.unify(w.dk(x, d), w.dk(other, d + lead), f"{node.name} (expand_as)")
    return other


@register_rule(aten.cat, aten.concat)
def cat(w: Walk, node: fx.Node):
    """The cat dim lists every input's keys in turn; the other dims are shared."""
    parts = [w.keys(t) for t in node.args[0]]
    parts = [p for p in parts if p is not None and p.sizes and math.prod(p.sizes) > 0]
    dim = int(arg(node, "dim", 0)) % len(parts[0].dims)
    dims = []
    for d in range(len(parts[0].dims)):
        if d == dim:
            dims.append([k for p in parts for k in w.dk(p, d)])
            continue
        first = w.dk(parts[0], d)
        for p in parts[1:]:
            w.unify(first, w.dk(p, d), f"{node.name} (cat)")
        dims.append(first)
    return w.tensor(dims, node.name)


@register_rule(aten.stack)
def stack(w: Walk, node: fx.Node):
    """Inputs share every dim; the new dim indexes the inputs (fixed)."""
    parts = [w.keys(t) for t in node.args[0]]
    dim = int(arg(node, "dim", 0)) % (len(parts[0].dims) + 1)
    dims = [w.dk(parts[0], d) for d in range(len(parts[0].dims))]
    for p in parts[1:]:
        for d in range(len(dims)):
            w.unify(dims[d], w.dk(p, d), f"{node.name} (stack)")
    dims.insert(dim, w.fresh(len(parts), f"{node.name}[{dim}]", frozen="stacked inputs"))
    return w.tensor(dims, node.name)


def _split_sizes_rewrite(node: fx.Node, resized) -> None:
    """New split sizes. Equal parts keep the op as written (``chunk(x, 2)`` stays, ``split(x, 64)`` becomes
    ``split(x, 32)``), so the constants still say what the model's forward says; uneven pruning turns split/chunk
    into split_with_sizes with the pruned sizes."""
    x = node.args[0]
    dim = _split_dim(node)
    sizes = [s[dim] for s in resized.new_shape(node)]
    if len(set(sizes)) == 1 and node.target == aten.chunk.default:
        return
    if len(set(sizes)) == 1 and node.target == aten.split.Tensor:
        node.args = (x, sizes[0], *node.args[2:])
        return
    node.target, node.args, node.kwargs = aten.split_with_sizes.default, (x, sizes, dim), {}


def _split_dim(node: fx.Node) -> int:
    ndim = len(node.args[0].meta["tensor_meta"].shape)
    return int(arg(node, "dim", 0)) % ndim


@register_rule(aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split, rewrite=_split_sizes_rewrite)
def split_rule(w: Walk, node: fx.Node):
    """Each output holds a consecutive run of the split dim's keys. ``chunk`` parts stay equal (index i of every
    part goes together): the user's ``x.chunk(n)`` then still splits the pruned tensor the same way, so the model
    can be written back (``to_model``)."""
    x = w.keys(node.args[0])
    dim = _split_dim(node)
    keys, start, outs = w.dk(x, dim), 0, []
    if node.target == aten.chunk.default:
        _couple_equal_parts(w, keys, [int(m.shape[dim]) for m in node.meta["tensor_meta"]], node.name)
    for meta in node.meta["tensor_meta"]:
        n = int(meta.shape[dim])
        outs.append(w.tensor([keys[start:start + n] if d == dim else w.dk(x, d) for d in range(len(x.dims))],
                             node.name))
        start += n
    return tuple(outs)


def _couple_equal_parts(w: Walk, keys, sizes: list[int], label: str) -> None:
    if len(set(sizes)) != 1:
        return
    m = sizes[0]
    for j in range(1, len(sizes)):
        for i in range(m):
            w.space.unify_keys(w.space.normalize(keys[i]), w.space.normalize(keys[j * m + i]), f"{label} (chunk)")


@register_rule(aten.unbind)
def unbind(w: Walk, node: fx.Node):
    """Each output is one index of the unbound dim: that dim is fixed."""
    x = w.keys(node.args[0])
    dim = int(arg(node, "dim", 0)) % len(x.dims)
    w.freeze_keys(w.dk(x, dim), f"{node.name}: unbind returns one tensor per index")
    rest = [w.dk(x, d) for d in range(len(x.dims)) if d != dim]
    return tuple(w.tensor(rest, node.name) for _ in range(x.sizes[dim]))


@register_rule(aten.select)
def select(w: Walk, node: fx.Node):
    """Picks one index of a dim: that dim is fixed, the rest pass through."""
    x = w.keys(node.args[0])
    dim = int(node.args[1]) % len(x.dims)
    w.freeze_keys(w.dk(x, dim), f"{node.name}: select picks a fixed index")
    return w.tensor([w.dk(x, d) for d in range(len(x.dims)) if d != dim], node.name)


def _slice_bounds(node: fx.Node, size: int) -> tuple[int, int, int, int]:
    dim, start, end, step = int(arg(node, "dim", 0)), arg(node, "start"), arg(node, "end"), int(arg(node, "step", 1))
    start, end, _ = slice(start if isinstance(start, int) else None,
                          end if isinstance(end, int) else None).indices(size)
    return dim, start, end, step


def _symbolic_bounds(node: fx.Node) -> bool:
    return any(isinstance(a, fx.Node) for a in node.args[2:4])


def _slice_rewrite(node: fx.Node, resized) -> None:
    if _symbolic_bounds(node):
        return  # bounds computed at run time (a sequence length): the rule froze this dim
    x = node.args[0]
    old = tuple(int(s) for s in x.meta["tensor_meta"].shape)
    dim, start, end, step = _slice_bounds(node, old[int(arg(node, "dim", 0)) % len(old)])
    dim %= len(old)
    kept = resized.kept_rows(x, dim)
    if kept is None or bool(kept.all()):
        return
    new_start = int(kept[:start].sum())
    new_end = new_start + int(kept[start:end].sum())
    node.args = (x, dim, new_start, new_end if end < old[dim] else sys.maxsize, *node.args[4:])


@register_rule(aten.slice, rewrite=_slice_rewrite)
def slice_rule(w: Walk, node: fx.Node):
    """A consecutive run of a dim's keys (a strided slice fixes the dim)."""
    x = w.keys(node.args[0])
    dim, start, end, step = _slice_bounds(node, x.sizes[int(arg(node, "dim", 0)) % len(x.dims)])
    dim %= len(x.dims)
    keys = w.dk(x, dim)
    if _symbolic_bounds(node):
        w.freeze_keys(keys, f"{node.name}: slice bounds known only at run time")
        n = shape(node)[dim]
        return w.tensor([w.fresh(n, f"{node.name}[{d}]", frozen="run-time slice") if d == dim else w.dk(x, d)
                         for d in range(len(x.dims))], node.name)
    if step != 1:
        w.freeze_keys(keys, f"{node.name}: strided slice")
    dims = [keys[start:end:step] if d == dim else w.dk(x, d) for d in range(len(x.dims))]
    return w.tensor(dims, node.name)


def _repeat_rewrite(node: fx.Node, resized) -> None:
    """Repeat counts stay what they were: a count computed at run time from a dim that pruning resized is scaled
    back (new/old size of the output over the input)."""
    new_out, new_in = resized.new_shape(node), resized.new_shape(node.args[0])
    old_out, old_in = resized.dep.walk.values[node].sizes, resized.dep.walk.values[node.args[0]].sizes
    lead, reps = len(new_out) - len(new_in), list(node.args[1])
    for d, r in enumerate(reps):
        if d < lead:
            continue
        new, old = new_out[d] // new_in[d - lead], old_out[d] // old_in[d - lead]
        if isinstance(r, int):
            reps[d] = new
        elif new != old:
            reps[d] = _scaled_size(node, r, new, old)
    node.args = (node.args[0], reps, *node.args[2:])


@register_rule(aten.repeat, rewrite=_repeat_rewrite)
def repeat(w: Walk, node: fx.Node):
    """``x.repeat(reps)`` tiles the whole tensor: output index (r, i) of a repeated dim is index i of tile r, a
    product with a new 'tile' atom outside (DeBERTa's relative-position keys tiled over the batch, heads inside);
    extra leading reps are new dims."""
    x, out = w.keys(node.args[0]), shape(node)
    if x is None:
        return freeze_through(w, node)
    lead = len(out) - len(x.dims)
    dims = []
    for d, n in enumerate(out):
        if d < lead:
            dims.append(w.fresh(n, f"{node.name}[{d}]"))
        elif n == x.sizes[d - lead]:
            dims.append(w.dk(x, d - lead))
        else:
            tile = w.fresh(n // x.sizes[d - lead], f"{node.name}/tile[{d}]")
            dims.append(product(w.space, [tile, w.dk(x, d - lead)], node.name))
    return w.tensor(dims, node.name)


def _repeat_interleave_rewrite(node: fx.Node, resized) -> None:
    dim = int(node.args[2]) if len(node.args) > 2 else int(node.kwargs.get("dim"))
    repeats = resized.new_shape(node)[dim] // resized.new_shape(node.args[0])[dim]
    node.args = (node.args[0], repeats, *node.args[2:])


@register_rule(aten.repeat_interleave, rewrite=_repeat_interleave_rewrite)
def repeat_interleave(w: Walk, node: fx.Node):
    """Index (i, r) of the output repeats index i: a product with a new 'repeat' atom (GQA head sharing)."""
    x = w.keys(node.args[0])
    dim_arg = arg(node, "dim")
    if x is None or not isinstance(node.args[1], int) or dim_arg is None:
        return freeze_through(w, node)
    dim = int(dim_arg) % len(x.dims)
    rep = w.fresh(int(node.args[1]), f"{node.name}/repeat")
    dims = [product(w.space, [w.dk(x, d), rep], node.name) if d == dim else w.dk(x, d) for d in range(len(x.dims))]
    return w.tensor(dims, node.name)


def freeze_through(w: Walk, node: fx.Node):
    """Fallback for a form of an op the rule does not model: its inputs and output keep their sizes."""
    for a in node.args:
        w.freeze_value(w.keys(a), f"{node.name}: unsupported form of {node.target}")
    return value_keys(w, node, node.name, frozen=f"{node.name}: unsupported form of {node.target}")


def _no_grad_region(w: Walk, node: fx.Node):
    """A torch.no_grad() region captured whole (HF rotary tables): its inputs and outputs keep their sizes."""
    for arg in node.args:
        w.freeze_value(w.keys(arg), f"{node.name}: computed in a no_grad region (e.g. rotary tables)")
    return value_keys(w, node, node.name, frozen=f"{node.name}: computed in a no_grad region (e.g. rotary tables)")


try:  # the higher-order op torch.export uses for `with torch.no_grad():` blocks
    from torch._higher_order_ops.wrap import wrap_with_set_grad_enabled

    register_rule(wrap_with_set_grad_enabled)(_no_grad_region)
except ImportError:  # older torch: such regions are frozen as unknown ops
    pass
