"""``remove-layers``: depth pruning. Drop whole residual blocks (ResNet blocks, transformer layers or their
attention/MLP branches), replacing ``y = x + f(x)`` by ``y = x``.

Blocks come from graphopt.analysis.blocks (found in the traced graph, named by their module: ``layers.2``,
``model.layers.5``, ``model.layers.5.mlp`` with ``unit="branch"``). Which blocks go is decided on calibration
batches (``calib_data`` of ``graphopt.optimize``) by one criterion:

- ``block-influence`` (ShortGPT): 1 - mean cosine similarity of a block's input and output; the blocks that change
  their input least go.
- ``angular`` (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers"): the angular distance
  arccos(cos)/pi between the input of a window of ``n`` consecutive blocks and its output; the window with the
  smallest distance goes (always a contiguous run).
- ``output-error``: the relative squared error of the model's outputs with only that block dropped, measured
  directly; the blocks whose removal hurts least go.

With ``greedy=True`` (the default; block-influence and output-error) blocks are chosen one at a time, the rest scored
again with the ones already chosen dropped, so the blocks that go are judged together: removals interact. On a
trained 4-layer byte-level Llama the two layers each cheapest to drop alone (1 and 2) were, together, the worst pair
without layer 0 (3.40 bits per byte; dense 1.89); greedy chose layers 1 and 3, the best pair (2.89), with either
criterion (bench/results/oneshot_lm.md). ``greedy=False`` takes the ``n`` best-scored alone.

or by an explicit list of names (``blocks=("layers.2", "model.layers.7.mlp")``; protection does not apply).
``repair=true`` (needs ``calib_data``) then refits the linear/conv layers that first read a removed block's output
(a transformer's next q/k/v and gate/up, the LM head after the last layer, the next ResNet block's convs): each,
fed what the pruned model now gives it, is solved by least squares to give the outputs it gave in the original
model on the same batches, in graph order (graphopt/calibration/repair_after_removal.py).
With ``plain=True``, shape-preserving modules without a skip (a conv-BN-ReLU 32->32 in a VGG stack) are candidates
too: removing one replaces its output by its input.
Cosines are taken along the feature axis: channels for 4-D (N, C, H, W) tensors, the last axis otherwise.
Without ``calib_data`` a data-driven criterion raises InputError, unless ``use_example_inputs=True`` (then the
example inputs are the only calibration batch: fine for tests, a weak signal for real decisions).
In a torch.distributed job the scores sum over every rank's batches (graphopt.util.distributed): one choice everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.util import distributed
from graphopt.analysis.blocks import Block, find_blocks, remove_blocks, writes_into
from graphopt.calibration.repair_after_removal import layers_after, record_inputs, refit_recorded
from graphopt.errors import InputError, MissingDataError, PassError, PipelineError
from graphopt.graph.inputs import ExampleInputs, check_batches, flat_outputs
from graphopt.graph.layers import shared_weights
from graphopt.pipeline.pass_base import Context, Pass, PassResult
from graphopt.graph.patterns import matches
from graphopt.util.progress import progress
from graphopt.pipeline.registry import register_pass
from graphopt.graph.shapes import flat_graph_inputs, propagate, shape_of

CRITERIA = ("block-influence", "angular", "output-error")
UNITS = ("layer", "branch")


@register_pass
@dataclass(frozen=True)
class RemoveLayers(Pass):
    """Remove ``n`` residual blocks (or a ``fraction`` of them, or the named ``blocks``) chosen by ``criterion``."""

    name: ClassVar[str] = "remove-layers"
    n: int | None = None  # blocks to remove; with neither n, fraction nor blocks given: 1
    fraction: float = 0.0
    criterion: str = "block-influence"
    blocks: tuple = ()  # explicit module names to remove (layers or branches); overrides n/fraction/criterion
    unit: str = "layer"  # "layer": whole transformer layers / ResNet blocks; "branch": attention or MLP alone
    # "first", "last" and name patterns (graphopt/graph/patterns.py) of blocks that stay. The first only, measured: on
    # a trained 4-layer byte-level Llama (bench/results/oneshot_lm.md) no criterion ever picked layer 0 (its scores
    # are 5x the others'), while protecting the last layer kept out the best pair to drop (2.89 vs 3.40 bits/byte)
    protect: tuple = ("first",)
    allow_projection: bool = False  # also remove blocks with a projection shortcut, keeping the projection
    plain: bool = False  # also shape-preserving modules without a skip (conv-BN-ReLU 32->32): replaced by x
    use_example_inputs: bool = False  # score on the example inputs when no calib_data was given
    max_batches: int = 0  # 0: every calibration batch
    greedy: bool = True  # choose one block at a time, scoring the rest with the chosen ones already dropped
    repair: bool = False  # refit the layers right after removed blocks to the original outputs (needs calib_data)
    damp: float = 0.01  # repair's ridge towards the old weights, relative to the mean input energy

    def __post_init__(self):
        given = (("n", self.n is not None), ("fraction", bool(self.fraction)), ("blocks", bool(self.blocks)))
        chosen = [k for k, v in given if v]
        if len(chosen) > 1:
            raise PipelineError(f"remove-layers: give one of n, fraction or blocks, not {' and '.join(chosen)}")
        if self.n is not None and (not isinstance(self.n, int) or self.n < 0):
            raise PipelineError(f"remove-layers: n must be a non-negative integer, got {self.n!r}")
        if not 0 <= self.fraction < 1:
            raise PipelineError(f"remove-layers: fraction must be in [0, 1), got {self.fraction}")
        if self.criterion not in CRITERIA:
            raise PipelineError(f"remove-layers: unknown criterion '{self.criterion}'; "
                                f"choose one of {', '.join(CRITERIA)} (or name blocks=...)")
        if not self.damp >= 0:
            raise PipelineError(f"remove-layers: damp must be >= 0, got {self.damp}")
        if self.unit not in UNITS:
            raise PipelineError(f"remove-layers: unit must be one of {', '.join(UNITS)}, got '{self.unit}'")

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        if any(shape_of(n) is None for n in gm.graph.nodes if n.op == "call_function"
               and n.target in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)):
            propagate(gm, ctx.inputs, fake=True)  # block detection compares shapes
        candidates = find_blocks(gm, self.unit, self.allow_projection, self.plain)
        if self.blocks:
            chosen, scores = self._named(gm), {}
        else:
            count = self.n if self.n is not None else (round(self.fraction * len(candidates)) if self.fraction else 1)
            if count == 0:
                return PassResult(gm, False, {"removed": "none", "blocks_found": len(candidates)})
            chosen, scores = self._ranked(gm, ctx, candidates, count)
        windows = scores.pop("windows", None)
        params = {b.name: b.numel for b in chosen}
        recorded, batches = self._record_for_repair(gm, ctx, candidates, chosen) if self.repair else ({}, None)
        remove_blocks(gm, chosen)
        repaired = refit_recorded(gm, batches, recorded, damp=self.damp) if recorded else {}
        removed = [{"block": b.name, "score": scores.get(b.name), "params": params[b.name]} for b in chosen]
        text = ", ".join(b.name + ("" if scores.get(b.name) is None else f" ({scores[b.name]:.3g})")
                         for b in chosen)
        decisions = {name: f"kept (score {score:.3g})" for name, score in scores.items()
                     if isinstance(score, (int, float))}
        decisions.update({b.name: "removed" + ("" if scores.get(b.name) is None else f" (score {scores[b.name]:.3g})")
                          for b in chosen})
        decisions.update({name.rpartition(".")[0] or name: note for name, note in repaired.items()})
        return PassResult(gm, modified=bool(chosen), decisions=decisions, stats={
            **({"layers_refit": len(repaired)} if self.repair else {}),
            "criterion": "explicit" if self.blocks else self.criterion, "removed": text,
            "blocks_found": len(candidates), "removed_blocks": removed, "scores": scores,
            **({"windows": windows} if windows else {})})

    def _record_for_repair(self, gm: fx.GraphModule, ctx: Context, candidates: list[Block], chosen: list[Block]):
        """The original inputs of the layers right after the chosen blocks (weights read once only: refitting a
        tied LM head would change the embedding too), and the calibration batches they came from."""
        batches = check_batches(ctx.calib_data, ctx.inputs, needed_by="remove-layers", why=" for repair=true",
                                pipeline="remove-layers:repair=true")
        stops = {b.output for b in candidates if b not in chosen}
        shared = shared_weights(gm)
        names = {name for name in layers_after([b.output for b in chosen], stops) if name not in shared}
        return (record_inputs(gm, batches, names) if names else {}), batches

    def _named(self, gm: fx.GraphModule) -> list[Block]:
        """The blocks named in ``blocks`` (layer or branch names); PassError for a name that is none."""
        known = {b.name: b for unit in UNITS for b in find_blocks(gm, unit, self.allow_projection, self.plain)}
        chosen, adds = [], set()
        for name in self.blocks:
            if name not in known:
                raise PassError(_not_a_block(gm, name, known, self.allow_projection, self.plain))
            block = known[name]
            if not adds & {br.add for br in block.branches}:  # a layer and one of its branches: remove once
                chosen.append(block)
                adds |= {br.add for br in block.branches}
        return chosen

    def _ranked(self, gm, ctx: Context, candidates: list[Block], count: int) -> tuple[list[Block], dict]:
        eligible = [b for i, b in enumerate(candidates) if not self._protected(b.name, i, len(candidates))]
        if count > len(eligible):
            names = ", ".join(b.name for b in candidates) or "none"
            raise PassError(
                f"remove-layers: asked to remove {count} blocks but the model has {len(candidates)} removable "
                f"blocks ({names}) and {len(eligible)} of them are unprotected (protect={list(self.protect)}); "
                "lower n or fraction, or narrow protect")
        batches = self._batches(ctx)
        if self.criterion == "angular":
            return _best_window(gm, batches, candidates, eligible, count)
        score_fn = block_influence if self.criterion == "block-influence" else output_error
        if self.greedy:
            ranked, scores = [], {}
            for _ in range(count):
                rest = [b for b in eligible if b not in ranked]
                step = score_fn(gm, batches, rest, dropped=tuple(ranked))
                best = min(rest, key=lambda b: step[b.name])
                ranked.append(best)
                scores.update({name: score for name, score in step.items() if name not in scores or name == best.name})
            return [b for b in eligible if b in ranked], scores  # graph order
        scores = score_fn(gm, batches, eligible)
        ranked = sorted(eligible, key=lambda b: scores[b.name])[:count]
        return [b for b in eligible if b in ranked], scores  # graph order

    def _protected(self, name: str, index: int, total: int) -> bool:
        for p in self.protect:
            if (p == "first" and index == 0) or (p == "last" and index == total - 1) or matches(name, p):
                return True
        return False

    def _batches(self, ctx: Context) -> list[ExampleInputs]:
        data = ctx.calib_data
        if data is None:
            if not self.use_example_inputs:
                raise MissingDataError(  # the CLI names its --calib flag instead of calib_data=
                    f"remove-layers: criterion '{self.criterion}' needs calibration batches",
                    "pass calib_data=[batch, ...] to graphopt.optimize (or Context), name the blocks to remove "
                    "with blocks=(...), or set use_example_inputs=True to score on the example inputs",
                    keyword="calib_data", sep="; ")
            data = [ctx.inputs]
        batches = [ExampleInputs.of(b) for b in data]  # listed once: output-error runs them once per block
        if self.max_batches:
            batches = batches[: self.max_batches]
        if not batches:
            raise InputError("remove-layers: calib_data is empty; give at least one input batch")
        return batches


def _not_a_block(gm: fx.GraphModule, name: str, known: dict, allow_projection: bool, plain: bool) -> str:
    listing = ", ".join(known) or "none"
    if not plain and name in {b.name for b in find_blocks(gm, "layer", allow_projection, plain=True)}:
        return (f"remove-layers: '{name}' is a shape-preserving layer without a skip connection; pass plain=True "
                "to allow replacing it by its input")
    if not allow_projection:
        projected = {b.name for u in UNITS for b in find_blocks(gm, u, True) if b.projection}
        if name in projected:
            return (f"remove-layers: '{name}' changes shape or channel count (its shortcut is a projection), so "
                    "it is not removable as an identity; pass allow_projection=True to keep only its projection")
    return (f"remove-layers: '{name}' is not a removable block (a residual block y = x + f(x) whose f is used "
            f"nowhere else); removable blocks: {listing}")


class _Probe(fx.Interpreter):
    """Runs the graph with some blocks dropped (their adds return the kept value) and records chosen values."""

    def __init__(self, gm: fx.GraphModule, watch=(), drop: tuple[Block, ...] = ()):
        super().__init__(gm, garbage_collect_values=True)
        self.watch, self.seen = set(watch), {}
        self.kept = {br.add: br.kept for b in drop for br in b.branches}
        self.copied = {add for add in self.kept if writes_into(add)}  # a relu_ after the add: not into the input
        self.skip = {n for b in drop for br in b.branches for n in br.body}
        self.skip |= {u for n in self.skip for u in n.users if not u.users and "assert" in str(u.target)}
        keep = set(self.kept.values())  # a plain layer's input is last read inside it: keep it for its output
        self.user_to_last_uses = {n: [v for v in vs if v not in keep] for n, vs in self.user_to_last_uses.items()}

    def run_node(self, n: fx.Node) -> Any:
        if n in self.skip:
            return None  # body of a dropped block: nobody outside reads it
        if n in self.kept:
            out = self.env[self.kept[n]].clone() if n in self.copied else self.env[self.kept[n]]
        else:
            out = super().run_node(n)
        if n in self.watch:  # a copy: a later in-place op (relu_ after the add) would change it under us
            self.seen[n] = out.clone() if isinstance(out, torch.Tensor) else out
        return out


@torch.no_grad()
def _run(gm: fx.GraphModule, batch: ExampleInputs, watch=(), drop=()) -> tuple[list[torch.Tensor], dict]:
    probe = _Probe(gm, watch, drop)
    out = probe.run(*flat_graph_inputs(gm, batch))
    return flat_outputs(out), probe.seen


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the feature axis (channels of NCHW maps, else the last axis), every position."""
    dim = 1 if a.dim() == 4 else -1
    return F.cosine_similarity(a.double(), b.double(), dim=dim, eps=1e-12)


def block_influence(gm: fx.GraphModule, batches: list[ExampleInputs], blocks: list[Block],
                    dropped: tuple[Block, ...] = ()) -> dict[str, float]:
    """ShortGPT's block influence per block: 1 - mean cosine(input, output) over all positions and batches, with
    the ``dropped`` blocks already removed."""
    sums = {b.name: 0.0 for b in blocks}
    counts = {b.name: 0 for b in blocks}
    watch = [n for b in blocks for n in (b.input, b.output)]
    for batch in progress(batches, "remove-layers: block influence"):
        _, seen = _run(gm, batch, watch, drop=dropped)
        for b in blocks:
            cos = _cosine(seen[b.input], seen[b.output])
            sums[b.name] += float(cos.sum())
            counts[b.name] += cos.numel()
    names = list(sums)
    total = distributed.sum_numbers([sums[n] for n in names] + [counts[n] for n in names])
    sums, counts = dict(zip(names, total[:len(names)])), dict(zip(names, total[len(names):]))
    return {name: 1.0 - sums[name] / max(counts[name], 1) for name in sums}


def _relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> tuple[float, float]:
    num = sum(float((g.double() - w.double()).pow(2).sum()) for g, w in zip(got, want) if w.is_floating_point())
    den = sum(float(w.double().pow(2).sum()) for w in want if w.is_floating_point())
    return num, den


def output_error(gm: fx.GraphModule, batches: list[ExampleInputs], blocks: list[Block],
                 dropped: tuple[Block, ...] = ()) -> dict[str, float]:
    """Per block: ||out_without_block - out||^2 / ||out||^2 over the model's float outputs, summed over batches
    (``out``: the whole model's; the ``dropped`` blocks are dropped too in the runs without the block)."""
    reference = [_run(gm, batch)[0] for batch in batches]
    nums, dens = [], []
    for block in progress(blocks, "remove-layers: output error"):
        num = den = 0.0
        for batch, want in zip(batches, reference):
            n, d = _relative_error(_run(gm, batch, drop=(*dropped, block))[0], want)
            num, den = num + n, den + d
        nums.append(num)
        dens.append(den)
    total = distributed.sum_numbers(nums + dens)
    return {b.name: num / max(den, 1e-30) for b, num, den in zip(blocks, total[:len(blocks)], total[len(blocks):])}


def _best_window(gm, batches, candidates: list[Block], eligible: list[Block], count: int):
    """The run of ``count`` consecutive unprotected blocks whose input and output are closest in angle."""
    ok = {b.name for b in eligible}
    windows = [candidates[i:i + count] for i in range(len(candidates) - count + 1)]
    windows = [w for w in windows if all(b.name in ok for b in w) and _same_shape(w[0].input, w[-1].output)]
    if not windows:
        raise PassError(f"remove-layers: no run of {count} consecutive unprotected blocks with equal input and "
                        "output shapes for criterion 'angular'; lower n or use block-influence")
    watch = {n for w in windows for n in (w[0].input, w[-1].output)}
    sums = [0.0] * len(windows)
    counts = [0] * len(windows)
    for batch in progress(batches, "remove-layers: angular distance"):
        _, seen = _run(gm, batch, watch)
        for k, w in enumerate(windows):
            cos = _cosine(seen[w[0].input], seen[w[-1].output]).clamp(-1, 1)
            sums[k] += float(torch.arccos(cos).sum() / math.pi)
            counts[k] += cos.numel()
    total = distributed.sum_numbers(sums + counts)
    sums, counts = total[:len(windows)], total[len(windows):]
    distance = {w[0].name + (f"..{w[-1].name}" if count > 1 else ""): s / max(c, 1)
                for w, s, c in zip(windows, sums, counts)}
    best = min(range(len(windows)), key=lambda k: sums[k] / max(counts[k], 1))
    scores = {b.name: list(distance.values())[best] for b in windows[best]}
    return windows[best], {**scores, "windows": distance}


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    return shape_of(a) is not None and shape_of(a) == shape_of(b)
