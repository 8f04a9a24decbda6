"""graphopt: trace a PyTorch model into an ATen graph, transform it with ordered, verified passes, export it."""

from graphopt.api import OptimizeResult, optimize
from graphopt.errors import (
    GraphoptError, GraphoptWarning, InputError, PassError, PipelineError, TraceError, VerifyError,
)
from graphopt.export import ExportError, ExportReport, export_onnx
from graphopt.instruments import Instrument
from graphopt.lower import lower
from graphopt.metrics import count_macs, count_params, measure_latency, model_bytes, paired_latency
from graphopt.pipeline import Context, Pass, PassManager, PassResult
from graphopt.registry import parse_pipeline, register_pass, registered_passes
from graphopt.report import PassRecord, Report
from graphopt.saving import LoadError, SaveError, load, save
from graphopt.training import finetune
from graphopt.trace import trace

import graphopt.passes  # noqa: E402,F401  (registers the built-in passes)

__all__ = [
    "Context", "ExportError", "ExportReport", "GraphoptError", "GraphoptWarning", "InputError", "Instrument", "OptimizeResult", "Pass", "PassError", "PassManager", "PassRecord",
    "PassResult", "PipelineError", "Report", "TraceError", "VerifyError", "count_macs", "count_params",
    "export_onnx",
    "LoadError", "SaveError", "finetune", "load", "save",
    "lower", "measure_latency", "model_bytes", "optimize", "paired_latency", "parse_pipeline", "register_pass",
    "registered_passes", "trace",
]
__version__ = "0.1.0"
