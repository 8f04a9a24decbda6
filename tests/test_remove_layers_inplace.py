"""remove-layers on residual adds written in place (``out += identity`` exports as ``aten.add_``) and on branches
scaled on the way to the add (layer scale, drop-path's keep-prob, per-channel scales).

Each pattern is a small model of its own (ResNet basic block, ConvNeXt block, inverted residual with squeeze-excite,
a layer-scaled MLP with drop-path) with a twin that writes the add as a plain ``+``: both must give the same
blocks, and removing one must equal the same model built without that block, in the graph and after
``to_model()``."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.analysis.blocks import find_blocks
from graphopt.cli.entry import main
from graphopt.graph.inputs import ExampleInputs
from graphopt.graph.shapes import propagate
from graphopt.passes.remove_layers import RemoveLayers
from util import outputs, rebatch

C = 8


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN, ``out += identity``, then a ReLU shared with the body (in place)."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.conv1, self.bn1 = nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)
        self.conv2, self.bn2 = nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.inplace:
            out += identity
        else:
            out = out + identity
        return self.relu(out)


class DropPath(nn.Module):
    """Stochastic depth as some libraries leave it in eval: the branch times its keep probability (or divided by a
    scalar), a scalar ``mul``/``div`` in the graph."""

    def __init__(self, keep: float, divide: bool = False):
        super().__init__()
        self.keep, self.divide = keep, divide

    def forward(self, x):
        return x / (1 / self.keep) if self.divide else x * self.keep


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, LayerNorm over channels-last, MLP, per-channel layer scale, drop-path, add."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.dwconv = nn.Conv2d(C, C, 7, padding=3, groups=C)
        self.norm = nn.LayerNorm(C)
        self.fc1, self.fc2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
        self.layer_scale = nn.Parameter(torch.rand(C, 1, 1) + 0.5)
        self.drop_path = DropPath(0.9)

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        result = self.drop_path(self.layer_scale * y)
        if self.inplace:
            result += x
        else:
            result = result + x
        return result


class SqueezeExcite(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """MobileNetV3/EfficientNet style: expand 1x1, depthwise 3x3, squeeze-excite, project 1x1, drop-path (a
    division by a scalar), ``x += shortcut``."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        e = 4 * C
        self.block = nn.Sequential(
            nn.Conv2d(C, e, 1, bias=False), nn.BatchNorm2d(e), nn.Hardswish(),
            nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e), nn.Hardswish(),
            SqueezeExcite(e), nn.Conv2d(e, C, 1, bias=False), nn.BatchNorm2d(C))
        self.drop_path = DropPath(0.8, divide=True)

    def forward(self, x):
        shortcut = x
        x = self.drop_path(self.block(x))
        if self.inplace:
            x += shortcut
        else:
            x = x + shortcut
        return x


class ScaledMLP(nn.Module):
    """``x = x + drop_path(gamma * mlp(norm(x)))`` on tokens, gamma a per-channel layer scale; with ``inplace``,
    the add writes into the skip: ``x += ...``."""

    copy_skip = True  # False: ``x += ...`` writes into the block's input itself (the previous block's output)

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.norm = nn.LayerNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C))
        self.gamma = nn.Parameter(torch.rand(C) + 0.5)
        self.drop_path = nn.Identity()  # timm's DropPath in eval

    def forward(self, x):
        branch = self.drop_path(self.gamma * self.mlp(self.norm(x)))
        if self.inplace:
            if self.copy_skip:
                x = x.clone()  # the block's input stays the caller's: only the copy is written
            x += branch
            return x
        return x + branch


class Net(nn.Module):
    """A stem, three blocks of one kind (``blocks.0..2``) and a linear head."""

    def __init__(self, block: type, inplace: bool, tokens: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.tokens = tokens
        self.stem = nn.Linear(C, C) if tokens else nn.Conv2d(3, C, 3, padding=1)
        self.blocks = nn.Sequential(*(block(inplace) for _ in range(3)))
        self.head = nn.Linear(C, 4)
        for m in self.modules():  # BN statistics that are not the identity, so a wrong skip shows
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean(1) if self.tokens else x.mean((2, 3)))


class ScaledMLPIntoSkip(ScaledMLP):
    copy_skip = False


PATTERNS = {"resnet": (BasicBlock, False), "convnext": (ConvNeXtBlock, False),
            "inverted_residual": (InvertedResidual, False), "scaled_mlp": (ScaledMLP, True),
            "scaled_mlp_into_skip": (ScaledMLPIntoSkip, True)}


def _model(pattern: str, inplace: bool = True) -> Net:
    block, tokens = PATTERNS[pattern]
    return Net(block, inplace, tokens).eval()


def _inputs(pattern: str, batch: int = 2, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 5, C) if PATTERNS[pattern][1] else (batch, 3, 12, 12)
    return (torch.randn(shape, generator=gen),)


def make_resnet_inplace() -> nn.Module:
    """For ``graphopt inspect test_remove_layers_inplace:make_resnet_inplace`` (tests/ is on sys.path)."""
    return _model("resnet")


@functools.lru_cache(maxsize=None)
def _blocks(pattern: str, inplace: bool):
    gm = graphopt.trace(_model(pattern, inplace), _inputs(pattern))
    propagate(gm, ExampleInputs.of(_inputs(pattern)), fake=True)
    adds = {str(n.target) for n in gm.graph.nodes if "add" in str(n.target)}
    return [(b.name, b.numel) for b in find_blocks(gm)], adds


def _without(model: Net, index: int) -> Net:
    """The same model built without block ``index``: what removing it must compute."""
    smaller = copy.deepcopy(model)
    del smaller.blocks[index]
    return smaller


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("pattern", PATTERNS)
def test_in_place_adds_give_the_blocks_of_the_plain_add(pattern):
    found, adds = _blocks(pattern, True)
    assert "aten.add_.Tensor" in adds  # the in-place form really is what the graph holds
    assert found == _blocks(pattern, False)[0]
    assert [name for name, _ in found] == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(numel == _params(_model(pattern).blocks[0]) for _, numel in found)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_removing_a_block_equals_the_model_without_it(pattern):
    model = _model(pattern)
    result = graphopt.optimize(model, [RemoveLayers(blocks=("blocks.1",))], _inputs(pattern))
    want = _without(model, 1)
    assert _params(result.module) == _params(want) < _params(model)
    written_back = result.to_model()  # verifies against the graph itself; checked once more below
    assert type(written_back) is Net and _params(written_back) == _params(want)
    for inputs in (_inputs(pattern), _inputs(pattern, batch=3, seed=1)):
        got = outputs(result.module, inputs)[0]
        assert got.shape == outputs(model, inputs)[0].shape
        torch.testing.assert_close(got, outputs(want, inputs)[0])
        torch.testing.assert_close(outputs(written_back, inputs)[0], got)


@pytest.mark.parametrize("pattern, criterion", [("resnet", "block-influence"), ("convnext", "output-error"),
                                                ("inverted_residual", "angular"), ("scaled_mlp", "block-influence"),
                                                ("scaled_mlp_into_skip", "output-error")])
def test_n_equals_one_with_a_criterion_and_repair_as_for_the_plain_add(pattern, criterion):
    calib = [_inputs(pattern, batch=8, seed=s) for s in range(2)]
    runs = [graphopt.optimize(_model(pattern, inplace), [RemoveLayers(n=1, criterion=criterion, repair=True)],
                              _inputs(pattern), calib_data=calib) for inplace in (True, False)]
    (stats, twin), (result, _) = [r.report.records[0].stats for r in runs], runs
    assert stats["blocks_found"] == 3
    (removed,) = [r["block"] for r in stats["removed_blocks"]]
    assert removed in ("blocks.1", "blocks.2")  # the first is protected
    assert stats["removed_blocks"] == twin["removed_blocks"] and stats["layers_refit"] == twin["layers_refit"]
    assert result.report.records[0].decisions == runs[1].report.records[0].decisions
    inputs = rebatch(_inputs(pattern), 3)
    torch.testing.assert_close(outputs(result.module, inputs)[0], outputs(runs[1].module, inputs)[0])
    assert _params(result.module) == _params(_without(_model(pattern), 1))
    written_back = result.to_model()
    torch.testing.assert_close(outputs(written_back, inputs)[0], outputs(result.module, inputs)[0])


@pytest.mark.parametrize("pattern", ["inverted_residual", "scaled_mlp_into_skip"])
def test_block_influence_scores_match_the_plain_add(pattern):
    """The scores read the block's input before the add writes into it (into the branch, or into the skip
    itself): the same as with ``+``."""
    calib = [_inputs(pattern, batch=8, seed=s) for s in range(2)]
    scores = []
    for inplace in (True, False):
        result = graphopt.optimize(_model(pattern, inplace), [RemoveLayers(n=1)], _inputs(pattern), calib_data=calib)
        scores.append(result.report.records[0].stats["scores"])
    assert scores[0].keys() == scores[1].keys() == {"blocks.1", "blocks.2"}
    for name in scores[0]:
        assert scores[0][name] == pytest.approx(scores[1][name], rel=1e-6) and scores[0][name] > 0


def test_inspect_lists_the_in_place_blocks(capsys):
    assert main(["inspect", "test_remove_layers_inplace:make_resnet_inplace", "--input-shape", "1,3,12,12"]) == 0
    out = capsys.readouterr().out
    assert "removable blocks: 3" in out
    assert all(f"blocks.{i} " in out for i in range(3))


class ConcatNet(nn.Module):
    """Two ResNet blocks (``out += identity``, then an in-place ReLU) whose input is also concatenated at the end:
    once a block is removed, its ReLU would write into that input unless it gets a copy."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, C, 1)
        self.blocks = nn.Sequential(BasicBlock(True), BasicBlock(True))

    def forward(self, x):
        x = self.stem(x)
        return torch.cat([self.blocks(x), x], 1)


def test_an_in_place_op_after_a_removed_add_does_not_write_into_the_kept_input():
    model, inputs = ConcatNet().eval(), _inputs("resnet")
    result = graphopt.optimize(model, [RemoveLayers(blocks=("blocks.0",))], inputs)
    with torch.no_grad():
        stem = model.stem(inputs[0])
        want = torch.cat([model.blocks[1](stem.relu()), stem], 1)  # the removed block leaves relu(x + 0)
    torch.testing.assert_close(result.module(*inputs), want)
    torch.testing.assert_close(result.to_model()(*inputs), want)
    error = graphopt.optimize(model, [RemoveLayers(n=1, criterion="output-error", protect=())], inputs,
                              calib_data=[inputs]).report.records[0].stats["scores"]["blocks.0"]
    with torch.no_grad():
        full = model(*inputs)
    assert error == pytest.approx(float((want - full).pow(2).sum() / full.pow(2).sum()), rel=1e-5)
