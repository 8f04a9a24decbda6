"""Weight-only quantization: GPTQ against round-to-nearest, the quantize-weights / dynamic-quant passes, their
lowering to graphopt::quant_linear, composition with pruning and sparsity, write-back, saving, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.calibration.gptq import gptq, rtn
from graphopt.errors import InputError, MissingDataError, PipelineError
from graphopt.kernels import QuantLinear
from graphopt.kernels.quant_format import padded_in_features
from graphopt.kernels.quant_ops import reference_quant_linear

quant_op = torch.ops.graphopt.quant_linear.default


class Mlp(nn.Module):
    """Odd widths: K = 100 is no multiple of the 32/128 groups, N = 37 no multiple of the 16-row tiles."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(100, 200), nn.Linear(200, 37), nn.Linear(37, 5)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _data(seed=0, n=4, rows=32):
    # correlated inputs (one mixing matrix for every seed): GPTQ has work to do
    mix = torch.randn(100, 100, generator=torch.Generator().manual_seed(99)) / 10 + torch.eye(100)
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 100, generator=g) @ mix,) for _ in range(n)]


def _quant_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == quant_op]


def _decisions(result) -> dict:
    """The last pass's per-layer decisions."""
    return result.report.records[-1].decisions


def _dequantized_copy(model, bits, group, names=("fc1", "fc2")):
    """The model with each named layer's weight replaced by its RTN-dequantized value: what the pass must equal."""
    ref = copy.deepcopy(model)
    for name in names:
        layer = getattr(ref, name)
        layer.weight.data = rtn(layer.weight.data, bits, group).dequantize()
    return ref


def test_gptq_beats_round_to_nearest_on_a_toy_layer():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) / 16
    x = torch.randn(2048, 256, generator=g) @ (torch.randn(256, 256, generator=g) / 16 + torch.eye(256))
    h = x.t() @ x

    def error(q):
        return float(((x @ (w - q.dequantize()).t()) ** 2).mean())

    for bits, group in ((4, 128), (4, 32), (4, None), (8, None)):
        base = error(rtn(w, bits, group))
        assert error(gptq(w, h, bits, group)) < 0.8 * base, (bits, group)
        assert error(gptq(w, h, bits, group, act_order=True)) < 0.8 * base, (bits, group, "act_order")
        assert error(gptq(w, h, bits, group, symmetric=False)) < error(rtn(w, bits, group, symmetric=False))


def test_gptq_keeps_a_sparsity_mask_and_stays_on_its_grid():
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(32, 96, generator=g) > 0.5
    w = torch.randn(32, 96, generator=g) * keep
    x = torch.randn(512, 96, generator=g)
    q = gptq(w, x.t() @ x, 4, 32, keep=keep)
    assert (q.dequantize()[~keep] == 0).all()
    assert q.codes.max() <= 15 and q.scales.shape == (32, 3)
    # every value is a grid point of its group: s * (code - 8)
    assert torch.equal(q.dequantize(), q.scales.repeat_interleave(32, 1) * (q.codes.float() - 8))


@pytest.mark.parametrize("spec,bits,group", [("quantize-weights:bits=4,group_size=32", 4, 32),
                                             ("quantize-weights:bits=8,group_size=none", 8, None)])
def test_rtn_pass_equals_the_dequantized_model_and_lowers_every_layer(spec, bits, group):
    model, x = Mlp().eval(), _data()[0][0]
    res = graphopt.optimize(model, spec + ",compute=float,min_speedup=0", x)
    nodes = _quant_nodes(res.module)
    assert len(nodes) == 2  # the head is an output layer: float unless output_layers=true
    assert {n.args[5] for n in nodes} == {bits} and all(n.args[7] == 0 for n in nodes)
    torch.testing.assert_close(res.module(x), _dequantized_copy(model, bits, group)(x), rtol=1e-5, atol=1e-5)
    assert _decisions(res)["head"].startswith("float: output layer")
    assert "kernel" in _decisions(res)["fc1"]
    assert isinstance(model.fc1, nn.Linear) and model.fc1.weight.dtype == torch.float32  # the model is untouched


def test_int8_compute_is_close_to_float_compute():
    model, x = Mlp().eval(), _data()[0][0]
    exact = graphopt.optimize(model, "quantize-weights:bits=4,group_size=32,compute=float,min_speedup=0", x).module
    fast = graphopt.optimize(model, "quantize-weights:bits=4,group_size=32,min_speedup=0", x).module
    acts = [n.args[7] for n in _quant_nodes(fast)]
    assert acts == [32, 32]
    want = exact(x)
    err = float((fast(x) - want).detach().norm() / want.detach().norm())
    assert 0 < err < 0.02  # activations rounded to int8 per block of 32: a small, nonzero difference


def test_gptq_pass_beats_rtn_on_calibration_data_and_needs_it():
    model = Mlp().eval()
    calib = _data(n=8, rows=64)  # 512 rows: more than fc2's 200 inputs, or GPTQ fits the calibration noise
    held = _data(seed=5)[0][0]
    want = model(held)
    errors = {}
    for method in ("rtn", "gptq"):
        res = graphopt.optimize(model, f"quantize-weights:bits=4,group_size=32,method={method},compute=float",
                                calib[0][0], calib_data=calib)
        errors[method] = float((res.module(held) - want).pow(2).mean())
    assert errors["gptq"] < errors["rtn"]
    assert "gptq on 512 input rows" in _decisions(res)["fc1"]
    with pytest.raises(MissingDataError, match="quantize-weights method=gptq needs calibration data"):
        graphopt.optimize(model, "quantize-weights:method=gptq", calib[0][0])


def test_dynamic_quant_quantizes_activations_per_token():
    model, x = Mlp().eval(), _data()[0][0]
    res = graphopt.optimize(model, "dynamic-quant:min_speedup=0", x)
    nodes = _quant_nodes(res.module)
    assert [(n.args[5], n.args[6], n.args[7]) for n in nodes] == [(8, 128, 128), (8, 224, 224)]
    assert padded_in_features(200, None) == 224
    layer = res.module.fc1
    qw = QuantLinear(layer.quant_qweight, layer.quant_scales, layer.quant_zeros, layer.bias, 8, 128, 128,
                     100, 200).quantized()
    torch.testing.assert_close(res.module.fc1.quant_qweight, qw.qweight)
    torch.testing.assert_close(quant_op(x, qw.qweight, qw.scales, qw.zeros, layer.bias, 8, 128, 128, 100, 200, 1),
                               reference_quant_linear(x, qw, layer.bias, 128), rtol=1e-4, atol=1e-4)
    assert float((res.module(x) - model(x)).norm() / model(x).norm()) < 0.02
    with pytest.raises(PipelineError, match="dynamic-quant: weights are int8 per output channel"):
        graphopt.optimize(model, "dynamic-quant:bits=4", x)


def test_tiny_layers_keep_a_float_weight_with_the_same_numbers():
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 8)).eval()
    x = torch.randn(1, 1024)
    res = graphopt.optimize(model, "quantize-weights:bits=4,group_size=32,compute=float,output_layers=true", x)
    assert "float weight (kernel predicted" in _decisions(res)["2"]  # 1024 x 8: the call overhead dominates
    assert _decisions(res)["0"].endswith("kernel")
    assert len(_quant_nodes(res.module)) == 1
    ref = copy.deepcopy(model)
    for i in (0, 2):
        ref[i].weight.data = rtn(ref[i].weight.data, 4, 32).dequantize()
    torch.testing.assert_close(res.module(x), ref(x), rtol=1e-5, atol=1e-5)


def test_layer_choice_and_per_layer_grids():
    model, x = Mlp().eval(), _data()[0][0]
    res = graphopt.optimize(model, "quantize-weights:ignore=[fc2],bits_for=[[fc1,8]],min_speedup=0", x)
    assert [n.args[5] for n in _quant_nodes(res.module)] == [8]
    assert _decisions(res)["fc2"] == "float: ignored"
    res = graphopt.optimize(model, "quantize-weights:layers=[fc2],min_speedup=0", x)
    assert len(_quant_nodes(res.module)) == 1 and _decisions(res)["fc1"] == "float: not matched by layers"


def test_keep_float_leaves_the_most_sensitive_layer_in_float():
    model, x = Mlp().eval(), _data()[0][0]
    with torch.no_grad():
        model.fc2.weight[:, :3] *= 40  # a few outlier inputs: int4 groups around them lose all precision
    res = graphopt.optimize(model, "quantize-weights:bits=4,group_size=32,keep_float=1,min_speedup=0", x,
                            calib_data=_data(n=2))
    ranking = res.report.records[-1].stats["sensitivity"]
    assert [name for name, _ in ranking] == ["fc2.weight", "fc1.weight"] and ranking[0][1] < ranking[1][1]
    assert _decisions(res)["fc2"].startswith("float: keep_float (most sensitive, SQNR")
    assert len(_quant_nodes(res.module)) == 1 and torch.equal(res.module.fc2.weight, model.fc2.weight)


@pytest.mark.parametrize("spec,message", [
    ("quantize-weights:bits=3", "bits must be 4 or 8"),
    ("quantize-weights:group_size=48", "group_size must be a positive multiple of 32"),
    ("quantize-weights:group_size_for=[[fc2,100]]", "layer 'fc2': group_size must be a positive multiple of 32"),
    ("quantize-weights:bits_for=[[fc1,2]]", "layer 'fc1': bits must be 4 or 8"),
    ("quantize-weights:method=awq", "method must be one of rtn, gptq"),
    ("quantize-weights:ignore=[nothing_here]", "match no layer"),
])
def test_bad_options_are_clear_errors(spec, message):
    with pytest.raises((PipelineError, InputError), match=message):
        graphopt.optimize(Mlp().eval(), spec, _data()[0][0])


def test_composes_with_channel_pruning_and_sparsity():
    model, x = Mlp().eval(), _data()[0][0]
    res = graphopt.optimize(model, "prune-channels:ratio=0.5,quantize-weights:bits=4,group_size=32,min_speedup=0", x)
    shapes = [(n.args[8], n.args[9]) for n in _quant_nodes(res.module)]
    assert shapes == [(100, 100), (100, 19)]
    assert res.module(x).shape == (32, 5)
    res = graphopt.optimize(model, "sparsify:sparsity=0.5,quantize-weights:bits=4,group_size=32,compute=float,"
                                   "min_speedup=0", x)
    layer = res.module.fc1
    qw = QuantLinear(layer.quant_qweight, layer.quant_scales, layer.quant_zeros, None, 4, 32, 0, 100, 200).quantized()
    from graphopt.kernels import dequantize

    zeros = float((dequantize(qw) == 0).float().mean())
    assert zeros >= 0.5  # the sparsity mask's zeros are exact zero points


def test_to_model_save_and_reload_give_the_same_outputs(tmp_path):
    model, x = Mlp().eval(), _data()[0][0]
    res = graphopt.optimize(model, "quantize-weights:bits=4,group_size=32,min_speedup=0", x)
    back = res.to_model()
    assert type(back) is Mlp and isinstance(back.fc1, QuantLinear) and isinstance(back.head, nn.Linear)
    want = res.module(x)
    torch.testing.assert_close(back(x), want)
    torch.save(back, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    torch.testing.assert_close(again(x), want)
    graphopt.save(res, tmp_path / "g.pt")
    torch.testing.assert_close(graphopt.load(tmp_path / "g.pt").module(x), want)
    back.train()
    assert back.fc1.training and back.head.training
    assert [n for n, _ in back.fc1.named_parameters()] == ["bias"]  # the codes are buffers, the bias trains


def test_a_quantized_model_trains_its_float_layers_and_biases():
    model, (x,) = Mlp().eval(), _data()[0]
    back = graphopt.optimize(model, "quantize-weights:bits=4,group_size=32,min_speedup=0", x).to_model().train()
    before = back.head.weight.detach().clone(), back.fc1.bias.detach().clone()
    opt = torch.optim.SGD(back.parameters(), lr=0.1)
    loss = back(x).square().mean()
    loss.backward()
    assert back.fc1.bias.grad is not None and back.fc2.bias.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(back.head.weight, before[0]) and not torch.equal(back.fc1.bias, before[1])
    # the gradient reaching fc1's input side equals that of the dequantized float layer
    ref = _dequantized_copy(model, 4, 32)
    xg, rg = x.clone().requires_grad_(), x.clone().requires_grad_()
    fwd = graphopt.optimize(model, "quantize-weights:bits=4,group_size=32,compute=float,min_speedup=0", x).to_model()
    fwd(xg).sum().backward()
    ref(rg).sum().backward()
    torch.testing.assert_close(xg.grad, rg.grad, rtol=1e-4, atol=1e-5)


def test_one_by_one_convs_are_quantized_as_an_option():
    model = nn.Sequential(nn.Conv2d(64, 96, 1), nn.ReLU(), nn.Conv2d(96, 64, 3, padding=1), nn.Conv2d(64, 10, 1))
    x = torch.randn(2, 64, 6, 6)
    res = graphopt.optimize(model, "quantize-weights:convs=true,bits=8,group_size=none,compute=float,min_speedup=0,"
                                   "output_layers=true", x)
    assert len(_quant_nodes(res.module)) == 2
    assert "spatial conv" in _decisions(res)["2"]
    ref = copy.deepcopy(model)
    for i in (0, 3):
        w = ref[i].weight.data
        ref[i].weight.data = rtn(w.reshape(w.shape[0], -1), 8, None).dequantize().reshape(w.shape)
    torch.testing.assert_close(res.module(x), ref(x), rtol=1e-5, atol=1e-5)
    back = res.to_model()
    assert type(back[0]).__name__ == "QuantPointwiseConv"
    torch.testing.assert_close(back(x), res.module(x))
    with pytest.warns(graphopt.GraphoptWarning, match="no layer was quantized .*1x1 conv .convs=true"):
        without = graphopt.optimize(model, "quantize-weights:min_speedup=0", x)
    assert not _quant_nodes(without.module) and _decisions(without)["0"].startswith("float: 1x1 conv")


def test_gptq_names_the_layer_for_inputs_it_cannot_take():
    w = torch.randn(8, 64)
    with pytest.raises(InputError, match=r"layer 'blk.fc': the Hessian must be \(64, 64\)"):
        gptq(w, torch.eye(32), 4, 32, layer="blk.fc")
    with pytest.raises(InputError, match="layer 'blk.fc': keep must be a bool mask"):
        gptq(w, torch.eye(64), 4, 32, keep=torch.ones(8, 64), layer="blk.fc")
    with pytest.raises(InputError, match="layer 'blk.fc': group_size must be a positive multiple of 32"):
        gptq(w, torch.eye(64), 4, 40, layer="blk.fc")
