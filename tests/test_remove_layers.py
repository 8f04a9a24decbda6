"""remove-layers: finding residual blocks by module name, removing them, the criteria, errors, composition."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.analysis.blocks import find_blocks
from graphopt.errors import InputError, PassError, PipelineError
from graphopt.graph.inputs import ExampleInputs
from graphopt.passes.channel_prune import PruneChannels
from graphopt.passes.remove_layers import RemoveLayers
from graphopt.graph.shapes import propagate
from models import build
from util import outputs, rebatch


@functools.lru_cache(maxsize=None)
def _traced(name: str):
    """A zoo model and its traced graph with shapes (cached: find_blocks only reads the graph)."""
    case = build(name)
    gm = graphopt.trace(case.model, case.example_inputs)
    propagate(gm, ExampleInputs.of(case.example_inputs), fake=True)
    return case, gm


def _calib(case, n: int = 2):
    return [rebatch(case.example_inputs, 4, seed=s) for s in range(n)]


@pytest.mark.parametrize("name, unit, allow_projection, expected", [
    ("resnet_basic", "layer", False, ["layers.0", "layers.2"]),
    ("resnet_basic", "layer", True, ["layers.0", "layers.1", "layers.2", "layers.3"]),
    ("resnet_bottleneck", "layer", False, ["layers.1", "layers.3"]),
    ("vit", "branch", False, ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp", "blocks.2.attn",
                              "blocks.2.mlp"]),
    ("hf_llama", "layer", False, ["model.layers.0", "model.layers.1"]),
    ("hf_llama", "branch", False, ["model.layers.0.self_attn", "model.layers.0.mlp",
                                   "model.layers.1.self_attn", "model.layers.1.mlp"]),
    ("hf_gpt2", "layer", False, ["transformer.h.0", "transformer.h.1"]),
    ("hf_bert", "layer", False, ["encoder.layer.0", "encoder.layer.1"]),
    ("densenet", "layer", False, []),  # concatenation, not addition: nothing to skip
])
def test_blocks_are_found_and_named_by_module(name, unit, allow_projection, expected):
    _, gm = _traced(name)
    blocks = find_blocks(gm, unit, allow_projection)
    assert [b.name for b in blocks] == expected
    assert [b.projection for b in blocks] == [allow_projection and n in ("layers.1", "layers.3") for n in expected]


@pytest.mark.parametrize("name, block, also", [
    ("resnet_basic", "layers.2", ()), ("vit", "blocks.1", ()), ("hf_llama", "model.layers.1", ()),
    ("hf_llama", "model.layers.0.mlp", ("model.layers.0.post_attention_layernorm",)),  # its pre-norm goes along
    ("hf_gpt2", "transformer.h.0", ()), ("swin", "stage2.1", ()),
])
def test_removed_block_leaves_a_working_smaller_model(name, block, also):
    case = build(name)
    numel = sum(p.numel() for n, p in case.model.named_parameters() if n.startswith((block + ".", *also)))
    result = graphopt.optimize(case.model, [RemoveLayers(blocks=(block,))], case.example_inputs)
    record = result.report.records[0]
    assert record.params_before - record.params_after == numel > 0
    assert record.macs_after < record.macs_before
    assert not any(n.startswith(block + ".") for n, _ in result.module.named_parameters())
    for inputs in (case.example_inputs, rebatch(case.example_inputs, 3)):
        want, got = outputs(case.model, inputs), outputs(result.module, inputs)
        assert [g.shape for g in got] == [w.shape for w in want]
    assert record.stats["removed_blocks"] == [{"block": block, "score": None, "params": numel}]


def test_removing_a_block_equals_skipping_it_in_the_model():
    """y = x + f(x) becomes y = x: the same as the original model with that block's branch zeroed."""
    case = build("resnet_basic")
    result = graphopt.optimize(case.model, [RemoveLayers(blocks=("layers.2",))], case.example_inputs)
    record = result.report.records[0]  # MACs drop by the block's share: two 3x3 convs, 32 -> 32 on 16x16, batch 2
    assert record.macs_before - record.macs_after == 2 * (2 * 16 * 16 * 32 * 32 * 9)
    with torch.no_grad():
        case.model.layers[2].conv2[1].weight.zero_()  # BN scale and shift 0: the branch outputs zero
        case.model.layers[2].conv2[1].bias.zero_()
    torch.testing.assert_close(outputs(result.module, case.example_inputs)[0],
                               outputs(case.model, case.example_inputs)[0])


class ResidualStack(nn.Module):
    """x + W2 relu(W1 x) blocks (``blocks.i``) between an input and an output layer; ``quiet`` blocks get tiny
    output weights, so they are near-identity maps."""

    def __init__(self, depth: int = 6, dim: int = 32, quiet: tuple = ()):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(16, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
                                    for _ in range(depth))
        self.out = nn.Linear(dim, 4)
        with torch.no_grad():
            for i in quiet:
                self.blocks[i][2].weight.mul_(1e-3)
                self.blocks[i][2].bias.mul_(1e-3)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


STACK_INPUTS = (torch.randn(2, 16),)
STACK_CALIB = [(torch.randn(16, 16, generator=torch.Generator().manual_seed(s)),) for s in range(3)]


def _removed(stats) -> list[str]:
    return [r["block"] for r in stats["removed_blocks"]]


@pytest.mark.parametrize("criterion", ["block-influence", "output-error"])
def test_criteria_pick_the_near_identity_blocks(criterion):
    model = ResidualStack(quiet=(2, 4))
    result = graphopt.optimize(model, [RemoveLayers(n=2, criterion=criterion, protect=("first", "last"))], STACK_INPUTS, calib_data=STACK_CALIB)
    stats = result.report.records[0].stats
    assert _removed(stats) == ["blocks.2", "blocks.4"]
    assert set(stats["scores"]) == {f"blocks.{i}" for i in range(1, 5)}  # first and last are protected
    loud = min(stats["scores"][f"blocks.{i}"] for i in (1, 3))
    assert max(stats["scores"]["blocks.2"], stats["scores"]["blocks.4"]) < loud / 100
    assert "removed=blocks.2 (" in str(result.report)


def test_angular_removes_the_quietest_contiguous_window():
    model = ResidualStack(quiet=(3, 4))
    result = graphopt.optimize(model, [RemoveLayers(n=2, criterion="angular", protect=("first", "last"))], STACK_INPUTS, calib_data=STACK_CALIB)
    stats = result.report.records[0].stats
    assert _removed(stats) == ["blocks.3", "blocks.4"]
    assert set(stats["windows"]) == {"blocks.1..blocks.2", "blocks.2..blocks.3", "blocks.3..blocks.4"}
    assert min(stats["windows"], key=stats["windows"].get) == "blocks.3..blocks.4"


def test_block_influence_on_a_decoder_picks_the_silenced_mlp():
    case = build("hf_llama")
    with torch.no_grad():
        case.model.model.layers[1].mlp.down_proj.weight.mul_(1e-4)
    result = graphopt.optimize(case.model, [RemoveLayers(n=1, unit="branch", protect=())], case.example_inputs,
                               calib_data=_calib(case))
    assert _removed(result.report.records[0].stats) == ["model.layers.1.mlp"]


def test_fraction_and_protection():
    model = ResidualStack(quiet=(0, 5))  # the quiet ones are first and last: protected by default
    result = graphopt.optimize(model, [RemoveLayers(fraction=0.5, protect=("first", "last"))], STACK_INPUTS, calib_data=STACK_CALIB)
    stats = result.report.records[0].stats
    assert len(stats["removed_blocks"]) == 3 and not {"blocks.0", "blocks.5"} & set(_removed(stats))
    unprotected = graphopt.optimize(model, [RemoveLayers(n=2, protect=())], STACK_INPUTS, calib_data=STACK_CALIB)
    assert _removed(unprotected.report.records[0].stats) == ["blocks.0", "blocks.5"]


def test_nothing_to_remove_is_a_no_op():
    result = graphopt.optimize(ResidualStack(), [RemoveLayers(n=0)], STACK_INPUTS)
    assert not result.report.records[0].modified


def test_bad_input_errors():
    model = ResidualStack(depth=3)
    with pytest.raises(PassError) as e:
        graphopt.optimize(model, [RemoveLayers(n=2, protect=("first", "last"))], STACK_INPUTS, calib_data=STACK_CALIB)
    assert str(e.value) == (
        "remove-layers: asked to remove 2 blocks but the model has 3 removable blocks (blocks.0, blocks.1, "
        "blocks.2) and 1 of them are unprotected (protect=['first', 'last']); lower n or fraction, or narrow protect")
    with pytest.raises(InputError) as e:
        graphopt.optimize(model, [RemoveLayers(n=1)], STACK_INPUTS)
    assert str(e.value) == (
        "remove-layers: criterion 'block-influence' needs calibration batches; pass calib_data=[batch, ...] to "
        "graphopt.optimize (or Context), name the blocks to remove with blocks=(...), or set "
        "use_example_inputs=True to score on the example inputs")
    with pytest.raises(PassError) as e:
        graphopt.optimize(model, [RemoveLayers(blocks=("inp",))], STACK_INPUTS)
    assert str(e.value) == (
        "remove-layers: 'inp' is not a removable block (a residual block y = x + f(x) whose f is used nowhere "
        "else); removable blocks: blocks.0, blocks.1, blocks.2")
    case = build("resnet_basic")
    with pytest.raises(PassError, match="'layers.1' changes shape or channel count .* allow_projection=True"):
        graphopt.optimize(case.model, [RemoveLayers(blocks=("layers.1",))], case.example_inputs)
    with pytest.raises(PipelineError, match="give one of n, fraction or blocks, not n and fraction"):
        RemoveLayers(n=1, fraction=0.5)
    with pytest.raises(PipelineError, match="unknown criterion 'cosine'"):
        graphopt.parse_pipeline("remove-layers:n=1,criterion=cosine")


def test_example_inputs_fallback_only_when_asked():
    model = ResidualStack(quiet=(2,))
    result = graphopt.optimize(model, [RemoveLayers(use_example_inputs=True)], STACK_INPUTS)  # default: 1 block
    assert _removed(result.report.records[0].stats) == ["blocks.2"]


def test_projection_blocks_keep_their_shortcut():
    case = build("resnet_basic")
    result = graphopt.optimize(case.model, [RemoveLayers(blocks=("layers.1",), allow_projection=True)],
                               case.example_inputs)
    names = {n for n, _ in result.module.named_parameters()}
    assert "layers.1.downsample.0.weight" in names and "layers.1.conv1.0.weight" not in names
    assert outputs(result.module, case.example_inputs)[0].shape == (2, 10)


@pytest.mark.parametrize("order", ["remove-first", "prune-first"])
def test_composes_with_channel_pruning_and_fusion(order):
    case = build("resnet_basic")
    remove = RemoveLayers(n=1, criterion="output-error", protect=(), allow_projection=True)
    prune = PruneChannels(ratio=0.5)
    passes = ["fuse", remove, prune] if order == "remove-first" else [prune, "fuse", remove]
    result = graphopt.optimize(case.model, passes, case.example_inputs, calib_data=_calib(case))
    assert [r.modified for r in result.report.records] == [True, True, True]
    assert result.report.records[-1].params_after < result.report.records[0].params_before / 2
    assert outputs(result.module, rebatch(case.example_inputs, 3))[0].shape == (3, 10)


def test_depth_pruning_then_finetune_keeps_digits_accuracy():
    """Remove 1 of the 3 residual blocks of a trained digits CNN, fine-tune briefly: within 2 points."""
    pytest.importorskip("sklearn", reason="the digits dataset ships with scikit-learn (a dev dependency)")
    from digits import accuracy, torch_threads, train, trained_residual_digits_cnn

    with torch_threads(1):
        model, (x_train, y_train, x_test, y_test) = trained_residual_digits_cnn()
        acc_full = accuracy(model, x_test, y_test)
        assert acc_full >= 0.93, f"ResidualDigitsCNN reached only {acc_full:.4f}"
        calib = [(x_train[i:i + 64],) for i in range(0, 256, 64)]
        result = graphopt.optimize(model, [RemoveLayers(n=1, protect=("first", "last"))], (x_train[:2],), calib_data=calib)
        record = result.report.records[0]
        assert _removed(record.stats) == ["blocks.1"]  # the only unprotected one of blocks.0-2
        assert record.params_after < 0.8 * record.params_before
        train(result.module, x_train, y_train, epochs=6, lr=3e-3)
        acc_pruned = accuracy(result.module, x_test, y_test)
    assert acc_pruned >= acc_full - 0.02, (acc_full, acc_pruned)


class InplaceBlock(nn.Module):
    """torchvision's habit: nn.ReLU(inplace=True) inside the branch and after the add (aten.relu_ in the graph)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.relu = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(True)

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))) + x)


def test_blocks_with_in_place_relu_are_found_and_removed_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *[InplaceBlock() for _ in range(3)]).eval()
    x = (torch.randn(2, 3, 8, 8),)
    result = graphopt.optimize(model, [RemoveLayers(n=1, use_example_inputs=True)], x)
    assert _removed(result.report.records[0].stats) == ["2"]
    with torch.no_grad():
        model[2].conv2.weight.zero_()
        model[2].conv2.bias.zero_()
    torch.testing.assert_close(result.module(*x), model(*x))


def test_plain_shape_preserving_layers_on_request():
    case, gm = _traced("vgg")
    assert [b.name for b in find_blocks(gm)] == []
    assert [b.name for b in find_blocks(gm, plain=True)] == ["features.1", "features.4", "features.8"]
    with pytest.raises(PassError, match="'features.4' is a shape-preserving layer without a skip connection; "
                                        "pass plain=True"):
        graphopt.optimize(case.model, [RemoveLayers(blocks=("features.4",))], case.example_inputs)
    result = graphopt.optimize(case.model, [RemoveLayers(n=1, plain=True, criterion="output-error")],
                               case.example_inputs, calib_data=_calib(case))
    record = result.report.records[0]
    assert _removed(record.stats) == ["features.4"]  # the only unprotected one
    assert record.params_before - record.params_after == 32 * 32 * 9 + 2 * 32  # conv, BN scale and shift
    assert outputs(result.module, rebatch(case.example_inputs, 3))[0].shape == (3, 10)


class _Stack(nn.Module):
    """Residual linear blocks y = x + x W_i with chosen W_i."""

    def __init__(self, weights):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in weights)
        with torch.no_grad():
            for block, w in zip(self.blocks, weights):
                block.weight.copy_(w)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def test_blocks_are_chosen_together_by_default_one_at_a_time():
    criterion = "output-error"  # block influence is local: a block's own cosine barely moves when another goes
    g = torch.Generator().manual_seed(0)
    same = 0.02 * torch.randn(16, 16, generator=g)
    other = torch.zeros(16, 16)
    other[torch.arange(16), torch.arange(16).roll(1)] = 0.1  # a little bigger alone, unrelated to `same`
    big = 0.5 * torch.randn(16, 16, generator=g)
    # blocks 1 and 2 are each the cheapest to drop, but they push the same way: dropping both costs 4x one
    model = _Stack([big, same, same, other, big]).eval()
    calib = [(torch.randn(64, 16, generator=g),) for _ in range(2)]
    chosen = {}
    for greedy in (False, True):
        res = graphopt.optimize(model, [RemoveLayers(n=2, criterion=criterion, greedy=greedy)], calib[0],
                                calib_data=calib)
        chosen[greedy] = [b["block"] for b in res.report.records[0].stats["removed_blocks"]]
    assert chosen[False] == ["blocks.1", "blocks.2"]
    assert sorted(chosen[True]) in (["blocks.1", "blocks.3"], ["blocks.2", "blocks.3"])
    assert RemoveLayers().greedy and RemoveLayers().protect == ("first",)
