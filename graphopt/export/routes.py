"""The routes ``export_onnx`` writes a file by: torch's two ONNX exporters, each with a dynamic or a static batch.

``exporter="auto"`` (the default) tries the torch.export-based exporter, then the TorchScript one, both with the
dynamic batch asked for; only where a dynamic batch is what failed (a guard or an invalid range on the batch dim,
a file that fixed the batch and fails at the second batch size) does it retry both with a static batch, the last
resort, which the report states (``dynamic_batch=False``). A route fails when its exporter, ``onnx.checker``, a
format's rewrite or the second-batch check fails; the first error of each route is kept, and when every route
fails one ExportError lists them. A numeric disagreement at the example batch is not a route failure: it is raised
as it is (the file stays for inspection). ``exporter="dynamo"`` / ``"legacy"`` force one route and raise its error
unchanged.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, TypeVar

import torch
import torch.fx.experimental._config as fx_config
import torch.nn as nn
from torch.export import Dim

from graphopt.errors import GraphoptWarning
from graphopt.export.formats import ExportError
from graphopt.export.onnx_translations import custom_translations
from graphopt.export.onnx_io import FlatIO, ensure_fake_quant_meta_kernels, set_batch_dim_name
from graphopt.export.onnx_verify import BatchSizeError

Exporter = Literal["auto", "dynamo", "legacy"]
EXPORTERS = ("auto", "dynamo", "legacy")
T = TypeVar("T")

__all__ = ["EXPORTERS", "Exporter", "Route", "export_proto", "first_working", "mode_switches_as_flags", "plan_routes"]


@dataclass(frozen=True)
class Route:
    """One way to write the file: an exporter and whether the batch dim is symbolic."""

    exporter: Literal["dynamo", "legacy"]
    dynamic_batch: bool

    def __str__(self) -> str:
        return f"{self.exporter} ({'dynamic' if self.dynamic_batch else 'static'} batch)"


def plan_routes(exporter: Exporter, dynamic_batch: bool) -> list[Route]:
    """The routes to try, in order: one when forced; for "auto" both exporters, then both with a static batch."""
    if exporter != "auto":
        return [Route(exporter, dynamic_batch)]
    routes = [Route("dynamo", dynamic_batch), Route("legacy", dynamic_batch)]
    return routes + ([Route("dynamo", False), Route("legacy", False)] if dynamic_batch else [])


_BATCH_TROUBLE = re.compile(r"Guard failed|Invalid ranges|Constraints? violat|ConstraintViolation|specializ|"
                            r"dynamic_shapes|fixed the batch|fixed a dimension|refuses batch", re.IGNORECASE)


def batch_related(error: BaseException) -> bool:
    """Whether a route failed because of its dynamic batch (so a static batch may still export)."""
    return isinstance(error, BatchSizeError) or bool(_BATCH_TROUBLE.search(_error_text(error)))


def first_working(routes: list[Route], attempt: Callable[[Route], T], model_name: str
                  ) -> tuple[T, Route, tuple[tuple[str, str | None], ...]]:
    """``attempt(route)`` for each route until one returns; (its result, the route, every route tried with its
    one-line failure, None for the one that worked). One route: its error is raised unchanged; several: an
    ExportError listing each. Static-batch routes run only after a dynamic one failed for its batch."""
    tried: list[tuple[Route, BaseException]] = []
    for route in routes:
        dynamic_failed = [e for r, e in tried if r.dynamic_batch]
        if not route.dynamic_batch and dynamic_failed and not any(map(batch_related, dynamic_failed)):
            continue
        if route.dynamic_batch and any(getattr(e, "module_refuses", False) for e in dynamic_failed):
            continue  # torch itself refuses a second batch size: no exporter can keep it dynamic
        try:
            result = attempt(route)
        except (ExportError, BatchSizeError) as e:
            if len(routes) == 1:
                raise
            tried.append((route, e))
            continue
        if tried and not route.dynamic_batch and any(r.dynamic_batch for r, _ in tried):
            warnings.warn(f"graphopt.export_onnx: {model_name} exports with a dynamic batch by no route "
                          f"({'; '.join(f'{r}: {one_line(e, 160)}' for r, e in tried)}); wrote a file "
                          "with the static batch of the example inputs (report.dynamic_batch is False)",
                          GraphoptWarning, stacklevel=3)
        return result, route, tuple((str(r), one_line(e)) for r, e in tried) + ((str(route), None),)
    raise _all_failed(tried, model_name) from tried[0][1]


def one_line(error: BaseException, limit: int = 300) -> str:
    """A route's failure in one line: the message's telling line, without its advice."""
    return _first_line(str(error).split(" What you can do:")[0].split("; What you can do")[0], limit)


def _all_failed(tried: list[tuple[Route, BaseException]], model_name: str) -> ExportError:
    lines = "\n".join(f"  {route}: {one_line(e, 400)}" for route, e in tried)
    return ExportError(
        f"export_onnx could not export {model_name} by any route ({len(tried)} tried):\n{lines}\nWhat you can do: "
        "replace the op at fault with ONNX-exportable ones (a custom op needs an ONNX translation), try another "
        "opset=..., or force one route with exporter='dynamo' or 'legacy' to see its full error"
    )


def export_proto(flat: FlatIO, batched: list[bool], opset: int | None, exporter: str, model_name: str):
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
            custom_translation_table=custom_translations() or None,
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
    with mode_switches_as_flags(flat):
        torch.onnx.export(
            flat, tuple(flat.tensors), buffer, dynamo=False, opset_version=opset, input_names=flat.input_names,
            output_names=flat.output_names, dynamic_axes=axes or None, verbose=False,
            training=torch.onnx.TrainingMode.PRESERVE,  # torch.export's modules refuse .train(); they are eval already
        )
    return onnx.load_model_from_string(buffer.getvalue())


@contextlib.contextmanager
def mode_switches_as_flags(module: nn.Module) -> Iterator[None]:
    """Within the context, modules that refuse ``train()``/``eval()`` take them as a flag change.

    torch.export's unlifted modules (``ExportedProgram.module()``) carry instance ``train``/``eval`` attributes
    that raise NotImplementedError, so ``.eval()`` on any module holding one fails, and so does any part of the
    TorchScript path that switches modes. Their graph fixes the mode whatever the flag says, so setting the flag
    is all a switch can mean for them. Other modules keep their own ``train`` (graphopt's rewrite BatchNorm nodes).
    """
    saved = [(m, vars(m)["train"], vars(m).get("eval")) for m in module.modules() if "train" in vars(m)]
    for m, _, _ in saved:
        m.train, m.eval = _flag_switches(m)
    try:
        yield
    finally:
        for m, train, evaluate in saved:
            m.train = train
            if evaluate is None:
                vars(m).pop("eval", None)
            else:
                m.eval = evaluate


def _flag_switches(module: nn.Module) -> tuple[Callable, Callable]:
    def train(mode: bool = True) -> nn.Module:
        for m in module.modules():
            m.training = mode
        return module

    return train, lambda: train(False)


_OP_PATTERNS = (
    re.compile(r"target=(torch\.ops\.[\w.]+)"),
    re.compile(r"OpOverload\(op='([\w.:]+)'"),
    re.compile(r"Unsupported: .*?operator ([\w.:]+)"),
    re.compile(r"Exporting the operator '([\w.:]+)'"),  # the legacy exporter's wordings
    re.compile(r"unrecognized namespace ([\w.:]+)"),
    re.compile(r"(aten::\w+|aten\.\w+(?:\.\w+)?)"),  # last: any ATen name in the text
)
_NODE_PATTERN = re.compile(r"%(\w+)\s*:")


def _exporter_error(e: BaseException, exporter: str, model_name: str) -> ExportError:
    text = _error_text(e)
    op = next((m.group(1) for p in _OP_PATTERNS if (m := p.search(text))), None)
    node = _NODE_PATTERN.search(text)
    where = " at " + ", ".join(filter(None, (f"node `{node.group(1)}`" if node else None,
                                             f"op `{op}`" if op else None))) if (op or node) else ""
    other = ("exporter='legacy' (the TorchScript exporter)" if exporter == "dynamo"
             else "exporter='dynamo' (the torch.export-based exporter)")
    reason = _first_line(text)
    return ExportError(
        f"the {exporter} ONNX exporter could not export {model_name}{where}: {reason}. What you can do: try "
        f"{other} or exporter='auto' (tries both), a different opset=..., or replace the op with ONNX-exportable "
        "ones (a custom op needs an ONNX translation)"
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
