"""``prune-channels``: structured channel pruning over the groups of the dependency analysis.

Each step analyses the graph, scores every channel of every prunable group, plans which channels go (local: the
same ratio in every group; global: lowest normalized scores across groups), and applies the plan in one place
(graphopt.analysis.dependency.apply). Parameters physically shrink; nothing is masked. With ``steps > 1`` the ratio is
reached gradually and ``finetune(gm, step)`` runs between steps (prune a little, recover, repeat).

``reconstruct=true`` (needs ``calib_data``) repairs what a step removes before removing it: every linear or conv
that reads a removed channel is refit by least squares on the calibration inputs the already-repaired layers before
it produce, and the removed channels' mean contribution goes into its bias, or into the running mean of the
BatchNorm right after it (graphopt/calibration/reconstruct.py); ``damp`` regularizes the solve towards the old
weights. ``importance=activation`` weighs each weight column by its input's mean square on calibration data;
``importance=taylor`` differentiates ``loss`` (``output-norm``, or ``cross-entropy``: next-token loss for a causal
LM, the model's own decisions for a classifier) unless a ``loss_fn`` is given.

``experts=true`` (default) also prunes the width of MoE layers' routed experts, fused 3-D tensors no group holds
(graphopt/analysis/moe_width.py): each expert of a layer loses the same count (``ratio``, ``ratios``, ``round_to``,
``ignore`` and the cap apply as to a group; ``ratio`` under ``global_ranking``), its own lowest by ``importance``;
``to_model()`` writes ``intermediate_size`` / ``moe_intermediate_size`` back. Shared experts are plain MLPs.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.fx as fx

from graphopt.analysis.dependency import ChannelGroup, DependencyGraph
from graphopt.analysis.dependency.apply import apply_channel_plan, keep_every_dim_nonempty
from graphopt.calibration.input_energy import input_energy
from graphopt.calibration.reconstruct import refit_before_removal, refit_targets
from graphopt.errors import GraphoptWarning, PipelineError
from graphopt.analysis.importance import CRITERIA, LOSSES, group_scores, named_loss
from graphopt.analysis.moe_width import prune_expert_widths, without_expert_widths
from graphopt.calibration.expert_energy import expert_input_energy
from graphopt.graph.inputs import ExampleInputs, check_batches
from graphopt.graph.nodes import resolve
from graphopt.graph.layers import layers, shared_weights
from graphopt.pipeline.pass_base import Context, Pass, PassResult
from graphopt.graph.patterns import matches, matches_any, unmatched
from graphopt.pipeline.registry import register_pass
from graphopt.graph.shapes import GraphRunError, propagate

ATTENTION = ("heads", "head_dim", "both", "none")
ALMOST_NOTHING = 0.05  # a prune that removes under this share of the parameters it was asked to cut warns why


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
    loss: str = "output-norm"  # for importance='taylor' without loss_fn: output-norm | cross-entropy
    # refit the layers reading removed channels on calib_data (least squares + bias). It lowered the one-shot error
    # everywhere measured (digits 50%/70%, the byte-level Llama), but costs: on a 440M Llama the pass took 43 s instead
    # of 2 s and its peak grew by 1.7 GB (measured with bench/oneshot_scale.py), so it is asked for, not assumed
    reconstruct: bool = False
    damp: float = 0.01  # reconstruct's damping: a share of the mean diagonal of each Gram matrix
    uniform: bool | None = None  # repeated layers keep equal widths under global ranking; None: on for HF models
    experts: bool = True  # prune the width of routed experts (fused 3-D tensors) too

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
        if self.loss not in LOSSES:
            raise PipelineError(f"prune-channels: unknown loss '{self.loss}'; choose one of {', '.join(LOSSES)}")
        if self.loss != "output-norm" and self.loss_fn is not None:
            raise PipelineError("prune-channels: give loss= (a named loss) or loss_fn= (your own), not both")
        if self.damp < 0:
            raise PipelineError(f"prune-channels: damp must be >= 0, got {self.damp}")
        if self.round_to < 1 or self.steps < 1 or not 0 < self.max_ratio_per_group < 1:
            raise PipelineError("prune-channels: round_to and steps must be >= 1, max_ratio_per_group in (0, 1)")

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        _check_patterns(gm, self.ignore + tuple(p for p, _ in self.ratios))
        weights = _layer_weights(gm)
        before = _shapes(gm, weights)
        removed_total, pruned_groups, repairs, head_notes = 0, 0, {}, {}
        batches = check_batches(ctx.calib_data, ctx.inputs, needed_by="prune-channels", why=" for reconstruct=true",
                                pipeline="prune-channels:reconstruct=true") if self.reconstruct else None
        step_keep = (1 - self.ratio) ** (1 / self.steps)
        params_before, first = _param_count(gm), None
        for step in range(self.steps):
            dep = ctx.analysis(DependencyGraph, gm) if step == 0 else DependencyGraph(gm, ctx)  # step 1+: pruned
            if step == 0:
                first = dep
                _warn_unknown(dep)
            plan = self.plan(gm, dep, ctx, 1 - step_keep, head_notes)
            plan = without_expert_widths(gm, plan)  # each expert its own channels (experts=true), or whole
            if batches is not None and plan:
                targets, skipped = refit_targets(gm, _removed_inputs(gm, plan), shared_weights(gm))
                repairs.update(skipped)
                repairs.update(refit_before_removal(gm, batches, targets, damp=self.damp))
            removed_total += apply_channel_plan(gm, dep, plan)
            if self.experts:
                if plan:  # the experts' layout is read off the shapes: the hidden size may have changed
                    _record_shapes(gm, ctx)
                removed_total += self._prune_expert_widths(gm, ctx, 1 - step_keep, plan, head_notes)
            if step < self.steps - 1:  # the next step's analysis reads shapes: record the pruned ones
                _record_shapes(gm, ctx)
            pruned_groups = max(pruned_groups, len(plan))
            if self.finetune is not None and step < self.steps - 1:
                self.finetune(gm, step)
        self._warn_if_almost_nothing(gm, first, params_before - _param_count(gm))
        decisions = _shape_decisions(before, _shapes(gm, weights), self.ignore)
        for layer_weight, note in repairs.items():
            layer = next((n for n, t in weights.items() if t == layer_weight), layer_weight)
            decisions[layer] = f"{decisions.get(layer, 'unchanged')}; {note}"
        decisions.update(head_notes)
        stats = {"groups_pruned": pruned_groups, "params_removed": removed_total, "steps": self.steps}
        if self.reconstruct:
            stats["layers_refit"] = sum(1 for note in repairs.values() if note.startswith("refit"))
        return PassResult(gm, modified=removed_total > 0, stats=stats, decisions=decisions)

    def plan(self, gm: fx.GraphModule, dep: DependencyGraph, ctx: Context, ratio: float,
             notes: dict | None = None) -> dict:
        """Which channels of which groups to remove at this ``ratio`` (``notes`` gets {attention layer: how its
        factored heads were cut})."""
        notes = {} if notes is None else notes
        groups = [g for g in dep.prunable_groups if self._eligible(g, dep)]
        batches = ctx.calib_data or [ctx.inputs.kwargs or ctx.inputs.args]
        energy = None
        if self.importance == "activation":
            energy = input_energy(gm, [ExampleInputs.of(b) for b in batches], _conv_and_linear_weights(gm))
        scores = group_scores(gm, groups, self.importance, seed=self.seed, batches=batches,
                              loss_fn=self.loss_fn or named_loss(self.loss), energy=energy)
        counts = self._global_counts(groups, scores, ratio) if self.global_ranking else \
            {g.index: self._count(g, self._ratio_of(g, ratio), _count_base(g, dep)) for g in groups}
        if not self.global_ranking:
            counts.update(self._factored_head_counts(groups, dep, ratio, notes))
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

    def _prune_expert_widths(self, gm: fx.GraphModule, ctx: Context, ratio: float, plan: dict, notes: dict) -> int:
        """Each routed expert's intermediate channels, counted like a group's (graphopt/analysis/moe_width.py)."""
        def count(width) -> int:
            ignored = any(matches_any(p, self.ignore) for p in width.params())
            return 0 if ignored else self._count(width, self._ratio_of(width, ratio))

        batches = ctx.calib_data or [ctx.inputs.kwargs or ctx.inputs.args]
        removed, found = prune_expert_widths(
            gm, count, self.importance, seed=self.seed, batches=batches, loss_fn=self.loss_fn or named_loss(self.loss),
            skip={(m.param, m.dim) for g in plan for m in g.members},
            measure_energy=lambda layers: expert_input_energy(gm, layers, [ExampleInputs.of(b) for b in batches]))
        notes.update(found)
        return removed

    def _factored_head_counts(self, groups: list[ChannelGroup], dep: DependencyGraph, ratio: float,
                              notes: dict) -> dict[int, int]:
        """Grouped-query attention has its query heads as a product of two groups: the key-value heads and the
        repeats of each (their members are a subset of the key-value heads' rows). The ratio is the share of query
        heads that go, once, not of both factors (which would remove 1 - (1 - r)^2 of them): the key-value heads
        are cut first, so every kept key-value head keeps its queries; the repeats only where the key-value heads
        cannot go (ignored, frozen) or the count needs them."""
        heads = [g for g in groups if dep.group_kind(g) == "heads"]
        slots = {g.index: {(m.param, m.dim) for m in g.members} for g in heads}
        out = {}
        for inner in heads:
            outer = next((g for g in heads if g is not inner and slots[inner.index] < slots[g.index]), None)
            if outer is None:  # not a repeat factor, or its key-value heads stay whole: its own count is right
                continue
            outer_size = outer.size
            product = outer_size * inner.size
            keep_goal = product - int(self._ratio_of(inner, ratio) * product)
            best = None
            outer_max = len(outer.prunable)
            for keep_inner in range(inner.size - len(inner.prunable), inner.size + 1):
                for keep_outer in range(outer_size - outer_max, outer_size + 1):
                    kept = keep_outer * keep_inner
                    if kept < max(keep_goal, 1) or keep_outer < 1 or keep_inner < 1:
                        continue
                    rank = (kept, -keep_inner)  # fewest heads kept at or above the goal; then cut key-value heads
                    if best is None or rank < best[0]:
                        best = (rank, keep_outer, keep_inner)
            if best is None:
                continue
            _, keep_outer, keep_inner = best
            out[inner.index], out[outer.index] = inner.size - keep_inner, outer_size - keep_outer
            cut = [what for what, n, k in (("key-value heads", outer_size, keep_outer), ("repeats", inner.size, keep_inner))
                   if k < n]
            label = _attention_name(inner)
            notes[label] = (f"query heads {product} -> {keep_outer * keep_inner} ({outer_size} key-value heads x "
                            f"{inner.size} repeats -> {keep_outer} x {keep_inner}; cut: {', '.join(cut) or 'nothing'})")
        return out

    def _eligible(self, group: ChannelGroup, dep: DependencyGraph) -> bool:
        if any(matches_any(p, self.ignore) for p in group.params()):
            return False
        kind = dep.group_kind(group)
        return kind == "channels" or self.attention in ("both", kind)

    def _warn_if_almost_nothing(self, gm: fx.GraphModule, dep: DependencyGraph, removed: int) -> None:
        """Warn when the pass removed under 5% of the parameters it was asked to cut, naming what held them."""
        asked = sum(p.numel() * self._ratio_of_param(name) for name, p in gm.named_parameters()
                    if not matches_any(name, self.ignore))
        groups = [g for g in dep.groups if any(m.dim < 2 for m in g.members)  # kernel windows are no channels
                  and not any(matches_any(p, self.ignore) for p in g.params())]
        wanted = sum(int(self._ratio_of_param(g.params()[0]) * g.size) for g in groups)
        if not wanted or removed >= ALMOST_NOTHING * asked:  # a ratio too small for any group is no blockage
            return
        held: dict[str, float] = defaultdict(float)  # reason -> parameters in the channels it keeps
        nodes: dict[str, set[str]] = defaultdict(set)  # an unanalysed op -> the nodes where it froze channels
        for g in groups:
            weight = dep.channel_params(g)
            kind = dep.group_kind(g)
            if kind != "channels" and self.attention not in ("both", kind):
                held[f"attention={self.attention} keeps {kind} groups whole"] += float(weight.sum())
                continue
            for i, reason in g.frozen.items():
                op, node = _op_and_node(reason)
                held[op or reason] += float(weight[i])
                if node:
                    nodes[op].add(node)
        total = sum(held.values()) or 1.0
        top = sorted(held.items(), key=lambda kv: -kv[1])[:3]
        why = "; ".join(f"{reason}{_at_nodes(nodes.get(reason))} ({share / total:.0%})" for reason, share in top) \
            or "no channel is frozen"
        warnings.warn(f"prune-channels removed almost nothing: {removed:,} of the ~{int(asked):,} parameters asked "
                      f"for at ratio {self.ratio:g} ({removed / asked:.1%}). What keeps channels whole, by parameters "
                      f"held: {why}. For an op without a rule, register one (README, 'Which channels move together'); "
                      "`python -m graphopt inspect` lists every group and why it is frozen.", GraphoptWarning,
                      stacklevel=3)

    def _ratio_of_param(self, name: str) -> float:
        """The final ratio asked of one parameter (its first matching ``ratios`` pattern, else ``ratio``)."""
        return next((r for pattern, r in self.ratios if matches(name, pattern)), self.ratio)

    def _ratio_of(self, group: ChannelGroup, default: float) -> float:
        for pattern, r in self.ratios:
            if any(matches(p, pattern) for p in group.params()):
                return 1 - (1 - r) ** (1 / self.steps)
        return default

    def _count(self, group: ChannelGroup, ratio: float, base: int | None = None) -> int:
        """Channels to remove: ratio of ``base`` channels of the group (all of them unless said), capped, leaving a
        multiple of round_to."""
        base = group.size if base is None else base
        # one step rounds down (never more than asked); a schedule rounds to nearest so n steps reach the target
        wanted = int(ratio * base) if self.steps == 1 else round(ratio * base)
        k = min(wanted, int(self.max_ratio_per_group * base), len(group.prunable))
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


def _count_base(group: ChannelGroup, dep: DependencyGraph) -> int:
    """What a ratio is a share of: a group's channels, but of a heads group only the heads that may go. A fused
    projection viewed as query heads plus fixed key/value slots (multi-query attention's ``view(b, s, heads + 2,
    head_dim)`` split into [heads, 1, 1]) keeps those slots; ratio 0.5 must halve the query heads, not remove half
    of all the slots from the query heads."""
    return len(group.prunable) if dep.group_kind(group) == "heads" else group.size


def _attention_name(group: ChannelGroup) -> str:
    """The attention module of a heads group: the common prefix of its weights' module paths."""
    paths = [p.rsplit(".", 2)[0] for p in group.params()]
    common = paths[0]
    for p in paths[1:]:
        while not (p == common or p.startswith(common + ".")):
            common = common.rsplit(".", 1)[0] if "." in common else ""
    return common or group.params()[0]


def _role(group: ChannelGroup) -> tuple[str, ...]:
    """A group's parameter names with layer indices wildcarded: ``model.layers.#.mlp.up_proj.weight``."""
    return tuple(sorted({re.sub(r"\.\d+\.", ".#.", p) for p in group.params()}))


def _conv_and_linear_weights(gm: fx.GraphModule) -> set[str]:
    return {layer.weight.target for layer in layers(gm) if layer.kind in ("linear", "conv") and layer.weight is not None}


def _removed_inputs(gm: fx.GraphModule, plan: dict) -> dict[str, list[int]]:
    """{weight of a linear/conv: its input channels (weight dim 1) the plan removes}."""
    candidates = _conv_and_linear_weights(gm)
    removed: dict[str, set[int]] = {}
    for group, channels in plan.items():
        going = np.asarray(channels, dtype=np.int64)
        for m in group.members:
            if m.dim == 1 and m.param in candidates:
                rows = m.rows[np.isin(m.channel, going)]
                if rows.size:
                    removed.setdefault(m.param, set()).update(rows.tolist())
    return {name: sorted(rows) for name, rows in removed.items()}


def _record_shapes(gm: fx.GraphModule, ctx: Context) -> None:
    try:
        propagate(gm, ctx.inputs, fake=True)
    except GraphRunError:  # opaque code that needs real tensors
        propagate(gm, ctx.inputs)


def _warn_unknown(dep: DependencyGraph) -> None:
    """Ops without a (working) dependency rule do not fail pruning: the channels they alone keep whole stay, and the
    user hears which op, where. Ops that touch no prunable channel (mask and position arithmetic) are not named."""
    blocking = dep.blocking_ops()
    if not blocking:
        return
    nodes = {n.name: n for n in dep.gm.graph.nodes}
    by_op: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, (reason, _) in blocking.items():
        node = nodes[name]
        op = f"module `{node.target}`" if node.op == "call_module" else str(node.target)
        what = "no dependency rule for" if reason.startswith("no dependency rule") else "a failing dependency rule for"
        by_op[(what, op)].append(f"`{name}`")
    ops = "; ".join(f"{what} {op} (node{'s' * (len(names) > 1)} {', '.join(names[:3])}{', ...' * (len(names) > 3)})"
                    for (what, op), names in sorted(by_op.items()))
    channels = sum(n for _, n in blocking.values())
    warnings.warn(f"prune-channels: {ops}; the {channels} channels only they hold are left unpruned. Register a rule "
                  "with @graphopt.analysis.dependency.register_rule(op) to prune through them (README, 'Which "
                  "channels move together').", GraphoptWarning, stacklevel=2)


def _op_and_node(reason: str) -> tuple[str | None, str | None]:
    """('no dependency rule for OP', node) for the reason an unanalysed op froze channels with, else (None, None)."""
    found = re.match(r"(no dependency rule for .+?|the dependency rule for .+?) (?:failed )?at node `([^`]+)`", reason)
    return (found.group(1), found.group(2)) if found else (None, None)


def _at_nodes(names: set[str] | None) -> str:
    if not names:
        return ""
    names = sorted(names)
    return f" at node{'s' * (len(names) > 1)} {', '.join(f'`{n}`' for n in names[:3])}{', ...' * (len(names) > 3)}"


def _param_count(gm: fx.GraphModule) -> int:
    return sum(p.numel() for p in gm.parameters())


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
