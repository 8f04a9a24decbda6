"""Expert widths: the intermediate channels inside the routed experts of MoE layers, pruned expert by expert.

A routed expert is a gated MLP whose weights are slices of fused tensors (transformers 5): ``gate_up_proj``
``[num_experts, 2 * width, hidden]`` (the gate's rows, then the up projection's: the experts split them with
``chunk(2, -1)``; GPT-OSS interleaves them, ``[..., ::2]`` / ``[..., 1::2]``), or ``gate_proj`` / ``up_proj``
``[num_experts, width, hidden]``, and ``down_proj`` ``[num_experts, hidden, width]``; ``is_transposed`` families
hold the last two dims the other way round; biases ``[num_experts, 2 * width]`` / ``[num_experts, width]`` follow
their weight. One intermediate channel ``c`` of expert ``e`` is row ``c`` and ``width + c`` (interleaved: ``2c``
and ``2c + 1``) of its gate/up slice and column ``c`` of its down slice.

The fused tensor must stay rectangular, so every expert of a layer keeps the same number of channels, but each
chooses its own by its own importance (``l1``/``l2``: the magnitude of its rows and column; ``taylor``: |w * dL/dw|
summed the same way; ``activation``: ||down[:, c]||² · E[x_c²] over the calibration tokens routed to the expert,
graphopt/calibration/expert_energy.py, l2 for an expert no token reached; ``random``: a seeded draw; ``bn-scale``:
l1). ``reconstruct`` does not refit experts.
Nothing in the dispatch (``grouped_mm``, ``batched_mm``) holds the width as a constant, so slicing the tensors is
the whole edit; the shapes are re-propagated by the pass manager. The dependency analysis couples the fused
tensors' hidden dim through the grouped products (rules_moe.py) and so sees these channels too, but as one index
shared by all experts: ``without_expert_widths`` takes those groups out of its plan and leaves them to this module.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.fx as fx

from graphopt.analysis.importance import taylor_saliency
from graphopt.analysis.moe import MoeLayer, find_moe_layers
from graphopt.errors import GraphoptWarning
from graphopt.graph.nodes import is_op, owner_and_leaf, resolve, set_parameter

aten = torch.ops.aten
__all__ = ["ExpertWidth", "find_expert_widths", "expert_channel_scores", "prune_expert_widths"]
_INPUT_SIDE = ("gate_up_proj", "gate_proj", "up_proj")  # their rows (dim 1, not transposed) are the channels


@dataclass
class ExpertWidth:
    """The intermediate width of one MoE layer's routed experts: ``size`` channels per expert, held by
    ``members`` (tensor name, channel dim, parts: 2 for a fused gate+up whose halves share a channel index).
    ``size`` and ``prunable`` read like a ChannelGroup's, so the pass counts it with its own rules."""

    layer: MoeLayer
    size: int
    members: list[tuple[str, int, int]]
    interleaved: bool = False  # a fused gate+up holds channel c at 2c and 2c + 1 (else at c and size + c)

    @property
    def name(self) -> str:
        """The experts module, e.g. ``model.layers.0.mlp.experts``."""
        return self.layer.experts

    @property
    def prunable(self) -> np.ndarray:
        """Every channel may go (one expert keeps at least one: the pass's count caps it)."""
        return np.arange(self.size)

    def params(self) -> list[str]:
        """The tensors holding these channels (the pass's ignore/ratios patterns match them)."""
        return [name for name, _, _ in self.members]

    def dims(self) -> set[tuple[str, int]]:
        """(tensor, dim) of every member: where these channels live."""
        return {(name, dim) for name, dim, _ in self.members}


def without_expert_widths(gm: fx.GraphModule, plan: dict) -> dict:
    """``plan`` (channel group -> channels to remove) less the groups that are only routed experts' intermediate
    channels: the dependency analysis sees one channel index shared by all experts, while prune_expert_widths lets
    each expert choose its own, so those groups are left to it."""
    widths, _ = find_expert_widths(gm)
    inside = set().union(*(w.dims() for w in widths))
    return {g: v for g, v in plan.items() if not all((m.param, m.dim) in inside for m in g.members)}


def find_expert_widths(gm: fx.GraphModule, layers: list[MoeLayer] | None = None) -> tuple[list[ExpertWidth],
                                                                                        dict[str, str]]:
    """The expert widths of ``gm``'s MoE layers, and {experts module: why its width stays} for those whose
    tensors are not of the layout above."""
    found, skipped = [], {}
    for layer in find_moe_layers(gm) if layers is None else layers:
        width = _width_of(gm, layer)
        if isinstance(width, str):
            skipped[layer.experts] = f"expert width kept: {width}"
        else:
            found.append(width)
    return found, skipped


def _width_of(gm: fx.GraphModule, layer: MoeLayer) -> ExpertWidth | str:
    """The layer's ExpertWidth, or why there is none."""
    hidden = _meta_last(layer.output)
    tensors = {name.rpartition(".")[2]: resolve(gm, name) for name in layer.expert_tensors}
    down = tensors.get("down_proj")
    if down is None or down.dim() != 3 or hidden is None:
        return f"'{layer.experts}' holds no fused down_proj [num_experts, hidden, width]"
    transposed = _transposed(down, tensors, hidden)
    if transposed is None:
        return f"cannot tell which dim of '{layer.experts}.down_proj' {list(down.shape)} is the width"
    size = down.shape[1] if transposed else down.shape[2]
    weight_dim = 2 if transposed else 1
    members = [(f"{layer.experts}.down_proj", 1 if transposed else 2, 1)]
    for leaf, t in tensors.items():
        base = leaf.removesuffix("_bias")
        if leaf == "down_proj" or (leaf == "down_proj_bias" and tuple(t.shape[1:]) == (hidden,)):
            continue
        parts = 2 if base == "gate_up_proj" else 1
        dim = 1 if leaf.endswith("_bias") else weight_dim
        if base not in _INPUT_SIDE or t.dim() <= dim or t.shape[dim] != parts * size:
            return f"'{layer.experts}.{leaf}' {list(t.shape)} is not a gate/up/down tensor of width {size}"
        members.append((f"{layer.experts}.{leaf}", dim, parts))
    fused = any(parts == 2 for _, _, parts in members)
    interleaved = fused and _splits(layer, interleaved=True)
    if fused and not interleaved and not _splits(layer, interleaved=False):
        return (f"'{layer.experts}' splits its fused gate_up_proj neither into halves (chunk(2, -1)) nor "
                "interleaved ([..., ::2], [..., 1::2])")
    return ExpertWidth(layer, size, members, interleaved)


def _meta_last(node: fx.Node) -> int | None:
    """The last dim of the node's recorded shape: the propagated one (current after pruning), else torch.export's."""
    meta = node.meta.get("tensor_meta")
    if hasattr(meta, "shape"):
        return int(meta.shape[-1])
    val = node.meta.get("val")
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) else None


def _transposed(down: torch.Tensor, tensors: dict, hidden: int) -> bool | None:
    """Whether the experts hold [num_experts, in, out] (``is_transposed``); None when the shapes cannot tell."""
    if down.shape[1] == hidden != down.shape[2]:
        return False
    if down.shape[2] == hidden != down.shape[1]:
        return True
    up = tensors.get("gate_up_proj", tensors.get("up_proj"))  # width == hidden: the input side's hidden dim tells
    if up is not None and up.dim() == 3 and (up.shape[1] == hidden) != (up.shape[2] == hidden):
        return up.shape[1] == hidden
    return None


def _splits(layer: MoeLayer, interleaved: bool) -> bool:
    """Whether the experts split a fused gate+up output in halves (``chunk(2, -1)``) or interleaved (a step-2
    slice of the last dim)."""
    if interleaved:
        return any(is_op(n, aten.slice) and len(n.args) > 4 and n.args[4] == 2 and n.args[2] in (0, 1)
                   and n.args[1] in (-1, len(n.meta["val"].shape) - 1) for n in layer.nodes if "val" in n.meta)
    return any(is_op(n, aten.chunk) and n.args[1] == 2 and (n.args[2] if len(n.args) > 2 else 0) in (-1, 1)
               for n in layer.nodes)


def expert_channel_scores(gm: fx.GraphModule, width: ExpertWidth, importance: str, *,
                          generator: torch.Generator | None = None,
                          saliency: dict[str, torch.Tensor] | None = None,
                          energy: torch.Tensor | None = None) -> torch.Tensor:
    """``[num_experts, size]``: each expert's score per channel, higher = more important (module docstring);
    ``saliency``: |w * dL/dw| per tensor (taylor), ``energy``: the down inputs' mean squares (activation)."""
    experts = width.layer.num_experts
    if importance == "random":
        return torch.rand(experts, width.size, generator=generator, dtype=torch.float64)
    if importance == "activation" and energy is not None:
        down = next((name, dim) for name, dim, _ in width.members if name.endswith(".down_proj"))
        weighted = _rows(resolve(gm, down[0]), down[1], 2) * energy
        reached = energy.sum(1) > 0  # an expert no calibration token reached: its weights alone
        return torch.where(reached[:, None], weighted, expert_channel_scores(gm, width, "l2"))
    power = 2 if importance in ("l2", "activation") else 1
    score = torch.zeros(experts, width.size, dtype=torch.float64)
    for name, dim, parts in width.members:
        values = saliency[name] if importance == "taylor" else resolve(gm, name)
        rows = _rows(values, dim, power)
        score += (rows.view(experts, width.size, parts).sum(2) if width.interleaved
                  else rows.view(experts, parts, width.size).sum(1))
    return score


def _rows(values: torch.Tensor, dim: int, power: int) -> torch.Tensor:
    """``[num_experts, values.shape[dim]]``: the sum of |v|^power over the other dims, per expert."""
    others = [d for d in range(1, values.dim()) if d != dim]
    rows = values.detach().abs().float() if not others else \
        torch.linalg.vector_norm(values.detach(), ord=power, dim=others, dtype=torch.float32)
    return rows.pow(power).double()


def prune_expert_widths(gm: fx.GraphModule, count: Callable[[ExpertWidth], int], importance: str, *,
                        seed: int = 0, batches: Iterable | None = None, loss_fn: Callable | None = None,
                        skip: set[tuple[str, int]] = frozenset(),
                        measure_energy: Callable[[list], dict] | None = None) -> tuple[int, dict[str, str]]:
    """Remove ``count(width)`` channels from every routed expert of each MoE layer, each expert its own lowest.
    ``batches``: for ``importance='taylor'`` (with ``loss_fn``); ``skip``: (tensor, dim) pairs another plan already
    edits (a layer whose width one of them holds stays); ``measure_energy``: for ``importance='activation'``, called with [(MoE layer, its down tensor's
    name, width)] and returning {experts module: ``[num_experts, width]`` energies or None}
    (graphopt.calibration.expert_energy, injected by the pass: analysis does not run calibration).
    Returns (parameters removed, {experts module: what happened})."""
    widths, notes = find_expert_widths(gm)
    for name, why in notes.items():
        warnings.warn(f"prune-channels: the routed experts' width of '{name}' stays whole: {why.split(': ', 1)[1]} "
                      "(graphopt/analysis/moe_width.py lists the layouts it prunes; experts=false skips them)",
                      GraphoptWarning, stacklevel=4)
    plans = []
    for width in widths:
        if skip & width.dims():
            notes[width.name] = "expert width kept: a channel group of the dependency analysis holds its tensors"
        elif (k := count(width)) > 0:
            plans.append((width, k))
    if not plans:
        return 0, notes
    saliency = taylor_saliency(gm, batches, loss_fn) if importance == "taylor" else None
    if importance == "activation" and measure_energy is None:
        raise ValueError("prune_expert_widths: importance='activation' needs measure_energy")
    energy = measure_energy([(w.layer, f"{w.name}.down_proj", w.size) for w, _ in plans]) \
        if importance == "activation" else {}
    generator = torch.Generator().manual_seed(seed)
    removed = 0
    for width, k in plans:
        scores = expert_channel_scores(gm, width, importance, generator=generator, saliency=saliency,
                                       energy=energy.get(width.name))
        keep = scores.argsort(dim=1, stable=True)[:, k:].sort(dim=1).values  # each expert's best, in order
        removed += _apply(gm, width, keep)
        notes[width.name] = (f"expert width {width.size} -> {width.size - k} ({width.layer.num_experts} experts, "
                             f"each its own channels by {importance})")
    gm.recompile()
    return removed, notes


def _apply(gm: fx.GraphModule, width: ExpertWidth, keep: torch.Tensor) -> int:
    """Keep channels ``keep[e]`` of every expert ``e`` in every member tensor; returns the elements removed."""
    removed = 0
    for name, dim, parts in width.members:
        old = resolve(gm, name)
        if width.interleaved:  # a fused gate+up: the channel's gate and up rows
            index = torch.stack([keep * parts + p for p in range(parts)], dim=2).flatten(1)
        else:
            index = torch.cat([keep + p * width.size for p in range(parts)], dim=1)
        view = [index.shape[0]] + [1] * (old.dim() - 1)
        view[dim] = index.shape[1]
        shape = list(old.shape)
        shape[dim] = index.shape[1]
        new = old.detach().gather(dim, index.view(view).expand(shape).to(old.device))
        _replace(gm, name, new)
        removed += old.numel() - new.numel()
    return removed


def _replace(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    owner, leaf = owner_and_leaf(gm, name)
    if leaf in owner._parameters:
        set_parameter(gm, name, value.contiguous())
    else:
        owner._buffers[leaf] = value.contiguous()
