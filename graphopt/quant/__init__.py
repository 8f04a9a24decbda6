"""int8 fake quantization: placement table, observers, calibration, QAT, mixed precision.

The ``fake-quant`` pass (passes/fake_quant.py) drives these modules; the functions re-exported here are what a user
calls around it: ``prepare_qat``/``convert`` for quantization-aware training. ONNX export is ``graphopt.export_onnx``
(it writes a fake-quant graph as QDQ int8, see graphopt/export/qdq_int8.py); ``export_qdq`` is its deprecated older
name.

May import: graphopt.errors, graphopt.util, graphopt.graph, graphopt.analysis, graphopt.calibration.
"""

import importlib
import warnings

from graphopt.quant.qat import convert, prepare_qat, trainable
from graphopt.quant.quantizer import FakeQuantize, QuantSpec, quantizers
from graphopt.quant.sensitivity import sqnr_db

__all__ = ["FakeQuantize", "QuantSpec", "convert", "prepare_qat", "quantizers", "sqnr_db", "trainable"]

# names that lived here before export/ existed: quant/ is below export/ and never imports it, so they resolve lazily
_MOVED_TO_EXPORT = {"export_qdq": "graphopt.export.compat", "QdqReport": "graphopt.export.compat",
                    "ort_kernel_counts": "graphopt.export.onnx_verify"}


def __getattr__(name: str):
    if name in _MOVED_TO_EXPORT:
        where = _MOVED_TO_EXPORT[name]
        if name == "ort_kernel_counts":  # export_qdq/QdqReport warn themselves when used
            warnings.warn(f"graphopt.quant.{name} moved to {where}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(where), name)
    raise AttributeError(f"module 'graphopt.quant' has no attribute {name!r}")
