"""Pass instruments: what the manager does around every pass, each one job (MLIR's pass instrumentation).

The manager runs a pass and, after it, runs the graph once on the example inputs when an instrument asks
(``run_after`` says ``"fake"``: FakeTensors, shapes and MACs, no arithmetic; ``"real"``: numbers to compare). Each
instrument reads that one run and writes its fields of the pass's report line:

- ``Timing``: seconds inside ``Pass.run``;
- ``Metrics``: parameter counts, MACs (counted on the run) before and after;
- ``Verify``: the graph still runs, keeps its output shapes, ``modified=False`` is true, and a pass that promises
  ``preserves_semantics`` keeps the numbers (``max_abs_error``);
- ``DumpIR(folder)``: the graph's code before the pipeline and after every pass, one file each.

Write your own by subclassing ``Instrument`` and passing ``instruments=[...]`` to ``graphopt.optimize`` or
``PassManager``; hooks run in list order, built-in ones first, so yours see their fields.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from graphopt.errors import VerifyError
from graphopt.pipeline.metrics import count_params
from graphopt.pipeline.pass_base import Context, Pass, PassResult

__all__ = ["DumpIR", "GraphRun", "Instrument", "Metrics", "Timing", "Verify"]


@dataclass(frozen=True)
class GraphRun:
    """One run of the graph on the example inputs: its flat outputs (FakeTensors when ``fake``) and MACs."""

    outputs: list
    macs: int | None
    fake: bool


class Instrument:
    """Hooks around every pass; the defaults do nothing. ``fields`` is the pass's report line being filled in."""

    def needs_numbers_before(self, p: Pass) -> bool:
        """Whether the graph's real outputs must be known before ``p`` runs (to compare with after it)."""
        return False

    def run_after(self, p: Pass, result: PassResult) -> str | None:
        """``"real"``, ``"fake"`` or None: the graph run this instrument needs after ``p``."""
        return None

    def before_pipeline(self, gm: fx.GraphModule, ctx: Context, run: GraphRun | None) -> None:
        """Called once with the input graph (and its run, when one was made)."""

    def before_pass(self, p: Pass, gm: fx.GraphModule, ctx: Context) -> None:
        """Called just before ``p.run(gm, ctx)``."""

    def after_pass(self, p: Pass, result: PassResult, ctx: Context, before: GraphRun | None,
                   after: GraphRun | None, fields: dict[str, Any]) -> None:
        """Called after ``p`` returned ``result`` (already linted and recompiled); ``before``/``after``: the graph
        runs around it (``after`` is None when no instrument asked for one)."""


class Timing(Instrument):
    """Seconds spent in ``Pass.run``."""

    def before_pass(self, p, gm, ctx):
        self._start = time.perf_counter()

    def after_pass(self, p, result, ctx, before, after, fields):
        fields["seconds"] = time.perf_counter() - self._start


class Metrics(Instrument):
    """Parameters before/after every pass; MACs from the graph runs around it (None where there was no run)."""

    def before_pass(self, p, gm, ctx):
        self._params = count_params(gm)

    def after_pass(self, p, result, ctx, before, after, fields):
        fields["params_before"], fields["params_after"] = self._params, count_params(result.gm)
        fields["macs_before"] = before.macs if before is not None else None
        fields["macs_after"] = after.macs if after is not None else fields["macs_before"]


_TOLERANCE = {  # (rtol, atol as a fraction of the output's magnitude)
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (1e-2, 1e-2),
}


class Verify(Instrument):
    """The graph after every pass runs on the example inputs with the same output shapes; ``modified=False``
    means unchanged code; ``preserves_semantics`` passes keep the outputs within ``tolerance`` (rtol, atol as a
    fraction of the output's magnitude, per dtype)."""

    def __init__(self, tolerance: dict | None = None):
        self.tolerance = {**_TOLERANCE, **(tolerance or {})}

    def needs_numbers_before(self, p):
        return p.preserves_semantics

    def run_after(self, p, result):
        return "real" if p.preserves_semantics and result.modified else "fake"

    def before_pass(self, p, gm, ctx):
        self._code = gm.code

    def after_pass(self, p, result, ctx, before, after, fields):
        if not result.modified and result.gm.code != self._code:
            raise VerifyError(
                f"pass '{p.name}' reported modified=False but changed the graph; "
                "return PassResult(gm, modified=True, ...) whenever the graph changes"
            )
        if before is None or after is None:
            return
        check_same_shapes(p.name, before.outputs, after.outputs)
        if p.preserves_semantics and result.modified and not before.fake:
            fields["max_abs_error"] = self._compare(p.name, before.outputs, after.outputs)

    def _compare(self, pass_name: str, before: list, after: list) -> float:
        worst = 0.0
        for i, (a, b) in enumerate(zip(before, after)):
            if not a.is_floating_point():
                if not torch.equal(a, b):
                    raise VerifyError(f"pass '{pass_name}' changed integer output {i} it promised to preserve")
                continue
            rtol, atol = self.tolerance.get(a.dtype, _TOLERANCE[torch.float32])
            scale = float(a.abs().max()) if a.numel() else 1.0
            err = float((a - b).abs().max()) if a.numel() else 0.0
            worst = max(worst, err)
            if not torch.allclose(b, a, rtol=rtol, atol=atol * max(scale, 1.0), equal_nan=True):
                raise VerifyError(
                    f"pass '{pass_name}' promised to preserve semantics but changed output {i}: "
                    f"max abs error {err:.3g} (output magnitude {scale:.3g}, rtol {rtol}, atol {atol}); "
                    "fix the pass or declare preserves_semantics = False"
                )
        return worst


def check_same_shapes(pass_name: str, before: list, after: list) -> None:
    """Every pass keeps the model's outputs: their number, shapes and dtypes."""
    sig = lambda outs: [(tuple(t.shape), t.dtype) for t in outs]  # noqa: E731
    if sig(before) != sig(after):
        raise VerifyError(
            f"pass '{pass_name}' changed the model's outputs from {sig(before)} to {sig(after)}; "
            "passes must keep output shapes (exclude the output layer from the pass)"
        )


class DumpIR(Instrument):
    """Writes the graph's Python code to ``folder``: ``00-input.py``, then ``01-<pass>.py``... after each pass."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._index = 0

    def before_pipeline(self, gm, ctx, run):
        self.folder.mkdir(parents=True, exist_ok=True)
        self._index = 0
        self._write("input", gm)

    def after_pass(self, p, result, ctx, before, after, fields):
        self._index += 1
        self._write(p.name, result.gm)

    def _write(self, label: str, gm: fx.GraphModule) -> None:
        (self.folder / f"{self._index:02d}-{label}.py").write_text(gm.code)
