"""The process's resident memory as Linux reports it, for memory benchmarks and memory tests."""

from __future__ import annotations

from pathlib import Path

__all__ = ["resident_bytes"]


def resident_bytes() -> dict[str, int]:
    """``{"VmRSS": now, "VmHWM": peak}`` in bytes, from /proc/self/status (empty where there is none)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) * 1024
    return out
