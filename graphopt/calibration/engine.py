"""The sequential calibration engine: run a graph over every calibration batch one node at a time, so that each
layer is seen (and compressed) with the inputs the already-compressed layers before it produce.

``run_sequentially(gm, batches, visit)`` executes ``gm`` node by node for all batches together. Before a node that
``visit`` asks for runs, ``visit(node, inputs)`` gets that node's argument values for every batch; it may gather
statistics and change the graph's parameters or buffers (prune a weight, re-estimate a BatchNorm), and the node then
runs with the changed tensors, so everything after it sees the compressed model. Parameters are read at the node
that uses them, never cached. Each value is freed after its last user has run: memory holds the activations live at
one point of the graph (the residual stream plus the block being worked on) for every batch, not those of the whole
model. Statistics a visitor gathers are combined across torch.distributed ranks by the visitor (summing
``InputStatistics.tensors()``), so every rank makes the same decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from graphopt.graph.inputs import ExampleInputs
from graphopt.graph.nodes import resolve
from graphopt.graph.shapes import GraphRunError, flat_graph_inputs
from graphopt.util.progress import progress

__all__ = ["NodeInputs", "run_sequentially"]


@dataclass
class NodeInputs:
    """The argument values of one node for every calibration batch: ``args[b]``, ``kwargs[b]`` for batch ``b``."""

    node: fx.Node
    args: list[tuple]
    kwargs: list[dict]

    def arg(self, index: int) -> list[Any]:
        """Positional argument ``index`` for every batch."""
        return [a[index] for a in self.args]


Visit = Callable[[NodeInputs], None]


@torch.no_grad()
def run_sequentially(gm: fx.GraphModule, batches: Sequence[ExampleInputs], visit: Visit,
                     wants: Callable[[fx.Node], bool], *, desc: str = "calibrating",
                     memory: dict | None = None) -> list[Any]:
    """Run ``gm`` over ``batches`` node by node, calling ``visit`` before every node for which ``wants(node)``;
    returns the graph's output for every batch. ``memory``, when given, gets ``peak_bytes``: the most bytes of
    activations held at once (all batches)."""
    nodes = list(gm.graph.nodes)
    last_use = _last_uses(nodes)
    env = _Values()
    placeholders = [n for n in nodes if n.op == "placeholder"]
    for b, batch in enumerate(batches):
        for node, value in zip(placeholders, flat_graph_inputs(gm, batch)):
            env.append(node, value)
    visited = sum(1 for n in nodes if wants(n))
    ticker = iter(progress(range(visited), desc, total=visited))
    out: list[Any] = []
    for index, node in enumerate(nodes):
        if node.op == "placeholder":
            continue
        if node.op == "output":
            out = [_load(node.args[0], env, gm, b) for b in range(len(batches))]
            break
        if node.op != "get_attr":  # get_attr values are read where they are used: a visitor may replace them
            loaded = [(_load(node.args, env, gm, b), _load(node.kwargs, env, gm, b)) for b in range(len(batches))]
            if wants(node):
                visit(NodeInputs(node, [a for a, _ in loaded], [k for _, k in loaded]))
                loaded = [(_load(node.args, env, gm, b), _load(node.kwargs, env, gm, b)) for b in range(len(batches))]
                next(ticker, None)
            env.put(node, [_execute(gm, node, a, k) for a, k in loaded])
        for dead in last_use.get(index, ()):
            env.drop(dead)
    for _ in ticker:  # let the progress line finish
        pass
    if memory is not None:
        memory["peak_bytes"] = env.peak
    return out


class _Values(dict):
    """Node -> its value for every batch, counting the bytes held (views of a stored tensor count in full)."""

    def __init__(self):
        super().__init__()
        self.bytes, self.peak = 0, 0

    def append(self, node: fx.Node, value: Any) -> None:
        self.setdefault(node, []).append(value)
        self._count(_nbytes(value))

    def put(self, node: fx.Node, values: list[Any]) -> None:
        self[node] = values
        self._count(sum(_nbytes(v) for v in values))

    def drop(self, node: fx.Node) -> None:
        values = self.pop(node, None)
        if values is not None:
            self.bytes -= sum(_nbytes(v) for v in values)

    def _count(self, added: int) -> None:
        self.bytes += added
        self.peak = max(self.peak, self.bytes)


def _nbytes(value: Any) -> int:
    return sum(x.numel() * x.element_size() for x in torch.utils._pytree.tree_leaves(value)
               if isinstance(x, torch.Tensor))


def _last_uses(nodes: list[fx.Node]) -> dict[int, list[fx.Node]]:
    """Graph position -> the nodes whose value is not needed after that position."""
    position = {n: i for i, n in enumerate(nodes)}
    last: dict[int, list[fx.Node]] = {}
    for node in nodes:
        if node.op == "get_attr":
            continue
        end = max((position[u] for u in node.users), default=position[node])
        last.setdefault(end, []).append(node)
    return last


def _load(value: Any, env: "_Values", gm: fx.GraphModule, batch: int) -> Any:
    def one(node: fx.Node) -> Any:
        if node.op == "get_attr":
            return resolve(gm, node.target)
        return env[node][batch]

    return fx.node.map_arg(value, one)


def _execute(gm: fx.GraphModule, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    try:
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_module":
            return gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, node.target)(*rest, **kwargs)
    except Exception as e:  # name the node, as every graph run does
        raise GraphRunError(node, e) from e
    raise AssertionError(f"unexpected node kind {node.op}")
