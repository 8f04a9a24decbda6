"""QDQ ONNX export of fake-quant graphs: checker, onnxsim, int8 weights, onnxruntime agreement and int8 kernels."""

from __future__ import annotations

import onnx
import pytest
import torch

import graphopt
from graphopt.export.onnx_verify import ort_kernel_counts
from graphopt.quant import quantizers
from models import build
from util import rebatch


def _quantized(name, spec="fake-quant"):
    case = build(name)
    calib = [rebatch(case.example_inputs, 8, seed=i) for i in range(2)]
    return case, graphopt.optimize(case.model, spec, case.example_inputs, calib_data=calib).module


@pytest.fixture(scope="module")
def resnet():
    return _quantized("resnet_basic")


def test_resnet_exports_as_qdq_and_runs_int8(resnet, tmp_path):
    case, gm = resnet
    path = tmp_path / "q.onnx"
    report = graphopt.export_onnx(gm, case.example_inputs, path)
    assert report.format == "qdq-int8" and report.verified_batches == (2, 3)
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    assert report.nodes_simplified is not None  # onnxsim ran and kept every QDQ node
    n_weights = sum(q.role == "weight" for q in quantizers(gm).values())
    assert report.int8_weights == n_weights
    int8 = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1]
    assert len(int8) == n_weights
    per_channel = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in
                   {i.name for i in int8}]
    assert all(next(a.i for a in n.attribute if a.name == "axis") == 0 for n in per_channel)
    assert report.quantize_nodes == sum(q.role == "activation" for q in quantizers(gm).values())
    assert report.sqnr_db > 35 and report.max_abs_error < 0.05  # onnxruntime's int8 kernels vs torch simulation
    kernels = ort_kernel_counts(str(path), str(tmp_path / "opt.onnx"))
    convs = sum(1 for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    assert kernels.get("QLinearConv") == convs and kernels.get("Conv", 0) == 0  # every conv runs as int8
    assert kernels.get("QLinearAdd", 0) >= 3


def test_file_is_about_four_times_smaller(resnet, tmp_path):
    case, gm = resnet
    q = graphopt.export_onnx(gm, case.example_inputs, tmp_path / "q.onnx", verify=False)
    assert q.sqnr_db is None and q.int8_weights > 0
    f = graphopt.export_onnx(case.model, case.example_inputs, tmp_path / "f.onnx", verify=False)
    assert f.file_bytes / q.file_bytes > 3.0


def test_export_before_calibration_is_refused(resnet, tmp_path):
    case, gm = resnet
    gm = __import__("copy").deepcopy(gm)
    name, q = next(iter(quantizers(gm).items()))
    q.state = "observe"
    with pytest.raises(graphopt.InputError, match=rf"^cannot export: quantizer `{name}` \(weight of `stem.0`\) "
                       "is not calibrated yet; run the fake-quant pass with calib_data"):
        graphopt.export_onnx(gm, case.example_inputs, tmp_path / "never.onnx")
    assert not (tmp_path / "never.onnx").exists()


def test_bert_exports_and_matches(tmp_path):
    case, gm = _quantized("hf_bert")
    report = graphopt.export_onnx(gm, case.example_inputs, tmp_path / "bert.onnx")
    assert report.quantize_nodes > 0 and report.int8_weights >= 12  # q/k/v/o + 2 MLP linears per layer, 2 layers
    assert report.sqnr_db > 30


def test_qat_graph_exports_folded(tmp_path):
    case, gm = _quantized("vgg", "fake-quant:qat=true")
    report = graphopt.export_onnx(gm, case.example_inputs, tmp_path / "qat.onnx")
    ops = {n.op_type for n in onnx.load(tmp_path / "qat.onnx").graph.node}
    assert "BatchNormalization" not in ops and report.sqnr_db > 35
    assert any(n.target == "qat_bn_0" for n in gm.graph.nodes)  # the trainable graph itself is unchanged


def test_quantized_exports_are_judged_by_sqnr_and_top1_not_elementwise(resnet, tmp_path):
    case, gm = resnet
    report = graphopt.export_onnx(gm, case.example_inputs, tmp_path / "q.onnx")  # default rtol=1e-3, atol=1e-4
    assert report.sqnr_db > 30 and report.top1_agreement is not None and report.top1_agreement >= 0.5
    convs = sum(1 for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    assert report.integer_kernels > convs  # every conv, and some adds, run as integer kernels in onnxruntime
    text = str(report)
    assert "qdq-int8" in text and "SQNR" in text and "integer kernels" in text


def test_a_quantized_export_below_min_sqnr_is_a_verify_error_with_what_to_do(resnet, tmp_path):
    case, gm = resnet
    with pytest.raises(graphopt.VerifyError, match=r"follows torch at only [\d.]+ dB SQNR at "
                                                   r"batch 2 \(min_sqnr=200 dB\).*reduce_range=true"):
        graphopt.export_onnx(gm, case.example_inputs, tmp_path / "q.onnx", min_sqnr=200)


def test_the_old_export_qdq_still_works_and_warns(resnet, tmp_path):
    from graphopt.quant import QdqReport, export_qdq

    case, gm = resnet
    with pytest.warns(graphopt.GraphoptWarning, match=r"export_qdq is deprecated: graphopt.export_onnx"):
        old = export_qdq(gm, case.example_inputs, tmp_path / "old.onnx")
    new = graphopt.export_onnx(gm, case.example_inputs, tmp_path / "new.onnx")
    assert isinstance(old, QdqReport) and old.int8_weights == new.int8_weights and old.simplified
    assert old.quantize_nodes == new.quantize_nodes and abs(old.sqnr_db - new.sqnr_db) < 1e-6
