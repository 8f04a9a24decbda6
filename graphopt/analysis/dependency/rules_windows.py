"""Rules for ops that slide windows over spatial dims: pooling and resizing, padding, im2col/col2im
(``F.unfold``/``F.fold``), ``Tensor.unfold`` and pixel (un)shuffle.

The spatial dims they touch are fixed (a window position is not a channel); what they do to the channel dim is
modelled exactly: im2col's output rows are (channel x kernel position) products, so pruning a channel removes its
kernel-position rows from the layer that reads them, and col2im factors its input rows back into channels.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.analysis.dependency.keys import product, split
from graphopt.analysis.dependency.walk import Walk, register_rule, shape
from graphopt.graph.nodes import arg

aten = torch.ops.aten


def _spatial(w: Walk, node: fx.Node, out: tuple, start: int) -> list:
    return [w.fresh(n, f"{node.name}[{d}]", frozen="spatial") for d, n in enumerate(out[start:], start=start)]


@register_rule(aten.pixel_shuffle)
def pixel_shuffle(w: Walk, node: fx.Node):
    """(C*r*r, H, W) -> (C, H*r, W*r): channels are (c, r*r); the r*r part moves into space (fixed)."""
    x, r = w.keys(node.args[0]), int(node.args[1])
    c, sub = split(w.space, w.dk(x, -3), [x.sizes[-3] // (r * r), r * r], node.name)
    w.freeze_keys(sub, f"{node.name}: sub-pixel positions")
    w.tag(c, "channels")
    out = shape(node)
    return w.tensor([w.dk(x, d) for d in range(len(x.dims) - 3)] + [c] + _spatial(w, node, out, len(out) - 2),
                    node.name)


@register_rule(aten.pixel_unshuffle)
def pixel_unshuffle(w: Walk, node: fx.Node):
    """(C, H*r, W*r) -> (C*r*r, H, W): output channels are (c, sub-pixel position)."""
    x, r = w.keys(node.args[0]), int(node.args[1])
    sub = w.fresh(r * r, f"{node.name}/subpixel", frozen="sub-pixel positions")
    out = shape(node)
    return w.tensor([w.dk(x, d) for d in range(len(x.dims) - 3)] + [product(w.space, [w.dk(x, -3), sub], node.name)]
                    + _spatial(w, node, out, len(out) - 2), node.name)


WINDOWED_POOLS = (aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.max_pool2d_with_indices,
                  aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d)
POOLS = WINDOWED_POOLS + (aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d,
                          aten.adaptive_max_pool2d, aten.upsample_nearest2d, aten.upsample_bilinear2d)


def _kernel_per_dim(node: fx.Node, spatial: int) -> list[int] | None:
    """The window size along each spatial dim of a windowed pool; None for adaptive pools and resizes."""
    if node.target.overloadpacket not in WINDOWED_POOLS:
        return None
    k = node.args[1]
    k = [int(v) for v in k] if isinstance(k, (list, tuple)) else [int(k)]
    return k * spatial if len(k) == 1 else k


@register_rule(*POOLS)
def pool(w: Walk, node: fx.Node):
    """Pooling/resizing: batch and channel dims pass through; a spatial dim the op leaves alone (size kept, window
    1 or an adaptive/resize op at the same size) passes through too, so a pool over ``[B, 1, L, D]`` with window
    (2, 1) (sequence pooling) keeps D's channels; other spatial dims are new and fixed."""
    x = w.keys(node.args[0])
    single = hasattr(node.meta.get("tensor_meta"), "shape")
    out = shape(node) if single else tuple(node.meta["tensor_meta"][0].shape)
    spatial = len(out) - 2 if len(out) > 2 else 1
    lead = len(out) - spatial
    kernel = _kernel_per_dim(node, spatial)
    dims = [w.dk(x, d) for d in range(lead)]
    for i, n in enumerate(out[lead:]):
        d = lead + i
        untouched = x.sizes[d] == n and (kernel is None or kernel[i] == 1)
        dims.append(w.dk(x, d) if untouched else w.fresh(n, f"{node.name}[{d}]", frozen="spatial"))
    result = w.tensor(dims, node.name)
    return result if single else (result, result)


PADS = (aten.pad, aten.constant_pad_nd, aten.reflection_pad1d, aten.reflection_pad2d, aten.reflection_pad3d,
        aten.replication_pad1d, aten.replication_pad2d, aten.replication_pad3d)


@register_rule(*PADS)
def pad(w: Walk, node: fx.Node):
    """Padding (``F.pad``, TF-"SAME" convs): dims without padding pass through. A constant pad of a dim adds new
    fixed indices on either side (a channel dim padded with zeros, as in option-A ResNet shortcuts, keeps its own
    channels prunable, the pad counts stay); a reflect/replicate pad fixes the dim it mirrors."""
    x, pads = w.keys(node.args[0]), [int(p) for p in node.args[1]]
    constant = node.target.overloadpacket is aten.constant_pad_nd or arg(node, "mode", "constant") == "constant"
    dims = [w.dk(x, d) for d in range(len(x.dims))]
    for i in range(len(pads) // 2):
        d, before, after = len(dims) - 1 - i, pads[2 * i], pads[2 * i + 1]
        if before == after == 0:
            continue
        if constant and before >= 0 and after >= 0:
            dims[d] = (w.fresh(before, f"{node.name}/pad[{d}]", frozen="padding") + dims[d]
                       + w.fresh(after, f"{node.name}/pad[{d}]", frozen="padding"))
        else:
            w.freeze_keys(dims[d], f"{node.name}: padded by mirroring or cropped")
            dims[d] = w.fresh(shape(node)[d], f"{node.name}[{d}]", frozen="padded")
    return w.tensor(dims, node.name)


@register_rule(aten.im2col)
def im2col(w: Walk, node: fx.Node):
    """``F.unfold``: (N, C, H, W) -> (N, C*kh*kw, L). Output row (c, p) is channel c at kernel position p: a
    product of the channel keys with a fixed kernel-position atom; the block dim L is new and fixed."""
    x, out = w.keys(node.args[0]), shape(node)
    c = len(x.dims) - 3
    positions = out[-2] // x.sizes[c]
    kpos = w.fresh(positions, f"{node.name}/kernel", frozen="kernel positions")
    w.freeze_keys(w.dk(x, -1), f"{node.name}: sliding blocks")
    w.freeze_keys(w.dk(x, -2), f"{node.name}: sliding blocks")
    lead = [w.dk(x, d) for d in range(c)]
    return w.tensor(lead + [product(w.space, [w.dk(x, c), kpos], node.name)]
                    + [w.fresh(out[-1], f"{node.name}/blocks", frozen="sliding blocks")], node.name)


@register_rule(aten.col2im)
def col2im(w: Walk, node: fx.Node):
    """``F.fold``: (N, C*kh*kw, L) -> (N, C, H, W). Input rows factor into (channel, kernel position): the channel
    part carries on, the kernel positions and blocks are fixed."""
    x, out = w.keys(node.args[0]), shape(node)
    c = len(x.dims) - 2
    channels = out[c]
    ch, kpos = split(w.space, w.dk(x, c), [channels, x.sizes[c] // channels], node.name)
    w.freeze_keys(kpos, f"{node.name}: kernel positions")
    w.tag(ch, "channels")
    w.freeze_keys(w.dk(x, -1), f"{node.name}: sliding blocks")
    return w.tensor([w.dk(x, d) for d in range(c)] + [ch] + _spatial(w, node, out, len(out) - 2), node.name)


@register_rule(aten.unfold)
def tensor_unfold(w: Walk, node: fx.Node):
    """``Tensor.unfold(dim, size, step)``: dim becomes the window index and a new last dim the position in the
    window, both fixed (windows overlap); the other dims pass through."""
    x, out = w.keys(node.args[0]), shape(node)
    dim = int(node.args[1]) % len(x.dims)
    w.freeze_keys(w.dk(x, dim), f"{node.name}: sliding windows")
    dims = [w.fresh(out[d], f"{node.name}[{d}]", frozen="sliding windows") if d == dim else w.dk(x, d)
            for d in range(len(x.dims))]
    return w.tensor(dims + [w.fresh(out[-1], f"{node.name}/window", frozen="sliding windows")], node.name)
