"""Repair the layers right after removed blocks: refit each to give, from the inputs it now gets, the outputs it
gave in the original model (``cross_refit.refit_to_original``).

Used by ``remove-layers:repair=true`` in three steps: ``layers_after`` finds the linear/conv layers that read a
removed block's output before any other layer does (in a transformer: the next layer's q/k/v and gate/up, or the
LM head after the last layer); ``record_inputs`` runs the original graph once and keeps those layers' input rows
(one tensor per distinct input: q, k and v share theirs); after the blocks are gone, ``refit_recorded`` runs the
pruned graph sequentially, so each refit sees the inputs of the layers refit before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.fx as fx

from graphopt.calibration.cross_refit import CrossStatistics, refit_to_original
from graphopt.calibration.engine import NodeInputs, run_sequentially
from graphopt.calibration.layer_io import input_rows, write_dense_weight
from graphopt.graph.inputs import ExampleInputs
from graphopt.graph.nodes import arg, is_op, resolve
from graphopt.util import distributed

__all__ = ["DenseLayer", "dense_layer", "layers_after", "record_inputs", "refit_recorded"]

aten = torch.ops.aten


@dataclass(frozen=True)
class DenseLayer:
    """A linear or ungrouped 1-D/2-D conv node with a stored weight: its weight and bias names, and whether the
    weight is stored (in, out) (``addmm(b, x, W)``, GPT-2's Conv1D)."""

    weight: str
    bias: str | None
    transposed: bool


def _attr(node) -> str | None:
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def dense_layer(node: fx.Node) -> DenseLayer | None:
    """The DenseLayer ``node`` computes, or None (grouped and 3-D convs, computed weights, other ops)."""
    if is_op(node, aten.linear) and _attr(node.args[1]):
        return DenseLayer(node.args[1].target, _attr(arg(node, "bias")), False)
    if is_op(node, aten.conv1d, aten.conv2d) and _attr(node.args[1]) and int(arg(node, "groups", 1)) == 1:
        return DenseLayer(node.args[1].target, _attr(arg(node, "bias")), False)
    if is_op(node, aten.addmm) and len(node.args) == 3 and not node.kwargs:
        bias, _, mat = node.args
        if _attr(mat):
            return DenseLayer(mat.target, _attr(bias), True)
        if isinstance(mat, fx.Node) and is_op(mat, aten.t) and _attr(mat.args[0]):
            return DenseLayer(mat.args[0].target, _attr(bias), False)
    return None


def layers_after(starts: Iterable[fx.Node], stops: set[fx.Node]) -> dict[str, DenseLayer]:
    """The dense layers reached from ``starts`` through users without passing another linear/conv or a node in
    ``stops`` (the outputs of the blocks that stay): {weight name: layer}, in no particular order."""
    found: dict[str, DenseLayer] = {}
    seen: set[fx.Node] = set()
    todo = list(starts)
    while todo:
        node = todo.pop()
        for user in node.users:
            if user in seen or user.op == "output":
                continue
            seen.add(user)
            layer = dense_layer(user)
            if layer is not None:
                found[layer.weight] = layer
            elif is_op(user, aten.linear, aten.addmm, aten.mm, aten.conv1d, aten.conv2d, aten.conv3d):
                continue  # a layer this repair does not handle: it still blocks the path
            elif user not in stops:
                todo.append(user)
    return found


def _layer_nodes(gm: fx.GraphModule, names: set[str]) -> dict[fx.Node, DenseLayer]:
    out = {}
    for node in gm.graph.nodes:
        layer = dense_layer(node) if node.op == "call_function" else None
        if layer is not None and layer.weight in names:
            out[node] = layer
    return out


def record_inputs(gm: fx.GraphModule, batches: Sequence[ExampleInputs], names: set[str]) -> dict[str, list[torch.Tensor]]:
    """Run ``gm`` (the original graph) once; the input rows of every layer whose weight is in ``names``, per batch."""
    nodes = _layer_nodes(gm, names)
    rows: dict[str, list[torch.Tensor]] = {}

    def visit(inputs: NodeInputs) -> None:
        name = nodes[inputs.node].weight
        (_, per_batch), = input_rows(inputs, resolve(gm, name).shape)
        rows[name] = per_batch

    run_sequentially(gm, batches, visit, lambda n: n in nodes, desc="remove-layers (original inputs)")
    return rows


def refit_recorded(gm: fx.GraphModule, batches: Sequence[ExampleInputs], recorded: dict[str, list[torch.Tensor]],
                   *, damp: float = 0.01) -> dict[str, str]:
    """Refit every layer of ``gm`` (the pruned graph) with recorded original inputs, in graph order, in place;
    returns {weight name: what was done}."""
    nodes = _layer_nodes(gm, set(recorded))
    notes: dict[str, str] = {}

    def visit(inputs: NodeInputs) -> None:
        layer = nodes[inputs.node]
        stored = resolve(gm, layer.weight).detach()
        matrix = stored.t() if layer.transposed else stored.reshape(stored.shape[0], -1)
        (_, now), = input_rows(inputs, stored.shape)
        stats = CrossStatistics(matrix.shape[1], layer=layer.weight)
        for z, x in zip(now, recorded[layer.weight]):
            stats.add(z, x)
        stats.load(distributed.sum_tensors(stats.tensors()))
        bias = resolve(gm, layer.bias).detach() if layer.bias else None
        new, new_bias = refit_to_original(matrix, bias, stats, damp=damp, layer=layer.weight)
        write_dense_weight(gm, layer.weight, new.t() if layer.transposed else new.reshape(stored.shape))
        if layer.bias:
            resolve(gm, layer.bias).copy_(new_bias)
        notes[layer.weight] = (f"refit to the original model's outputs on {stats.count} input rows"
                               + (", bias included" if layer.bias else ""))

    run_sequentially(gm, batches, visit, lambda n: n in nodes, desc="remove-layers (repair)")
    return notes
