"""The manager that runs passes in order, with instruments around each one (graphopt/pipeline/instruments.py).

The list order IS the schedule: declared ``after``/``before`` constraints are checked before anything runs and a
violation is an error, never a silent re-sort. For every pass the manager computes the analyses it ``requires``,
runs it (refusing nested pass calls, see pipeline/pass_base.py), keeps the analyses it ``preserves`` and drops the others,
lints and recompiles the graph, runs it once on the example inputs if an instrument asks (FakeTensors unless
numbers are needed: shapes into ``node.meta``, MACs counted on the same run) and hands that run to the
instruments: timing, metrics, verification, IR dumps, the user's own.
"""

from __future__ import annotations

from typing import Sequence

import torch.fx as fx

from graphopt.errors import GraphoptError, PassError, PipelineError, VerifyError
from graphopt.pipeline.instruments import DumpIR, GraphRun, Instrument, Metrics, Timing, Verify
from graphopt.pipeline.metrics import counting_macs
from graphopt.pipeline.pass_base import Context, Pass, PassResult, running_pass
from graphopt.pipeline.registry import resolve_pass
from graphopt.pipeline.report import PassRecord, Report
from graphopt.graph.shapes import GraphRunError, is_fake, propagate
from graphopt.graph.nodes import hoist_get_attrs, sink_get_attrs

__all__ = ["Context", "Pass", "PassManager", "PassResult", "check_order"]


class PassManager:
    """Runs passes in the given order with instruments around each; ``run`` returns the graph and a Report.

    ``verify=False`` drops the Verify instrument (and with it the graph runs, so MACs are not counted);
    ``instruments`` are added after the built-in ones (Timing, Metrics, Verify); ``dump_ir`` adds DumpIR(folder).
    """

    def __init__(self, passes: Sequence[Pass | str], *, verify: bool = True, tolerance: dict | None = None,
                 instruments: Sequence[Instrument] = (), dump_ir: str | None = None):
        self.passes = [resolve_pass(p) for p in passes]
        self.verify = verify
        builtin: list[Instrument] = [Timing(), Metrics()] + ([Verify(tolerance)] if verify else [])
        self.instruments = builtin + list(instruments) + ([DumpIR(dump_ir)] if dump_ir else [])
        check_order(self.passes)

    def run(self, gm: fx.GraphModule, ctx: Context) -> tuple[fx.GraphModule, Report]:
        """Apply every pass to ``gm`` in order; raise PassError/VerifyError naming the pass that failed."""
        report = Report(capture=gm.meta.get("graphopt_capture", "unknown"))
        last = self._graph_run(gm, ctx, "<input graph>", "fake") if self._any_run() else None
        for inst in self.instruments:
            inst.before_pipeline(gm, ctx, last)
        for p in self.passes:
            if last is not None and last.fake and any(i.needs_numbers_before(p) for i in self.instruments):
                last = self._graph_run(gm, ctx, f"<input of {p.name}>", "real")
            record, gm, last = self._run_one(p, gm, ctx, last)
            report.records.append(record)
        return gm, report

    def _any_run(self) -> bool:
        return any(type(i).run_after is not Instrument.run_after for i in self.instruments)

    def _run_one(self, p: Pass, gm: fx.GraphModule, ctx: Context, before: GraphRun | None):
        was_sunk = hoist_get_attrs(gm.graph)  # passes see every weight read at the top; see sink_get_attrs
        for kind in p.requires:  # provided before the pass (and before its clock starts)
            ctx.analysis(kind, gm)
        for inst in self.instruments:
            inst.before_pass(p, gm, ctx)
        ctx.gm = gm
        try:
            with running_pass(p):
                result = p.run(gm, ctx)
        except GraphoptError:
            raise
        except Exception as e:
            raise PassError(f"pass '{p.name}' failed: {type(e).__name__}: {e}") from e
        finally:
            ctx.gm = None
        if not isinstance(result, PassResult):
            raise PassError(f"pass '{p.name}' returned {type(result).__name__}; return PassResult(gm, modified, stats)")
        ctx.carry_over(gm, result.gm, keep=p.preserves if result.modified else tuple(ctx._analyses))
        try:
            result.gm.graph.lint()
        except Exception as e:
            raise VerifyError(f"pass '{p.name}' left an invalid graph: {e}") from e
        if result.modified or was_sunk:  # a pass that changed nothing leaves the graph as it found it
            sink_get_attrs(result.gm.graph)
        result.gm.recompile()
        modes = {i.run_after(p, result) for i in self.instruments} - {None}
        after = self._graph_run(result.gm, ctx, p.name, "real" if "real" in modes else "fake") if modes else None
        fields: dict = {}
        for inst in self.instruments:
            inst.after_pass(p, result, ctx, before, after, fields)
        record = PassRecord(p.name, fields.get("seconds", 0.0), result.modified, fields.get("params_before", 0),
                            fields.get("params_after", 0), fields.get("macs_before"), fields.get("macs_after"),
                            dict(result.stats), fields.get("max_abs_error"), dict(result.decisions))
        return record, result.gm, after if after is not None else before

    def _graph_run(self, gm, ctx: Context, pass_name: str, mode: str) -> GraphRun:
        """Run the graph (on FakeTensors unless ``mode`` is "real" or a real run is the cheaper one): shapes into
        meta, MACs, outputs."""
        fake = mode != "real" and not _real_run_is_cheaper(gm)
        try:
            with counting_macs() as macs:
                outputs = propagate(gm, ctx.inputs, fake=fake)
        except GraphRunError as e:
            if fake:  # opaque code (a leaf module using numpy, say) cannot run on FakeTensors: run it for real
                return self._graph_run(gm, ctx, pass_name, "real")
            raise VerifyError(
                f"pass '{pass_name}' produced a graph that fails on the example inputs: {e}"
            ) from e.__cause__
        return GraphRun(outputs, macs(), is_fake(outputs))


# FakeTensor propagation costs 0.4-3 ms per op here (measured on the test zoo, ResNet-50, MobileNetV2, batch 1-2),
# where a real run of the same graphs was 2-10x faster; FakeTensors win only when the arithmetic is heavy (a large
# model on long inputs). The capture timed its own real run (graphopt_real_run_seconds): compare with this.
_FAKE_SECONDS_PER_OP = 1.5e-3


def _real_run_is_cheaper(gm: fx.GraphModule) -> bool:
    seconds = gm.meta.get("graphopt_real_run_seconds") if hasattr(gm, "meta") else None
    if seconds is None:
        return False
    ops = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    return seconds < _FAKE_SECONDS_PER_OP * ops


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
