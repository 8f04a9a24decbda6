"""Passes and the manager that runs them in order, verifying the graph after each one.

The list order IS the schedule: declared ``after``/``before`` constraints are checked before anything runs and a
violation is an error, never a silent re-sort. After every pass the manager lints, recompiles, re-runs the graph
on the example inputs (shapes into ``node.meta``, MACs counted on the same run; on FakeTensors, so no arithmetic,
unless numbers are needed) and, for passes that promise to preserve semantics, compares real outputs with the
graph before the pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

import torch
import torch.fx as fx

from graphopt.errors import GraphoptError, PassError, PipelineError, VerifyError
from graphopt.inputs import ExampleInputs
from graphopt.metrics import count_params, counting_macs
from graphopt.report import PassRecord, Report
from graphopt.shapes import GraphRunError, is_fake, propagate


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly new) graph, whether it changed anything, and pass-specific stats."""

    gm: fx.GraphModule
    modified: bool
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    """Base of every pass: a frozen dataclass whose fields are its options.

    Class-level declarations: ``name`` (registry key), ``requires`` (analyses it reads), ``preserves`` (analyses
    it keeps valid), ``after``/``before`` (names of passes it must follow/precede when both are scheduled),
    ``preserves_semantics`` (the manager then checks that outputs do not change).
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[type, ...]] = ()
    preserves: ClassVar[tuple[type, ...]] = ()
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    preserves_semantics: ClassVar[bool] = False

    def run(self, gm: fx.GraphModule, ctx: "Context") -> PassResult:
        """Transform ``gm`` (in place or into a new GraphModule) and say what changed."""
        raise NotImplementedError(f"pass {type(self).__name__} does not implement run(gm, ctx)")


class Context:
    """Per-run state shared by passes: example inputs, calibration data, and a cache of analyses."""

    def __init__(self, example_inputs: Any, *, calib_data: Iterable | None = None):
        self.inputs = ExampleInputs.of(example_inputs)
        self.calib_data = calib_data
        self.gm: fx.GraphModule | None = None
        self._analyses: dict[type, Any] = {}

    def analysis(self, kind: type) -> Any:
        """The analysis ``kind(gm, ctx)`` of the current graph, computed once and cached until a pass changes it."""
        if self.gm is None:
            raise PipelineError("ctx.analysis() is only available while a pass runs under a PassManager")
        if kind not in self._analyses:
            self._analyses[kind] = kind(self.gm, self)
        return self._analyses[kind]

    def invalidate(self, keep: Sequence[type] = ()) -> None:
        """Drop cached analyses except those in ``keep``."""
        self._analyses = {k: v for k, v in self._analyses.items() if k in keep}


_TOLERANCE = {  # (rtol, atol as a fraction of the output's magnitude)
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (1e-2, 1e-2),
}


class PassManager:
    """Runs passes in the given order, verifying after each one; ``run`` returns the graph and a Report."""

    def __init__(self, passes: Sequence[Pass | str], *, verify: bool = True, tolerance: dict | None = None):
        from graphopt.registry import resolve_pass

        self.passes = [resolve_pass(p) for p in passes]
        self.verify = verify
        self.tolerance = {**_TOLERANCE, **(tolerance or {})}
        check_order(self.passes)

    def run(self, gm: fx.GraphModule, ctx: Context) -> tuple[fx.GraphModule, Report]:
        """Apply every pass to ``gm`` in order; raise PassError/VerifyError naming the pass that failed."""
        report = Report(capture=gm.meta.get("graphopt_capture", "unknown"))
        outputs, macs = self._measure(gm, ctx, "<input graph>", fake=True) if self.verify else (None, None)
        for p in self.passes:
            if self.verify and p.preserves_semantics and is_fake(outputs):  # numbers to compare against
                outputs, macs = self._measure(gm, ctx, f"<input of {p.name}>", fake=False)
            record, gm, outputs, macs = self._run_one(p, gm, ctx, outputs, macs)
            report.records.append(record)
        return gm, report

    def _run_one(self, p: Pass, gm, ctx: Context, outputs, macs):
        params, code = count_params(gm), gm.code
        ctx.gm = gm
        start = time.perf_counter()
        try:
            result = p.run(gm, ctx)
        except GraphoptError:
            raise
        except Exception as e:
            raise PassError(f"pass '{p.name}' failed: {type(e).__name__}: {e}") from e
        finally:
            ctx.gm = None
        seconds = time.perf_counter() - start
        if not isinstance(result, PassResult):
            raise PassError(f"pass '{p.name}' returned {type(result).__name__}; return PassResult(gm, modified, stats)")
        new = result.gm
        if result.modified:
            ctx.invalidate(keep=p.preserves)
        new_outputs, new_macs, diff = outputs, macs, None
        if self.verify:
            new_outputs, new_macs, diff = self._verify(p, new, ctx, outputs, result.modified, code)
        record = PassRecord(p.name, seconds, result.modified, params, count_params(new), macs, new_macs,
                            dict(result.stats), diff)
        return record, new, new_outputs, new_macs

    def _verify(self, p: Pass, gm, ctx, before, modified: bool, code_before: str):
        try:
            gm.graph.lint()
        except Exception as e:
            raise VerifyError(f"pass '{p.name}' left an invalid graph: {e}") from e
        gm.recompile()
        if not modified and gm.code != code_before:
            raise VerifyError(
                f"pass '{p.name}' reported modified=False but changed the graph; "
                "return PassResult(gm, modified=True, ...) whenever the graph changes"
            )
        compare = p.preserves_semantics and modified
        outputs, macs = self._measure(gm, ctx, p.name, fake=not compare)
        _check_same_shapes(p.name, before, outputs)
        diff = self._compare(p.name, before, outputs) if compare else None
        return outputs, macs, diff

    def _measure(self, gm, ctx: Context, pass_name: str, *, fake: bool):
        """Run the graph (on FakeTensors unless numbers are needed): shapes into meta, MACs, outputs."""
        try:
            with counting_macs() as macs:
                outputs = propagate(gm, ctx.inputs, fake=fake)
        except GraphRunError as e:
            if fake:  # opaque code (a leaf module using numpy, say) cannot run on FakeTensors: run it for real
                return self._measure(gm, ctx, pass_name, fake=False)
            raise VerifyError(
                f"pass '{pass_name}' produced a graph that fails on the example inputs: {e}"
            ) from e.__cause__
        return outputs, macs()

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


def _check_same_shapes(pass_name: str, before: list | None, after: list) -> None:
    """Every pass keeps the model's outputs: their number, shapes and dtypes."""
    if before is None:
        return
    sig = lambda outs: [(tuple(t.shape), t.dtype) for t in outs]  # noqa: E731
    if sig(before) != sig(after):
        raise VerifyError(
            f"pass '{pass_name}' changed the model's outputs from {sig(before)} to {sig(after)}; "
            "passes must keep output shapes (exclude the output layer from the pass)"
        )


def check_order(passes: Sequence[Pass]) -> None:
    """Raise PipelineError if any declared after/before constraint is violated by the list order."""
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, p in enumerate(passes):
        first.setdefault(p.name, i)
        last[p.name] = i
    for i, p in enumerate(passes):
        for other in p.after:
            j = last.get(other)
            if j is not None and j > i:
                raise PipelineError(
                    f"pass '{p.name}' must run after '{other}', but '{other}' comes later in the list; "
                    f"move '{other}' before '{p.name}'"
                )
        for other in p.before:
            j = first.get(other)
            if j is not None and j < i:
                raise PipelineError(
                    f"pass '{p.name}' must run before '{other}', but '{other}' comes earlier in the list; "
                    f"move '{p.name}' before '{other}'"
                )
