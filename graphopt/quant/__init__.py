"""int8 fake quantization: placement table, observers, calibration, QAT, mixed precision, the QDQ export format.

The ``fake-quant`` pass (passes/fake_quant.py) drives these modules; the functions re-exported here are what a user
calls around it: ``prepare_qat``/``convert`` for quantization-aware training. ONNX export is ``graphopt.export_onnx``
(it writes a fake-quant graph as QDQ int8, see onnx_qdq.py); ``export_qdq`` is its deprecated older name.
"""

from graphopt.quant.qat import convert, prepare_qat, trainable
from graphopt.quant.quantizer import FakeQuantize, QuantSpec, quantizers
from graphopt.quant.sensitivity import sqnr_db
from graphopt.onnx_verify import ort_kernel_counts

__all__ = ["FakeQuantize", "QdqReport", "QuantSpec", "convert", "export_qdq", "ort_kernel_counts", "prepare_qat",
           "quantizers", "sqnr_db", "trainable"]


def __getattr__(name: str):
    # the deprecated export entry point lives with export (quant/ does not import export at import time)
    if name in ("export_qdq", "QdqReport"):
        from graphopt import export_compat

        return getattr(export_compat, name)
    raise AttributeError(f"module 'graphopt.quant' has no attribute {name!r}")
