"""Where the graph reads its weights: next to the op that uses them after a pass (so a parametrized weight, say
a masked one, is materialized only while its op runs), at the top while passes run (so a pass may add a reader
anywhere)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

import graphopt
from graphopt.analysis.sparsity import WeightMask
from graphopt.graph.nodes import hoist_get_attrs, sink_get_attrs
from graphopt.pipeline.pass_base import Pass, PassResult


def _mlp(depth: int = 6, width: int = 32) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers).eval()


def _most_masked_weights_alive(module: nn.Module, x: torch.Tensor) -> int:
    """Run ``module`` once, counting the largest number of masked-weight tensors alive at the same time."""
    alive: list[weakref.ref] = []
    most = 0
    forward = WeightMask.forward

    def counting(self, original):
        nonlocal most
        out = forward(self, original)
        alive[:] = [r for r in alive if r() is not None] + [weakref.ref(out)]
        most = max(most, len(alive))
        return out

    WeightMask.forward = counting
    try:
        with torch.no_grad():
            module(x)
    finally:
        WeightMask.forward = forward
    return most


def _next_op(node):
    """The first node after ``node`` that is not another weight read."""
    node = node.next
    while node.op == "get_attr":
        node = node.next
    return node


def test_a_masked_graph_holds_one_materialized_weight_at_a_time():
    model, x = _mlp(), torch.randn(4, 32)
    result = graphopt.optimize(model, ["sparsify:sparsity=0.5"], example_inputs=(x,))
    gm = result.module
    reads = [n for n in gm.graph.nodes if n.op == "get_attr" and n.users]
    assert reads and all(_next_op(n) in n.users for n in reads)
    assert _most_masked_weights_alive(gm, x) <= 2  # the one its linear reads (and the next, while it is made)
    hoist_get_attrs(gm.graph)
    gm.recompile()
    assert _most_masked_weights_alive(gm, x) == 6  # read at the top, every masked weight lives through the run
    torch.testing.assert_close(gm(x), result.module(x))


def test_hoist_then_sink_gives_back_the_same_code():
    gm = graphopt.optimize(_mlp(), ["sparsify:sparsity=0.5"], example_inputs=(torch.randn(4, 32),)).module
    code = gm.code
    assert hoist_get_attrs(gm.graph) is True
    assert hoist_get_attrs(gm.graph) is False  # already at the top
    sink_get_attrs(gm.graph)
    gm.recompile()
    assert gm.code == code


@dataclass(frozen=True)
class ReadFirstWeightEarly(Pass):
    """Adds a reader of the last layer's weight before the first op, as a pass written against the canonical
    form (every get_attr at the top) may: ``out + 0 * last_weight.sum()``."""

    name: ClassVar[str] = "read-first-weight-early"

    def run(self, gm, ctx):
        weight = [n for n in gm.graph.nodes if n.op == "get_attr"][-1]
        first_op = next(n for n in gm.graph.nodes if n.op == "call_function")
        with gm.graph.inserting_before(first_op):
            total = gm.graph.call_function(torch.ops.aten.sum.default, (weight,))
            zero = gm.graph.call_function(torch.ops.aten.mul.Tensor, (total, 0.0))
        out = next(n for n in gm.graph.nodes if n.op == "output")
        value = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
        with gm.graph.inserting_before(out):
            added = gm.graph.call_function(torch.ops.aten.add.Tensor, (value, zero))
        out.replace_input_with(value, added)
        return PassResult(gm, modified=True)


def test_a_pass_after_a_modifying_pass_sees_the_weight_reads_at_the_top():
    model, x = _mlp(), torch.randn(4, 32)
    result = graphopt.optimize(model, ["sparsify:sparsity=0.5", ReadFirstWeightEarly()], example_inputs=(x,))
    alone = graphopt.optimize(model, ["sparsify:sparsity=0.5"], example_inputs=(x,))
    torch.testing.assert_close(result.module(x), alone.module(x))
