"""Model size and cost: parameters, MACs, bytes, and a CPU latency helper for bench/ and reports."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

import graphopt.kernels  # noqa: F401  (registers torch.ops.graphopt.*, counted below)
from graphopt.graph.inputs import ExampleInputs


@register_flop_formula(torch.ops.graphopt.quant_linear)
def _quant_linear_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    """A quantized linear does every multiply-add of the dense one (in integers or floats); x (..., in)."""
    rows = 1
    for d in x_shape[:-1]:
        rows *= d
    return 2 * rows * x_shape[-1] * out_shape[-1]


def count_params(module: nn.Module) -> int:
    """Number of parameter elements, each shared tensor counted once."""
    return sum(p.numel() for p in module.parameters())


def model_bytes(module: nn.Module) -> int:
    """Bytes held by parameters and buffers (what a checkpoint of the weights weighs)."""
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@contextmanager
def counting_macs() -> Iterator[Callable[[], int]]:
    """Count multiply-accumulates of the torch ops run inside the block; yields a getter of the total."""
    counter = FlopCounterMode(display=False)
    with counter:
        yield lambda: counter.get_total_flops() // 2


@torch.no_grad()
def count_macs(module: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass (convs, matmuls, attention), from torch's FLOP counter."""
    with counting_macs() as macs:
        ExampleInputs.of(example_inputs).call(module)
    return macs()


@dataclass(frozen=True)
class Latency:
    """Median and spread of repeated timings, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int


@contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """Pin torch's intra-op thread count for the block, then restore it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _summary(samples: list[float]) -> Latency:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return Latency(statistics.median(ordered) * 1e3, pick(0.1) * 1e3, pick(0.9) * 1e3, len(ordered))


@torch.no_grad()
def measure_latency(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 20, threads: int = 1) -> Latency:
    """Time ``fn()`` after ``warmup`` calls: median of ``repeats`` runs with a fixed thread count."""
    return paired_latency({"_": fn}, warmup=warmup, repeats=repeats, threads=threads)["_"]


@torch.no_grad()
def paired_latency(
    fns: Mapping[str, Callable[[], Any]], *, warmup: int = 3, repeats: int = 20, threads: int = 1
) -> dict[str, Latency]:
    """Time several callables interleaved round by round, so machine noise hits them alike; medians per name."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with fixed_threads(threads):
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: _summary(s) for name, s in samples.items()}
