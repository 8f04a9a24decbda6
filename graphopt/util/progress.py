"""One progress display for long work (calibration, scoring, fine-tuning): a single updating line on stderr.

It draws only when stderr is a terminal (or ``GRAPHOPT_PROGRESS=1``), so logs and test output stay clean;
``GRAPHOPT_PROGRESS=0`` turns it off everywhere. In a torch.distributed job only rank 0 draws.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

from graphopt.util.distributed import rank

T = TypeVar("T")


def enabled() -> bool:
    """Whether progress lines are drawn: never on ranks other than 0; then the env switch, else only on an
    interactive stderr."""
    if rank() != 0:
        return False
    flag = os.environ.get("GRAPHOPT_PROGRESS")
    if flag is not None:
        return flag not in ("", "0", "false", "no")
    return sys.stderr.isatty()


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Yield ``items`` unchanged while drawing ``desc: i/total [elapsed]`` on one line of stderr."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if not enabled():
        yield from items
        return
    start = last = time.perf_counter()
    done = 0
    for done, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if now - last > 0.1 or done == total:
            last = now
            of = f"/{total}" if total else ""
            sys.stderr.write(f"\r{desc}: {done}{of} [{now - start:.1f}s]")
            sys.stderr.flush()
    sys.stderr.write(f"\r{desc}: {done}{'/' + str(total) if total else ''} done in "
                     f"{time.perf_counter() - start:.1f}s\n")
    sys.stderr.flush()
