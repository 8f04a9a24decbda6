"""``graphopt.quant.export_qdq``, the older entry point of the QDQ int8 export, kept working (it warns).

``graphopt.export_onnx`` now writes every module, a calibrated fake-quant graph as QDQ with int8 weights among
them (graphopt/export/formats.py), and its ExportReport carries the quantized figures (SQNR, top-1 agreement,
int8 weights, integer kernels). This wrapper calls it and returns the old QdqReport.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from graphopt.errors import GraphoptWarning
from graphopt.export.onnx import export_onnx

__all__ = ["QdqReport", "export_qdq"]


@dataclass(frozen=True)
class QdqReport:
    """What export_qdq wrote and how closely onnxruntime follows torch's fake-quant graph."""

    path: str
    file_bytes: int
    quantize_nodes: int
    dequantize_nodes: int
    int8_weights: int  # weights stored as int8 initializers
    sqnr_db: float | None  # onnxruntime vs torch fake-quant (the lowest over the verified batches)
    max_abs_error: float | None
    simplified: bool

    def __str__(self) -> str:
        check = "not verified" if self.sqnr_db is None else \
            f"onnxruntime vs torch: SQNR {self.sqnr_db:.1f} dB, max abs error {self.max_abs_error:.3g}"
        return (f"{self.path}: {self.file_bytes / 1e6:.3f} MB, {self.quantize_nodes} QuantizeLinear, "
                f"{self.dequantize_nodes} DequantizeLinear, {self.int8_weights} int8 weights; {check}")


def export_qdq(gm: fx.GraphModule, example_inputs: Any, path: str | os.PathLike, *, opset: int | None = None,
               simplify: bool = True, verify: bool = True) -> QdqReport:
    """Deprecated: ``graphopt.export_onnx(gm, example_inputs, path)`` does this (and gates on SQNR)."""
    warnings.warn("graphopt.quant.export_qdq is deprecated: graphopt.export_onnx exports fake-quant graphs as QDQ "
                  "int8 itself (report.sqnr_db, report.int8_weights)", GraphoptWarning, stacklevel=2)
    report = export_onnx(gm, example_inputs, path, opset=opset, simplify=simplify, verify=verify, min_sqnr=None)
    if report.format == "float":
        from graphopt.errors import InputError

        raise InputError("export_qdq expects a fake-quant graph (graphopt.optimize(model, 'fake-quant', ...)); this "
                         "module has no quantizers: use graphopt.export_onnx")
    return QdqReport(report.path, report.file_bytes, report.quantize_nodes, report.qdq_nodes - report.quantize_nodes,
                     report.int8_weights, report.sqnr_db, report.max_abs_error, report.nodes_simplified is not None)
