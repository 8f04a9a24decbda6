"""``graphopt.export_onnx``: a graphopt result (or any module) as a checked, simplified, verified ONNX file.

One path for every module; what differs by format (float, QDQ int8 of a fake-quant graph, the formats later
capabilities register) is in graphopt/export/formats.py: the format prepares the module, rewrites the simplified
file and says how onnxruntime's result is judged (elementwise for float, SQNR and top-1 agreement for quantized).

Steps: let the format prepare the module; call it once for reference outputs; wrap it so ONNX sees flat tensor inputs and outputs with readable
names (kwargs keys such as ``input_ids``, output fields such as ``logits``); export with torch's default
torch.export-based exporter (``exporter="legacy"`` picks the TorchScript one); ``onnx.checker``; onnxsim, kept only
when it leaves every QuantizeLinear/DequantizeLinear node in place; then onnxruntime on the example inputs and on a
second batch size when the batch is dynamic. Passes leave physically smaller tensors, so the file holds the
shrunk weights, never masks.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
import torch.fx as fx
import torch.fx.experimental._config as fx_config
import torch.nn as nn
from torch.export import Dim

import graphopt.export.qdq_int8  # noqa: F401  (registers the QDQ int8 format)
import graphopt.export.weight_quant  # noqa: F401  (registers the weight-quantized int4/int8 format)
from graphopt.errors import GraphoptWarning, InputError
from graphopt.export.formats import ExportError, format_for
from graphopt.graph.module import GraphoptModule
from graphopt.graph.inputs import ExampleInputs
from graphopt.export.onnx_io import (
    FlatIO, count_qdq, ensure_fake_quant_meta_kernels, set_batch_dim_name, strip_initializer_prefix,
)
from graphopt.export.onnx_verify import verify_file

Exporter = Literal["dynamo", "legacy"]


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
    exporter: Exporter = "dynamo",
    rtol: float = 1e-3,
    atol: float = 1e-4,
    min_sqnr: float | None = 30.0,
) -> ExportReport:
    """Export ``module`` called on ``example_inputs`` to the ONNX file ``path`` and return an ExportReport.

    ``example_inputs`` are given as to ``graphopt.optimize`` (a tensor, a tuple of positional inputs, or a dict of
    keyword inputs; non-tensor values are baked in). With ``dynamic_batch`` dim 0 of every input that shares the
    first input's batch size becomes the symbolic ``batch`` dim. ``exporter="legacy"`` uses the TorchScript
    exporter (deprecated by torch) where the torch.export-based one fails. ``verify`` runs onnxruntime and raises
    ``VerifyError`` when any output differs beyond ``atol + rtol * |torch|``; for a quantized module (a calibrated
    fake-quant graph: QDQ with int8 weights) when onnxruntime's SQNR against torch falls below ``min_sqnr`` dB
    (None: report it only), since integer kernels round differently from the simulation. The module is not changed.
    """
    start = time.perf_counter()
    if not isinstance(module, nn.Module):
        raise InputError(f"export_onnx expects a torch.nn.Module (e.g. result.module), got {type(module).__name__}")
    if exporter not in ("dynamo", "legacy"):
        raise InputError(f"export_onnx: exporter must be 'dynamo' or 'legacy', got {exporter!r}")
    path = os.fspath(path)
    _check_writable(path)
    fmt = format_for(module)
    inputs = ExampleInputs.of(example_inputs)
    # the outputs onnxruntime must reproduce: the prepared copy's, or the caller's module where the copy only
    # exists so that the exporter writes plain matmuls (weight-quant: the caller's module runs the quant ops)
    original = _in_eval_mode(module) if fmt.verify_against == "original" else None
    module = _in_eval_mode(fmt.prepare(module if original is None else original))
    flat = FlatIO(module, inputs)
    truth = flat if original is None else FlatIO(original, inputs)
    batched = flat.batched_inputs() if dynamic_batch else [False] * len(flat.tensors)
    proto = _export(flat, batched, opset, exporter, type(module).__name__)
    strip_initializer_prefix(proto, FlatIO.PREFIX)
    _check(proto)
    nodes_exported = len(proto.graph.node)
    nodes_simplified = None
    if simplify:
        proto, nodes_simplified = _simplify(proto)
    stats = fmt.rewrite(proto, module)
    if stats:
        _check(proto)
    _save(proto, path)
    errors: tuple[float | None, float | None] = (None, None)
    verified: tuple[int, ...] = ()
    quality: dict = {}
    if verify:
        errors, verified, quality = verify_file(path, flat, batched, fmt.check, rtol, atol, min_sqnr, truth)
    return ExportReport(
        path=path, exporter=exporter, opset=_opset(proto), input_names=tuple(flat.input_names),
        output_names=tuple(flat.output_names), dynamic_batch=any(batched), nodes_exported=nodes_exported,
        nodes_simplified=nodes_simplified, qdq_nodes=count_qdq(proto), file_bytes=_file_bytes(path),
        max_abs_error=errors[0], max_rel_error=errors[1], verified_batches=verified,
        seconds=time.perf_counter() - start, format=fmt.name,
        quantize_nodes=sum(n.op_type == "QuantizeLinear" for n in proto.graph.node),
        int8_weights=stats.get("int8_weights", 0), quantized_matmuls=stats.get("quantized_matmuls", 0),
        quantized_gathers=stats.get("quantized_gathers", 0), float_tables=tuple(stats.get("float_tables", ())),
        **quality,
    )


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
                  GraphoptWarning, stacklevel=3)
    return copy.deepcopy(module).eval()


def _check_writable(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ExportError(f"cannot write the ONNX file to '{path}': it is a directory; pass a file path such as "
                          f"'{os.path.join(path, 'model.onnx')}'")
    if not os.path.isdir(folder):
        raise ExportError(f"cannot write the ONNX file to '{path}': folder '{folder}' does not exist; create it first")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ExportError(f"cannot write the ONNX file to '{path}': permission denied; choose a writable path")


def _export(flat: FlatIO, batched: list[bool], opset: int | None, exporter: Exporter, model_name: str):
    """The exported ModelProto; exporter failures become one ExportError that names the op at fault."""
    try:
        with _quiet_exporter(), torch.no_grad():
            if exporter == "dynamo":
                return _export_dynamo(flat, batched, opset)
            return _export_legacy(flat, batched, opset)
    except ExportError:
        raise
    except Exception as e:  # the exporters raise many types (UserError, ConversionError, RuntimeError, ...)
        raise _exporter_error(e, exporter, model_name) from e


def _export_dynamo(flat: FlatIO, batched: list[bool], opset: int | None):
    ensure_fake_quant_meta_kernels()
    batch = Dim("batch")
    specs = tuple({0: batch} if b else None for b in batched)
    # size-oblivious reasoning keeps a batch of 1 dynamic instead of specializing it (as graphopt.trace does)
    with fx_config.patch(backed_size_oblivious=any(batched)), _reused_torchlib_registry():
        program = torch.onnx.export(
            flat, tuple(flat.tensors), None, dynamo=True, opset_version=opset, input_names=flat.input_names,
            output_names=flat.output_names, dynamic_shapes=(specs,) if any(batched) else None, verbose=False,
        )
    proto = program.model_proto
    set_batch_dim_name(proto, batched, "batch")
    return proto


_REGISTRIES: dict[tuple, Any] = {}


@contextlib.contextmanager
def _reused_torchlib_registry() -> Iterator[None]:
    """Build the exporter's op registry once per opset instead of on every export (3-7 s each, measured).

    torch.onnx.export rebuilds it from onnxscript's torchlib on every call and only reads it afterwards. This reaches
    into a private torch module: if that moved, the export simply runs uncached.
    """
    try:
        from torch.onnx._internal.exporter import _registration
        original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def cached(cls, opset_version=None, **kwargs):
        key = (cls, opset_version, tuple(sorted(kwargs.items())))
        if key not in _REGISTRIES:
            args = {} if opset_version is None else {"opset_version": opset_version}
            _REGISTRIES[key] = original.__func__(cls, **args, **kwargs)
        return _REGISTRIES[key]

    _registration.ONNXRegistry.from_torchlib = classmethod(cached)
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = original


def _export_legacy(flat: FlatIO, batched: list[bool], opset: int | None):
    import onnx

    axes = {n: {0: "batch"} for n, b in zip(flat.input_names, batched) if b}  # outputs' dims follow by inference
    buffer = io.BytesIO()
    torch.onnx.export(
        flat, tuple(flat.tensors), buffer, dynamo=False, opset_version=opset, input_names=flat.input_names,
        output_names=flat.output_names, dynamic_axes=axes or None, verbose=False,
        training=torch.onnx.TrainingMode.PRESERVE,  # torch.export's modules refuse .train(); they are eval already
    )
    return onnx.load_model_from_string(buffer.getvalue())


_OP_PATTERNS = (
    re.compile(r"target=(torch\.ops\.[\w.]+)"),
    re.compile(r"OpOverload\(op='([\w.:]+)'"),
    re.compile(r"Unsupported: .*?operator ([\w.:]+)"),
    re.compile(r"Exporting the operator '([\w.:]+)'"),  # the legacy exporter's wordings
    re.compile(r"unrecognized namespace ([\w.:]+)"),
    re.compile(r"(aten::\w+|aten\.\w+(?:\.\w+)?)"),  # last: any ATen name in the text
)
_NODE_PATTERN = re.compile(r"%(\w+)\s*:")


def _exporter_error(e: BaseException, exporter: Exporter, model_name: str) -> ExportError:
    text = _error_text(e)
    op = next((m.group(1) for p in _OP_PATTERNS if (m := p.search(text))), None)
    node = _NODE_PATTERN.search(text)
    where = " at " + ", ".join(filter(None, (f"node `{node.group(1)}`" if node else None,
                                             f"op `{op}`" if op else None))) if (op or node) else ""
    other = ("exporter='legacy' (the TorchScript exporter)" if exporter == "dynamo"
             else "exporter='dynamo' (the default torch.export-based exporter)")
    reason = _first_line(text)
    return ExportError(
        f"the {exporter} ONNX exporter could not export {model_name}{where}: {reason}. What you can do: try "
        f"{other}, a different opset=..., or replace the op with ONNX-exportable ones (a custom op needs an ONNX "
        "translation)"
    )


def _error_text(e: BaseException) -> str:
    """The exception's message plus those of its causes, where the op name usually sits."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def _first_line(text: str, limit: int = 300) -> str:
    """The most telling line of an exporter message: skip banners, colour codes and empty lines."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    summary = re.search(r"## Exception summary\s*\n\s*(.+)", text)  # the dynamo exporter's own digest
    if summary:
        text = re.sub(r"<class '(?:[\w]+\.)*(\w+)'>", r"\1", summary.group(1))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Failed to export", "- ", "#", "The error above", "("))]
    line = (useful or lines or ["unknown error"])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporters print progress, warnings and whole graphs; errors still surface as exceptions."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


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
                      GraphoptWarning, stacklevel=3)
        return proto, None
    if not ok or count_qdq(simplified) < qdq_before:
        warnings.warn("graphopt.export_onnx: onnxsim removed QuantizeLinear/DequantizeLinear nodes or failed its "
                      "check; wrote the unsimplified model", GraphoptWarning, stacklevel=3)
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
