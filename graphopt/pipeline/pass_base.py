"""What a pass is: ``Pass``, its ``PassResult``, and the ``Context`` a run shares (inputs, data, analyses).

This module imports nothing else of graphopt's pipeline, so passes, the registry and the manager all build on it
without importing each other. Two contracts live here because every pass inherits them:

- **Analyses are keyed by the graph they describe.** ``ctx.analysis(kind)`` (or ``ctx.analysis(kind, gm)`` for a
  graph the pass made itself) computes ``kind(gm, ctx)`` once per graph object; the manager drops an analysis after
  a pass that changed the graph, unless the pass lists it in ``preserves``, and computes the ones a pass lists in
  ``requires`` before it runs. A pass that changes the graph and then wants the analysis of the new state calls
  ``ctx.invalidate()`` first.
- **A pass never runs another pass.** ``Pass.run`` called while a different pass is running under a manager
  raises PipelineError: share the function both need (``fuse_batch_norms`` in graphopt/graph/batch_norm.py, say), or schedule
  the other pass first. The manager, not a pass, is what makes a pass visible (verification, report line).
"""

from __future__ import annotations

import contextvars
import functools
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

import torch.fx as fx

from graphopt.errors import PipelineError
from graphopt.graph.inputs import ExampleInputs

__all__ = ["Context", "Pass", "PassResult", "running_pass"]

_RUNNING: contextvars.ContextVar["Pass | None"] = contextvars.ContextVar("graphopt_running_pass", default=None)


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly new) graph, whether it changed anything, pass-specific stats, and
    ``decisions``: per layer (or block) name, what the pass did to it or why it left it alone, in words
    (``{"layer1.0.conv1": "out 64 -> 32"}``, ``{"fc": "ignored"}``); the report, its JSON and the CLI show them."""

    gm: fx.GraphModule
    modified: bool
    stats: dict = field(default_factory=dict)
    decisions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    """Base of every pass: a frozen dataclass whose fields are its options.

    Class-level declarations: ``name`` (registry key), ``requires`` (analyses the manager computes before the pass
    runs, read with ``ctx.analysis``), ``preserves`` (analyses still valid after it changed the graph; all others
    are dropped), ``after``/``before`` (names of passes it must follow/precede when both are scheduled),
    ``preserves_semantics`` (the manager then checks that outputs do not change).
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[type, ...]] = ()
    preserves: ClassVar[tuple[type, ...]] = ()
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    preserves_semantics: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "run" in cls.__dict__:
            cls.run = _refusing_nested_runs(cls.__dict__["run"])

    def run(self, gm: fx.GraphModule, ctx: "Context") -> PassResult:
        """Transform ``gm`` (in place or into a new GraphModule) and say what changed."""
        raise NotImplementedError(f"pass {type(self).__name__} does not implement run(gm, ctx)")


def _refusing_nested_runs(run):
    @functools.wraps(run)
    def guarded(self, gm, ctx):
        outer = _RUNNING.get()
        if outer is not None and outer is not self:
            raise PipelineError(
                f"pass '{outer.name}' called pass '{self.name}' directly; a pass never runs another pass (it would "
                f"skip verification and the report): call the function both need, or schedule '{self.name}' "
                f"before '{outer.name}' in the pipeline"
            )
        if outer is self:  # under a manager (it keeps the analyses the pass preserves) or super().run()
            return run(self, gm, ctx)
        with running_pass(self):  # called directly, outside a manager: the same contracts
            result = run(self, gm, ctx)
        if isinstance(result, PassResult) and isinstance(ctx, Context):
            ctx.carry_over(gm, result.gm, keep=self.preserves if result.modified else tuple(ctx._analyses))
        return result

    return guarded


class running_pass:  # noqa: N801  (a context manager used like a function)
    """Context manager the manager wraps each ``p.run`` in, so nested pass calls can be refused."""

    def __init__(self, p: Pass):
        self.p = p

    def __enter__(self):
        self._token = _RUNNING.set(self.p)
        return self.p

    def __exit__(self, *exc):
        _RUNNING.reset(self._token)
        return False


class Context:
    """Per-run state shared by passes: example inputs, calibration data, and analyses keyed by graph."""

    def __init__(self, example_inputs: Any, *, calib_data: Iterable | None = None):
        self.inputs = ExampleInputs.of(example_inputs)
        self.calib_data = calib_data
        self.gm: fx.GraphModule | None = None  # the graph the running pass was given (set by the manager)
        self._analyses: dict[type, tuple[weakref.ref, Any]] = {}

    def analysis(self, kind: type, gm: fx.GraphModule | None = None) -> Any:
        """``kind(gm, ctx)`` for ``gm`` (default: the graph the running pass was given), computed once per graph
        and kept until a pass changes that graph without listing ``kind`` in ``preserves``."""
        gm = gm if gm is not None else self.gm
        if gm is None:
            raise PipelineError("ctx.analysis() needs a graph: call it inside a pass under a PassManager, or pass gm=")
        cached = self._analyses.get(kind)
        if cached is not None and cached[0]() is gm:
            return cached[1]
        value = kind(gm, self)
        self._analyses[kind] = (weakref.ref(gm), value)
        return value

    def cached(self, kind: type, gm: fx.GraphModule) -> bool:
        """Whether ``kind`` is cached for ``gm`` (no computation)."""
        entry = self._analyses.get(kind)
        return entry is not None and entry[0]() is gm

    def invalidate(self, keep: Sequence[type] = ()) -> None:
        """Drop cached analyses except those in ``keep``."""
        self._analyses = {k: v for k, v in self._analyses.items() if k in keep}

    def carry_over(self, old: fx.GraphModule, new: fx.GraphModule, keep: Sequence[type]) -> None:
        """After a pass: keep the analyses in ``keep`` that described ``old`` as describing ``new`` (the pass said
        they stay valid), drop the rest."""
        kept = {}
        for kind, (ref, value) in self._analyses.items():
            if kind in keep and ref() is old:
                kept[kind] = (weakref.ref(new), value)
        self._analyses = kept
