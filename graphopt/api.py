"""``graphopt.optimize``: copy, trace, run the pass pipeline, report."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch.fx as fx
import torch.nn as nn

from graphopt import distributed
from graphopt.instruments import Instrument
from graphopt.pipeline import Context, Pass, PassManager
from graphopt.registry import parse_pipeline
from graphopt.report import Report
from graphopt.trace import Capture, trace
from graphopt.writeback import snapshot


@dataclass
class OptimizeResult:
    """The optimized module (called like the original model) and the per-pass report."""

    module: fx.GraphModule
    report: Report
    _original: nn.Module | None = field(default=None, repr=False)  # the caller's model (never changed)
    _snapshot: Any = field(default=None, repr=False)  # the captured graph before any pass (graphopt.writeback)
    _inputs: Any = field(default=None, repr=False)

    def to_model(self, *, verify: bool = True) -> nn.Module:
        """The user's own model back: a copy of the model given to ``optimize``, the same class, with every change
        of the pipeline applied to its modules (sliced weights, size attributes, removed blocks, low-rank layers,
        folded norms, sparsity masks; an HF model's ``config``). With ``verify`` it is run on the example inputs
        and a second batch size and must match ``self.module``, else WritebackError names the module at fault."""
        from graphopt.errors import WritebackError
        from graphopt.writeback import to_model

        if self._original is None or self._snapshot is None:
            raise WritebackError("to_model() needs the result of graphopt.optimize in this process (a result "
                                 "loaded with graphopt.load has no model to write back into); use result.module")
        return to_model(self.module, self._original, self._snapshot, self._inputs, verify=verify)

    @property
    def capture(self) -> str:
        """Which route captured the model: 'export', 'export-static' or 'symbolic_trace'."""
        return self.report.capture

    def __str__(self) -> str:
        return str(self.report)


def optimize(
    model: nn.Module,
    passes: Sequence[Pass | str] | str = (),
    example_inputs: Any = None,
    *,
    calib_data: Iterable | None = None,
    verify: bool = True,
    capture: Capture = "auto",
    leaf_modules: Sequence[type] = (),
    dynamic: bool = True,
    graph: fx.GraphModule | None = None,
    instruments: Sequence[Instrument] = (),
    dump_ir: str | None = None,
) -> OptimizeResult:
    """Trace ``model`` on ``example_inputs`` and run ``passes`` in order; the caller's model is never changed.

    ``passes`` are Pass objects or strings (``"fuse"``, ``"prune-channels:ratio=0.5"``, or one comma-separated
    string). ``calib_data`` is an iterable of input batches for data-driven passes. With ``verify`` the manager
    checks the graph after every pass (see PassManager).

    ``graph``: a capture of this model on these inputs made earlier with ``graphopt.trace`` (a copy of it is
    used, so several pipelines can share one capture, the slow step on large models).

    ``instruments``: your own ``graphopt.Instrument`` hooks around every pass (graphopt/instruments.py);
    ``dump_ir``: a folder that gets the graph's code before the pipeline and after every pass.

    Inside a ``torch.distributed`` job every rank calls this with the same model and its own ``calib_data``:
    statistics are combined over all ranks and every rank gets the same plan (see graphopt.distributed).
    """
    manager = PassManager(parse_pipeline(passes) if isinstance(passes, str) else passes, verify=verify,
                          instruments=instruments, dump_ir=dump_ir)
    gm = copy.deepcopy(graph) if graph is not None else \
        trace(model, example_inputs, capture=capture, leaf_modules=leaf_modules, dynamic=dynamic)
    distributed.check_same_weights(gm)
    snap = snapshot(gm, model)
    ctx = Context(example_inputs, calib_data=calib_data)
    gm, report = manager.run(gm, ctx)
    return OptimizeResult(gm, report, model, snap, ctx.inputs)
