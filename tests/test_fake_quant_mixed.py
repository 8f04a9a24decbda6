"""fake-quant mixed precision (sensitivity ranking, layers kept in float or bf16) and pruning then quantizing."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.quant import quantizers, sqnr_db
from models import build
from util import outputs, rebatch


def _run(name, spec):
    case = build(name)
    calib = [rebatch(case.example_inputs, 8, seed=i) for i in range(2)]
    return case, graphopt.optimize(case.model, spec, case.example_inputs, calib_data=calib)


@pytest.fixture(scope="module")
def ranked():
    return _run("resnet_basic", "fake-quant:keep_float=2")


def test_sensitivity_ranking_is_reported_and_the_worst_layers_stay_float(ranked):
    case, res = ranked
    stats = res.report.records[0].stats
    ranking = stats["sensitivity"]
    assert len(ranking) == stats["quantized_layers"]
    scores = [s for _, s in ranking]
    assert scores == sorted(scores)  # most sensitive (lowest SQNR) first
    kept = stats["kept_float"]
    assert kept == [layer for layer, _ in ranking[:2]]
    quantized_layers = {q.layer for q in quantizers(res.module).values() if q.role == "weight"}
    assert not set(kept) & quantized_layers


def test_keeping_layers_float_does_not_hurt(ranked):
    case, res = ranked
    _, full = _run("resnet_basic", "fake-quant")
    x = rebatch(case.example_inputs, 8, seed=5)
    want = outputs(case.model, x)
    assert sqnr_db(want, outputs(res.module, x)) >= sqnr_db(want, outputs(full.module, x)) - 0.5


def test_error_budget_keeps_every_layer_below_it():
    case, res = _run("mlp", "fake-quant:min_layer_sqnr=100")
    stats = res.report.records[0].stats
    assert len(stats["kept_float"]) == stats["quantized_layers"]  # 100 dB: no int8 layer is that good
    assert not quantizers(res.module)
    torch.testing.assert_close(outputs(res.module, case.example_inputs), outputs(case.model, case.example_inputs))


def test_half_regions_run_in_bfloat16():
    case, res = _run("resnet_basic", "fake-quant:half=[fc],half_dtype=bfloat16")
    assert res.report.records[0].stats["half_layers"] == ["fc"]
    linear = next(n for n in res.module.graph.nodes if n.target is torch.ops.aten.linear.default)
    assert all(a.target is torch.ops.aten.to.dtype and a.args[1] == torch.bfloat16 for a in linear.all_input_nodes)
    out = outputs(res.module, case.example_inputs)[0]
    assert out.dtype == torch.float32 and sqnr_db(outputs(case.model, case.example_inputs), [out]) > 25


def test_prune_then_quantize_in_one_pipeline(tmp_path):
    case, res = _run("resnet_basic", "prune-channels:ratio=0.5,fake-quant")
    prune, quant = res.report.records
    assert prune.name == "prune-channels" and quant.name == "fake-quant"
    assert prune.params_after < 0.6 * prune.params_before and quant.stats["quantized_layers"] > 0
    text = str(res.report)
    assert "prune-channels" in text and "fake-quant" in text
    assert outputs(res.module, case.example_inputs)[0].shape == (2, 10)
    assert graphopt.export_onnx(res.module, case.example_inputs, tmp_path / "pq.onnx").sqnr_db > 30
