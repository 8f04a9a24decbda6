"""int8 fake quantization: placement table, observers, calibration, QAT, mixed precision, QDQ ONNX export.

The ``fake-quant`` pass (passes/fake_quant.py) drives these modules; the functions re-exported here are what a user
calls around it: ``prepare_qat``/``convert`` for quantization-aware training, ``export_qdq`` for ONNX.
"""

from graphopt.quant.qat import convert, prepare_qat, trainable
from graphopt.quant.quantizer import FakeQuantize, QuantSpec, quantizers
from graphopt.quant.sensitivity import sqnr_db

__all__ = ["FakeQuantize", "QuantSpec", "convert", "prepare_qat", "quantizers", "sqnr_db", "trainable"]
from graphopt.quant.onnx_qdq import QdqReport, export_qdq, ort_kernel_counts  # noqa: E402

__all__ += ["QdqReport", "export_qdq", "ort_kernel_counts"]
