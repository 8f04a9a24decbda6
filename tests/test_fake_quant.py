"""fake-quant: where quantizers go, calibration, observers, SQNR against float, and bad input."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.quant import FakeQuantize, quantizers, sqnr_db
from graphopt.quant.observers import make_observer
from graphopt.quant.quantizer import QuantSpec, qparams_from_range
from models import CNN_NAMES, build
from util import outputs, rebatch


def _calib(inputs, n=3, batch=8):
    return [rebatch(inputs, batch, seed=i) for i in range(n)]


@pytest.fixture(scope="module")
def resnet():
    case = build("resnet_basic")
    res = graphopt.optimize(case.model, "fake-quant", case.example_inputs, calib_data=_calib(case.example_inputs))
    return case, res


def test_placement_follows_the_table(resnet):
    case, res = resnet
    gm = res.module
    qs = quantizers(gm)
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and "conv2d" in str(n.target)]
    weights = [q for q in qs.values() if q.role == "weight"]
    assert len(weights) == len(convs) + 1  # every conv and the classifier
    assert all(q.spec.axis == 0 and q.spec.dtype == "int8" and q.spec.symmetric for q in weights)
    assert all(q.scale.numel() > 1 for q in weights)  # per output channel
    acts = [q for q in qs.values() if q.role == "activation"]
    assert all(q.spec.dtype == "uint8" and not q.spec.symmetric and q.spec.axis is None for q in acts)
    for conv in convs:  # each conv reads a quantized input and a quantized weight
        assert all(a.op == "call_module" for a in conv.args[:2])
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert adds and all(a.op == "call_module" for add in adds for a in add.args[:2])  # residual adds (U8S8)
    torch.testing.FileCheck().check_not("batch_norm").run(gm.code)  # folded before quantizing (PTQ)
    assert res.report.records[0].stats["bn_folded"] == len(convs)


def test_calibrated_model_is_close_to_float_and_batch_dynamic(resnet):
    case, res = resnet
    x = rebatch(case.example_inputs, 5, seed=42)
    got = outputs(res.module, x)
    assert got[0].shape == (5, 10)
    assert sqnr_db(outputs(case.model, x), got) >= 30
    assert all(q.calibrated for q in quantizers(res.module).values())


@pytest.mark.parametrize("name", [*CNN_NAMES, "hf_bert", "hf_gpt2"])  # figures per model: bench/quant.py
def test_zoo_sqnr(name):
    case = build(name)
    res = graphopt.optimize(case.model, "fake-quant", case.example_inputs, calib_data=_calib(case.example_inputs))
    x = rebatch(case.example_inputs, 8, seed=7)
    assert sqnr_db(outputs(case.model, x), outputs(res.module, x)) >= 30
    if name == "hf_gpt2":  # its Conv1D layers are addmm(bias, x, W) with W stored (in, out): quantized too
        assert len(quantizers(res.module)) > 2 * 8 and res.report.records[0].stats["quantized_layers"] >= 9


def test_user_model_is_not_changed():
    case = build("vgg")
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    graphopt.optimize(case.model, "fake-quant", case.example_inputs, calib_data=_calib(case.example_inputs, 1))
    after = case.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_skip_last_keeps_the_classifier_float():
    case = build("resnet_basic")
    res = graphopt.optimize(case.model, "fake-quant:ignore=[last]", case.example_inputs,
                            calib_data=_calib(case.example_inputs, 1))
    layers = {q.layer for q in quantizers(res.module).values()}
    assert "fc" not in layers and res.report.records[0].stats["skipped"] == ["fc"]


def _qdq_error(kind, x):
    obs = make_observer(kind)
    obs.update(x)
    low, high = obs.range(0, 255, False)
    scale, zp = qparams_from_range(low, high, 0, 255, False)
    deq = (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale
    return float(high), deq - x


def test_observers_choose_their_ranges():
    torch.manual_seed(0)
    x = torch.randn(100_000)
    x[0] = 40.0  # one outlier
    high, err = _qdq_error("minmax", x)
    assert high == pytest.approx(40.0)
    assert _qdq_error("moving-average", x)[0] == pytest.approx(40.0)  # one batch: its own min/max
    high_p, err_p = _qdq_error("percentile", x)
    assert high_p < 5 and err_p[1:].pow(2).mean() < err[1:].pow(2).mean() / 10  # outlier clipped: finer steps
    high_m, err_m = _qdq_error("mse", x)
    assert err_m.pow(2).mean() <= err.pow(2).mean() and err_m.pow(2).mean() <= err_p.pow(2).mean()
    x[0] = 5.0  # a mild tail: clipping some of it pays off
    assert _qdq_error("mse", x)[0] < 5.0


def test_moving_average_observer_smooths_batches():
    obs = make_observer("moving-average")
    obs.update(torch.tensor([0.0, 1.0]))
    obs.update(torch.tensor([0.0, 11.0]))
    assert float(obs.range(0, 255, False)[1]) == pytest.approx(2.0)  # 0.9 * 1 + 0.1 * 11


def test_symmetric_weight_qparams():
    scale, zp = qparams_from_range(torch.tensor([-2.0, -1.0]), torch.tensor([1.0, 0.5]), -128, 127, True)
    torch.testing.assert_close(scale, torch.tensor([2 / 127, 1 / 127]))
    assert zp.tolist() == [0, 0]


def test_fake_quantize_uses_straight_through_gradients():
    q = FakeQuantize(QuantSpec("int8", True, None), "activation", "layer")
    q.observer.update(torch.tensor([-1.0, 1.0]))
    q.freeze()
    q.train()
    x = torch.tensor([0.3, 5.0], requires_grad=True)  # 5.0 is clipped: no gradient there
    q(x).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0]


# ---- bad input: clear errors, nothing changed ---------------------------------------------------------------


def test_no_calibration_data():
    case = build("vgg")
    with pytest.raises(graphopt.InputError, match=r"^fake-quant needs calibration data to choose its scales: pass "
                       r"graphopt.optimize\(model, 'fake-quant', example_inputs, calib_data=batches\)"):
        graphopt.optimize(case.model, "fake-quant", case.example_inputs)
    with pytest.raises(graphopt.InputError, match="^calib_data is empty"):
        graphopt.optimize(case.model, "fake-quant", case.example_inputs, calib_data=[])


def test_batches_of_the_wrong_shape():
    case = build("vgg")
    bad = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    with pytest.raises(graphopt.InputError) as e:
        graphopt.optimize(case.model, "fake-quant", case.example_inputs, calib_data=bad)
    assert str(e.value) == ("calibration batch 1: input [0][0] is (4, 3, 16, 16) float32, but the model was traced "
                            "with (2, 3, 32, 32) float32; only the batch dimension may differ")


def test_unsupported_dtype():
    case = build("mlp")
    model = case.model.double()
    x = case.example_inputs[0].double()
    with pytest.raises(graphopt.InputError, match=r"^fake-quant supports float32 models, but layer `0` reads `input_1` of "
                       r"dtype float64; convert the model with model.float\(\) before optimizing"):
        graphopt.optimize(model, "fake-quant", (x,), calib_data=[(x,)])


def test_bad_options():
    with pytest.raises(graphopt.PipelineError, match="activation_dtype must be 'uint8' or 'int8', got 'int4'"):
        graphopt.optimize(build("mlp").model, "fake-quant:activation_dtype=int4", torch.randn(2, 64))
    with pytest.raises(graphopt.PipelineError, match="observer must be one of minmax, moving-average, percentile"):
        graphopt.parse_pipeline("fake-quant:observer=kl")
