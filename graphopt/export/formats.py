"""Export formats: what ``export_onnx`` does beyond the float steps for a module a capability changed.

``export_onnx`` runs one path for every module: prepare, export, ``onnx.checker``, onnxsim, rewrite, save, verify
in onnxruntime. A capability that changes what the file must hold (int8 fake-quant: qdq_int8.py; packed int4/int8
weights: weight_quant.py) registers an ``ExportFormat``: when it ``applies`` to a module, the format ``prepare``s
the module to export (a converted copy), ``rewrite``s the simplified ModelProto given that copy (int8 weights as
int8 initializers, say), says which module onnxruntime must reproduce (``verify_against``: the prepared copy, or
the caller's module when the copy only exists to make the exporter write matmuls) and how its result is judged:
``"elementwise"`` (float: ``atol + rtol * |torch|``) or ``"sqnr"`` (quantized: integer kernels round differently
from the simulation, so the signal-to-noise ratio of onnxruntime against torch, and the top-1 agreement of the
outputs, are the honest measures). Formats are tried newest first; the float format applies to everything else.

This module imports nothing of graphopt's export or quant code, so every format builds on it (ExportError lives
here for that reason: a format's rewrite raises it, and export_onnx imports the formats).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch.nn as nn

from graphopt.errors import GraphoptError

__all__ = ["FLOAT", "ExportError", "ExportFormat", "format_for", "register_format"]


class ExportError(GraphoptError):
    """The ONNX exporter, ``onnx.checker`` or the file system refused the model; the message says what to try."""

    __module__ = "graphopt.export.onnx"  # its public home (re-exported there and as graphopt.ExportError)


def _same(module: nn.Module) -> nn.Module:
    return module


def _no_rewrite(proto, prepared: nn.Module) -> dict:
    return {}


@dataclass(frozen=True)
class ExportFormat:
    """One way a module is written to ONNX (see the module docstring)."""

    name: str
    applies: Callable[[nn.Module], bool]
    prepare: Callable[[nn.Module], nn.Module] = _same
    rewrite: Callable[[object, nn.Module], dict] = _no_rewrite  # (ModelProto, prepared) -> ExportReport fields
    check: Literal["elementwise", "sqnr"] = "elementwise"
    verify_against: Literal["prepared", "original"] = "prepared"


FLOAT = ExportFormat("float", lambda module: True)  # float weights, checked elementwise
_FORMATS: list[ExportFormat] = []


def register_format(fmt: ExportFormat) -> ExportFormat:
    """Make ``fmt`` available to ``export_onnx`` (a format of the same name is replaced)."""
    _FORMATS[:] = [f for f in _FORMATS if f.name != fmt.name]
    _FORMATS.insert(0, fmt)
    return fmt


def format_for(module: nn.Module) -> ExportFormat:
    """The newest registered format that applies to ``module``, else FLOAT."""
    return next((f for f in _FORMATS if f.applies(module)), FLOAT)
