"""fake-quant's ``reduce_range``: 7-bit weights where onnxruntime's u8s8 kernels saturate (x86 without VNNI)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphopt
from graphopt.errors import PipelineError
from graphopt.quant import cpu_int8, quantizers
from models import build


def _quantized(spec):
    case = build("resnet_basic")
    return case, graphopt.optimize(case.model, spec, case.example_inputs, calib_data=[case.example_inputs])


def test_reduced_range_stores_7_bit_weights_that_onnxruntime_runs_like_torch(tmp_path):
    case, res = _quantized("fake-quant:reduce_range=true")
    weights = [q for q in quantizers(res.module).values() if q.role == "weight"]
    assert weights and all((q.spec.qmin, q.spec.qmax) == (-64, 63) for q in weights)
    assert res.report.records[-1].stats["weight_bits"] == 7
    report = graphopt.export_onnx(res.module, case.example_inputs, tmp_path / "q.onnx")
    stored = [numpy_helper.to_array(i) for i in onnx.load(tmp_path / "q.onnx").graph.initializer
              if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1]
    assert len(stored) == len(weights)
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in stored) == 63
    assert report.sqnr_db > 35


@pytest.mark.parametrize("forced,bits", [("1", 7), ("0", 8)])
def test_auto_follows_the_cpu_detection_and_its_override(monkeypatch, forced, bits):
    monkeypatch.setenv("GRAPHOPT_INT8_SATURATES", forced)
    _, res = _quantized("fake-quant")
    assert res.report.records[-1].stats["weight_bits"] == bits
    weight = next(q for q in quantizers(res.module).values() if q.role == "weight")
    assert weight.spec.qmax == (63 if bits == 7 else 127)


@pytest.mark.parametrize("flags,machine,saturates", [
    ({"avx2", "avx512bw"}, "x86_64", True),  # AVX-512 without VNNI: vpmaddubsw, int16 pair sums
    ({"avx2", "avx512bw", "avx512_vnni"}, "x86_64", False),
    ({"avx2", "avx_vnni"}, "x86_64", False),
    ({"asimd", "asimddp"}, "aarch64", False),
])
def test_detection_reads_the_cpu_flags(monkeypatch, flags, machine, saturates):
    monkeypatch.delenv("GRAPHOPT_INT8_SATURATES", raising=False)
    monkeypatch.setattr(cpu_int8, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(cpu_int8.platform, "machine", lambda: machine)
    cpu_int8._detected.cache_clear()
    try:
        assert cpu_int8.int8_pairs_saturate() is saturates
    finally:
        cpu_int8._detected.cache_clear()


def test_a_bad_reduce_range_is_refused_by_name():
    with pytest.raises(PipelineError, match=r"reduce_range must be true, false or 'auto', got 'maybe'"):
        graphopt.parse_pipeline("fake-quant:reduce_range=maybe")
