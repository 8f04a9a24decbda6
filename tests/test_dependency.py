"""DependencyGraph: which channels are coupled, with which index mapping, and what is frozen and why."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.analysis.dependency import DependencyGraph
from models import build


def analyse(model, *inputs):
    return DependencyGraph(graphopt.trace(model.eval(), inputs))


def group_of(dep, param, dim):
    """The group holding dim ``dim`` of ``param`` (a group with at least one prunable channel)."""
    found = [g for g in dep.groups if any(m.param == param and m.dim == dim for m in g.members) and len(g.prunable)]
    assert found, f"no prunable group has {param} dim {dim}"
    return found[0]


def member(group, param, dim):
    return next(m for m in group.members if m.param == param and m.dim == dim)


def rows_by_channel(group, param, dim):
    m = member(group, param, dim)
    out = {}
    for r, c in zip(m.rows.tolist(), m.channel.tolist()):
        out.setdefault(c, []).append(r)
    return out


def test_residual_stage_couples_every_conv_writing_to_it():
    dep = DependencyGraph(graphopt.trace(build("resnet_basic").model, build("resnet_basic").example_inputs))
    stage = group_of(dep, "stem.0.weight", 0)
    params = stage.params()
    assert {"layers.0.conv2.0.weight", "layers.0.conv1.0.weight", "layers.1.conv1.0.weight"} <= set(params)
    assert "layers.0.conv1.0.bias" not in params  # the block's inner channels are a group of their own
    assert stage.size == 16 and len(stage.prunable) == 16


class CatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], dim=1)).mean((2, 3))


def test_concat_maps_each_input_to_its_offset():
    dep = analyse(CatNet(), torch.randn(2, 3, 4, 4))
    ga, gb = group_of(dep, "a.weight", 0), group_of(dep, "b.weight", 0)
    assert ga is not gb
    assert sorted(member(ga, "c.weight", 1).rows.tolist()) == [0, 1, 2, 3]
    assert sorted(member(gb, "c.weight", 1).rows.tolist()) == [4, 5, 6, 7, 8, 9]


class SplitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.x, self.y = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(5, 4, 1)

    def forward(self, inp):
        a, b = torch.split(self.stem(inp), [3, 5], dim=1)
        return (self.x(a) + self.y(b)).mean((2, 3))


def test_split_maps_each_output_back_to_its_offset():
    dep = analyse(SplitNet(), torch.randn(2, 3, 4, 4))
    stem = group_of(dep, "stem.weight", 0)
    x_rows, y_rows = rows_by_channel(stem, "x.weight", 1), rows_by_channel(stem, "y.weight", 1)
    assert sorted(x_rows) == [0, 1, 2] and [x_rows[c] for c in range(3)] == [[0], [1], [2]]
    assert sorted(y_rows) == [3, 4, 5, 6, 7] and y_rows[3] == [0] and y_rows[7] == [4]


class FlattenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 2), 1))


def test_flatten_expands_each_channel_to_its_features():
    dep = analyse(FlattenHead(), torch.randn(2, 3, 8, 8))
    rows = rows_by_channel(group_of(dep, "conv.weight", 0), "fc.weight", 1)
    assert rows == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7], 2: [8, 9, 10, 11], 3: [12, 13, 14, 15]}


class Depthwise(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(self.dw(self.pw(x))).mean((2, 3))


def test_depthwise_conv_couples_input_and_output_channels():
    dep = analyse(Depthwise(groups=8), torch.randn(2, 3, 6, 6))
    g = group_of(dep, "pw.weight", 0)
    assert {"dw.weight", "dw.bias", "out.weight"} <= set(g.params())
    assert rows_by_channel(g, "dw.weight", 0) == rows_by_channel(g, "pw.weight", 0)


def test_grouped_conv_prunes_the_same_index_in_every_group():
    dep = analyse(Depthwise(groups=2), torch.randn(2, 3, 6, 6))
    g = group_of(dep, "pw.weight", 0)
    assert g.size == 4  # 8 channels = 2 groups (kept whole) x 4 per group
    assert rows_by_channel(g, "pw.weight", 0) == {0: [0, 4], 1: [1, 5], 2: [2, 6], 3: [3, 7]}
    assert rows_by_channel(g, "dw.weight", 1) == {0: [0], 1: [1], 2: [2], 3: [3]}


class PermuteLinear(nn.Module):
    """A Linear over the height dim, after a permute: it must not be coupled with conv channels."""

    def __init__(self):
        super().__init__()
        self.conv, self.mix, self.out = nn.Conv2d(3, 6, 1), nn.Linear(8, 8), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.mix(self.conv(x).permute(0, 1, 3, 2)).permute(0, 1, 3, 2)
        return self.out(y).mean((2, 3))


def test_linear_over_a_spatial_dim_is_not_coupled_with_channels():
    dep = analyse(PermuteLinear(), torch.randn(2, 3, 8, 8))
    channels = group_of(dep, "conv.weight", 0)
    assert "mix.weight" not in channels.params() and "out.weight" in channels.params()
    spatial = [g for g in dep.groups if any(m.param == "mix.weight" and m.dim == 1 for m in g.members)]
    assert all(len(g.prunable) == 0 for g in spatial)  # the height dim comes from the input: frozen
    assert "spatial" in set().union(*(g.frozen.values() for g in spatial)) or spatial[0].frozen


class MaskedAndSqueezed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.mask = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 1, 1)
        self.se1, self.se2, self.out = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        y = y * torch.sigmoid(self.mask(y))  # (B,1,H,W) broadcast over channels
        y = y * torch.sigmoid(self.se2(torch.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        return self.out(y).mean((2, 3))


def test_broadcast_mask_and_squeeze_excitation():
    dep = analyse(MaskedAndSqueezed(), torch.randn(2, 3, 8, 8))
    g = group_of(dep, "conv.weight", 0)
    assert {"se2.weight", "se2.bias", "se1.weight", "mask.weight", "out.weight"} <= set(g.params())
    assert member(g, "mask.weight", 1).rows.size == 8 and "mask.bias" not in g.params()


def test_vit_heads_and_head_dim_are_separate_groups_with_tokens_coupled_to_the_stream():
    case = build("vit")
    dep = DependencyGraph(graphopt.trace(case.model, case.example_inputs))
    kinds = {dep.group_kind(g) for g in dep.prunable_groups
             if any(m.param == "blocks.0.attn.qkv.weight" and m.dim == 0 for m in g.members)}
    assert kinds == {"heads", "head_dim"}
    stream = group_of(dep, "patch_embed.weight", 0)
    assert {"cls_token", "pos_embed", "blocks.0.attn.proj.weight", "norm.weight"} <= set(stream.params())
    heads = next(g for g in dep.prunable_groups if dep.group_kind(g) == "heads"
                 and "blocks.0.attn.qkv.weight" in g.params())
    assert heads.size == 4 and len(member(heads, "blocks.0.attn.qkv.weight", 0).rows) == 3 * 4 * 16


def test_gqa_kv_heads_couple_their_query_heads():
    case = build("hf_llama")
    dep = DependencyGraph(graphopt.trace(case.model, case.example_inputs))
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    kv = next(g for g in dep.prunable_groups if dep.group_kind(g) == "heads" and k in g.params())
    assert kv.size == 2  # 2 kv heads, each serving 2 query heads
    head_dim = 64 // 4
    assert len(member(kv, k, 0).rows) == 2 * head_dim
    assert len(member(kv, q, 0).rows) == 4 * head_dim  # every query row belongs to one kv head


def test_model_inputs_and_outputs_are_frozen():
    case = build("resnet_basic")
    dep = DependencyGraph(graphopt.trace(case.model, case.example_inputs))
    classes = [g for g in dep.groups if any(m.param == "fc.weight" and m.dim == 0 for m in g.members)][0]
    assert len(classes.prunable) == 0 and set(classes.frozen.values()) == {"model output"}
    rgb = [g for g in dep.groups if any(m.param == "stem.0.weight" and m.dim == 1 for m in g.members)][0]
    assert set(rgb.frozen.values()) == {"model input `x`"}


def test_every_zoo_model_is_analysed_without_error():
    from models import NAMES
    for name in NAMES:
        case = build(name)
        dep = DependencyGraph(graphopt.trace(case.model, case.example_inputs))
        assert dep.prunable_groups, name
        for g in dep.groups:
            for m in g.members:
                assert m.rows.shape == m.channel.shape and (m.channel < g.size).all()


class IndexNet(nn.Module):
    """Advanced indexing on non-channel dims (rows picked by a tensor, an indexed assignment) and on channels."""

    def __init__(self, on_channels: bool = False):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 1)
        self.register_buffer("rows", torch.tensor([3, 0, 2]))
        self.on_channels = on_channels

    def forward(self, x):
        h = self.a(x)
        if self.on_channels:
            h = h[:, self.rows]  # aten.index on the channel dim: those channels must stay
            return h.mean((2, 3))
        picked = h[:, :, self.rows]  # aten.index(h, [None, None, rows])
        out = h.clone()
        out[:, :, self.rows] = picked * 2  # aten.index_put
        return self.b(out).mean((2, 3))


def _ops(dep):
    return {str(n.target) for n in dep.gm.graph.nodes if n.op == "call_function"}


def test_advanced_indexing_of_a_spatial_dim_keeps_channels_prunable():
    dep = analyse(IndexNet(), torch.randn(2, 3, 5, 5))
    ops = _ops(dep)
    assert "aten.index.Tensor" in ops and {"aten.index_put.default", "aten.index_put_.default"} & ops
    assert not dep.unknown_ops
    group = group_of(dep, "a.weight", 0)
    assert "b.weight" in group.params() and len(group.prunable) == 8
    res = graphopt.optimize(IndexNet(), "prune-channels:ratio=0.5", (torch.randn(2, 3, 5, 5),))
    assert res.module.a.weight.shape[0] == 4
    assert res.module(torch.randn(3, 3, 5, 5)).shape == (3, 6)


def test_a_constant_pick_of_channels_keeps_those_and_frees_the_unread_ones():
    """``h[:, rows]`` with a constant ``rows``: the picked channels reach the model output (frozen), the other five
    are read by nothing, so pruning removes them, renumbers ``rows`` and changes no output."""
    model = IndexNet(on_channels=True).eval()
    x = torch.randn(2, 3, 5, 5)
    dep = analyse(model, x)
    assert not dep.unknown_ops
    group = group_of(dep, "a.weight", 0)
    assert sorted(set(range(8)) - set(group.prunable.tolist())) == [0, 2, 3]
    res = graphopt.optimize(model, "prune-channels:ratio=0.5", (x,))
    assert res.module.a.weight.shape[0] == 4  # half of 8 go, all of them unread
    picked = res.module.a.weight[res.module.rows]  # the renumbered pick reads the same filters
    torch.testing.assert_close(picked, model.a.weight[model.rows], rtol=0, atol=0)
    x3 = torch.randn(3, 3, 5, 5)
    torch.testing.assert_close(res.module(x3), model(x3), rtol=0, atol=0)
    assert torch.equal(model.rows, torch.tensor([3, 0, 2]))  # the user's buffer is untouched


class EinsumNet(nn.Module):
    """A projection written as einsum (a free-standing weight), then per-head scores with a broadcast dim."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16))
        self.heads = nn.Parameter(torch.randn(16, 4))
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.einsum("bi,ij->bj", x, self.w)
        gate = torch.einsum("...j,jk->...k", h, self.heads).sigmoid().mean(-1, keepdim=True)
        return self.out(h * gate)


def test_einsum_projections_couple_like_linears():
    dep = analyse(EinsumNet(), torch.randn(2, 8))
    assert not dep.unknown_ops
    group = group_of(dep, "w", 1)
    assert {"w", "heads", "out.weight"} <= set(group.params()) and len(group.prunable) == 16
    res = graphopt.optimize(EinsumNet(), "prune-channels:ratio=0.5", torch.randn(2, 8))
    assert res.module.w.shape == (8, 8) and res.module.heads.shape[0] == 8  # j pruned with w; k is its own group
    assert res.module(torch.randn(5, 8)).shape == (5, 3)
