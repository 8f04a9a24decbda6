"""graphopt: trace a PyTorch model into an ATen graph, transform it with ordered, verified passes, export it.

The folders read as the flow: capture/ (model -> graph) -> analysis/ (coupled channels, blocks, importance) ->
pipeline/ (the pass manager; the passes are graphopt.passes) -> export/ (ONNX, the streamlined eager module) ->
result/ (your own model back, save/load). graph/ is the IR they share, util/ the helpers under everything; quant/
is the library the fake-quant pass builds on; cli/ and examples/ sit on top.
"""

from graphopt import _moved

_moved.install()  # old flat module paths (graphopt.graph_pickle, ...) keep resolving, e.g. for saved files

from graphopt.api import OptimizeResult, optimize  # noqa: E402
from graphopt.capture.tracing import trace  # noqa: E402
from graphopt.errors import (  # noqa: E402
    GraphoptError, GraphoptWarning, InputError, PassError, PipelineError, TraceError, VerifyError,
)
from graphopt.export.onnx import ExportError, ExportReport, export_onnx  # noqa: E402
from graphopt.export.streamline import streamline  # noqa: E402
from graphopt.pipeline.instruments import Instrument  # noqa: E402
from graphopt.pipeline.manager import Context, Pass, PassManager, PassResult  # noqa: E402
from graphopt.pipeline.metrics import (  # noqa: E402
    count_macs, count_params, measure_latency, model_bytes, paired_latency,
)
from graphopt.pipeline.registry import parse_pipeline, register_pass, registered_passes  # noqa: E402
from graphopt.pipeline.report import PassRecord, Report  # noqa: E402
from graphopt.result.hf_quant import load_pretrained  # noqa: E402
from graphopt.result.saving import LoadError, SaveError, load, save  # noqa: E402
from graphopt.training.loop import finetune  # noqa: E402

import graphopt.passes  # noqa: E402,F401  (registers the built-in passes)

if "transformers" in __import__("sys").modules:  # from_pretrained can then read graphopt-quantized checkpoints
    from graphopt.result.hf_quant import register as _register_hf_quantizer

    _register_hf_quantizer()

__all__ = [
    "Context", "ExportError", "ExportReport", "GraphoptError", "GraphoptWarning", "InputError", "Instrument",
    "LoadError", "OptimizeResult", "Pass", "PassError", "PassManager", "PassRecord", "PassResult", "PipelineError",
    "Report", "SaveError", "TraceError", "VerifyError", "count_macs", "count_params", "export_onnx", "finetune",
    "load", "load_pretrained", "measure_latency", "model_bytes", "optimize", "paired_latency", "parse_pipeline", "register_pass",
    "registered_passes", "save", "streamline", "trace",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "lower":  # renamed: "lower" now means only swapping in kernels (the lower-sparse pass)
        import warnings

        warnings.warn("graphopt.lower is now graphopt.streamline", DeprecationWarning, stacklevel=2)
        return streamline
    raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
