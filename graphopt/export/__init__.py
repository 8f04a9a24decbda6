"""Stage 5, deployment forms: ONNX export through one entry point (``export_onnx`` in onnx.py) with the formats
capabilities register (formats.py: float, QDQ int8 in qdq_int8.py, packed int4/int8 weights as onnxruntime's
MatMulNBits / DynamicQuantizeMatMul in weight_quant.py), the routes it exports by (routes.py: torch's two exporters,
a static batch as the last resort), writing and simplifying files (onnx_io.py), checking them in onnxruntime
(onnx_verify.py), and the plain fast eager module (``graphopt.streamline``, streamline.py). compat.py keeps the
deprecated ``export_qdq``.

May import: graphopt.errors, graphopt.util, graphopt.graph, graphopt.quant, graphopt.kernels.
"""

from graphopt.export.onnx import ExportError, ExportReport, export_onnx

__all__ = ["ExportError", "ExportReport", "export_onnx"]
