"""Dynamic dims that hold at size 1: drop torch.export's ``!= 1`` guards where the graph is right at 1 too.

Why the guards exist: torch.export decides every Python branch on a tensor size once, from the example's value,
and guards the graph to that side. Model code often branches on a size being 1 (HF: ``is_causal = q_len > 1``
in sdpa attention, ``if batch_size != position_ids.shape[0]`` in its mask code, a BERT slice of buffered token
type ids), so a graph traced at a sequence length of 8 carries ``size()[1] != 1`` and ``> 1`` and refuses a
length of 1, although its ops compute the same thing there (the size-1 branch is only a shortcut). Size-oblivious
reasoning (``backed_size_oblivious``) covers torch's own 0/1 checks, not the model's ``if``.

What this does, for every dynamic symbol that such a guard keeps away from 1: rebuild the module without those
guards, run it and the eager model on the example inputs cut to size 1 along that symbol, and keep the guards
dropped only where both agree. Guards of any other kind (equal sizes, upper bounds) are never touched.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import sympy
import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind, TensorArgument
from torch.utils._sympy.value_ranges import ValueRanges

from graphopt.graph.inputs import ExampleInputs, flat_outputs

__all__ = ["relax_size_one_guards"]

# guards that say nothing but "this size is not 1"
_NOT_ONE = re.compile(r"^(?P<src>L\[.*\]\.size\(\)\[\d+\]) (?:!= 1|> 1|>= 2)$")


def relax_size_one_guards(model: nn.Module, inputs: ExampleInputs, ep: torch.export.ExportedProgram) -> list[str]:
    """Drop, in place, the guards of ``ep`` that exclude size 1 for a dynamic dim, where a size-1 probe shows the
    graph computes what ``model`` computes there. Returns the guards dropped (call before ``ep.module()``)."""
    sources = _sources(model, inputs, ep)
    dropped: list[str] = []
    for symbol in {s for s, _ in sources.values()}:
        guards = [g for g in ep._guards_code if (m := _NOT_ONE.match(g)) and sources.get(m["src"], (None,))[0] == symbol]
        bound = ep.range_constraints.get(symbol)
        if not guards and (bound is None or int(bound.lower) <= 1):
            continue
        if _holds_at_one(model, inputs, ep, sources, symbol, guards):
            dropped += guards
    return dropped


def _sources(model, inputs: ExampleInputs, ep) -> dict[str, tuple[sympy.Symbol, tuple]]:
    """Guard source text (``L['input_ids'].size()[1]``) -> (its symbol, (leaf index, dim)) for each dynamic dim."""
    names = list(inspect.signature(model.forward).parameters)
    leaves, _ = pytree.tree_flatten_with_path((inputs.args, inputs.kwargs))
    placeholders = {n.name: n for n in ep.graph.find_nodes(op="placeholder")}
    user = [s.arg for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    tensor_vals = [placeholders[a.name].meta.get("val") for a in user if isinstance(a, TensorArgument)]
    flat = [i for i, (_, leaf) in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    out = {}
    for index, val in zip(flat, tensor_vals):
        path = leaves[index][0]
        head = names[path[1].idx] if path[0].idx == 0 and path[1].idx < len(names) else getattr(path[1], "key", None)
        if head is None:
            continue
        for dim, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                out[f"L['{head}']{pytree.keystr(path[2:])}.size()[{dim}]"] = (size.node.expr, (index, dim))
    return out


def _holds_at_one(model, inputs, ep, sources, symbol, guards: list[str]) -> bool:
    """Rebuild the module without ``guards``; keep that only if it matches the eager model at size 1."""
    probe = _cut_to_one(inputs, _along(inputs, sources, symbol))
    saved_code, saved_range = list(ep._guards_code), ep.range_constraints.get(symbol)
    ep._guards_code[:] = [g for g in saved_code if g not in guards]
    if saved_range is not None:
        ep.range_constraints[symbol] = ValueRanges(min(int(saved_range.lower), 1), saved_range.upper)
    try:
        with torch.no_grad():
            want, got = flat_outputs(probe.call(model)), flat_outputs(probe.call(ep.module()))
        ok = len(want) == len(got) and all(_close(a, b) for a, b in zip(got, want))
    except Exception:  # the model or the graph cannot run at size 1: the guard stays
        ok = False
    if not ok:
        ep._guards_code[:] = saved_code
        if saved_range is not None:
            ep.range_constraints[symbol] = saved_range
    return ok


def _along(inputs: ExampleInputs, sources: dict, symbol) -> list[tuple[int, int]]:
    """The dims to cut with ``symbol``: its own, and those of other inputs at the same dim index and example size,
    since export may keep two equal sizes apart (GPT-2's mask length is checked against the ids by a guard)."""
    leaves = pytree.tree_leaves((inputs.args, inputs.kwargs))
    size = {(d, leaves[i].shape[d]) for s, (i, d) in sources.values() if s == symbol}
    return [(i, d) for s, (i, d) in sources.values() if s == symbol or (d, leaves[i].shape[d]) in size]


def _cut_to_one(inputs: ExampleInputs, where: list[tuple[int, int]]) -> ExampleInputs:
    leaves, spec = pytree.tree_flatten((inputs.args, inputs.kwargs))
    for index, dim in where:
        leaves[index] = leaves[index].narrow(dim, 0, 1)
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    return ExampleInputs(tuple(args), dict(kwargs))


def _close(a: Any, b: Any) -> bool:
    try:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        return True
    except AssertionError:
        return False
