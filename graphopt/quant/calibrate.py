"""Calibration: check the user's batches, run the graph over them with observers on, then freeze every scale.

Batches come from ``graphopt.optimize(..., calib_data=...)`` (``Context.calib_data``): an iterable of inputs
shaped like ``example_inputs`` (a tensor, a tuple of positional inputs, or a dict of keyword inputs), with any
batch size. They are checked against the example inputs *before* the graph is touched, so a bad batch leaves
nothing half-modified.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx

from graphopt.util import distributed
from graphopt.errors import InputError
from graphopt.graph.inputs import ExampleInputs
from graphopt.graph.inputs import check_batches as check_calibration_batches
from graphopt.util.progress import progress
from graphopt.quant.quantizer import quantizers


def check_batches(calib_data: Iterable | None, example: ExampleInputs) -> list[ExampleInputs]:
    """The batches as ExampleInputs, each checked against ``example`` (graphopt/graph/inputs.py), for fake-quant."""
    return check_calibration_batches(calib_data, example, needed_by="fake-quant", why=" to choose its scales")


def observe(gm: fx.GraphModule, batches: list[ExampleInputs], desc: str = "calibrating") -> None:
    """Run ``gm`` over the batches with every unfrozen quantizer observing (no grad)."""
    for q in quantizers(gm).values():
        if q.state == "observe" and q.observer is None:
            raise RuntimeError(f"quantizer of `{q.layer}` was frozen already")
    with torch.no_grad():
        for batch in progress(batches, desc):
            batch.call(gm)


def freeze(gm: fx.GraphModule) -> int:
    """Freeze every observing quantizer (its statistics merged over all ranks first, in a distributed job);
    returns how many. Raises InputError for a quantizer that saw nothing."""
    sync_observers(gm)
    frozen = 0
    for name, q in quantizers(gm).items():
        if q.state != "observe":
            continue
        try:
            q.freeze()
        except RuntimeError as e:
            raise InputError(f"{e} (`{name}`): the calibration batches never reach it; check calib_data") from e
        frozen += 1
    return frozen


def sync_observers(gm: fx.GraphModule) -> int:
    """In a torch.distributed job, merge every observing quantizer's statistics over all ranks (one collective
    for all of them); returns how many were merged (0 without a process group)."""
    if not distributed.active():
        return 0
    observing = {name: q for name, q in sorted(quantizers(gm).items()) if q.state == "observe" and q.observer}
    world = distributed.world_size()
    gathered = distributed.gather_objects({name: q.observer.state(world) for name, q in observing.items()})
    for name, q in observing.items():
        q.observer.merge([states[name] for states in gathered])
    return len(observing)


def calibrate(gm: fx.GraphModule, batches: list[ExampleInputs]) -> int:
    """Observe over ``batches`` then freeze; returns the number of quantizers frozen."""
    observe(gm, batches)
    return freeze(gm)


def as_batches(calib_data: Any, example_inputs: Any) -> list[ExampleInputs]:
    """Public form of check_batches for callers outside a pass."""
    return check_batches(calib_data, ExampleInputs.of(example_inputs))
