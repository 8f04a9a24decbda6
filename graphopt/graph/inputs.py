"""Example inputs: one normal form (args tuple, kwargs dict) and the helpers that call models with it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from graphopt.errors import InputError, MissingDataError


@dataclass(frozen=True)
class ExampleInputs:
    """Positional and keyword inputs a model is called with: ``model(*args, **kwargs)``."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, example_inputs: Any) -> "ExampleInputs":
        """Accept a tensor, a tuple/list of positional inputs, a dict of keyword inputs, or an ExampleInputs."""
        if isinstance(example_inputs, ExampleInputs):
            return example_inputs
        if isinstance(example_inputs, torch.Tensor):
            return cls((example_inputs,), {})
        if isinstance(example_inputs, (tuple, list)):
            return cls(tuple(example_inputs), {})
        if isinstance(example_inputs, dict):
            bad = [k for k in example_inputs if not isinstance(k, str)]
            if bad:
                raise InputError(f"example_inputs dict keys must be argument names (str), got {bad[0]!r}")
            return cls((), dict(example_inputs))
        raise InputError(
            f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
            f"got {type(example_inputs).__name__}; e.g. example_inputs=(torch.randn(1, 3, 224, 224),)"
        )

    def call(self, fn) -> Any:
        """Call ``fn`` with these inputs."""
        return fn(*self.args, **self.kwargs)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor among the inputs, nested ones included."""
        leaves = torch.utils._pytree.tree_leaves((self.args, self.kwargs))
        return [x for x in leaves if isinstance(x, torch.Tensor)]

    def describe(self) -> str:
        """Short text of the input shapes, for error messages."""
        def one(x):
            return f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" if isinstance(x, torch.Tensor) else repr(x)
        parts = [one(a) for a in self.args] + [f"{k}={one(v)}" for k, v in self.kwargs.items()]
        return "(" + ", ".join(parts) + ")"


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output, in a stable order (tensor, tuple, dict, HF ModelOutput)."""
    if hasattr(out, "to_tuple") and callable(out.to_tuple):  # HF ModelOutput: its tuple drops None fields
        out = out.to_tuple()
    return [x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def check_batches(calib_data: Iterable | None, example: ExampleInputs, *, needed_by: str, why: str = "",
                  pipeline: str | None = None) -> list[ExampleInputs]:
    """The calibration batches as ExampleInputs, each checked against ``example``; InputError naming the first bad
    one. ``needed_by`` names the pass in the messages (``why`` says what for; ``pipeline`` is the pass string the
    remedy shows, default ``needed_by``); no data at all is a MissingDataError (the CLI names its --calib flag)."""
    problem = f"{needed_by} needs calibration data{why}"
    remedy = (f"pass graphopt.optimize(model, '{pipeline or needed_by}', example_inputs, calib_data=batches) with an "
              "iterable of input batches shaped like example_inputs")
    if calib_data is None:
        raise MissingDataError(problem, remedy, keyword="calib_data")
    if isinstance(calib_data, (torch.Tensor, dict)):
        raise InputError(
            f"calib_data must be an iterable of batches, got a single {type(calib_data).__name__}; "
            "wrap it in a list: calib_data=[batch]"
        )
    batches = [ExampleInputs.of(b) for b in calib_data]
    if not batches:
        raise InputError(f"calib_data is empty; {problem}: {remedy}")
    for i, batch in enumerate(batches):
        _check_like(i, batch, example)
    return batches


def _check_like(index: int, batch: ExampleInputs, example: ExampleInputs) -> None:
    want = dict(_named_tensors(example))
    got = dict(_named_tensors(batch))
    if set(want) != set(got):
        raise InputError(
            f"calibration batch {index} has inputs {sorted(got)} but the model was traced with {sorted(want)}; "
            "give every batch the same structure as example_inputs"
        )
    for name, w in want.items():
        g = got[name]
        free = {0} | ({1} if w.dim() >= 2 and not w.dtype.is_floating_point else set())  # batch (and sequence)
        same = g.dim() == w.dim() and all(g.shape[d] == w.shape[d] for d in range(w.dim()) if d not in free)
        if not same or g.dtype != w.dtype:
            raise InputError(
                f"calibration batch {index}: input {name} is {tuple(g.shape)} {str(g.dtype).removeprefix('torch.')}, "
                f"but the model was traced with {tuple(w.shape)} {str(w.dtype).removeprefix('torch.')}; only the batch "
                "dimension may differ"
            )


def _named_tensors(inputs: ExampleInputs) -> list[tuple[str, torch.Tensor]]:
    flat, _ = torch.utils._pytree.tree_flatten_with_path((inputs.args, inputs.kwargs))
    return [(torch.utils._pytree.keystr(path), x) for path, x in flat if isinstance(x, torch.Tensor)]
