"""The sequential calibration engine and the data-aware passes on it: recalibrate-bn and sparsify's wanda/sparsegpt."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.calibration.engine import run_sequentially
from graphopt.errors import MissingDataError, PipelineError
from graphopt.graph.inputs import ExampleInputs
from graphopt.graph.layers import layer_name
from graphopt.graph.nodes import is_op, resolve
from graphopt.analysis.sparsity import follows_pattern, weight_masks

aten = torch.ops.aten


class Chain(nn.Module):
    """Residual MLP blocks: depth changes, the live activations at any point do not."""

    def __init__(self, depth: int, width: int = 32):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth))
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _batches(n=4, rows=16, width=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, 1, width)
    return [(torch.randn(rows, width, generator=g) * scale,) for _ in range(n)]


def test_each_layer_sees_the_outputs_of_the_compressed_layers_before_it():
    model = Chain(3).eval()
    batches = _batches()
    gm = graphopt.trace(model, batches[0])
    seen = {}

    def visit(inputs):
        name = layer_name(inputs.node)
        seen[name] = [x.clone() for x in inputs.arg(0)]
        resolve(gm, f"{name}.weight").mul_(0.5)  # "compress" it: later layers must see the change

    outputs = run_sequentially(gm, [ExampleInputs.of(b) for b in batches], visit, lambda n: is_op(n, aten.linear))
    halved = copy.deepcopy(model)
    with torch.no_grad():
        for p in halved.parameters():
            if p.dim() == 2:
                p.mul_(0.5)
    for b, (x,) in enumerate(batches):
        h = x
        for k, block in enumerate(halved.blocks):
            torch.testing.assert_close(seen[f"blocks.{k}.0"][b], h)
            h = h + block(h)
        torch.testing.assert_close(seen["head"][b], h)
        torch.testing.assert_close(outputs[b][0], halved(x))


def test_memory_holds_one_point_of_the_graph_not_the_whole_model():
    peaks = {}
    for depth in (2, 12):
        model = Chain(depth).eval()
        batches = _batches(n=8, rows=64)
        gm = graphopt.trace(model, batches[0])
        memory = {}
        run_sequentially(gm, [ExampleInputs.of(b) for b in batches], lambda i: None,
                         lambda n: is_op(n, aten.linear), memory=memory)
        peaks[depth] = memory["peak_bytes"]
    assert peaks[2] > 0 and peaks[12] <= 2 * peaks[2], peaks


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def test_recalibrate_bn_sets_the_exact_statistics_of_the_calibration_data():
    torch.manual_seed(0)
    model = ConvBN().eval()
    calib = [(torch.randn(4, 3, 8, 8) * 2 + 1,) for _ in range(3)]
    res = graphopt.optimize(model, ["recalibrate-bn"], calib[0], calib_data=calib)
    assert res.report.records[0].stats["recalibrated"] == 2
    back = res.to_model().eval()
    seen = {name: [] for name, m in back.named_modules() if isinstance(m, nn.BatchNorm2d)}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen[name].append(inp[0]))
             for name, m in back.named_modules() if name in seen]
    with torch.no_grad():
        for (x,) in calib:
            back(x)
    for h in hooks:
        h.remove()
    for name, inputs in seen.items():
        values = torch.cat(inputs).double().transpose(0, 1).reshape(8, -1)
        bn = back.get_submodule(name)
        torch.testing.assert_close(bn.running_mean.double(), values.mean(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), values.var(1), rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.body[1].running_mean, back.body[1].running_mean)  # the user's model is untouched
    assert torch.equal(model.body[1].running_mean, torch.zeros(8))


def test_recalibrate_bn_says_what_it_needs():
    model = ConvBN().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(MissingDataError, match=r"recalibrate-bn needs calibration data.*calib_data=batches"):
        graphopt.optimize(model, ["recalibrate-bn"], (x,))
    with pytest.raises(PipelineError, match=r"ignore pattern 'nothing.\*' matches no BatchNorm"):
        graphopt.optimize(model, ["recalibrate-bn:ignore=[nothing.*]"], (x,), calib_data=[(x,)])


def _output_error(module, reference, batches) -> float:
    with torch.no_grad():
        return sum(float(((module(*b) - reference(*b)) ** 2).mean()) for b in batches)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_data_aware_sparsity_keeps_the_outputs_closer_than_magnitude(pattern):
    torch.manual_seed(0)
    model = Chain(3).eval()
    calib, held_out = _batches(8, 64), _batches(4, 64, seed=1)
    errors, results = {}, {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        res = graphopt.optimize(model, [f"sparsify:sparsity=0.5,pattern={pattern},method={method}"], calib[0],
                                calib_data=calib)
        results[method] = res
        errors[method] = _output_error(res.module, model, held_out)
        masks = weight_masks(res.module)
        assert len(masks) == 4 and all(follows_pattern(m.mask, pattern) for m in masks.values())
    assert errors["sparsegpt"] < 0.7 * errors["magnitude"] and errors["wanda"] < errors["magnitude"], errors
    decisions = results["sparsegpt"].report.records[0].decisions
    assert decisions["blocks.0.0"].startswith("50.0% zeros") and "sparsegpt" in decisions["blocks.0.0"]


def test_sparsegpt_runs_on_convs_and_lowers_to_the_sparse_kernels():
    torch.manual_seed(0)
    model = ConvBN().eval()
    calib = [(torch.randn(4, 3, 8, 8),) for _ in range(4)]
    res = graphopt.optimize(model, ["sparsify:sparsity=0.5,method=sparsegpt", "lower-sparse"],
                            calib[0], calib_data=calib)
    stats = res.report.records[0].stats
    assert stats["layers_sparsified"] == 3 and abs(stats["sparsity"] - 0.5) < 0.02


def test_data_aware_sparsity_says_what_it_needs():
    model = Chain(2).eval()
    x = _batches(1)[0]
    with pytest.raises(MissingDataError, match=r"sparsify method=wanda needs calibration data"):
        graphopt.optimize(model, ["sparsify:method=wanda"], x)
    with pytest.raises(PipelineError, match=r"method 'wanda' supports unstructured and N:M patterns"):
        graphopt.optimize(model, ["sparsify:method=wanda,pattern=8x1"], x, calib_data=[x])
    with pytest.raises(PipelineError, match=r"method must be one of magnitude, wanda, sparsegpt"):
        graphopt.optimize(model, ["sparsify:method=obs"], x, calib_data=[x])
