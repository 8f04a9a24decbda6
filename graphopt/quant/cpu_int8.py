"""Whether this CPU's int8 kernels saturate on full-range int8 weights, which decides fake-quant's weight range.

onnxruntime (MLAS) multiplies uint8 activations by int8 weights with ``vpmaddubsw`` on x86 CPUs without VNNI
(AVX2, AVX-512 without VNNI): it adds each pair of u8*s8 products into a saturating int16 before widening, so two
large products (255 * 127 * 2 = 64770 > 32767) clip. With VNNI (``vpdpbusd``) the four products go straight into
int32, and ARM's dot-product instructions do not saturate either. onnxruntime's quantizer answers this with
``reduce_range`` (7-bit weights, [-64, 63]: 255 * 63 * 2 = 32130 fits), and so does fake-quant's
``reduce_range=auto``: on such a CPU the weights are quantized to 7 bits, so that the exported int8 model computes
what the fake-quant graph computes on the machine it was quantized on. The environment variable
``GRAPHOPT_INT8_SATURATES`` (``1``/``0``) overrides the detection, e.g. to quantize on a VNNI machine for a
deployment CPU without it.
"""

from __future__ import annotations

import functools
import os
import platform

__all__ = ["int8_pairs_saturate", "resolve_reduce_range"]

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8")


def int8_pairs_saturate() -> bool:
    """True when onnxruntime's u8s8 kernels on this CPU add pairs of products in saturating int16."""
    forced = os.environ.get("GRAPHOPT_INT8_SATURATES")
    if forced is not None and forced.strip() in ("0", "1"):
        return forced.strip() == "1"
    return _detected()


@functools.lru_cache(maxsize=1)
def _detected() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False  # ARM sdot/udot and other architectures accumulate in int32
    flags = _cpu_flags()
    if flags is None:
        return False  # unknown (not Linux): keep full-range weights, the common case on current x86 servers
    return not any(f in flags for f in _VNNI_FLAGS)


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        return None
    return None


def resolve_reduce_range(option: bool | str) -> bool:
    """fake-quant's ``reduce_range`` option (True, False or "auto") as a bool for this machine."""
    if isinstance(option, bool):
        return option
    if str(option).lower() == "auto":
        return int8_pairs_saturate()
    raise ValueError(f"reduce_range must be true, false or 'auto', got {option!r}")
