"""``prune-experts``: remove whole routed experts of mixture-of-experts layers, the same number in every layer.

Which experts (``criterion=``), per layer, the lowest-scoring go:
- ``reap`` (the default; needs ``calib_data``): REAP (Lasby et al. 2025), the mean over the tokens routed to the
  expert of ``gate_weight * ||expert_output||``; an expert that is rarely chosen, or chosen with small weights, or
  whose output is small, goes first;
- ``frequency`` (needs ``calib_data``): how often the expert is in a token's top-k;
- ``random``: a seeded draw (``seed=``), the baseline.
How many: ``ratio`` of each layer's experts (rounded down) or ``n`` experts; HF configs hold one expert count, so
every layer loses the same number and all MoE layers must have the same count. Where fewer than ``top_k`` experts
(the number each token is routed to) remain, top-k is capped at the number left: the router's ``topk`` and the
dispatch constants that hold k (the grouped-mm token sort's ``// k``, the batched-mm ``repeat_interleave(k)``, the
``[tokens, k, hidden]`` view that sums each token's experts) follow, and the write-back sets
``num_experts_per_tok`` and the modules' ``top_k`` to ``min(old, left)``.

The surgery is on the graph (graphopt/analysis/moe.py finds the blocks, whatever the experts' dispatch): the
router's rows (its weight, bias and DeepSeek's ``e_score_correction_bias``) and the experts' slices of every fused
tensor ``[num_experts, ...]`` are kept for the surviving experts, in their order; constants that hold the expert
count (``histc`` bins of the grouped-mm dispatch, the router's group views) follow. Shared experts (plain linear
layers) are never touched. Group-limited routing (DeepSeek-V3 ``n_group`` > 1, ``topk_group``) keeps its groups
equal: ``n`` must be a multiple of ``n_group`` and each group loses ``n / n_group`` of its own lowest. The
write-back (``result.to_model()``) updates ``num_local_experts`` / ``num_experts`` / ``n_routed_experts`` and the
experts modules' counts (graphopt/result/hf_config.py).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from graphopt.analysis.moe import MoeLayer, find_moe_layers
from graphopt.calibration.expert_scores import expert_stats
from graphopt.errors import PassError, PipelineError
from graphopt.graph.inputs import check_batches
from graphopt.graph.nodes import is_op, owner_and_leaf, resolve, set_parameter
from graphopt.pipeline.pass_base import Context, Pass, PassResult
from graphopt.pipeline.registry import register_pass

aten = torch.ops.aten
CRITERIA = ("reap", "frequency", "random")


@register_pass
@dataclass(frozen=True)
class PruneExperts(Pass):
    """Remove the ``ratio`` (or ``n``) least important routed experts of every MoE layer."""

    name: ClassVar[str] = "prune-experts"
    ratio: float | None = None
    n: int | None = None
    criterion: str = "reap"  # reap | frequency | random
    seed: int = 0  # criterion=random

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise PipelineError(f"prune-experts: criterion must be one of {', '.join(CRITERIA)}; got "
                                f"{self.criterion!r}")
        if (self.ratio is None) == (self.n is None):
            raise PipelineError("prune-experts: give either ratio= (a share of each layer's experts) or n= (experts "
                                "removed per layer), e.g. prune-experts:ratio=0.5")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise PipelineError(f"prune-experts: ratio must be in [0, 1), got {self.ratio}")
        if self.n is not None and (isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0):
            raise PipelineError(f"prune-experts: n must be a whole number >= 0, got {self.n!r}")

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        layers = find_moe_layers(gm)
        if not layers:
            raise PassError("prune-experts: this model has no mixture-of-experts layer (a router linear layer "
                            "choosing top-k experts whose weights are fused 3-D tensors [num_experts, out, in], as "
                            "transformers 5 holds them); remove prune-experts from the pipeline")
        counts = {layer.num_experts for layer in layers}
        if len(counts) > 1:
            raise PassError(f"prune-experts: the MoE layers hold different expert counts ({sorted(counts)}); one "
                            "number removed per layer could not be described by one config: prune them one by one")
        experts = counts.pop()
        remove = self._how_many(layers, experts)
        if remove == 0:
            return PassResult(gm, modified=False, stats={"criterion": self.criterion, "removed": {}},
                              decisions={layer.name: f"kept all {experts} experts" for layer in layers})
        groups = {layer.name: _groups(layer, remove) for layer in layers}
        scores = self._scores(gm, layers, ctx)
        removed, left, top_k = {}, experts - remove, {}
        for layer in layers:
            gone = _lowest(scores[layer.name], remove, groups[layer.name])
            keep = torch.tensor([e for e in range(experts) if e not in set(gone)])
            _apply(gm, layer, keep, groups[layer.name])
            if layer.top_k > left:
                cap_top_k(gm, layer, left)
            removed[layer.name], top_k[layer.name] = gone, min(layer.top_k, left)
        decisions = {layer.name: f"experts {experts} -> {left} (removed {removed[layer.name]}, {self.criterion})"
                     + (f"; top-k {layer.top_k} -> {left}" if layer.top_k > left else "") for layer in layers}
        stats = {"criterion": self.criterion, "experts_before": experts, "experts_after": left, "removed": removed,
                 "top_k": top_k, "scores": {name: [round(float(s), 6) for s in scores[name]] for name in removed}}
        return PassResult(gm, modified=True, stats=stats, decisions=decisions)

    def _how_many(self, layers: list[MoeLayer], experts: int) -> int:
        remove = int(self.ratio * experts) if self.ratio is not None else self.n
        if remove >= experts:
            raise PassError(f"prune-experts: n={remove} would remove every one of the {experts} experts of each MoE "
                            f"layer; n must be below {experts}")
        return remove

    def _scores(self, gm: fx.GraphModule, layers: list[MoeLayer], ctx: Context) -> dict[str, torch.Tensor]:
        """Higher = more important, one score per expert and layer."""
        if self.criterion == "random":
            gen = torch.Generator().manual_seed(self.seed)
            return {layer.name: torch.rand(layer.num_experts, generator=gen, dtype=torch.float64) for layer in layers}
        batches = check_batches(ctx.calib_data, ctx.inputs, needed_by=f"prune-experts criterion={self.criterion}",
                                why=" to rank the experts", pipeline=f"prune-experts:criterion={self.criterion}")
        stats = expert_stats(gm, layers, batches, outputs=self.criterion == "reap")
        return {name: s.reap if self.criterion == "reap" else s.count for name, s in stats.items()}


def _lowest(scores: torch.Tensor, remove: int, groups: int) -> list[int]:
    """The ``remove`` lowest-scoring experts (ties: the lower index), ``remove / groups`` from each equal group."""
    size = scores.numel() // groups
    gone = []
    for g in range(groups):
        part = scores[g * size:(g + 1) * size]
        order = sorted(range(size), key=lambda e: (float(part[e]), e))
        gone += [g * size + e for e in order[:remove // groups]]
    return sorted(gone)


def _groups(layer: MoeLayer, remove: int) -> int:
    """How many routing groups the router splits its experts into (1 without group-limited routing)."""
    found = {shape[0] for n in layer.router_nodes if (shape := _group_shape(n, layer.num_experts))}
    if not found:
        return 1
    groups = found.pop()
    if remove % groups:
        raise PassError(f"prune-experts: '{layer.name}' routes within {groups} groups of "
                        f"{layer.num_experts // groups} experts (n_group={groups}, group-limited top-k); each group "
                        f"must lose as many, so the number removed must be a multiple of {groups}, got {remove}: use "
                        f"n={max(groups, remove - remove % groups)}")
    left = (layer.num_experts - remove) // groups
    for n in layer.router_nodes:  # the group score is the sum of each group's top experts: they must remain
        if is_op(n, aten.topk) and _meta_shape(n.args[0])[-2:] == [groups, layer.num_experts // groups] \
                and n.args[1] > left:
            raise PassError(f"prune-experts: '{layer.name}' scores each of its {groups} expert groups by its top "
                            f"{n.args[1]} experts; removing {remove} leaves {left} per group: remove at most "
                            f"{layer.num_experts - n.args[1] * groups}")
    return groups


def _meta_shape(node) -> list:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return list(val.shape) if isinstance(val, torch.Tensor) else []


def _group_shape(node: fx.Node, experts: int) -> list | None:
    """[groups, experts / groups] when ``node`` views the router's scores per group (groups > 1)."""
    if not is_op(node, aten.view, aten.reshape, aten.expand) or not isinstance(node.args[1], (list, tuple)):
        return None
    shape = list(node.args[1])
    if len(shape) >= 2 and all(isinstance(s, int) for s in shape[-2:]) and shape[-2] > 1 \
            and shape[-2] * shape[-1] == experts and _meta_shape(node)[-2:] == shape[-2:]:
        return shape[-2:]
    return None


def _apply(gm: fx.GraphModule, layer: MoeLayer, keep: torch.Tensor, groups: int) -> None:
    """Keep experts ``keep`` of ``layer``: tensors sliced on dim 0, expert-count constants updated."""
    for name in (*layer.router_tensors, *layer.expert_tensors):
        _replace(gm, name, resolve(gm, name).index_select(0, keep))
    old, new = layer.num_experts, keep.numel()
    for node in layer.nodes:  # the grouped-mm dispatch counts tokens per expert: histc(x, bins=E, min=0, max=E-1)
        if is_op(node, aten.histc) and list(node.args[1:4]) == [old, 0, old - 1]:
            node.args = (node.args[0], new, 0, new - 1, *node.args[4:])
    for node in layer.router_nodes:
        shape = node.args[1] if is_op(node, aten.view, aten.reshape, aten.expand) else None
        if not isinstance(shape, (list, tuple)) or not shape:
            continue
        if _group_shape(node, old) and groups > 1:
            node.args = (node.args[0], [*shape[:-1], new // groups], *node.args[2:])
        elif shape[-1] == old and _meta_shape(node)[-1:] == [old]:
            node.args = (node.args[0], [*shape[:-1], new], *node.args[2:])
    gm.recompile()


def cap_top_k(gm: fx.GraphModule, layer: MoeLayer, k: int) -> None:
    """Route each token of ``layer`` to ``k`` (< its top-k) experts: the router's final ``topk`` and the constants of
    the experts' dispatch that hold the old k (see the module docstring) become ``k``."""
    old = layer.top_k
    top = _topk_of(layer.index)
    if top is None:
        raise PassError(f"prune-experts: the expert indices of '{layer.name}' do not come from a topk op, so its "
                        f"top-k ({old}) cannot be capped at the {k} experts left: remove at most "
                        f"{layer.num_experts - old} experts")
    top.args = (top.args[0], k, *top.args[2:])
    for node in layer.nodes:
        if is_op(node, aten.floor_divide, aten.repeat_interleave) and len(node.args) > 1 and node.args[1] == old:
            node.args = (node.args[0], k, *node.args[2:])  # token slot // k; hidden repeated once per slot
        elif node.target is operator.mul and old in node.args and any(isinstance(a, fx.Node) for a in node.args):
            node.args = tuple(k if a == old and not isinstance(a, fx.Node) else a for a in node.args)  # tokens * k
        elif is_op(node, aten.view, aten.reshape) and isinstance(node.args[1], (list, tuple)):
            shape, meta = list(node.args[1]), _meta_shape(node)
            if len(shape) == len(meta) >= 3 and shape[-2] == old == meta[-2]:  # [tokens, k, hidden]: summed over k
                node.args = (node.args[0], [*shape[:-2], k, shape[-1]], *node.args[2:])
    gm.recompile()


def _topk_of(node: fx.Node) -> fx.Node | None:
    """The ``aten.topk`` whose indices ``node`` is (through getitem and dtype casts), or None."""
    while isinstance(node, fx.Node):
        if node.target is operator.getitem and is_op(node.args[0], aten.topk):
            return node.args[0]
        if not is_op(node, aten.to, aten._to_copy, aten.type_as, aten.view, aten.reshape) \
                and node.target is not operator.getitem:
            return None
        node = node.args[0]
    return None


def _replace(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    owner, leaf = owner_and_leaf(gm, name)
    if leaf in owner._parameters:
        set_parameter(gm, name, value)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value.clone()
    else:
        setattr(owner, leaf, value.clone())
