"""What ``make demo`` runs: optimize the built-in example model and show what each pass did."""

from __future__ import annotations

import torch

from graphopt.api import optimize
from graphopt.examples import example_model
from graphopt.metrics import paired_latency

DEMO_PASSES = ("remove-identity", "fuse", "dce")


def run_demo(repeats: int = 30, threads: int = 1) -> int:
    """Optimize ExampleNet, check it against the original, print the report and a latency comparison."""
    model, inputs = example_model()
    print(f"graphopt demo: {type(model).__name__} on input {tuple(inputs[0].shape)}, passes: {', '.join(DEMO_PASSES)}")
    result = optimize(model, list(DEMO_PASSES), inputs)
    print(result.report)
    x = torch.randn(8, 3, 32, 32)  # another batch size: the optimized graph keeps the batch dynamic
    with torch.no_grad():
        err = (result.module(x) - model(x)).abs().max().item()
    print(f"\nmax abs difference to the original model on a batch of 8: {err:.2e}")
    one = inputs[0][:1]
    lat = paired_latency({"original": lambda: model(one), "optimized": lambda: result.module(one)},
                         repeats=repeats, threads=threads)
    print(f"eager latency, batch 1, {threads} thread, median of {repeats} interleaved runs: "
          f"original {lat['original'].median_ms:.3f} ms, optimized {lat['optimized'].median_ms:.3f} ms "
          f"({lat['original'].median_ms / lat['optimized'].median_ms:.2f}x)")
    return 0 if err < 1e-4 else 1
