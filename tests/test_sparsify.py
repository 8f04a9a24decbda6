"""The ``sparsify`` pass and graphopt.analysis.sparsity: pattern structure, targets, thresholds, schedules, masks that
persist through fine-tuning, the zoo, and the exact messages of bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphopt
from digits import DigitsCNN
from graphopt.graph.inputs import ExampleInputs
from graphopt.passes.sparsify import Sparsify, find_layers
from graphopt.graph.shapes import is_fake, propagate
from graphopt.analysis.sparsity import (
    Pattern, achieved_sparsity, bake_masks, cubic_sparsity, follows_pattern, magnitude_mask, weight_masks,
)
from models import build
from util import assert_same_outputs, outputs

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # torch's deepcopy
SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
BLOCKS = ["unstructured", "8x1", "16x1", "1x4", "2x2"]
DIGITS_INPUT = (torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)),)


def blocks_uniform(mask: torch.Tensor, rows: int, cols: int) -> bool:
    """Checked element by element (not through follows_pattern): every block, ragged ones too, is all or none."""
    m = mask.reshape(mask.shape[0], -1)
    for r in range(0, m.shape[0], rows):
        for c in range(0, m.shape[1], cols):
            block = m[r:r + rows, c:c + cols]
            if block.any() and not block.all():
                return False
    return True


_TRACED: dict = {}


def sparsified(model, spec, inputs=DIGITS_INPUT):
    """(graph, report record) of ``spec`` run under a verifying PassManager on a traced copy of ``model``.

    A fresh DigitsCNN is traced once per session (all of them have the same seeded weights); others each time.
    """
    fresh_digits = type(model) is DigitsCNN and inputs is DIGITS_INPUT
    if fresh_digits and "digits" in _TRACED:
        gm = copy.deepcopy(_TRACED["digits"])
    else:
        gm = graphopt.trace(model, inputs)
        if fresh_digits:
            _TRACED["digits"] = copy.deepcopy(gm)
    passes = [spec] if isinstance(spec, (str, Sparsify)) else spec
    gm, report = graphopt.PassManager(passes).run(gm, graphopt.Context(inputs))
    return gm, report.records[-1]


def digits_cnn() -> DigitsCNN:
    """The DigitsCNN every test here starts from (seeded)."""
    torch.manual_seed(0)
    return DigitsCNN().eval()


# ---------------------------------------------------------------------------------------------- patterns

shapes = st.tuples(st.integers(1, 40), st.integers(1, 12), st.sampled_from([(), (3,), (3, 3)]))


@settings(max_examples=60, **SETTINGS)
@given(shape=shapes, pattern=st.sampled_from(BLOCKS), sparsity=st.floats(0, 0.99), seed=st.integers(0, 99))
def test_block_masks_have_the_block_structure_and_reach_the_target(shape, pattern, sparsity, seed):
    out, inp, kernel = shape
    w = torch.randn(out, inp, *kernel, generator=torch.Generator().manual_seed(seed))
    mask = magnitude_mask(w, sparsity, pattern)
    p = Pattern.parse(pattern)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    assert blocks_uniform(mask, p.rows, p.cols) and follows_pattern(mask, pattern)
    # the dropped element count is the reachable one closest to the target: within half a full block
    assert abs((1 - mask.float().mean().item()) * w.numel() - sparsity * w.numel()) <= p.rows * p.cols / 2 + 1e-6


@settings(max_examples=40, **SETTINGS)
@given(out=st.integers(1, 20), groups=st.integers(1, 6), nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 8)]),
       kernel=st.sampled_from([(), (1,), (1, 1)]), seed=st.integers(0, 99))
def test_nm_masks_keep_exactly_n_of_every_m_largest(out, groups, nm, kernel, seed):
    n, m = nm
    w = torch.randn(out, groups * m, *kernel, generator=torch.Generator().manual_seed(seed))
    mask = magnitude_mask(w, 0.0, f"{n}:{m}")  # N:M fixes the sparsity; the argument is ignored
    kept = mask.reshape(out, groups, m)
    assert (kept.sum(-1) == n).all() and follows_pattern(mask, f"{n}:{m}")
    values = w.reshape(out, groups, m).abs()
    assert (values.masked_fill(~kept, math.inf).amin(-1) >= values.masked_fill(kept, -1).amax(-1)).all()
    assert achieved_sparsity(mask) == pytest.approx(1 - n / m)


def test_pattern_checker_rejects_broken_structure():
    mask = torch.ones(16, 4, dtype=torch.bool)
    mask[:, 0] = False  # column 0 gone: 8x1 blocks and 3:4 groups still hold
    assert follows_pattern(mask, "8x1") and follows_pattern(mask, "3:4") and not follows_pattern(mask, "1x4")
    mask[3, 1] = False
    assert follows_pattern(mask, "unstructured") and not follows_pattern(mask, "8x1")
    assert not follows_pattern(mask, "1x4") and follows_pattern(mask, "3:4") and not follows_pattern(mask, "2:4")


def test_ragged_last_block_is_scored_by_its_mean_and_dropped_whole():
    w = torch.ones(10, 3)  # 8x1 blocks: rows 0-7 and a ragged block of rows 8-9 in each column
    w[8:, 1] = 0.5  # the ragged block of column 1 has the lowest mean magnitude
    mask = magnitude_mask(w, 2 / 30, "8x1")  # 2 of 30 weights: exactly that ragged block
    assert not mask[8:, 1].any() and mask.sum() == 28
    w[8, 1] = 3.0  # mean (3 + 0.5) / 2 > 1: now the first full block of ones goes instead
    mask = magnitude_mask(w, 8 / 30, "8x1")
    assert mask[8:, 1].all() and not mask[:8, 0].any() and mask.sum() == 22
    assert magnitude_mask(w, 3 / 30, "8x1").all()  # dropping the lowest block (8) misses 3 by more than none does



def test_cubic_schedule_values():
    assert cubic_sparsity(0, 10, 0.9) == 0.0
    assert cubic_sparsity(10, 10, 0.9) == pytest.approx(0.9)
    assert cubic_sparsity(5, 10, 0.8, initial=0.2) == pytest.approx(0.8 + (0.2 - 0.8) * 0.5 ** 3)
    assert cubic_sparsity(25, 10, 0.9) == pytest.approx(0.9) and cubic_sparsity(-3, 10, 0.9) == 0.0
    values = [cubic_sparsity(t, 20, 0.9) for t in range(21)]
    steps = [b - a for a, b in zip(values, values[1:])]
    assert all(s > 0 for s in steps) and steps == sorted(steps, reverse=True)  # rising, steepest first


# ------------------------------------------------------------------------------------------- the pass

@pytest.mark.parametrize("pattern", ["unstructured", "8x1", "16x1", "1x4"])
def test_layerwise_target_reached_in_every_layer_with_the_pattern(pattern):
    model = digits_cnn()
    state = copy.deepcopy(model.state_dict())
    result = graphopt.optimize(model, [Sparsify(sparsity=0.75, pattern=pattern)], DIGITS_INPUT)
    gm, record = result.module, result.report.records[0]
    masks = weight_masks(gm)
    assert set(masks) == {"stem.0.weight", "conv1.weight", "conv2.weight", "down.0.weight", "head.weight"}
    p = Pattern.parse(pattern)
    for name, m in masks.items():
        weight = graphopt.graph.nodes.resolve(gm, name)
        assert m.pattern == pattern and blocks_uniform(m.mask, p.rows, p.cols)
        assert torch.equal(weight == 0, ~m.mask)  # the graph's weight reads as original * mask
        block = p.rows * p.cols / weight.numel()
        assert abs(achieved_sparsity(weight) - 0.75) <= block / 2 + 1e-6
        assert record.stats["per_layer"][name] == pytest.approx(achieved_sparsity(weight), abs=1e-6)
    total = sum(graphopt.graph.nodes.resolve(gm, n).numel() for n in masks)
    assert record.stats["zeros"] == sum(int((graphopt.graph.nodes.resolve(gm, n) == 0).sum()) for n in masks)
    assert record.stats["sparsity"] == pytest.approx(record.stats["zeros"] / total, abs=1e-6)
    assert record.modified and record.params_after == record.params_before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the user's model is untouched


def test_nm_pattern_in_the_pass_fixes_sparsity_and_skips_unfit_layers_when_asked():
    gm, record = sparsified(digits_cnn(), "sparsify:pattern=2:4,skip_unfit=true")
    assert record.stats["skipped"] == {"stem.0.weight": "pattern 2:4 does not fit 9 inputs"}
    for name, m in weight_masks(gm).items():
        groups = m.mask.reshape(m.mask.shape[0], -1, 4).sum(-1)
        assert (groups <= 2).all() and record.stats["per_layer"][name] == 0.5


class TwoLayers(nn.Module):
    """Two linear layers whose weights differ in scale by 100x."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.small, self.large = nn.Linear(32, 32), nn.Linear(32, 32)
        with torch.no_grad():
            self.large.weight.mul_(100)

    def forward(self, x):
        return self.large(torch.relu(self.small(x)))


def test_global_threshold_ranks_all_layers_together_layerwise_does_not():
    x = (torch.randn(2, 32),)
    local, rec_local = sparsified(TwoLayers(), Sparsify(sparsity=0.5), x)
    pooled, rec_global = sparsified(TwoLayers(), Sparsify(sparsity=0.5, global_threshold=True), x)
    assert rec_local.stats["per_layer"] == {"small.weight": 0.5, "large.weight": 0.5}
    per = rec_global.stats["per_layer"]
    assert per["small.weight"] > 0.95 and per["large.weight"] < 0.05 and rec_global.stats["sparsity"] == 0.5
    kept, dropped = [], []
    for layer in (pooled.small, pooled.large):
        magnitude, mask = layer.parametrizations.weight.original.detach().abs(), layer.parametrizations.weight[0].mask
        kept.append(magnitude[mask])
        dropped.append(magnitude[~mask])
    assert torch.cat(kept).min() >= torch.cat(dropped).max()  # one threshold for both layers


def test_overrides_ignore_and_skip_output():
    spec = Sparsify(sparsity=0.5, sparsities=(("conv*", 0.9),), patterns=(("down.0", "1x4"),), ignore=("stem",),
                    skip_output=True)
    gm, record = sparsified(digits_cnn(), spec)
    per = record.stats["per_layer"]
    assert set(per) == {"conv1.weight", "conv2.weight", "down.0.weight"}
    assert per["conv1.weight"] == pytest.approx(0.9, abs=1e-3) and per["down.0.weight"] == 0.5
    assert weight_masks(gm)["down.0.weight"].pattern == "1x4"
    assert record.stats["skipped"] == {"stem.0.weight": "ignored", "head.weight": "output layer"}


def test_sparsity_zero_is_the_identity():
    model = digits_cnn()
    gm, record = sparsified(model, "sparsify:sparsity=0")
    assert not record.modified and weight_masks(gm) == {}
    assert_same_outputs(gm, model, DIGITS_INPUT)


def test_second_run_changes_nothing_and_string_form_parses():
    (p,) = graphopt.parse_pipeline("sparsify:sparsity=0.6,pattern=16x1,global_threshold=true")
    assert p == Sparsify(sparsity=0.6, pattern="16x1", global_threshold=True)
    gm, _ = sparsified(digits_cnn(), [p, p])
    assert not graphopt.PassManager([p]).run(gm, graphopt.Context(DIGITS_INPUT))[1].records[0].modified


def test_finetuning_keeps_pruned_weights_at_zero_and_trains_the_rest():
    gm, _ = sparsified(digits_cnn(), Sparsify(sparsity=0.8, pattern="8x1"))
    masks = {n: m.mask.clone() for n, m in weight_masks(gm).items()}
    before = {n: graphopt.graph.nodes.resolve(gm, n).detach().clone() for n in masks}
    opt = torch.optim.Adam(gm.parameters(), lr=1e-2)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    for _ in range(3):
        loss = F.cross_entropy(gm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, mask in masks.items():
        owner, leaf = name.rsplit(".", 1)
        original = getattr(gm.get_submodule(owner).parametrizations, leaf).original
        weight = graphopt.graph.nodes.resolve(gm, name)
        assert (weight[~mask] == 0).all() and (original.grad[~mask] == 0).all()
        assert not torch.equal(weight[mask], before[name][mask])  # kept weights did train


def test_gradual_steps_follow_the_cubic_schedule_and_never_revive_weights():
    seen = []

    def finetune(gm, step):
        masks = weight_masks(gm)
        seen.append((step, sum(int((~m.mask).sum()) for m in masks.values()) / sum(m.mask.numel() for m in
                                                                                   masks.values()), masks))
        with torch.no_grad():  # a "fine-tune" that pushes every original weight up: masks must not follow
            for m in gm.parameters():
                m.add_(1.0)

    spec = Sparsify(sparsity=0.9, steps=4, initial_sparsity=0.1, finetune=finetune)
    gm, record = sparsified(digits_cnn(), spec)
    assert [s for s, _, _ in seen] == [0, 1, 2]
    for (step, got, _), want in zip(seen, [cubic_sparsity(k, 4, 0.9, 0.1) for k in (1, 2, 3)]):
        assert got == pytest.approx(want, abs=1e-3)
    assert record.stats["sparsity"] == pytest.approx(0.9, abs=1e-3) and record.stats["steps"] == 4
    final = weight_masks(gm)
    for _, _, masks in seen:
        assert all(not (final[n].mask & ~m.mask).any() for n, m in masks.items())


def test_apply_from_a_training_loop_of_your_own():
    gm = graphopt.trace(digits_cnn(), DIGITS_INPUT)
    spec = Sparsify(sparsity=0.8, pattern="1x4")
    levels = [spec.apply(gm, progress=t / 4)["sparsity"] for t in range(5)]
    assert levels[0] == 0 and levels == sorted(levels) and levels[-1] == pytest.approx(0.8, abs=1e-3)


def test_tied_weights_are_left_dense():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.mix, self.out = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 50)
            self.out.weight = self.embed.weight

        def forward(self, ids):
            return self.out(self.mix(self.embed(ids)))

    gm, record = sparsified(Tied().eval(), "sparsify", (torch.randint(0, 50, (2, 5)),))
    assert record.stats["per_layer"] == {"mix.weight": 0.5}
    assert record.stats["skipped"] in ({"embed.weight": "also read by other ops"},
                                       {"out.weight": "also read by other ops"})


# ------------------------------------------------------------------- what comes after: lowering, export

def test_masked_graph_lowers_exports_and_bakes():
    gm, _ = sparsified(digits_cnn(), Sparsify(sparsity=0.7, pattern="8x1"))
    want = outputs(gm, DIGITS_INPUT)
    fake = propagate(gm, ExampleInputs.of(DIGITS_INPUT), fake=True)  # what the PassManager verifies with
    assert is_fake(fake) and fake[0].shape == want[0].shape
    lowered = graphopt.streamline(gm, DIGITS_INPUT)
    torch.testing.assert_close(outputs(lowered, DIGITS_INPUT), want, rtol=0, atol=0)
    exported = torch.export.export(gm, DIGITS_INPUT).module()
    torch.testing.assert_close(outputs(exported, DIGITS_INPUT), want)
    other = copy.deepcopy(gm)
    assert bake_masks(gm) == ["stem.0.weight", "conv1.weight", "conv2.weight", "down.0.weight", "head.weight"]
    assert weight_masks(gm) == {} and isinstance(gm.conv1.weight, nn.Parameter)
    assert achieved_sparsity(gm.conv1.weight) == pytest.approx(0.7, abs=0.01)
    torch.testing.assert_close(outputs(gm, DIGITS_INPUT), want, rtol=0, atol=0)
    torch.testing.assert_close(outputs(other, DIGITS_INPUT), want, rtol=0, atol=0)  # the copy keeps its masks
    assert len(weight_masks(other)) == 5


@pytest.mark.parametrize("name", ["mobilenetv2", "hf_bert", "hf_gpt2"])
def test_zoo_models(name):
    case = build(name)
    gm, record = sparsified(case.model, Sparsify(sparsity=0.6, pattern="1x4"), case.example_inputs)
    per = record.stats["per_layer"]
    assert per and all(abs(s - 0.6) < 0.05 for s in per.values())
    stored_in_out, _ = find_layers(gm)  # GPT-2's Conv1D weights are (in, out): their pattern is on the transpose
    assert any(stored_in_out.values()) == (name == "hf_gpt2")
    for n, m in weight_masks(gm).items():
        assert follows_pattern(m.mask.t() if stored_in_out[n] else m.mask, "1x4")
    lowered = graphopt.streamline(gm, case.example_inputs)
    torch.testing.assert_close(outputs(lowered, case.example_inputs), outputs(gm, case.example_inputs))


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsity=1.0), "sparsify: sparsity must be in [0, 1), got 1.0"),
    (dict(sparsity=-0.1), "sparsify: sparsity must be in [0, 1), got -0.1"),
    (dict(sparsities=(("conv1", 1.5),)), "sparsify: sparsity for 'conv1' must be in [0, 1), got 1.5"),
    (dict(pattern="8y1"), "sparsify: unknown pattern '8y1'; use 'unstructured', a block 'RxC' of R output rows by C "
                          "input columns such as '8x1', '16x1' or '1x4', or 'N:M' such as '2:4'"),
    (dict(pattern="4:4"), "sparsify: N:M pattern '4:4' needs 0 < N < M (N weights kept in every M)"),
    (dict(pattern="2:4", sparsity=0.9), "sparsify: pattern '2:4' fixes the sparsity at 0.5; leave 'sparsity' unset "
                                        "or use a block pattern"),
    (dict(steps=0), "sparsify: steps must be >= 1, got 0"),
    (dict(patterns=("conv1",)), "sparsify: patterns takes (name pattern, value) pairs, e.g. "
                                "patterns=(('layer4.*', '1x4'),)"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(graphopt.PipelineError) as info:
        Sparsify(**kwargs)
    assert str(info.value) == message


def test_pattern_that_does_not_fit_a_layer():
    with pytest.raises(graphopt.PassError) as info:
        sparsified(digits_cnn(), "sparsify:pattern=2:4")
    assert str(info.value) == (
        "sparsify: pattern '2:4' does not fit layer 'stem.0.weight': its 9 inputs per output are not a multiple "
        "of 4; ignore it (ignore=['stem.0']), give it another pattern (patterns=[('stem.0', 'unstructured')]) "
        "or set skip_unfit=True")


def test_unknown_layer_name():
    with pytest.raises(graphopt.PipelineError) as info:
        sparsified(digits_cnn(), Sparsify(ignore=("nonexistent",)))
    assert str(info.value) == (
        "sparsify: no layer matches 'nonexistent' (ignore/sparsities/patterns name modules or weights by "
        "qualified name, e.g. 'layer1.0.conv1' or 'blocks.*.mlp.*')")
