"""Example inputs: one normal form (args tuple, kwargs dict) and the helpers that call models with it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from graphopt.errors import InputError


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
