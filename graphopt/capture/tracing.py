"""Capture a model into graphopt's one canonical IR: an unlifted ``torch.export`` graph of ATen ops.

Order of attempts: ``torch.export`` (non-strict) with the batch dim, and the sequence dim of integer token inputs,
left dynamic; the same with static shapes; then ``torch.fx.symbolic_trace`` normalized into the same ATen form
(see capture/fx_fallback.py). Which one worked is recorded in ``gm.meta["graphopt_capture"]``. Every node's shape and
dtype is recorded in ``node.meta["tensor_meta"]``, and the captured graph is checked against the eager model.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import re
import time
import warnings
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.fx as fx
import torch.fx.experimental._config as fx_config
import torch.nn as nn
from torch.export import Dim

from graphopt.util.diagnose import locate, module_stack, short_reason
from graphopt.errors import GraphoptWarning, InputError, TraceError
from graphopt.capture.fx_fallback import symbolic_capture
from graphopt.graph.module import as_graphopt_module
from graphopt.capture.guards import relax_size_one_guards
from graphopt.capture.hugging_face import plan_capture
from graphopt.graph.inputs import ExampleInputs, flat_outputs
from graphopt.graph.shapes import propagate

Capture = Literal["auto", "export", "fx"]
_HINT = (
    "What you can do: make control flow independent of tensor values (torch.where, torch.cond), give non-tensor "
    "arguments fixed values, or keep the offending module opaque with leaf_modules=[ItsClass] (fx fallback)."
)
# torch.export's words for an output it cannot return; control-flow advice does not apply to those
_OUTPUT_TYPE = re.compile(r"Found <class '([\w.]+)'> in output")
_OUTPUT_HINT = (
    "What you can do: the model returns a {kind} object, which a graph cannot return: return tensors, tuples, "
    "dicts or dataclasses instead{extra}."
)


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    capture: Capture = "auto",
    leaf_modules: Sequence[type] = (),
    dynamic: bool = True,
    copy_model: bool = True,
) -> fx.GraphModule:
    """Capture ``model`` called on ``example_inputs`` into the canonical ATen-level ``fx.GraphModule``.

    The model is captured in eval mode, on a deep copy unless ``copy_model=False`` (the caller's model is never
    changed). ``capture`` forces one route ("export" or "fx"); ``leaf_modules`` lists module types the fx fallback
    keeps opaque. The result is called exactly like the model and returns outputs of the same structure.
    """
    if not isinstance(model, nn.Module):
        raise InputError(
            f"graphopt expects a torch.nn.Module, got {type(model).__name__}; wrap plain functions in an nn.Module"
        )
    if capture not in ("auto", "export", "fx"):
        raise InputError(f"capture must be 'auto', 'export' or 'fx', not {capture!r}")
    inputs = ExampleInputs.of(example_inputs)
    model = copy.deepcopy(model) if copy_model else model
    model.eval()
    hf = plan_capture(model, inputs)  # HF models: no KV cache in the graph, masks stay optional (capture/hugging_face.py)
    reference = _run_eagerly(model, hf.reference if hf else inputs)
    inputs = hf.inputs if hf else inputs
    gm, route = _capture(model, inputs, capture, tuple(leaf_modules), dynamic)
    gm = as_graphopt_module(gm)  # .train()/.eval() and pickling work on the result (graph/module.py)
    gm = hf.install(gm) if hf else gm
    gm.meta["graphopt_capture"] = route
    gm.meta["graphopt_hf_model"] = hf is not None  # passes that keep HF configs describable read it
    start = time.perf_counter()
    outputs = propagate(gm, inputs)
    gm.meta["graphopt_real_run_seconds"] = time.perf_counter() - start  # the manager picks real or fake runs by it
    _check_reproduces(model, reference, outputs, route)
    return gm


def _run_eagerly(model: nn.Module, inputs: ExampleInputs) -> list[torch.Tensor]:
    """Run the model once; a failure here means the example inputs do not fit it, so say where."""
    with module_stack(model) as stack, torch.no_grad():
        try:
            out = inputs.call(model)
        except Exception as e:
            where = f"module `{stack[-1] or '<root>'}` ({type(model.get_submodule(stack[-1])).__name__})" \
                if stack else f"{type(model).__name__}.forward"
            raise InputError(
                f"example_inputs {inputs.describe()} do not fit the model: {where} raised "
                f"{short_reason(e)}. Pass inputs of the shapes and dtypes the model expects."
            ) from e
    return flat_outputs(out)


def _capture(model, inputs, capture: Capture, leaf_modules, dynamic: bool) -> tuple[fx.GraphModule, str]:
    errors: list[tuple[str, BaseException]] = []
    if capture in ("auto", "export"):
        for dyn in ((True, False) if dynamic else (False,)):
            try:
                return _export(model, inputs, dyn), "export" if dyn else "export-static"
            except Exception as e:  # export raises many unrelated types; all mean "try the next route"
                errors.append(("torch.export", e))
    if capture in ("auto", "fx"):
        try:
            return symbolic_capture(model, inputs, leaf_modules), "symbolic_trace"
        except Exception as e:
            errors.append(("torch.fx.symbolic_trace", e))
    raise _trace_error(model, errors) from errors[0][1]


def _export(model: nn.Module, inputs: ExampleInputs, dynamic: bool) -> fx.GraphModule:
    shapes = _dynamic_shapes(model, inputs) if dynamic else None
    # size-oblivious reasoning keeps a batch of 1 dynamic instead of specializing it (the 0/1 rule)
    with fx_config.patch(backed_size_oblivious=dynamic), _quiet_torch():
        ep = torch.export.export(model, inputs.args, inputs.kwargs, dynamic_shapes=shapes, strict=False)
    if dynamic:
        relax_size_one_guards(model, inputs, ep)  # a model's `if size > 1` need not keep size 1 out (capture/guards.py)
        _warn_narrow_batch(model, ep)
    gm = ep.module()
    # The input-structure pre-hook re-checks every call in Python (~10% of a small CNN's eager latency); the
    # shape guards compiled into the graph (_guards_fn) stay, and a wrong call still fails with a clear TypeError.
    gm.validate_inputs = False
    return gm


def _warn_narrow_batch(model: nn.Module, ep: torch.export.ExportedProgram) -> None:
    """torch.export sometimes proves the batch must exceed 1 (a layout decision); say so instead of failing later."""
    lowest = []
    for node in ep.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0], torch.SymInt):
            bound = ep.range_constraints.get(val.shape[0].node.expr)
            if bound is not None and int(bound.lower) > 1:
                lowest.append(int(bound.lower))
    if lowest:
        warnings.warn(
            f"graphopt.trace: torch.export captured {type(model).__name__} for batch sizes >= {max(lowest)} only; "
            "to serve a batch of 1, trace with example inputs of batch 1", GraphoptWarning, stacklevel=3)


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """torch logs whole graphs when an export attempt fails; we report the failure ourselves, once and clearly."""
    previous = logging.root.manager.disable  # torch's child loggers set their own levels: silence them all
    logging.disable(logging.CRITICAL)
    try:
        # export also print()s the partial graph of a failed attempt straight to stderr
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _dynamic_shapes(model: nn.Module, inputs: ExampleInputs) -> dict[str, Any]:
    """Dim 0 of every tensor input is the batch; dim 1 of integer inputs (token ids, masks) is the sequence."""

    def spec(x):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        dims = {0: Dim.AUTO}
        if x.dim() >= 2 and not x.dtype.is_floating_point:
            dims[1] = Dim.AUTO
        return dims

    bound = inspect.signature(model.forward).bind(*inputs.args, **inputs.kwargs)
    return {name: torch.utils._pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def _trace_error(model: nn.Module, errors: list[tuple[str, BaseException]]) -> TraceError:
    lines = [f"could not trace {type(model).__name__}:"]
    for route, err in errors[-2:] if len(errors) > 2 else errors:
        lines.append(f"  {route} failed in {locate(err, model).describe()}: {short_reason(err)}")
    lines.append(_hint(errors))
    return TraceError("\n".join(lines))


def _hint(errors: list[tuple[str, BaseException]]) -> str:
    found = next((m for _, e in errors if (m := _OUTPUT_TYPE.search(str(e)))), None)
    if found is None:
        return _HINT
    kind = found[1].rsplit(".", 1)[-1]
    cache = "Cache" in kind  # an HF KV cache: graphopt captures HF models without one, wrappers must ask for that
    return _OUTPUT_HINT.format(kind=kind, extra=" (for a Hugging Face model inside a wrapper, call it with "
                               "use_cache=False)" if cache else " (or register the type with torch.utils._pytree)")


def _check_reproduces(model: nn.Module, reference: list, outputs: list, route: str) -> None:
    got = [x for x in outputs if isinstance(x, torch.Tensor)]
    if len(got) != len(reference) or any(a.shape != b.shape for a, b in zip(got, reference)):
        raise TraceError(
            f"the {route} capture of {type(model).__name__} returns {len(got)} tensors of shapes "
            f"{[tuple(t.shape) for t in got]}, the model {[tuple(t.shape) for t in reference]}; "
            "the model's output probably depends on Python state the trace cannot see"
        )
    for i, (a, b) in enumerate(zip(got, reference)):
        try:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        except AssertionError as e:
            raise TraceError(
                f"the {route} capture of {type(model).__name__} does not reproduce output {i}: "
                f"{short_reason(e)}; check for randomness or Python-side state in forward"
            ) from e
