"""Working inside a ``torch.distributed`` job: statistics from every rank's data, one plan on every rank.

When a process group is initialized with more than one rank, every data-driven statistic graphopt gathers
(Taylor saliency, layer-removal scores, activation zero counts, quantization observer ranges and samples,
mixed-precision sensitivities) is combined over all ranks before anything is decided, so each rank computes the
identical plan and identical scales from the data of all ranks. Without a process group nothing changes.

Sums are reduced onto rank 0 and broadcast back rather than all-reduced: an all-reduce may add in a different
order on different ranks, and a last-bit difference in a score can flip a pruning decision. Collectives run on
the default group (``torch.distributed.group.WORLD``) in a fixed order, so every rank must run the same passes
on the same model (``check_same_weights`` says which parameter differs when they do not).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from graphopt.errors import InputError

__all__ = ["active", "rank", "world_size", "local_only", "sum_tensors", "sum_numbers", "max_numbers",
           "gather_objects", "broadcast_buffers", "check_same_weights", "shard"]

_local = threading.local()


def active() -> bool:
    """True inside an initialized process group of two or more ranks (and outside ``local_only``)."""
    if getattr(_local, "off", False) or not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Inside this block graphopt uses this rank's data alone, as if no process group existed (for debugging
    and comparisons; plans may then differ between ranks)."""
    before = getattr(_local, "off", False)
    _local.off = True
    try:
        yield
    finally:
        _local.off = before


def _comm_device() -> torch.device:
    """Where collective buffers live: NCCL reduces CUDA tensors only, the other backends CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce_then_broadcast(flat: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    dist.reduce(flat, dst=0, op=op)
    dist.broadcast(flat, src=0)
    return flat


def sum_tensors(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The element-wise sum of each tensor over all ranks (new tensors; the inputs when not ``active()``).

    One collective per dtype for the whole list, so many small statistics cost one round trip."""
    if not active() or not tensors:
        return list(tensors)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    device = _comm_device()
    for dtype, idx in sorted(by_dtype.items(), key=lambda item: str(item[0])):  # same order on every rank
        flat = torch.cat([tensors[i].detach().reshape(-1).to(device) for i in idx])
        flat = _reduce_then_broadcast(flat, dist.ReduceOp.SUM)
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[offset:offset + n].reshape(tensors[i].shape).to(tensors[i].device)
            offset += n
    return out  # type: ignore[return-value]


def _numbers(values: Sequence[float], op: dist.ReduceOp) -> list[float]:
    if not active() or not values:
        return [float(v) for v in values]
    flat = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    return _reduce_then_broadcast(flat, op).tolist()


def sum_numbers(values: Sequence[float]) -> list[float]:
    """Each number summed over all ranks (float64: counts stay exact up to 2**53)."""
    return _numbers(values, dist.ReduceOp.SUM)


def max_numbers(values: Sequence[float]) -> list[float]:
    """Each number's maximum over all ranks."""
    return _numbers(values, dist.ReduceOp.MAX)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` when not ``active()``); tensors should be on the CPU."""
    if not active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def shard(items: Any) -> Any:
    """This rank's share of ``items``, anything sliceable (a list of batches, the rows of a tensor): every
    ``world_size()``-th item from ``rank()``; ``items`` itself when not ``active()``."""
    if not active():
        return items
    return items[rank()::world_size()]


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics, quantizer scales) into every rank's ``module``: what
    DistributedDataParallel does before each forward, done once more after the last one."""
    if not active():
        return
    device = _comm_device()
    with torch.no_grad():
        for _, buf in sorted(module.named_buffers()):
            moved = buf.to(device)
            dist.broadcast(moved, src=0)
            if moved is not buf:
                buf.copy_(moved)


def check_same_weights(module: nn.Module) -> None:
    """InputError naming the first parameter or buffer whose values differ from rank 0's.

    Ranks that start from different weights would compute different plans (and different scales) even with
    synchronized statistics; compare a per-tensor checksum (float64 sum and sum of squares) once, up front."""
    if not active():
        return
    named = [(n, t) for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_floating_point()]
    sums = torch.tensor([[float(t.detach().double().sum()), float(t.detach().double().pow(2).sum())]
                         for _, t in named], dtype=torch.float64).reshape(-1, 2)
    shapes = [tuple(t.shape) for _, t in named]
    mine = (rank(), [n for n, _ in named], shapes, sums)
    for other_rank, names, other_shapes, other_sums in gather_objects(mine):
        if names != mine[1] or other_shapes != shapes:
            raise InputError(
                f"rank {other_rank} holds a model with different parameters than rank {rank()}; every rank must "
                "build the same model before graphopt.optimize")
        differs = (other_sums != sums).any(dim=1).nonzero()
        if len(differs):
            name = names[int(differs[0])]
            raise InputError(
                f"rank {other_rank} and rank {rank()} hold different values of `{name}`; every rank must start "
                "from the same weights (load one checkpoint everywhere, or seed before building the model), "
                "else each computes a different plan")
