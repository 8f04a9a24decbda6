"""The shared layer view (graphopt/graph/layers.py) and the one pattern language (graphopt/graph/patterns.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.graph.layers import arg, layer_name, layers
from graphopt.graph.patterns import first_match, matches, matches_any, unmatched
from models import build

aten = torch.ops.aten


class Tied(nn.Module):
    """Embedding tied to the head, a conv stack with a grouped conv, a Linear in the middle."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.body = nn.Sequential(nn.Conv1d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv1d(8, 8, 1))
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids).transpose(1, 2)
        x = self.body(x).transpose(1, 2)
        return self.head(torch.relu(self.mid(x)))


def _view(model, *inputs):
    gm = graphopt.trace(model.eval(), inputs)
    return gm, {layer.name: layer for layer in layers(gm)}


def test_layers_have_their_module_names_kinds_weights_and_flags():
    gm, view = _view(Tied(), torch.randint(0, 16, (2, 5)))
    assert set(view) == {"embed", "body.0", "body.2", "mid", "head"}  # the tied two keep their own module names
    assert view["embed"].kind == "embedding" and view["body.0"].kind == "conv" and view["mid"].kind == "linear"
    assert view["mid"].weight.target == "mid.weight" and view["mid"].bias.target == "mid.bias"
    assert not view["mid"].shared and not view["body.0"].shared
    assert view["embed"].shared and view["head"].shared  # they read one tensor
    assert view["embed"].weight is view["head"].weight
    assert [name for name, layer in view.items() if layer.feeds_output] == ["head"]
    assert not view["mid"].feeds_output


def test_arguments_are_read_by_schema_name_whether_given_or_defaulted():
    gm, view = _view(Tied(), torch.randint(0, 16, (2, 5)))
    assert arg(view["body.0"].node, "groups") == 2
    assert arg(view["body.2"].node, "groups", "missing") == 1  # not in the call: the schema's default
    assert arg(view["mid"].node, "no_such_argument", "fallback") == "fallback"


def test_a_masked_weight_keeps_its_layer_name():
    case = build("mlp")
    res = graphopt.optimize(case.model, "sparsify:sparsity=0.5", case.example_inputs)
    names = {layer.name for layer in layers(res.module)}
    plain = {layer.name for layer in layers(graphopt.trace(case.model, case.example_inputs))}
    assert names == plain and not any("parametrizations" in n for n in names)


def test_gpt2_conv1d_layers_are_addmm_layers_named_by_module():
    case = build("hf_gpt2")
    gm = graphopt.trace(case.model, case.example_inputs)
    addmm = [layer for layer in layers(gm) if layer.kind == "addmm"]
    assert addmm and all(layer.name.endswith(("c_attn", "c_proj", "c_fc")) for layer in addmm)
    assert layer_name(addmm[0].node, "mat2") == addmm[0].name


@pytest.mark.parametrize("name,pattern,selected", [
    ("head", "head", True),
    ("head.weight", "head", True),  # a module selects what is inside it
    ("heads", "head", False),
    ("blocks.0.conv1", "blocks.0", True),
    ("blocks.10.conv1", "blocks.1", False),
    ("model.layers.3.mlp.up_proj", "*.mlp.*", True),
    ("model.layers.3.self_attn.q_proj", "*.mlp.*", False),
    ("Head", "head", False),  # case-sensitive on every platform
])
def test_one_pattern_language(name, pattern, selected):
    assert matches(name, pattern) is selected


def test_pattern_helpers():
    assert matches_any("a.b", ["x", "a"]) and not matches_any("a.b", [])
    assert first_match("layers.2.mlp", [("layers.1", 0.1), ("layers.*", 0.5)], 0.0) == 0.5
    assert first_match("head", [("layers.*", 0.5)], 0.0) == 0.0
    assert unmatched(["layers.*", "typo"], ["layers.0.fc"]) == ["typo"]


def test_every_pass_option_that_selects_layers_reads_the_same_patterns():
    case = build("resnet_basic")
    x = case.example_inputs
    calib = [x]
    quant = graphopt.optimize(case.model, "fake-quant:ignore=[layers.1]", x, calib_data=calib).report.records[-1]
    skipped = set(quant.stats["skipped"])  # the block's convs and its residual add (named by its module)
    assert {"layers.1.conv1.0", "layers.1.conv2.0", "layers.1.downsample.0"} <= skipped
    assert all(matches(n, "layers.1") for n in skipped)
    with pytest.warns(graphopt.GraphoptWarning, match=r"the option `skip` is now called `ignore`"):
        old = graphopt.optimize(case.model, "fake-quant:skip=[layers.1]", x, calib_data=calib).report.records[-1]
    assert old.stats["skipped"] == quant.stats["skipped"]
    sparse = graphopt.optimize(case.model, "sparsify:sparsity=0.5,ignore=[layers.1]", x).report.records[-1]
    ignored = sorted(n for n, why in sparse.stats["skipped"].items() if why == "ignored")
    assert ignored == ["layers.1.conv1.0.weight", "layers.1.conv2.0.weight", "layers.1.downsample.0.weight"]
    low = graphopt.optimize(case.model, "low-rank:energy=0.9,ignore=[layers.1]", x).report.records[-1]
    assert {n for n, why in low.stats["skipped_layers"].items() if why == "ignored"} >= {"layers.1.conv1.0"}
