"""``graphopt.export_onnx``: a graphopt result (or any module) as a checked, simplified, verified ONNX file.

One path for every module; what differs by format (float, QDQ int8 of a fake-quant graph, the formats later
capabilities register) is in graphopt/export/formats.py: the format prepares the module, rewrites the simplified
file and says how onnxruntime's result is judged (elementwise for float, SQNR and top-1 agreement for quantized).

Steps: let the format prepare the module; call it once for reference outputs; wrap it so ONNX sees flat tensor
inputs and outputs with readable names (kwargs keys such as ``input_ids``, output fields such as ``logits``); then,
by the first route that works (graphopt/export/routes.py: torch's torch.export-based exporter, then the TorchScript
one, a static batch only as the last resort): export, ``onnx.checker``, onnxsim (kept only when it leaves every
QuantizeLinear/DequantizeLinear node in place), the format's rewrite, onnxruntime on the example inputs and on a
second batch size when the batch is dynamic. Passes leave physically smaller tensors, so the file holds the
shrunk weights, never masks.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
import torch.nn as nn

import graphopt.export.qdq_int8  # noqa: F401  (registers the QDQ int8 format)
import graphopt.export.weight_quant  # noqa: F401  (registers the weight-quantized int4/int8 format)
from graphopt.errors import GraphoptWarning, InputError
from graphopt.export.formats import ExportError, ExportFormat, format_for
from graphopt.graph.module import GraphoptModule
from graphopt.graph.inputs import ExampleInputs
from graphopt.export.onnx_io import FlatIO, count_qdq, strip_initializer_prefix
from graphopt.export.onnx_verify import verify_file
from graphopt.export.routes import (
    EXPORTERS, Exporter, Route, _first_line, _quiet_exporter, export_proto, first_working,
    mode_switches_as_flags, plan_routes,
)

__all__ = ["ExportError", "ExportReport", "export_onnx"]


@dataclass(frozen=True)
class ExportReport:
    """What ``export_onnx`` wrote and how well onnxruntime reproduces torch on it."""

    path: str
    exporter: str
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_batch: bool
    nodes_exported: int  # ONNX nodes straight from the exporter
    nodes_simplified: int | None  # after onnxsim; None when simplification was off or undone
    qdq_nodes: int  # QuantizeLinear + DequantizeLinear nodes in the written file
    file_bytes: int
    max_abs_error: float | None  # onnxruntime vs torch over every verified batch; None without verify
    max_rel_error: float | None
    verified_batches: tuple[int, ...]
    seconds: float
    format: str = "float"  # "float", "qdq-int8", ... (graphopt/export/formats.py)
    quantize_nodes: int = 0  # QuantizeLinear nodes (activations; weights are stored as int8)
    int8_weights: int = 0  # weights stored as int8 initializers
    sqnr_db: float | None = None  # quantized formats: onnxruntime vs torch over every verified batch (the lowest)
    top1_agreement: float | None = None  # quantized formats: share of rows whose argmax agrees (class outputs)
    integer_kernels: int | None = None  # quantized formats: integer kernels onnxruntime runs (its optimized graph)
    quantized_matmuls: int = 0  # weight-quantized MatMuls written (MatMulNBits, DynamicQuantizeMatMul)
    quantized_gathers: int = 0  # packed embedding-table lookups written (GatherBlockQuantized)
    float_tables: tuple[str, ...] = ()  # packed tables written float (onnxruntime cannot take them; folded; warned)
    # every route export_onnx tried, in order: (route, its one-line failure), None for the route that wrote the file
    routes_tried: tuple[tuple[str, str | None], ...] = ()

    @property
    def nodes(self) -> int:
        """Nodes in the written file."""
        return self.nodes_exported if self.nodes_simplified is None else self.nodes_simplified

    def __str__(self) -> str:
        simplified = "not simplified" if self.nodes_simplified is None else f"{self.nodes_simplified} after onnxsim"
        lines = [
            f"ONNX file:  {self.path} ({self.file_bytes / 1e6:.2f} MB, opset {self.opset}, {self.exporter} exporter)",
            f"nodes:      {self.nodes_exported} exported, {simplified}"
            + (f", {self.qdq_nodes} QDQ" if self.qdq_nodes else ""),
            f"inputs:     {', '.join(self.input_names)}" + ("  (dynamic batch)" if self.dynamic_batch else ""),
            f"outputs:    {', '.join(self.output_names)}",
        ]
        if self.format != "float":
            packed = [f"{self.quantized_matmuls} weight-quantized MatMuls"] if self.quantized_matmuls else []
            packed += [f"{self.quantized_gathers} quantized Gathers"] if self.quantized_gathers else []
            packed += [f"{len(self.float_tables)} tables kept float ({', '.join(self.float_tables)})"
                       ] if self.float_tables else []
            parts = packed or [f"{self.int8_weights} int8 weights", f"{self.quantize_nodes} QuantizeLinear"]
            runs = "" if self.integer_kernels is None else f"; onnxruntime runs {self.integer_kernels} integer kernels"
            lines.append(f"format:     {self.format}, {', '.join(parts)}{runs}")
        if self.max_abs_error is None:
            lines.append("verified:   no")
        else:
            batches = ", ".join(map(str, self.verified_batches))
            quality = "" if self.sqnr_db is None else f"SQNR {self.sqnr_db:.1f} dB, " + (
                "" if self.top1_agreement is None else f"top-1 agreement {self.top1_agreement:.1%}, ")
            lines.append(f"verified:   onnxruntime at batch {batches}: {quality}max abs error {self.max_abs_error:.2e}, "
                         f"max rel error {self.max_rel_error:.2e}")
        if len(self.routes_tried) > 1:
            lines.append("routes:     " + "; ".join(f"{route} failed: {why}" if why else f"{route} wrote the file"
                                                    for route, why in self.routes_tried))
        lines.append(f"time:       {self.seconds:.1f} s")
        return "\n".join(lines)


def export_onnx(
    module: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    simplify: bool = True,
    verify: bool = True,
    exporter: Exporter = "auto",
    rtol: float = 1e-3,
    atol: float = 1e-4,
    min_sqnr: float | None = 30.0,
) -> ExportReport:
    """Export ``module`` called on ``example_inputs`` to the ONNX file ``path`` and return an ExportReport.

    ``example_inputs`` are given as to ``graphopt.optimize`` (a tensor, a tuple of positional inputs, or a dict of
    keyword inputs; non-tensor values are baked in). With ``dynamic_batch`` dim 0 of every input that shares the
    first input's batch size becomes the symbolic ``batch`` dim. ``exporter="auto"`` tries torch's
    torch.export-based exporter, then the TorchScript one, and only where the dynamic batch is what fails both with
    a static batch (graphopt/export/routes.py); ``report.exporter`` names the route that wrote the file and
    ``report.routes_tried`` each route tried with its failure. ``"dynamo"`` or ``"legacy"`` force one exporter.
    ``verify`` runs onnxruntime and raises ``VerifyError`` when any output differs beyond ``atol + rtol * |torch|``;
    for a quantized module (a calibrated fake-quant graph: QDQ with int8 weights) when onnxruntime's SQNR against
    torch falls below ``min_sqnr`` dB (None: report it only), since integer kernels round differently from the
    simulation. The module is not changed.
    """
    start = time.perf_counter()
    if not isinstance(module, nn.Module):
        raise InputError(f"export_onnx expects a torch.nn.Module (e.g. result.module), got {type(module).__name__}")
    if exporter not in EXPORTERS:
        raise InputError(f"export_onnx: exporter must be 'auto', 'dynamo' or 'legacy', got {exporter!r}")
    path = os.fspath(path)
    _check_writable(path)
    job = _Job.prepare(module, ExampleInputs.of(example_inputs), path, opset, simplify, verify, (rtol, atol, min_sqnr))
    name = type(job.module).__name__
    written, route, tried = first_working(plan_routes(exporter, dynamic_batch), job.write, name)
    return job.report(written, route, tried, time.perf_counter() - start)


@dataclass
class _Job:
    """One export_onnx call: the prepared module, its flat I/O, and how to write and verify the file by a route."""

    fmt: ExportFormat
    module: nn.Module  # what the exporter sees (the format's prepared copy, in eval mode)
    flat: FlatIO
    truth: FlatIO  # whose outputs onnxruntime must reproduce
    path: str
    opset: int | None
    simplify: bool
    verify: bool
    tolerances: tuple[float, float, float | None]  # rtol, atol, min_sqnr

    @classmethod
    def prepare(cls, module: nn.Module, inputs: ExampleInputs, path: str, opset, simplify, verify, tolerances):
        fmt = format_for(module)
        # the outputs onnxruntime must reproduce: the prepared copy's, or the caller's module where the copy only
        # exists so that the exporter writes plain matmuls (weight-quant: the caller's module runs the quant ops)
        original = _in_eval_mode(module) if fmt.verify_against == "original" else None
        module = _in_eval_mode(fmt.prepare(module if original is None else original))
        flat = FlatIO(module, inputs)
        truth = flat if original is None else FlatIO(original, inputs)
        return cls(fmt, module, flat, truth, path, opset, simplify, verify, tolerances)

    def write(self, route: Route) -> dict:
        """Export by ``route``, check, simplify, rewrite, save and verify; the report's figures of the file."""
        batched = self.flat.batched_inputs() if route.dynamic_batch else [False] * len(self.flat.tensors)
        proto = export_proto(self.flat, batched, self.opset, route.exporter, type(self.module).__name__)
        strip_initializer_prefix(proto, FlatIO.PREFIX)
        _check(proto)
        nodes_exported, nodes_simplified = len(proto.graph.node), None
        if self.simplify:
            proto, nodes_simplified = _simplify(proto)
        stats = self.fmt.rewrite(proto, self.module)
        if stats:
            _check(proto)
        _save(proto, self.path)
        errors, verified, quality = (None, None), (), {}
        if self.verify:
            errors, verified, quality = verify_file(self.path, self.flat, batched, self.fmt.check, *self.tolerances,
                                                    self.truth)
        return dict(
            opset=_opset(proto), dynamic_batch=any(batched), nodes_exported=nodes_exported,
            nodes_simplified=nodes_simplified, qdq_nodes=count_qdq(proto), file_bytes=_file_bytes(self.path),
            max_abs_error=errors[0], max_rel_error=errors[1], verified_batches=verified,
            quantize_nodes=sum(n.op_type == "QuantizeLinear" for n in proto.graph.node),
            int8_weights=stats.get("int8_weights", 0), quantized_matmuls=stats.get("quantized_matmuls", 0),
            quantized_gathers=stats.get("quantized_gathers", 0), float_tables=tuple(stats.get("float_tables", ())),
            **quality,
        )

    def report(self, written: dict, route: Route, tried: tuple, seconds: float) -> ExportReport:
        return ExportReport(path=self.path, exporter=route.exporter, input_names=tuple(self.flat.input_names),
                            output_names=tuple(self.flat.output_names), seconds=seconds, format=self.fmt.name,
                            routes_tried=tried, **written)


def _in_eval_mode(module: nn.Module) -> nn.Module:
    """The module itself, or an eval() copy of a plain module left in training mode (dropout would break verify).

    Plain fx.GraphModules are left alone: their graph fixes the mode whatever their flag says. graphopt's own
    (GraphoptModule) switch modes like any module, so they are treated like one.
    """
    fixed = isinstance(module, fx.GraphModule) and not isinstance(module, GraphoptModule)
    if fixed or not any(m.training for m in module.modules()):
        return module
    warnings.warn(f"graphopt.export_onnx: {type(module).__name__} is in training mode; exporting an eval() copy "
                  "(dropout off, BatchNorm on running statistics). Call .eval() first to silence this",
                  GraphoptWarning, stacklevel=4)
    copied = copy.deepcopy(module)
    with mode_switches_as_flags(copied):  # a torch.export module inside refuses .eval() (FACTS.md)
        return copied.eval()


def _check_writable(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ExportError(f"cannot write the ONNX file to '{path}': it is a directory; pass a file path such as "
                          f"'{os.path.join(path, 'model.onnx')}'")
    if not os.path.isdir(folder):
        raise ExportError(f"cannot write the ONNX file to '{path}': folder '{folder}' does not exist; create it first")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ExportError(f"cannot write the ONNX file to '{path}': permission denied; choose a writable path")


def _check(proto) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported ONNX model fails onnx.checker: {_first_line(str(e))}; "
                          "try exporter='legacy' or another opset") from e


def _simplify(proto) -> tuple[Any, int | None]:
    """onnxsim's result, or the input unchanged (with a warning) when onnxsim fails or drops QDQ nodes."""
    import onnxsim

    qdq_before = count_qdq(proto)
    try:
        with _quiet_exporter():
            simplified, ok = onnxsim.simplify(proto, check_n=0)
    except Exception as e:  # onnxsim raises RuntimeError/ValueError from C++; the unsimplified model is still good
        warnings.warn(f"graphopt.export_onnx: onnxsim failed ({_first_line(str(e))}); wrote the unsimplified model",
                      GraphoptWarning, stacklevel=5)
        return proto, None
    if not ok or count_qdq(simplified) < qdq_before:
        warnings.warn("graphopt.export_onnx: onnxsim removed QuantizeLinear/DequantizeLinear nodes or failed its "
                      "check; wrote the unsimplified model", GraphoptWarning, stacklevel=5)
        return proto, None
    return simplified, len(simplified.graph.node)


def _save(proto, path: str) -> None:
    import onnx

    try:
        big = proto.ByteSize() > 1_800_000_000  # protobuf cannot hold 2 GB: weights go to a side file
        onnx.save_model(proto, path, save_as_external_data=big, location=os.path.basename(path) + ".data")
    except OSError as e:
        raise ExportError(f"cannot write the ONNX file to '{path}': {e.strerror or e}; choose a writable path") from e


def _opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _file_bytes(path: str) -> int:
    side = path + ".data"
    return os.path.getsize(path) + (os.path.getsize(side) if os.path.exists(side) else 0)
