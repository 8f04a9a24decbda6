"""``OptimizeResult``: what ``graphopt.optimize`` returns (the optimized module, its report, the way back to the
user's own model class)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
import torch.nn as nn

from graphopt.errors import WritebackError
from graphopt.pipeline.report import Report
from graphopt.result.writeback import to_model


@dataclass
class OptimizeResult:
    """The optimized module (called like the original model) and the per-pass report."""

    module: fx.GraphModule
    report: Report
    _original: nn.Module | None = field(default=None, repr=False)  # the caller's model (never changed)
    _snapshot: Any = field(default=None, repr=False)  # the captured graph before any pass (graphopt.result.writeback)
    _inputs: Any = field(default=None, repr=False)

    def to_model(self, *, verify: bool = True) -> nn.Module:
        """The user's own model back: a copy of the model given to ``optimize``, the same class, with every change
        of the pipeline applied to its modules (sliced weights, size attributes, removed blocks, low-rank layers,
        folded norms, sparsity masks; an HF model's ``config``). With ``verify`` it is run on the example inputs
        and a second batch size and must match ``self.module``, else WritebackError names the module at fault."""
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
