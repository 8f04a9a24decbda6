"""Helpers shared by tests: calling models on example inputs, new batch sizes, and output comparison."""

from __future__ import annotations

import torch

from graphopt.graph.inputs import ExampleInputs, flat_outputs


def outputs(module, example_inputs) -> list[torch.Tensor]:
    """The flat output tensors of ``module`` called on ``example_inputs`` (no grad)."""
    with torch.no_grad():
        return flat_outputs(ExampleInputs.of(example_inputs).call(module))


def rebatch(example_inputs, batch: int, seed: int = 1):
    """The same inputs with another batch size: fresh random floats, integer rows repeated (token ids, masks)."""
    gen = torch.Generator().manual_seed(seed)

    def one(x):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return x
        if x.is_floating_point():
            return torch.randn((batch, *x.shape[1:]), generator=gen, dtype=x.dtype)
        return x[torch.arange(batch) % x.shape[0]]

    inputs = ExampleInputs.of(example_inputs)
    args = tuple(one(a) for a in inputs.args)
    kwargs = {k: one(v) for k, v in inputs.kwargs.items()}
    return kwargs if isinstance(example_inputs, dict) else args


def assert_same_outputs(got_module, want_module, example_inputs, rtol=1e-4, atol=1e-4) -> None:
    """Both modules give the same output tensors on ``example_inputs``."""
    got, want = outputs(got_module, example_inputs), outputs(want_module, example_inputs)
    assert len(got) == len(want), f"{len(got)} outputs vs {len(want)}"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


@torch.library.custom_op("graphopt_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    """A custom op graphopt knows nothing about: no dependency rule (until a test registers one), no ONNX
    translation. Defined once here: torch refuses a second definition of the same op in one process."""
    return x * 2


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class WithCustomOp(torch.nn.Module):
    """Two 1x1 convs with ``mystery`` (an op without a dependency rule) on the channels between them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 1)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.b(mystery(self.a(x))).mean((2, 3)))
