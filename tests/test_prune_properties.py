"""Property-based tests of ``prune-channels`` on random architectures (see random_archs.py for the generator).

Whatever the architecture, ratio and importance: pruning succeeds, the pruned module runs on the example batch and
on another batch size with the original output shapes, never grows, and shrinks when there is something to prune;
ratio 0 is the exact identity; the caller's model is never changed; ``round_to`` leaves multiples of it.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.analysis.dependency import DependencyGraph
from graphopt.passes.channel_prune import PruneChannels
from graphopt.pipeline.manager import Context, PassManager
from random_archs import (
    ALL_KINDS, MAX_C, Arch, Concat, Conv, Depthwise, Head, Residual, Shuffle, archs, build, example_input,
)

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                database=None)
SCALE = float(os.environ.get("GRAPHOPT_PROPERTY_SCALE", "1"))  # e.g. 10 for a longer bug hunt
if os.environ.get("GRAPHOPT_PROPERTY_NO_SHRINK"):  # report failures as found (shrinking a model takes minutes)
    SETTINGS["phases"] = (Phase.explicit, Phase.reuse, Phase.generate)


def examples(n: int) -> int:
    return max(1, round(n * SCALE))


ratios = st.floats(0, 0.9)
importances = st.sampled_from(["l1", "l2", "random"])
attentions = st.sampled_from(["heads", "head_dim", "both"])


def _run(module, x) -> list[torch.Tensor]:
    with torch.no_grad():
        out = module(x)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _shapes(outs) -> list[tuple]:
    return [tuple(o.shape) for o in outs]


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(before: dict, model: nn.Module) -> None:
    after = model.state_dict()
    assert list(after) == list(before), "the model's state_dict keys changed"
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), f"optimize changed the caller's `{k}`"


def _eligible_groups(model, x, attention: str):
    """Prunable groups the pass may touch with this ``attention`` option (as PruneChannels._eligible decides)."""
    dep = DependencyGraph(graphopt.trace(model, x))
    return [g for g in dep.prunable_groups
            if dep.group_kind(g) == "channels" or attention in ("both", dep.group_kind(g))]


# ---------------------------------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------------------------------

KIND_CLASS = {"conv": "Conv", "depthwise": "Depthwise", "grouped": "GroupedConv", "shuffle": "Shuffle", "se": "SE",
              "view": "ViewRoundTrip", "token_mlp": "TokenMLP", "attention": "Attention", "residual": "Residual",
              "concat": "Concat", "split": "Split", "mha": "Mha", "patch_fold": "PatchFold", "im2col": "Im2col",
              "pad": "Pad", "seq_pool": "SeqPool", "t_linear": "TLinear",
              "rel_pos": "RelPos"}


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_generator_produces_every_block(kind: str):
    """Each building block is reachable, and a recipe using it builds a small, valid model (no tracing here)."""
    arch = find(archs(), lambda a: KIND_CLASS[kind] in a.kinds(), settings=settings(max_examples=2000, database=None))
    model, x = build(arch)
    assert x.shape == (2, arch.in_ch, 8, 8)
    with torch.no_grad():
        assert model(x).shape == (2, 5) and model(example_input(arch, 3)).shape == (3, 5)
    assert all(m.out_channels <= MAX_C for m in model.modules() if isinstance(m, nn.Conv2d))
    assert eval(repr(arch), vars(__import__("random_archs"))) == arch  # the printed recipe rebuilds the model


# ---------------------------------------------------------------------------------------------------------------------
# Main property
# ---------------------------------------------------------------------------------------------------------------------


@settings(max_examples=examples(30), **SETTINGS)
@given(arch=archs(), ratio=ratios, importance=importances, attention=attentions)
def test_pruning_any_architecture(arch: Arch, ratio: float, importance: str, attention: str):
    model, x = build(arch)
    state = _state(model)
    want = _run(model, x)
    x3 = example_input(arch, 3)
    want3 = _run(model, x3)

    res = graphopt.optimize(model, [PruneChannels(ratio=ratio, importance=importance, attention=attention)], x)

    _assert_same_state(state, model)  # the caller's model is untouched
    assert model.training is False
    got, got3 = _run(res.module, x), _run(res.module, x3)
    assert _shapes(got) == _shapes(want)
    assert _shapes(got3) == _shapes(want3)
    assert all(torch.isfinite(o).all() for o in got + got3)

    record = res.report.records[0]
    before, after = _n_params(model), _n_params(res.module)
    assert record.params_before == before and record.params_after == after
    assert after <= before
    assert record.macs_after <= record.macs_before
    assert record.stats["params_removed"] == before - after
    assert record.modified == (after < before)
    if ratio >= 0.3 and after == before:  # (the analysis only runs when needed: tracing is the slow part)
        big = [g for g in _eligible_groups(model, x, attention) if g.size >= 4]
        assert not big, f"nothing pruned at ratio {ratio} though prunable groups of >= 4 channels exist: {big}"


# ---------------------------------------------------------------------------------------------------------------------
# Ratio 0, no mutation, round_to
# ---------------------------------------------------------------------------------------------------------------------


@settings(max_examples=examples(15), **SETTINGS)
@given(arch=archs(), importance=importances, string_form=st.booleans())
def test_ratio_zero_is_the_identity(arch: Arch, importance: str, string_form: bool):
    model, x = build(arch)
    passes = [f"prune-channels:ratio=0,importance={importance}"] if string_form else \
        [PruneChannels(ratio=0.0, importance=importance)]
    res = graphopt.optimize(model, passes, x)
    traced = graphopt.trace(model, x)
    for xi in (x, example_input(arch, 3)):
        for got, graph, eager in zip(_run(res.module, xi), _run(traced, xi), _run(model, xi), strict=True):
            assert torch.equal(got, graph)  # the pass changed nothing
            # eager nn.MultiheadAttention takes torch's fused fast path under no_grad: equal up to rounding
            torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    assert _n_params(res.module) == _n_params(model)
    record = res.report.records[0]
    assert record.params_after == record.params_before and not record.modified
    assert record.stats["params_removed"] == 0


@settings(max_examples=examples(6), **SETTINGS)
@given(arch=archs(), ratio=st.floats(0.3, 0.9), global_ranking=st.booleans(), steps=st.integers(1, 2))
def test_original_model_is_not_mutated(arch: Arch, ratio: float, global_ranking: bool, steps: int):
    model, x = build(arch)
    state = _state(model)
    modules = [(name, type(m)) for name, m in model.named_modules()]
    want = _run(model, x)
    graphopt.optimize(model, [PruneChannels(ratio=ratio, global_ranking=global_ranking, steps=steps)], x)
    _assert_same_state(state, model)
    assert [(name, type(m)) for name, m in model.named_modules()] == modules
    assert not model.training
    for got, w in zip(_run(model, x), want, strict=True):
        assert torch.equal(got, w)


def _dim_layout(dep: DependencyGraph, shapes: dict[str, tuple]) -> dict[tuple, tuple]:
    """(param, dim) -> (group, grid) for every parameter dim the analysis knows. ``grid``: the dim's rows are the
    full grid of ALL channels of its groups (one group: each of its channels once; several: a product such as
    heads x head_dim), so its pruned size is the product of the groups' kept counts. ``group``: the group, when
    the grid has just one. A dim that holds only some channels of a group (a conv feeding a concat that is then
    added to another tensor, the convs before a channel shuffle of a concat) is no grid."""
    rows: dict[tuple, dict[int, dict]] = {}
    for g in dep.groups:
        for m in g.members:
            per_row = rows.setdefault((m.param, m.dim), {})
            for r, c in zip(m.rows.tolist(), m.channel.tolist()):
                per_row.setdefault(r, {})[g.index] = c
    by_index = {g.index: g for g in dep.groups}
    layout = {}
    for (param, dim), per_row in rows.items():
        groups = sorted({i for cell in per_row.values() for i in cell})
        cells = {tuple(sorted(cell.items())) for cell in per_row.values()}
        full = all(len({cell.get(i) for cell in per_row.values()}) == by_index[i].size for i in groups)
        size = 1
        for i in groups:
            size *= by_index[i].size
        grid = full and len(per_row) == len(cells) == size == shapes[param][dim] \
            and all(len(cell) == len(groups) for cell in per_row.values())
        layout[(param, dim)] = (by_index[groups[0]] if grid and len(groups) == 1 else None, grid)
    return layout


def _partial_groups(dep: DependencyGraph) -> set[int]:
    """Indices of groups some tensor dim (a parameter's or any value's) holds only part of: the pieces of a concat
    later added to another tensor, the slices of a split, the convs before a channel shuffle of a concat. Pruning
    may empty such a dim, and the pass then puts a channel back (see test_round_to_after_restoring_a_channel)."""
    space = dep.walk.space
    group_of = {p: g.index for g in dep.groups for p in g.primes}
    size = {g.index: g.size for g in dep.groups}
    partial = set()
    values = list(dep.params.values()) + list(dep.walk.values.values())
    for value in values:
        for tk in value if isinstance(value, (tuple, list)) else [value]:
            for keys in getattr(tk, "dims", None) or []:
                held: dict[int, set] = {}
                for key in keys or []:
                    for p in space.normalize(key):
                        if p in group_of:  # (primes no parameter holds belong to no group)
                            held.setdefault(group_of[p], set()).add(p)
                partial.update(i for i, primes in held.items() if len(primes) < size[i])
    return partial


def _conv_linear_weights(model: nn.Module) -> dict[str, tuple]:
    return {f"{name}.weight": tuple(m.weight.shape) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


@settings(max_examples=examples(15), **SETTINGS)
@given(arch=archs(), ratio=st.floats(0.1, 0.9), importance=importances, attention=attentions)
def test_round_to_keeps_multiples(arch: Arch, ratio: float, importance: str, attention: str):
    """Every group keeps a multiple of round_to channels (or all), so every conv/linear whose output channels are
    whole groups (or a full grid of groups) keeps a multiple of round_to output channels, or all of them."""
    model, x = build(arch)
    gm = graphopt.trace(model, x)  # optimize() without its own trace, so the analysis sees the same graph
    dep = DependencyGraph(gm)
    shapes = {name: tuple(t.shape) for name, t in [*gm.named_parameters(), *gm.named_buffers()]}
    layout = _dim_layout(dep, shapes)
    pruned_gm, report = PassManager([PruneChannels(ratio=ratio, importance=importance, attention=attention,
                                                   round_to=4)]).run(gm, Context(x))
    pruned = {name: tuple(t.shape) for name, t in [*pruned_gm.named_parameters(), *pruned_gm.named_buffers()]}
    assert set(shapes) == set(pruned), "parameter names changed"
    partial = _partial_groups(dep)
    for (param, dim), (group, _) in layout.items():
        if group is not None and group.index not in partial:
            kept = pruned[param][dim]
            assert kept == group.size or kept % 4 == 0, \
                f"{group} keeps {kept} of {group.size} channels (`{param}` dim {dim}), not a multiple of round_to=4"
    for name, shape in _conv_linear_weights(model).items():
        out_dim = pruned[name][0]
        grid_groups = {g.index for g in dep.groups for m in g.members if (m.param, m.dim) == (name, 0)}
        if layout[(name, 0)][1] and not grid_groups & partial:
            assert out_dim == shape[0] or out_dim % 4 == 0, \
                f"{name}: {shape[0]} output channels pruned to {out_dim}, not a multiple of round_to=4"
    assert report.records[0].params_after <= report.records[0].params_before
    assert _shapes(_run(pruned_gm, example_input(arch, 3))) == [(3, 5)]


# ---------------------------------------------------------------------------------------------------------------------
# Regression tests for what the properties found (each fails today; strict, so a fix shows up as XPASS)
# ---------------------------------------------------------------------------------------------------------------------


def _c(out: int) -> Conv:
    return Conv(out=out, k=1, bias=False, bn=False, act=None)


def _out_channels(module: nn.Module) -> dict[str, int]:
    return {name: p.shape[0] for name, p in module.named_parameters() if name.endswith("weight")}


def test_round_to_after_restoring_a_channel():
    """Regression: restoring a channel so no dim empties must restore a whole round_to block."""
    arch = Arch(in_ch=3, seed=0, blocks=(_c(4), Concat(a=(_c(2),), b=(_c(10),)), Residual(body=(_c(12),))),
                head=Head("gap"))
    model, x = build(arch)
    res = graphopt.optimize(model, [PruneChannels(ratio=0.9, importance="l1", round_to=4)], x)
    kept = _out_channels(res.module)["blocks.2.body.0.0.weight"]  # this conv's outputs are the whole group
    assert kept % 4 == 0, f"the residual conv keeps {kept} of 12 output channels with round_to=4"


def test_depthwise_residual_is_prunable():
    """Regression: x + depthwise(x) used to freeze x (a size-1 factor made its keys products)."""
    arch = Arch(in_ch=3, seed=0, blocks=(Conv(out=8), Residual(body=(Depthwise(),))), head=Head("gap"))
    model, x = build(arch)
    res = graphopt.optimize(model, [PruneChannels(ratio=0.5)], x)
    assert _n_params(res.module) < _n_params(model)


class _ChannelsLastLinearThenConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.conv = nn.Linear(4, 4), nn.Conv2d(4, 5, 1)

    def forward(self, x):
        return self.conv(self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_batch_of_one_after_channels_last_linear():
    """torch.export proves batch > 1 here (a layout decision); graphopt.capture.guards checks the graph at batch 1 against
    the eager model and drops that guard, so a graph traced at batch 2 serves a batch of 1 too."""
    model = _ChannelsLastLinearThenConv().eval()
    res = graphopt.optimize(model, [PruneChannels(ratio=0.0)], torch.randn(2, 4, 8, 8))
    x1 = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(res.module(x1), model(x1))
    res = graphopt.optimize(model, [PruneChannels(ratio=0.0)], torch.randn(1, 4, 8, 8))
    torch.testing.assert_close(res.module(x1), model(x1))
