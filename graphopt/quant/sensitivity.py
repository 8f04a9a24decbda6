"""Sensitivity analysis for mixed precision: quantize one layer at a time and measure the output error.

For each quantized layer, every quantizer is switched off except that layer's own (its weight and the activations
it reads), the graph runs over a few calibration batches, and the outputs are compared with the float graph's as
SQNR in dB (signal power over error power; higher is better). The lowest SQNR is the most sensitive layer.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from graphopt.util import distributed
from graphopt.graph.inputs import ExampleInputs, flat_outputs
from graphopt.util.progress import progress
from graphopt.quant.quantizer import quantizers


def signal_and_noise(reference: list[torch.Tensor], test: list[torch.Tensor]) -> tuple[float, float]:
    """(sum ref^2, sum (ref - test)^2) over all float outputs."""
    signal = noise = 0.0
    for r, t in zip(reference, test):
        if not r.is_floating_point():
            continue
        r, t = r.detach().double(), t.detach().double()
        signal += float(r.pow(2).sum())
        noise += float((r - t).pow(2).sum())
    return signal, noise


def decibels(signal: float, noise: float) -> float:
    """10*log10(signal / noise); inf for no noise."""
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def sqnr_db(reference: list[torch.Tensor], test: list[torch.Tensor]) -> float:
    """10*log10(sum ref^2 / sum (ref - test)^2) over all float outputs; inf when they are equal."""
    return decibels(*signal_and_noise(reference, test))


def run_outputs(gm: fx.GraphModule, batches: list[ExampleInputs]) -> list[torch.Tensor]:
    """The flat outputs of ``gm`` over all batches (no grad), concatenated per output."""
    with torch.no_grad():
        return [t for b in batches for t in flat_outputs(b.call(gm))]


def with_states(gm: fx.GraphModule, states: dict[str, str]):
    """Context manager: set quantizer states by name, restore them on exit."""
    qs = quantizers(gm)

    class _Scope:
        def __enter__(self):
            self.saved = {n: q.state for n, q in qs.items()}
            for n, s in states.items():
                qs[n].state = s

        def __exit__(self, *exc):
            for n, s in self.saved.items():
                qs[n].state = s
            return False

    return _Scope()


def rank_layers(gm: fx.GraphModule, owners: dict[str, list[str]], batches: list[ExampleInputs]
                ) -> list[tuple[str, float]]:
    """[(layer, SQNR dB with only that layer quantized)], most sensitive (lowest SQNR) first."""
    names = list(quantizers(gm))
    with with_states(gm, {n: "off" for n in names}):
        reference = run_outputs(gm, batches)
    powers = []
    for layer, own in progress(list(owners.items()), "sensitivity"):
        states = {n: ("quantize" if n in own else "off") for n in names}
        with with_states(gm, states):
            powers.extend(signal_and_noise(reference, run_outputs(gm, batches)))
    powers = distributed.sum_numbers(powers)  # every rank's batches: one ranking on every rank
    ranking = [(layer, decibels(powers[2 * i], powers[2 * i + 1])) for i, layer in enumerate(owners)]
    ranking.sort(key=lambda item: item[1])
    return ranking


def choose_float(ranking: list[tuple[str, float]], keep: int, min_sqnr: float | None) -> list[str]:
    """Layers to keep in float: the ``keep`` most sensitive, plus any whose SQNR is below ``min_sqnr``."""
    chosen = [layer for layer, _ in ranking[:keep]]
    if min_sqnr is not None:
        chosen += [layer for layer, s in ranking if s < min_sqnr and layer not in chosen]
    return chosen
