"""``sparsify``: weight sparsity with patterns, held as masks until lowering; by magnitude or from calibration data.

Methods (``method=``): ``magnitude`` (the default; ``calib_data`` is not used), and two one-shot, data-aware ones
that need ``calib_data`` and run the layers in graph order, each on the inputs the already-pruned layers before it
produce (graphopt/calibration/): ``wanda`` scores ``|W_ij| * ||x_j||`` per output row, ``sparsegpt`` chooses by
the OBS saliency and updates the weights that stay with the layer's input Hessian (damped by ``damp`` times its
mean diagonal; ``block_size`` columns per lazy update). Both take unstructured and N:M patterns, one step, layer-wise
thresholds.

Which weights: the weight of every ``aten.linear``, ``aten.conv1d/2d/3d`` and ``aten.addmm``/``aten.mm`` node
(``x @ W``, Hugging Face GPT-2's Conv1D) that reads it through a ``get_attr`` node. Patterns always refer to the
layer's (out, in) matrix, so for an ``addmm``/``mm`` weight, stored (in, out), its mask is the transpose of that. Left dense (listed in ``stats['skipped']`` with the reason): weights that are also read
by other ops (an embedding tied to an output head), parameters held under several names, biases, norms, embeddings,
names matched by ``ignore``, the output layers with ``skip_output=True`` (layers from which no other linear/conv is
reachable: a classifier head, an LM head), and with ``skip_unfit=True`` layers the pattern cannot fit.

Patterns and the matrix view they apply to: see graphopt/analysis/sparsity.py (``unstructured``, ``RxC`` blocks such as
``8x1``/``16x1``/``1x4`` with a ragged last block, ``N:M`` such as ``2:4`` whose sparsity is fixed at 1 - N/M).
Thresholds are layer-wise (every layer reaches ``sparsity``) or, with ``global_threshold=True``, one magnitude
threshold over all layers pooled (overall sparsity reaches ``sparsity``; layers with smaller weights lose more).
Layers given their own value in ``sparsities`` and N:M layers always use their own, layer-wise.
``steps > 1`` reaches the target on the cubic schedule of Zhu & Gupta (2017) and calls ``finetune(gm, step)``
between steps; from a training loop of your own call ``Sparsify(...).apply(gm, progress)`` instead. N:M layers
take their full pattern at the first step (their sparsity is not free).

Contract with lowering (``lower-sparse``) and with training code:
- each sparsified weight ``<owner>.<leaf>`` is a torch.nn.utils.parametrize parametrization on its owner module
  inside the GraphModule: ``owner.parametrizations.<leaf>`` holds ``original`` (the dense Parameter the
  optimizer trains) and a ``graphopt.analysis.sparsity.WeightMask`` with a bool buffer ``mask`` (True = kept) and a
  ``pattern`` string. Reading ``owner.<leaf>`` (as the graph's get_attr node does) gives ``original * mask``.
- the graph itself is unchanged (no new nodes): FakeTensor verification, ``graphopt.streamline`` and ``torch.export``
  of the module see the masked weight. Pruned weights read as exact zeros and receive zero gradients, so
  fine-tuning (loss.backward + optimizer.step) keeps them zero; masks never revive a pruned weight.
- ``graphopt.analysis.sparsity.weight_masks(gm)`` lists them; ``graphopt.analysis.sparsity.bake_masks(gm)`` replaces them by plain
  parameters equal to ``original * mask`` (remove_parametrizations with leave_parametrized=True, made safe for deep
  copies, which share parametrized classes in torch). A parametrized module cannot be pickled whole
  (``torch.save(gm)``): save its ``state_dict`` or bake first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.fx as fx

from graphopt.calibration.prune_weights import METHODS, WeightTarget, prune_with_data
from graphopt.errors import InputError, PassError, PipelineError
from graphopt.graph.inputs import check_batches
from graphopt.graph.nodes import is_op, resolve
from graphopt.graph.layers import output_layers
from graphopt.pipeline.pass_base import Context, Pass, PassResult
from graphopt.graph.patterns import first_match, matches_any, unmatched
from graphopt.pipeline.registry import register_pass
from graphopt.analysis.sparsity import (
    Pattern, achieved_sparsity, block_scores, cubic_sparsity, element_scores, expand_blocks, nm_keep,
    register_mask, select_lowest, weight_masks, weight_matrix,
)

aten = torch.ops.aten
# op -> (position of the weight argument, stored as (in, out) rather than (out, in))
LAYER_OPS = {aten.linear: (1, False), aten.conv1d: (1, False), aten.conv2d: (1, False), aten.conv3d: (1, False),
             aten.addmm: (2, True), aten.mm: (1, True)}  # addmm/mm: HF GPT-2's Conv1D, x @ W with W (in, out)


@register_pass
@dataclass(frozen=True)
class Sparsify(Pass):
    """Zero the lowest-magnitude weights (or blocks) of linear/conv layers through persistent masks."""

    name: ClassVar[str] = "sparsify"
    before: ClassVar = ("lower-sparse",)
    sparsity: float | None = None  # default 0.5; N:M patterns fix theirs at 1 - N/M
    pattern: str = "unstructured"
    global_threshold: bool = False
    sparsities: tuple = ()  # ((name pattern, sparsity), ...): per-layer targets, first match wins
    patterns: tuple = ()  # ((name pattern, pattern), ...): per-layer patterns, first match wins
    ignore: tuple = ()  # name patterns (graphopt/graph/patterns.py) of layers or weights left dense
    skip_output: bool = False
    skip_unfit: bool = False
    steps: int = 1
    initial_sparsity: float = 0.0
    finetune: Callable | None = None  # finetune(gm, step) between steps
    method: str = "magnitude"  # magnitude | wanda | sparsegpt (the last two need calib_data)
    damp: float = 0.01  # sparsegpt: Hessian damping, as a share of its mean diagonal
    block_size: int = 128  # sparsegpt: columns per lazy update block

    def __post_init__(self):
        for option, example in (("sparsities", "0.9"), ("patterns", "'1x4'")):
            if not all(isinstance(e, (tuple, list)) and len(e) == 2 for e in getattr(self, option)):
                raise PipelineError(f"sparsify: {option} takes (name pattern, value) pairs, e.g. "
                                    f"{option}=(('layer4.*', {example}),)")
        for _, pat in self.patterns:
            _parse(pat)
        fixed = _parse(self.pattern).fixed_sparsity
        if self.sparsity is not None:
            _check_sparsity("sparsity", self.sparsity)
            if fixed is not None and abs(self.sparsity - fixed) > 1e-9:
                raise PipelineError(f"sparsify: pattern '{self.pattern}' fixes the sparsity at {fixed:g}; leave "
                                    f"'sparsity' unset or use a block pattern")
        for name, s in self.sparsities:
            _check_sparsity(f"sparsity for '{name}'", s)
        _check_sparsity("initial_sparsity", self.initial_sparsity)
        if self.steps < 1:
            raise PipelineError(f"sparsify: steps must be >= 1, got {self.steps}")
        self._check_method()

    def _check_method(self) -> None:
        if self.method not in ("magnitude", *METHODS):
            raise PipelineError(f"sparsify: method must be one of magnitude, {', '.join(METHODS)}; got "
                                f"{self.method!r}")
        if self.method == "magnitude":
            return
        patterns = [_parse(self.pattern), *(_parse(p) for _, p in self.patterns)]
        if any(not (p.is_nm or str(p) == "unstructured") for p in patterns):
            raise PipelineError(f"sparsify: method '{self.method}' supports unstructured and N:M patterns; use "
                                "method=magnitude for block patterns")
        if self.steps != 1 or self.global_threshold:
            raise PipelineError(f"sparsify: method '{self.method}' is one-shot and layer-wise: leave steps=1 and "
                                "global_threshold=False")

    @property
    def target(self) -> float:
        """The sparsity asked for the layers without an override (0.5 unless set; 1 - N/M for N:M)."""
        fixed = Pattern.parse(self.pattern).fixed_sparsity
        return fixed if fixed is not None else (0.5 if self.sparsity is None else self.sparsity)

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        self._check_names(gm)
        if self.method != "magnitude":
            return self._run_with_data(gm, ctx)
        modified, stats = False, {}
        for step in range(1, self.steps + 1):
            changed, stats = self._apply(gm, step / self.steps)
            modified |= changed
            if self.finetune is not None and step < self.steps:
                self.finetune(gm, step - 1)
        decisions = {_owner(n): f"{s:.1%} zeros" for n, s in stats.get("per_layer", {}).items()}
        decisions.update({_owner(n): why for n, why in stats.get("skipped", {}).items()})
        return PassResult(gm, modified=modified, stats={**stats, "steps": self.steps}, decisions=decisions)

    def _run_with_data(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        batches = check_batches(ctx.calib_data, ctx.inputs, needed_by=f"sparsify method={self.method}",
                                pipeline=f"sparsify:method={self.method}")
        layers, skipped = self._layers(gm)
        targets = {}
        for node in gm.graph.nodes:
            slot = weight_slot(node)
            name = node.args[slot[0]].target if slot else None
            if name in layers and all(t.name != name for t in targets.values()):
                pattern, target, transposed = layers[name]
                targets[node] = WeightTarget(name, pattern, self.target if target is None else target, transposed)
        notes = prune_with_data(gm, batches, targets, self.method, damp=self.damp, block_size=self.block_size)
        stats = self._stats(gm, layers, skipped)
        decisions = {_owner(n): f"{s:.1%} zeros ({notes.get(n, self.method)})" for n, s in stats["per_layer"].items()}
        decisions.update({_owner(n): why for n, why in skipped.items()})
        return PassResult(gm, modified=bool(notes), stats={**stats, "steps": 1, "method": self.method},
                          decisions=decisions)

    def apply(self, gm: fx.GraphModule, progress: float = 1.0) -> dict:
        """Set the masks of ``gm`` (in place) to where the cubic schedule stands at ``progress`` in [0, 1].

        For fine-tuning loops of your own: call it every few optimizer steps with ``progress = step / total``;
        returns the same stats as the pass.
        """
        if self.method != "magnitude":
            raise PipelineError(f"sparsify: apply() follows the magnitude schedule; method={self.method} is one-shot: "
                                "run the pass with calib_data instead")
        self._check_names(gm)
        return self._apply(gm, progress)[1]

    def _check_names(self, gm: fx.GraphModule) -> None:
        _check_names(gm, self.ignore + tuple(p for p, _ in self.sparsities) + tuple(p for p, _ in self.patterns))

    def _apply(self, gm: fx.GraphModule, progress: float) -> tuple[bool, dict]:
        layers, skipped = self._layers(gm)
        keeps = self._plan(gm, layers, progress)
        changed = False
        for name, keep in keeps.items():
            weight = resolve(gm, name)
            stored = keep.t() if layers[name][2] else keep.reshape(weight.shape)
            changed |= register_mask(gm, name, stored.contiguous(), str(layers[name][0]))
        return changed, self._stats(gm, layers, skipped)

    def _layers(self, gm: fx.GraphModule) -> tuple[dict[str, tuple[Pattern, float | None, bool]], dict[str, str]]:
        """{weight name: (pattern, final sparsity, transposed)} of the layers to sparsify; {name: reason} of the rest."""
        candidates, skipped = find_layers(gm, skip_output=self.skip_output)
        layers = {}
        for name, transposed in candidates.items():
            if matches_any(name, self.ignore):
                skipped[name] = "ignored"
                continue
            pattern = Pattern.parse(first_match(name, self.patterns, self.pattern))
            fixed = pattern.fixed_sparsity
            target = fixed if fixed is not None else first_match(name, self.sparsities, None)
            cols = _matrix(resolve(gm, name), transposed).shape[1]
            if pattern.is_nm and cols % pattern.m:
                if not self.skip_unfit:
                    raise PassError(
                        f"sparsify: pattern '{pattern}' does not fit layer '{name}': its {cols} inputs per output are "
                        f"not a multiple of {pattern.m}; ignore it (ignore=['{_owner(name)}']), give it another "
                        f"pattern (patterns=[('{_owner(name)}', 'unstructured')]) or set skip_unfit=True")
                skipped[name] = f"pattern {pattern} does not fit {cols} inputs"
                continue
            layers[name] = (pattern, target, transposed)
        return layers, skipped

    def _plan(self, gm: fx.GraphModule, layers: dict, progress: float) -> dict[str, torch.Tensor]:
        """Keep-masks (matrix form) of every layer at ``progress`` along the schedule."""
        masks = weight_masks(gm)
        previous = {name: _matrix(masks[name].mask, layers[name][2]) for name in layers if name in masks}
        scores = {name: element_scores(_matrix(resolve(gm, name), layers[name][2]), previous.get(name))
                  for name in layers}
        at = lambda final: cubic_sparsity(progress, 1, final, min(self.initial_sparsity, final))  # noqa: E731
        keeps, pooled = {}, []
        for name, (pattern, target, _) in layers.items():
            if pattern.is_nm:
                keeps[name] = nm_keep(scores[name], pattern, name)
            elif target is not None or not self.global_threshold:
                final = self.target if target is None else target
                means, sizes = block_scores(scores[name], pattern)
                drop = select_lowest(means, sizes, at(final) * scores[name].numel()).reshape(means.shape)
                keeps[name] = expand_blocks(~drop, pattern, scores[name].shape)
            else:
                pooled.append(name)
        keeps.update(self._global(pooled, layers, scores, at(self.target)))
        for name in previous:  # monotone: what a mask dropped stays dropped
            keeps[name] = keeps[name] & previous[name]
        return keeps

    @staticmethod
    def _global(names: list[str], layers: dict, scores: dict, sparsity: float) -> dict[str, torch.Tensor]:
        """One ranking of the blocks of every pooled layer: the lowest mean magnitudes go, wherever they are."""
        if not names:
            return {}
        blocks = {n: block_scores(scores[n], layers[n][0]) for n in names}
        all_means = torch.cat([m.flatten() for m, _ in blocks.values()])
        all_sizes = torch.cat([s.flatten() for _, s in blocks.values()])
        drop = select_lowest(all_means, all_sizes, sparsity * float(all_sizes.sum()))
        keeps, start = {}, 0
        for n, (means, _) in blocks.items():
            part = drop[start:start + means.numel()].reshape(means.shape)
            keeps[n] = expand_blocks(~part, layers[n][0], scores[n].shape)
            start += means.numel()
        return keeps

    @staticmethod
    def _stats(gm: fx.GraphModule, layers: dict, skipped: dict) -> dict:
        per_layer = {name: round(achieved_sparsity(resolve(gm, name)), 6) for name in layers}
        zeros = sum(round(s * resolve(gm, n).numel()) for n, s in per_layer.items())
        total = sum(resolve(gm, n).numel() for n in layers)
        params = sum(p.numel() for p in gm.parameters())
        return {"sparsity": round(zeros / max(total, 1), 6), "model_sparsity": round(zeros / max(params, 1), 6),
                "layers_sparsified": len(layers), "zeros": zeros, "per_layer": per_layer, "skipped": skipped}


def find_layers(gm: fx.GraphModule, *, skip_output: bool = False) -> tuple[dict[str, bool], dict[str, str]]:
    """{weight name: stored (in, out)} of the layers that may be sparsified (graph order); {name: reason} of the rest."""
    weight_of = {n: n.args[weight_slot(n)[0]] for n in gm.graph.nodes if weight_slot(n) is not None}
    only_weight: dict[str, bool] = {}  # is this attribute read as a layer weight and nothing else?
    for n in gm.graph.nodes:
        for user in n.users if n.op == "get_attr" else ():
            fine = weight_of.get(user) is n and sum(a is n for a in user.args) == 1
            only_weight[n.target] = only_weight.get(n.target, True) and fine
    aliases = _alias_names(gm)
    outputs = output_layers(gm, weight_of) if skip_output else set()
    names, skipped = {}, {}
    for node, attr in weight_of.items():
        name = attr.target
        if name in names or name in skipped:
            continue
        if not only_weight.get(name, False):
            skipped[name] = "also read by other ops"
        elif len(aliases.get(name, ())) > 1:
            skipped[name] = f"shared with {', '.join(a for a in aliases[name] if a != name)}"
        elif node in outputs:
            skipped[name] = "output layer"
        else:
            names[name] = weight_slot(node)[1]
    return names, skipped


def weight_slot(node: fx.Node) -> tuple[int, bool] | None:
    """(argument position, transposed) of a layer node whose weight is a stored tensor (get_attr); else None."""
    slot = next((v for op, v in LAYER_OPS.items() if is_op(node, op)), None)
    if slot is None or len(node.args) <= slot[0]:
        return None
    weight = node.args[slot[0]]  # mm/addmm take 2-D matrices only: a stored one is (in, out)
    return slot if isinstance(weight, fx.Node) and weight.op == "get_attr" else None


def _matrix(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The (out, in) matrix that patterns apply to: the weight as stored, or its transpose for x @ W layers."""
    return tensor.t() if transposed else weight_matrix(tensor)


def _alias_names(gm: fx.GraphModule) -> dict[str, list[str]]:
    by_tensor: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    return {name: names for names in by_tensor.values() for name in names}


def _owner(name: str) -> str:
    return name.rpartition(".")[0] or name


def _parse(pattern: str) -> Pattern:
    try:
        return Pattern.parse(pattern)
    except InputError as e:
        raise PipelineError(f"sparsify: {e}") from None


def _check_sparsity(what: str, s: float) -> None:
    if not 0 <= s < 1:
        raise PipelineError(f"sparsify: {what} must be in [0, 1), got {s}")


def _check_names(gm: fx.GraphModule, patterns: tuple) -> None:
    names = [n for n, _ in gm.named_parameters()] + list(weight_masks(gm))
    bad = unmatched(patterns, names)
    if bad:
        raise PipelineError(f"sparsify: no layer matches '{bad[0]}' (ignore/sparsities/patterns name modules or "
                            f"weights by qualified name, e.g. 'layer1.0.conv1' or 'blocks.*.mlp.*')")
