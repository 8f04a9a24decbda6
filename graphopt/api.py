"""``graphopt.optimize``: copy, trace, run the pass pipeline, report."""

from __future__ import annotations

import copy
from typing import Any, Iterable, Sequence

import torch.fx as fx
import torch.nn as nn

from graphopt.util import distributed
from graphopt.pipeline.instruments import Instrument
from graphopt.pipeline.manager import Context, Pass, PassManager
from graphopt.pipeline.registry import parse_pipeline
from graphopt.capture.tracing import Capture, trace
from graphopt.result.optimize_result import OptimizeResult
from graphopt.result.writeback import snapshot

__all__ = ["OptimizeResult", "optimize"]


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

    ``instruments``: your own ``graphopt.Instrument`` hooks around every pass (graphopt/pipeline/instruments.py);
    ``dump_ir``: a folder that gets the graph's code before the pipeline and after every pass.

    Inside a ``torch.distributed`` job every rank calls this with the same model and its own ``calib_data``:
    statistics are combined over all ranks and every rank gets the same plan (see graphopt.util.distributed).
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
