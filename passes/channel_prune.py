"""``prune-channels``: structured channel pruning over the groups of the dependency analysis.

Each step analyses the graph, scores every channel of every prunable group, plans which channels go (local: the
same ratio in every group; global: lowest normalized scores across groups), and applies the plan in one place
(graphopt.analysis.dependency.apply). Parameters physically shrink; nothing is masked. With ``steps > 1`` the ratio is
reached gradually and ``finetune(gm, step)`` runs between steps (prune a little, recover, repeat).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.fx as fx

from graphopt.analysis.dependency import ChannelGroup, DependencyGraph
from graphopt.analysis.dependency.apply import apply_channel_plan, keep_every_dim_nonempty
from graphopt.errors import GraphoptWarning, PipelineError
from graphopt.analysis.importance import CRITERIA, group_scores
from graphopt.graph.nodes import resolve
from graphopt.graph.layers import layers
from graphopt.pipeline.pass_base import Context, Pass, PassResult
from graphopt.graph.patterns import matches, matches_any, unmatched
from graphopt.pipeline.registry import register_pass
from graphopt.graph.shapes import GraphRunError, propagate

ATTENTION = ("heads", "head_dim", "both", "none")


@register_pass
@dataclass(frozen=True)
class PruneChannels(Pass):
    """Remove the least important channels of every coupled channel group (physically smaller layers)."""

    name: ClassVar[str] = "prune-channels"
    before: ClassVar = ("fake-quant",)
    ratio: float = 0.5
    importance: str = "l2"
    round_to: int = 1  # each group keeps a multiple (a concat member alone may not: groups, not layers, round)
    ignore: tuple = ()  # name patterns (graphopt/graph/patterns.py) of modules/parameters whose groups stay whole
    ratios: tuple = ()  # ((pattern, ratio), ...): per-module ratios, first match wins
    global_ranking: bool = False
    max_ratio_per_group: float = 0.9
    attention: str = "heads"
    steps: int = 1
    seed: int = 0
    finetune: Callable | None = None  # finetune(gm, step) between steps
    loss_fn: Callable | None = None  # for importance='taylor': loss_fn(output, batch) -> scalar
    uniform: bool | None = None  # repeated layers keep equal widths under global ranking; None: on for HF models

    def __post_init__(self):
        _check_ratio("ratio", self.ratio)
        for pattern, r in self.ratios:
            _check_ratio(f"ratio for '{pattern}'", r)
        if self.importance not in CRITERIA:
            raise PipelineError(f"prune-channels: unknown importance '{self.importance}'; "
                                f"choose one of {', '.join(CRITERIA)}")
        if self.attention not in ATTENTION:
            raise PipelineError(f"prune-channels: attention must be one of {', '.join(ATTENTION)}, "
                                f"got '{self.attention}'")
        if self.round_to < 1 or self.steps < 1 or not 0 < self.max_ratio_per_group < 1:
            raise PipelineError("prune-channels: round_to and steps must be >= 1, max_ratio_per_group in (0, 1)")

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        _check_patterns(gm, self.ignore + tuple(p for p, _ in self.ratios))
        weights = _layer_weights(gm)
        before = _shapes(gm, weights)
        removed_total, pruned_groups = 0, 0
        step_keep = (1 - self.ratio) ** (1 / self.steps)
        for step in range(self.steps):
            dep = ctx.analysis(DependencyGraph, gm) if step == 0 else DependencyGraph(gm, ctx)  # step 1+: pruned
            if step == 0:
                _warn_unknown(dep)
            plan = self.plan(gm, dep, ctx, 1 - step_keep)
            removed_total += apply_channel_plan(gm, dep, plan)
            if step < self.steps - 1:  # the next step's analysis reads shapes: record the pruned ones
                _record_shapes(gm, ctx)
            pruned_groups = max(pruned_groups, len(plan))
            if self.finetune is not None and step < self.steps - 1:
                self.finetune(gm, step)
        return PassResult(gm, modified=removed_total > 0, stats={
            "groups_pruned": pruned_groups, "params_removed": removed_total, "steps": self.steps},
            decisions=_shape_decisions(before, _shapes(gm, weights), self.ignore))

    def plan(self, gm: fx.GraphModule, dep: DependencyGraph, ctx: Context, ratio: float) -> dict:
        """Which channels of which groups to remove at this ``ratio``."""
        groups = [g for g in dep.prunable_groups if self._eligible(g, dep)]
        scores = group_scores(gm, groups, self.importance, seed=self.seed,
                              batches=ctx.calib_data or [ctx.inputs.kwargs or ctx.inputs.args],
                              loss_fn=self.loss_fn)
        counts = self._global_counts(groups, scores, ratio) if self.global_ranking else \
            {g.index: self._count(g, self._ratio_of(g, ratio)) for g in groups}
        uniform = self.uniform if self.uniform is not None else bool(gm.meta.get("graphopt_hf_model"))
        if uniform and self.global_ranking:
            counts = self._uniform_counts(groups, counts)
        plan = {}
        for g in groups:
            k = counts.get(g.index, 0)
            if k:
                candidates = torch.from_numpy(g.prunable)
                order = scores[g.index][candidates].argsort(stable=True)
                plan[g] = candidates[order[:k]].tolist()
        return keep_every_dim_nonempty(dep, plan, scores, self.round_to)

    def _eligible(self, group: ChannelGroup, dep: DependencyGraph) -> bool:
        if any(matches_any(p, self.ignore) for p in group.params()):
            return False
        kind = dep.group_kind(group)
        return kind == "channels" or self.attention in ("both", kind)

    def _ratio_of(self, group: ChannelGroup, default: float) -> float:
        for pattern, r in self.ratios:
            if any(matches(p, pattern) for p in group.params()):
                return 1 - (1 - r) ** (1 / self.steps)
        return default

    def _count(self, group: ChannelGroup, ratio: float) -> int:
        """Channels to remove: ratio of the group, capped, leaving a multiple of round_to."""
        # one step rounds down (never more than asked); a schedule rounds to nearest so n steps reach the target
        wanted = int(ratio * group.size) if self.steps == 1 else round(ratio * group.size)
        k = min(wanted, int(self.max_ratio_per_group * group.size), len(group.prunable))
        keep = group.size - k
        if self.round_to > 1:
            keep = min(group.size, math.ceil(keep / self.round_to) * self.round_to)
        return max(0, group.size - keep)

    def _global_counts(self, groups: list[ChannelGroup], scores: dict, ratio: float) -> dict[int, int]:
        """Rank channels of all groups together on scores normalized by their group's mean."""
        pool = []
        for g in groups:
            s = scores[g.index][torch.from_numpy(g.prunable)]
            s = s / s.mean().clamp_min(1e-12)
            pool.extend((float(v), g.index) for v in s)
        budget = int(ratio * sum(g.size for g in groups))
        caps = {g.index: self._count(g, self.max_ratio_per_group) for g in groups}
        counts = {g.index: 0 for g in groups}
        for _, index in sorted(pool)[: max(budget, 0)]:
            if counts[index] < caps[index]:
                counts[index] += 1
        by_index = {g.index: g for g in groups}
        return {i: self._count(by_index[i], c / by_index[i].size) if c else 0 for i, c in counts.items()}


    def _uniform_counts(self, groups: list[ChannelGroup], counts: dict[int, int]) -> dict[int, int]:
        """Groups of one role in repeated layers (the same parameter names but for the layer index, the same size:
        every layer's MLP channels, every layer's heads) remove the role's mean count each, as Minitron ranks a
        role across layers and keeps one width, so a Hugging Face config can still describe the model."""
        roles: dict[tuple, list[ChannelGroup]] = {}
        for g in groups:
            roles.setdefault((_role(g), g.size), []).append(g)
        out = dict(counts)
        for members in roles.values():
            if len(members) > 1:
                mean = sum(counts.get(g.index, 0) for g in members) / len(members)
                for g in members:
                    out[g.index] = self._count(g, (round(mean) + 1e-6) / g.size)
        return out


def _role(group: ChannelGroup) -> tuple[str, ...]:
    """A group's parameter names with layer indices wildcarded: ``model.layers.#.mlp.up_proj.weight``."""
    return tuple(sorted({re.sub(r"\.\d+\.", ".#.", p) for p in group.params()}))


def _record_shapes(gm: fx.GraphModule, ctx: Context) -> None:
    try:
        propagate(gm, ctx.inputs, fake=True)
    except GraphRunError:  # opaque code that needs real tensors
        propagate(gm, ctx.inputs)


def _warn_unknown(dep: DependencyGraph) -> None:
    """Ops without a dependency rule do not fail pruning: their channels stay whole, and the user hears why."""
    ops = sorted({reason.removeprefix("no rule for ") for reason in dep.unknown_ops.values()
                  if reason.startswith("no rule for ")})
    if ops:
        warnings.warn(f"prune-channels: no dependency rule for {', '.join(ops)}; the channels they touch are left "
                      "unpruned. Register a rule with @graphopt.analysis.dependency.register_rule(op) to prune through them.",
                      GraphoptWarning, stacklevel=2)


def _layer_weights(gm: fx.GraphModule) -> dict[str, str]:
    """Layer name -> the qualified name of its stored weight (the layer view, read once per pass)."""
    return {layer.name: layer.weight.target for layer in layers(gm) if layer.weight is not None}


def _shapes(gm: fx.GraphModule, weights: dict[str, str]) -> dict[str, tuple[int, ...]]:
    tensors = {**dict(gm.named_buffers()), **dict(gm.named_parameters(remove_duplicate=False))}
    return {name: tuple((tensors[t] if t in tensors else resolve(gm, t)).shape) for name, t in weights.items()}


def _shape_decisions(before: dict, after: dict, ignore: tuple) -> dict[str, str]:
    """Per layer: its weight's (out, in) sizes before -> after, "ignored", or "unchanged"."""
    out = {}
    for name, old in before.items():
        new = after.get(name)
        if matches_any(name, ignore):
            out[name] = "ignored"
        elif new is None:
            out[name] = "removed"
        elif new != old:
            out[name] = ", ".join(f"{what} {a} -> {b}" for what, a, b in zip(("out", "in"), old[:2], new[:2]) if a != b)
        else:
            out[name] = "unchanged"
    return out


def _check_ratio(what: str, r: float) -> None:
    if not 0 <= r < 1:
        raise PipelineError(f"prune-channels: {what} must be in [0, 1), got {r}")


def _check_patterns(gm: fx.GraphModule, patterns: tuple) -> None:
    names = [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]
    bad = unmatched(patterns, names)
    if bad:
        raise PipelineError(f"prune-channels: no parameter matches '{bad[0]}' (ignore/ratios name modules or "
                            f"parameters by qualified name, e.g. 'layer1.0.conv1' or 'blocks.*.attn')")
