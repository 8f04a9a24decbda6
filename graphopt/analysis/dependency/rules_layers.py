"""Rules for layers with parameters and contractions: conv, linear, matmul, attention, norms, embedding."""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from graphopt.analysis.dependency.keys import product, split
from graphopt.analysis.dependency.walk import Walk, register_rule, shape, value_keys
from graphopt.graph.nodes import arg

aten = torch.ops.aten


def _groups_index(node: fx.Node) -> int:
    return 8 if node.target == aten.convolution.default else 6


def _conv_groups_rewrite(node: fx.Node, resized) -> None:
    """``groups`` = new channels / new weight channels per group (input side; output side when transposed)."""
    weight = resized.new_shape(node.args[1])
    channels = resized.new_shape(node)[1] if _is_transposed(node) else resized.new_shape(node.args[0])[1]
    groups, index = channels // weight[1], _groups_index(node)
    if len(node.args) > index:
        node.args = (*node.args[:index], groups, *node.args[index + 1:])
    elif int(node.kwargs.get("groups", 1)) != groups:
        node.kwargs = {**node.kwargs, "groups": groups}


def _is_transposed(node: fx.Node) -> bool:
    if node.target == aten.convolution.default:
        return bool(node.args[6])
    return getattr(node.target, "overloadpacket", None) in (aten.conv_transpose1d, aten.conv_transpose2d,
                                                             aten.conv_transpose3d)


@register_rule(aten.conv1d, aten.conv2d, aten.conv3d, aten.conv_transpose1d, aten.conv_transpose2d,
               aten.conv_transpose3d, aten.convolution, rewrite=_conv_groups_rewrite)
def conv(w: Walk, node: fx.Node):
    """Input channels = weight's in-dim; output channels = weight's out-dim (and bias); groups factor both."""
    x, wt = w.keys(node.args[0]), w.keys(node.args[1])
    bias = w.keys(arg(node, "bias"))
    transposed = _is_transposed(node)
    groups = int(arg(node, "groups", 1))
    name = node.name
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    channels = w.dk(x, 1)
    for d in range(2, len(wt.dims)):
        w.bind(wt, d, w.fresh(wt.sizes[d], f"{wt.label}[{d}]", frozen="kernel window"), name)
    if groups == 1:
        w.bind(wt, in_dim, channels, name)
        out = w.dk(wt, out_dim)
    else:  # channels = (group, channel within group) on both sides; only per-group sizes live in the weight
        g, per_group = split(w.space, channels, [groups, len(channels) // groups], name)
        w.bind(wt, in_dim, channels if transposed else per_group, name)
        out = product(w.space, [g, w.dk(wt, 1) if transposed else w.fresh(wt.sizes[0] // groups, f"{name}/out")],
                      name)
        if not transposed:
            w.bind(wt, 0, out, name)
    if bias is not None:
        w.bind(bias, 0, out, name)
    spatial = [w.fresh(n, f"{name}[{d}]", frozen="spatial") for d, n in enumerate(shape(node)[2:], start=2)]
    return w.tensor([w.dk(x, 0), out, *spatial], name)


@register_rule(aten.linear)
def linear(w: Walk, node: fx.Node):
    """y = x W^T + b over the last dim."""
    x, wt, bias = w.keys(node.args[0]), w.keys(node.args[1]), w.keys(arg(node, "bias"))
    w.bind(wt, 1, w.dk(x, -1), node.name)
    out = w.dk(wt, 0)
    if bias is not None:
        w.bind(bias, 0, out, node.name)
    return w.tensor([w.dk(x, d) for d in range(len(x.dims) - 1)] + [out], node.name)


@register_rule(aten.addmm)
def addmm(w: Walk, node: fx.Node):
    """bias + m1 @ m2 (GPT-2's Conv1D)."""
    bias, m1, m2 = (w.keys(a) for a in node.args[:3])
    w.unify(w.dk(m1, 1), w.dk(m2, 0), node.name)
    out = w.dk(m2, 1)
    if bias is not None:
        w.bind(bias, -1, out, node.name)
    return w.tensor([w.dk(m1, 0), out], node.name)


@register_rule(aten.matmul, aten.bmm, aten.mm)
def matmul(w: Walk, node: fx.Node):
    """Contract a's last dim with b's second to last; leading (batch) dims broadcast."""
    a, b = w.keys(node.args[0]), w.keys(node.args[1])
    if len(a.dims) < 2 or len(b.dims) < 2:
        w.freeze_value(a, "1-D matmul")
        w.freeze_value(b, "1-D matmul")
        return value_keys(w, node, node.name, frozen="1-D matmul")
    w.unify(w.dk(a, -1), w.dk(b, -2), f"{node.name} (contraction)")
    # batched products of heads (q @ k^T, attn @ v); a batched matrix-vector product is a per-token linear layer
    # (MoE experts' weights gathered per token, bmm(weight, x.unsqueeze(-1))), whose dims are no heads
    if len(a.dims) >= 3 and len(b.dims) >= 3 and a.sizes[-2] != 1 and b.sizes[-1] != 1:
        w.tag(w.dk(a, -3), "heads")
        w.tag(w.dk(a, -1), "head_dim")
        w.tag(w.dk(b, -1), "head_dim")
    out = shape(node)
    batch = _broadcast_batch(w, [a, b], out[:-2], node.name)
    return w.tensor(batch + [w.dk(a, -2), w.dk(b, -1)], node.name)


def _broadcast_batch(w: Walk, tensors, out_batch, name):
    """Leading dims of several operands, aligned from the right of their batch part."""
    dims = []
    for d, n in enumerate(out_batch):
        same = []
        for tk in tensors:
            k = d - (len(out_batch) - (len(tk.dims) - 2))
            if k >= 0 and tk.sizes[k] == n:
                same.append(w.dk(tk, k))
        if not same:
            dims.append(w.fresh(n, f"{name}[{d}]", frozen="broadcast batch"))
            continue
        for other in same[1:]:
            w.unify(same[0], other, name)
        dims.append(same[0])
    return dims


def _sdpa_scale_rewrite(node: fx.Node, resized) -> None:
    """Keep the attention scale of the original head_dim when head_dim is pruned (the model was trained so)."""
    old = int(node.args[0].meta["tensor_meta"].shape[-1])
    if resized.new_shape(node.args[0])[-1] != old and node.kwargs.get("scale") is None and len(node.args) < 7:
        node.kwargs = {**node.kwargs, "scale": 1.0 / math.sqrt(old)}


@register_rule(aten.scaled_dot_product_attention, rewrite=_sdpa_scale_rewrite)
def sdpa(w: Walk, node: fx.Node):
    """softmax(q k^T) v: q/k share head_dim, k/v share length, batch and head dims broadcast (GQA: heads fixed)."""
    q, k, v = (w.keys(a) for a in node.args[:3])
    mask = w.keys(arg(node, "attn_mask"))
    name = node.name
    w.unify(w.dk(q, -1), w.dk(k, -1), f"{name} (q/k head_dim)")
    w.unify(w.dk(k, -2), w.dk(v, -2), f"{name} (k/v length)")
    for t in (q, k, v):
        if len(t.dims) >= 3:
            w.tag(w.dk(t, -3), "heads")
        w.tag(w.dk(t, -1), "head_dim")
    lead = [{q.sizes[d], k.sizes[d], v.sizes[d]} - {1} for d in range(len(q.sizes) - 2)] \
        if len(q.sizes) == len(k.sizes) == len(v.sizes) else [{0, 1}]
    if any(len(sizes) > 1 for sizes in lead):  # a single key/value head broadcast (multi-query) is not grouping
        for t in (q, k, v):  # grouped-query attention inside SDPA: keep head counts as they are
            w.freeze_keys(w.dk(t, -3), f"{name}: grouped heads inside scaled_dot_product_attention")
    batch = _broadcast_batch(w, [q, k, v], q.sizes[:-2], name)
    if mask is not None:
        out_like = batch + [w.dk(q, -2), w.dk(k, -2)]
        for d in range(len(mask.dims)):
            target = out_like[d - len(mask.dims)]
            if mask.sizes[d] == len(target):
                w.unify(w.dk(mask, d), target, f"{name} (mask)")
    return w.tensor(batch + [w.dk(q, -2), w.dk(v, -1)], name)


@register_rule(aten.embedding)
def embedding(w: Walk, node: fx.Node):
    """Rows are looked up by token id (fixed); the embedding width is a channel dim."""
    wt, idx = w.keys(node.args[0]), w.keys(node.args[1])
    w.bind(wt, 0, w.fresh(wt.sizes[0], f"{wt.label}[0]", frozen="embedding rows are token ids"), node.name)
    return w.tensor([w.dk(idx, d) for d in range(len(idx.dims))] + [w.dk(wt, 1)], node.name)


@register_rule(aten.batch_norm, aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit,
               aten.instance_norm)
def batch_norm(w: Walk, node: fx.Node):
    """Per-channel (dim 1) statistics and affine parameters."""
    x = w.keys(node.args[0])
    channels = w.dk(x, 1)
    for a in node.args[1:5]:
        p = w.keys(a)
        if p is not None:
            w.bind(p, 0, channels, node.name)
    if node.target == aten.batch_norm.default or node.target == aten.instance_norm.default:
        return x
    extra = value_keys(w, node, node.name, frozen="batch-norm statistics")
    return (x, *extra[1:])


def _normalized_shape_rewrite(node: fx.Node, resized) -> None:
    k = len(node.args[1])
    node.args = (node.args[0], list(resized.new_shape(node)[-k:]), *node.args[2:])


@register_rule(aten.layer_norm, aten.rms_norm, rewrite=_normalized_shape_rewrite)
def layer_norm(w: Walk, node: fx.Node):
    """Normalizes (and scales) over the last len(normalized_shape) dims."""
    x = w.keys(node.args[0])
    k = len(node.args[1])
    for p in (w.keys(arg(node, "weight")), w.keys(arg(node, "bias")) if node.target != aten.rms_norm.default
              else None):
        if p is not None:
            for i in range(k):
                w.bind(p, i, w.dk(x, len(x.dims) - k + i), node.name)
    return x


def _group_norm_rewrite(node: fx.Node, resized) -> None:
    old_c = int(node.args[0].meta["tensor_meta"].shape[1])
    if int(node.args[1]) == old_c:  # one group per channel: follows the channel count
        node.args = (node.args[0], resized.new_shape(node)[1], *node.args[2:])


@register_rule(aten.group_norm, rewrite=_group_norm_rewrite)
def group_norm(w: Walk, node: fx.Node):
    """Per-channel affine parameters; with 1 < groups < channels the groups must stay equal, so channels freeze."""
    x = w.keys(node.args[0])
    channels = w.dk(x, 1)
    for a in (arg(node, "weight"), arg(node, "bias")):
        p = w.keys(a)
        if p is not None:
            w.bind(p, 0, channels, node.name)
    groups = int(node.args[1])
    if 1 < groups < len(channels):
        w.freeze_keys(channels, f"{node.name}: group_norm with {groups} groups needs equal groups")
    return x


def _einsum_labels(equation: str, ranks: list[int]) -> tuple[list[list[str]], list[str]] | None:
    """Per operand and for the output, one label per dim; '...' becomes labels aligned from the right across
    operands (broadcast). None for forms not modelled (a label twice in one operand: a diagonal or trace)."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    specs = lhs.split(",")
    if len(specs) != len(ranks):
        return None
    widest = max((r - (len(s) - 3) for s, r in zip(specs, ranks) if "..." in s), default=0)
    ellipsis = [f"...{i}" for i in range(widest)]

    def expand(spec: str, rank: int | None) -> list[str]:
        if "..." not in spec:
            return list(spec)
        head, _, tail = spec.partition("...")
        n = widest if rank is None else rank - len(head) - len(tail)
        return list(head) + ellipsis[widest - n:] + list(tail)

    labels = [expand(s, r) for s, r in zip(specs, ranks)]
    if any(len(set(ls)) != len(ls) for ls in labels):
        return None
    if arrow:
        out = expand(rhs, None)
    else:  # implicit output: the broadcast dims, then the letters used once, alphabetically
        counts = {c: sum(ls.count(c) for ls in labels) for ls in labels for c in ls}
        out = ellipsis + sorted(c for c, k in counts.items() if k == 1 and not c.startswith("..."))
    return labels, out


@register_rule(aten.einsum)
def einsum(w: Walk, node: fx.Node):
    """A dim label shared by operands is one dim (a contracted label couples the operands like a linear's input
    features; a kept one passes to the output); a size-1 broadcast occurrence is left out of the coupling."""
    operands = [w.keys(o) for o in node.args[1]]
    parsed = _einsum_labels(node.args[0], [len(tk.dims) for tk in operands]) if all(
        tk is not None and hasattr(tk, "dims") for tk in operands) else None
    if parsed is None:
        reason = f"{node.name}: einsum form not modelled"
        for tk in operands:
            w.freeze_value(tk, reason)
        return value_keys(w, node, node.name, frozen=reason)
    labels, out_labels = parsed
    by_label: dict[str, list] = {}
    for tk, ls in zip(operands, labels):
        for d, label in enumerate(ls):
            by_label.setdefault(label, []).append((tk, d))
    keys = {}
    for label, uses in by_label.items():
        size = max(tk.sizes[d] for tk, d in uses)
        full = [(tk, d) for tk, d in uses if tk.sizes[d] == size]
        first = w.dk(*full[0])
        for tk, d in full[1:]:
            w.bind(tk, d, first, f"{node.name} (einsum '{label}')")
        keys[label] = first
    out = shape(node)
    dims = [keys[label] if label in keys and len(keys[label]) == n else
            w.fresh(n, f"{node.name}[{i}]", frozen="einsum broadcast") for i, (label, n) in enumerate(zip(out_labels, out))]
    return w.tensor(dims, node.name)
