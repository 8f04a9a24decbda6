"""Old module paths of graphopt's flat layout, kept importable after the move into stage folders.

Files written by ``graphopt.save``, ``torch.save`` and ``pickle`` name the module of every class and function they
hold (``graphopt.graph_pickle.rebuild``, ``graphopt.graph_module.GraphoptModule``, ``graphopt.sparsity.WeightMask``):
those keep loading, and code importing an old path keeps working with a DeprecationWarning naming the new one.
Each old path is a light module in ``sys.modules`` that imports the new module on first attribute access only, so
the aliases cost nothing at import time and add no import edges between the stage folders.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings

MOVED = {
    "graphopt.blocks": "graphopt.analysis.blocks",
    "graphopt.cli_commands": "graphopt.cli.commands",
    "graphopt.cli_distributed": "graphopt.cli.distributed",
    "graphopt.cli_model": "graphopt.cli.models",
    "graphopt.demo": "graphopt.examples.demo",
    "graphopt.dependency": "graphopt.analysis.dependency",
    "graphopt.dependency.analysis": "graphopt.analysis.dependency.analysis",
    "graphopt.dependency.apply": "graphopt.analysis.dependency.apply",
    "graphopt.dependency.elements": "graphopt.analysis.dependency.elements",
    "graphopt.dependency.keys": "graphopt.analysis.dependency.keys",
    "graphopt.dependency.rules_elementwise": "graphopt.analysis.dependency.rules_elementwise",
    "graphopt.dependency.rules_layers": "graphopt.analysis.dependency.rules_layers",
    "graphopt.dependency.rules_shape": "graphopt.analysis.dependency.rules_shape",
    "graphopt.dependency.walk": "graphopt.analysis.dependency.walk",
    "graphopt.diagnose": "graphopt.util.diagnose",
    "graphopt.digits": "graphopt.examples.digits",
    "graphopt.distributed": "graphopt.util.distributed",
    "graphopt.export_compat": "graphopt.export.compat",
    "graphopt.export_formats": "graphopt.export.formats",
    "graphopt.fx_fallback": "graphopt.capture.fx_fallback",
    "graphopt.graph_json": "graphopt.result.graph_json",
    "graphopt.graph_module": "graphopt.graph.module",
    "graphopt.graph_pickle": "graphopt.graph.pickling",
    "graphopt.graph_utils": "graphopt.graph.nodes",
    "graphopt.guards": "graphopt.capture.guards",
    "graphopt.hf_capture": "graphopt.capture.hugging_face",
    "graphopt.hf_config": "graphopt.result.hf_config",
    "graphopt.importance": "graphopt.analysis.importance",
    "graphopt.inputs": "graphopt.graph.inputs",
    "graphopt.instruments": "graphopt.pipeline.instruments",
    "graphopt.layers": "graphopt.graph.layers",
    "graphopt.lower": "graphopt.export.streamline",
    "graphopt.metrics": "graphopt.pipeline.metrics",
    "graphopt.onnx_io": "graphopt.export.onnx_io",
    "graphopt.onnx_verify": "graphopt.export.onnx_verify",
    "graphopt.pass_base": "graphopt.pipeline.pass_base",
    "graphopt.patterns": "graphopt.graph.patterns",
    "graphopt.plots": "graphopt.util.plots",
    "graphopt.progress": "graphopt.util.progress",
    "graphopt.quant.onnx_qdq": "graphopt.export.qdq_int8",
    "graphopt.registry": "graphopt.pipeline.registry",
    "graphopt.report": "graphopt.pipeline.report",
    "graphopt.saving": "graphopt.result.saving",
    "graphopt.saving_modules": "graphopt.result.saving_modules",
    "graphopt.shapes": "graphopt.graph.shapes",
    "graphopt.sparsity": "graphopt.analysis.sparsity",
    "graphopt.trace": "graphopt.capture.tracing",
    "graphopt.writeback": "graphopt.result.writeback",
    "graphopt.writeback_sizes": "graphopt.result.writeback_sizes",
    "graphopt.writeback_structure": "graphopt.result.writeback_structure",
}
RENAMED = {"graphopt.lower": {"lower": "streamline"}}  # old module -> {old name: new name}


class MovedModule(types.ModuleType):
    """Stands for an old module path; public attributes come from the module's new home, with a warning."""

    def __init__(self, old: str, new: str):
        super().__init__(old, f"Moved to {new}.")
        self.__dict__["_new_home"] = new

    def __getattr__(self, name: str):
        if name.startswith("_"):  # tools probe modules for dunders and private hooks: no import, no warning
            raise AttributeError(name)
        new = self.__dict__["_new_home"]
        target = RENAMED.get(self.__name__, {}).get(name, name)
        warnings.warn(f"{self.__name__}.{name} moved to {new}.{target}; import it from there",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), target)


def install() -> None:
    """Register every old path (idempotent; a real module already imported under a path wins)."""
    for old, new in MOVED.items():
        sys.modules.setdefault(old, MovedModule(old, new))
