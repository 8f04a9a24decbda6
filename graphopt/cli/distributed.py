"""``graphopt optimize`` launched by torchrun: one process per rank, each calibrating and fine-tuning on its share.

torchrun sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``; the command then joins a gloo process group (it runs the
model on the CPU) and every rank computes the same plan from all ranks' data (graphopt.util.distributed). A data path
holding ``{rank}`` names one file per rank (``calib-{rank}.pt``: nothing is read twice); any other file is read by
every rank and split between them. Only rank 0 writes the output directory and prints the report.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch.distributed as dist

from graphopt.util import distributed


def launched_by_torchrun() -> bool:
    """True when torchrun (or any launcher setting its variables) started this process as one of several."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """The default process group from torchrun's environment for the duration of a command (none otherwise, or
    when the caller already made one)."""
    if not launched_by_torchrun() or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank_path(spec: str | None) -> str | None:
    """``spec`` with ``{rank}`` replaced by this rank."""
    return spec.replace("{rank}", str(distributed.rank())) if spec else spec


def per_rank(spec: str | None) -> bool:
    """Whether ``spec`` names one file per rank."""
    return bool(spec) and "{rank}" in spec
