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
from graphopt.errors import InputError, MissingDataError
from graphopt.graph.inputs import ExampleInputs
from graphopt.util.progress import progress
from graphopt.quant.quantizer import quantizers

NO_DATA_PROBLEM = "fake-quant needs calibration data to choose its scales"
NO_DATA_REMEDY = ("pass graphopt.optimize(model, 'fake-quant', example_inputs, calib_data=batches) with an iterable "
                  "of input batches shaped like example_inputs")
NO_DATA = f"{NO_DATA_PROBLEM}: {NO_DATA_REMEDY}"


def check_batches(calib_data: Iterable | None, example: ExampleInputs) -> list[ExampleInputs]:
    """The batches as ExampleInputs, each checked against ``example``; InputError naming the first bad one."""
    if calib_data is None:  # MissingDataError: the CLI names its --calib flag instead of calib_data=
        raise MissingDataError(NO_DATA_PROBLEM, NO_DATA_REMEDY, keyword="calib_data")
    if isinstance(calib_data, (torch.Tensor, dict)):
        raise InputError(
            f"calib_data must be an iterable of batches, got a single {type(calib_data).__name__}; "
            "wrap it in a list: calib_data=[batch]"
        )
    batches = [ExampleInputs.of(b) for b in calib_data]
    if not batches:
        raise InputError(f"calib_data is empty; {NO_DATA}")
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
