"""Shared by the bench scripts: provenance header lines, geometric means, and publishing a report."""

from __future__ import annotations

import datetime
import math
import os
import shlex
import sys
from pathlib import Path


def geomean(xs: list[float], empty: float = float("nan")) -> float:
    """Geometric mean (``empty`` for an empty list)."""
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else empty


def provenance(title: str, *lines: str) -> str:
    """A markdown title, then the command, date and CPU lines, then the script's own ``lines``."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown")
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    return "\n".join([f"# {title}", "", f"- command: `{command}`",
                      f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
                      f"- CPU: {cpu} ({os.cpu_count()} logical CPUs visible)", *lines])


def publish(report: str, out: str) -> None:
    """Print the report and write it to ``out`` (folders created as needed)."""
    print(report)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report)
